"""One virtual e-bike or e-motorcycle: a deterministic, seeded state model that every emulator of it reads.

`VehicleModel.state_at(t)` is a pure function of `t` (random access, no stepping), so the GNSS emulator, the
BMS and controller emulators and the tests all see the same vehicle without sharing mutable state, and a test can
ask for any instant of a two-hour ride without simulating the hour before it.

The ride is a repeating cycle of legs — accelerate, cruise, brake, wait at a light — drawn once from the seed.
Speed is therefore piecewise linear in time and distance piecewise quadratic, both closed-form. Temperatures
depend on the recent load, which is approximated by the mean speed over the last two minutes: two distance
lookups instead of integrating a thermal model.

A `Variant` holds what differs between vehicle kinds — pack (cells in series, capacity, resistance), controller
current, wheel, speed range and limiter, mass and drag — and the device emulators take their cell count, limits
and configuration from the model's variant: "ebike48" (13S NMC "48 V", 16-inch wheel, the default) and
"emoto72" (20S NMC "72 V", 17-inch wheel, 60 km/h limiter).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass

from protocol.catalogue import Catalogue, SignalType, load_catalogue
from simulators.route import Route

# The e-bike ("ebike48") values, kept as module constants for callers that predate variants.
WHEEL_CIRCUMFERENCE_M = 1.35  # 16-inch e-bike tyre; the hub motor turns with the wheel, so motor rpm = wheel rpm
MAX_SPEED_KMH = 45.0
CELLS_IN_SERIES = 13  # the common "48 V" pack: 13s li-ion, 41.6 V empty .. 54.6 V full
MAX_PACK_VOLTAGE_V = 4.2 * CELLS_IN_SERIES
PACK_RESISTANCE_OHM = 0.12
CONTROLLER_MAX_CURRENT_A = 30.0
IDLE_CURRENT_A = 0.3  # lights, controller and the telematics board itself
CELL_FULL_V = 4.2
SWAP_AT_SOC_PCT = 10.0  # riders swap batteries at a cabinet rather than run flat; keeps endless rides bounded
SWAPPED_SOC_PCT = 95.0
THERMAL_WINDOW_S = 120.0

_G = 9.81
_AIR_DENSITY = 1.2
_INCH_M = 0.0254


@dataclass(frozen=True, slots=True)
class Variant:
    """What differs between vehicle kinds. Ranges are (low, high) drawn per vehicle from its seed."""

    name: str
    cells_in_series: int
    nominal_ah: float
    temperature_probes: int
    barcode_prefix: str
    pack_resistance_ohm: float
    controller_max_current_a: float
    idle_current_a: float
    wheel_inch: float  # as configured in the controller
    wheel_circumference_m: float  # the model's: motor rpm = wheel rpm (hub motor)
    pole_pairs: int
    speed_limit_kmh: float  # configured in the controller
    max_speed_kmh: float  # the model never reports more
    cruise_kmh: tuple[float, float]
    accel_ms2: tuple[float, float]
    decel_ms2: tuple[float, float]
    soc_per_km: tuple[float, float]  # % of the pack per km
    mass_kg: float  # vehicle + rider + cargo
    crr: float
    cda_m2: float
    drive_efficiency: float
    regen_fraction: float  # share of braking power recovered (only while braking)

    @property
    def max_pack_voltage_v(self) -> float:
        return CELL_FULL_V * self.cells_in_series


VARIANTS: dict[str, Variant] = {
    # The common Chinese "48 V" e-bike: 13S NMC 24 Ah (1.15 kWh), 30 A controller, 16-inch hub-motor wheel.
    # Riders in Chongqing ride faster than the 25 km/h the controller is configured for; the model keeps
    # the speeds it always had (limiters are routinely bypassed, which the hazard rules look for).
    "ebike48": Variant(
        name="ebike48",
        cells_in_series=CELLS_IN_SERIES,
        nominal_ah=24.0,
        temperature_probes=2,
        barcode_prefix="ZL48V24AH",
        pack_resistance_ohm=PACK_RESISTANCE_OHM,
        controller_max_current_a=CONTROLLER_MAX_CURRENT_A,
        idle_current_a=IDLE_CURRENT_A,
        wheel_inch=16.0,
        wheel_circumference_m=WHEEL_CIRCUMFERENCE_M,
        pole_pairs=23,
        speed_limit_kmh=25.0,
        max_speed_kmh=MAX_SPEED_KMH,
        cruise_kmh=(18.0, 42.0),
        accel_ms2=(0.9, 1.6),
        decel_ms2=(1.4, 2.4),
        soc_per_km=(1.0, 1.3),  # ≈ 12-15 Wh/km from a 1.15 kWh pack
        mass_kg=125.0,
        crr=0.012,
        cda_m2=0.6,
        drive_efficiency=0.8,
        regen_fraction=0.25,  # mild regen ("EABS") on e-bike hub controllers
    ),
    # A "72 V" electric motorcycle: 20S NMC 40 Ah (2.9 kWh, 66-84 V), 80 A controller, 17-inch wheel with a
    # hub motor, 60 km/h limiter, heavier and draggier than the e-bike.
    "emoto72": Variant(
        name="emoto72",
        cells_in_series=20,
        nominal_ah=40.0,
        temperature_probes=4,
        barcode_prefix="ZL72V40AH",
        pack_resistance_ohm=0.10,
        controller_max_current_a=80.0,
        idle_current_a=0.6,
        wheel_inch=17.0,
        wheel_circumference_m=math.pi * 17.0 * _INCH_M,
        pole_pairs=16,
        speed_limit_kmh=60.0,
        max_speed_kmh=60.0,
        cruise_kmh=(28.0, 58.0),
        accel_ms2=(1.2, 2.2),
        decel_ms2=(1.8, 3.0),
        soc_per_km=(1.2, 1.6),  # ≈ 35-46 Wh/km from a 2.9 kWh pack
        mass_kg=190.0,
        crr=0.014,
        cda_m2=0.75,
        drive_efficiency=0.85,
        regen_fraction=0.3,
    ),
}

# Open-circuit voltage of one li-ion cell against state of charge (%), piecewise linear.
_OCV_CURVE: tuple[tuple[float, float], ...] = (
    (0.0, 3.30),
    (5.0, 3.45),
    (10.0, 3.55),
    (20.0, 3.65),
    (40.0, 3.75),
    (60.0, 3.87),
    (80.0, 4.02),
    (100.0, 4.20),
)


@dataclass(frozen=True, slots=True)
class VehicleState:
    t: float
    lat: float
    lon: float
    altitude_m: float
    heading_deg: float
    speed_kmh: float
    motor_rpm: int
    motor_temp_c: float
    controller_temp_c: float
    soc_pct: float
    pack_voltage_v: float
    pack_current_a: float  # positive into the battery (charging), negative while riding
    battery_temp_max_c: float
    soh_pct: float
    distance_m: float  # ridden since start_time


@dataclass(frozen=True, slots=True)
class _Leg:
    """Accelerate to `v` m/s, cruise, brake to a stop, wait. Times are offsets within the drive cycle."""

    t0: float
    s0: float
    v: float
    accel: float
    t_accel: float
    t_cruise: float
    decel: float
    t_decel: float
    t_stop: float

    @property
    def duration(self) -> float:
        return self.t_accel + self.t_cruise + self.t_decel + self.t_stop

    @property
    def distance(self) -> float:
        return self.v * (self.t_accel / 2 + self.t_cruise + self.t_decel / 2)

    def kinematics(self, dt: float) -> tuple[float, float, float]:
        """(distance since the leg began, speed, acceleration) at `dt` seconds into the leg."""
        if dt < self.t_accel:
            return 0.5 * self.accel * dt * dt, self.accel * dt, self.accel
        s = 0.5 * self.v * self.t_accel
        dt -= self.t_accel
        if dt < self.t_cruise:
            return s + self.v * dt, self.v, 0.0
        s += self.v * self.t_cruise
        dt -= self.t_cruise
        if dt < self.t_decel:
            return s + self.v * dt - 0.5 * self.decel * dt * dt, self.v - self.decel * dt, -self.decel
        return s + 0.5 * self.v * self.t_decel, 0.0, 0.0


def _draw_legs(rng: random.Random, count: int, variant: Variant) -> list[_Leg]:
    legs: list[_Leg] = []
    t = s = 0.0
    for _ in range(count):
        v = rng.uniform(*variant.cruise_kmh) / 3.6
        accel = rng.uniform(*variant.accel_ms2)
        decel = rng.uniform(*variant.decel_ms2)
        # One stop in five is a rolling slow-down rather than a red light; modelled as a zero-length wait.
        t_stop = 0.0 if rng.random() < 0.2 else rng.uniform(12.0, 75.0)
        leg = _Leg(
            t0=t,
            s0=s,
            v=v,
            accel=accel,
            t_accel=v / accel,
            t_cruise=rng.uniform(15.0, 140.0),
            decel=decel,
            t_decel=v / decel,
            t_stop=t_stop,
        )
        legs.append(leg)
        t += leg.duration
        s += leg.distance
    return legs


def _cell_ocv(soc_pct: float) -> float:
    soc = min(100.0, max(0.0, soc_pct))
    for (s0, v0), (s1, v1) in itertools.pairwise(_OCV_CURVE):
        if soc <= s1:
            return v0 + (v1 - v0) * (soc - s0) / (s1 - s0)
    return _OCV_CURVE[-1][1]


class VehicleModel:
    """The ground truth of one vehicle riding `route` from `start_time` (unix seconds), drawn from `seed`.

    `variant` names an entry of `VARIANTS` (or is a `Variant`); the default e-bike is what the model always was.
    """

    LEGS_PER_CYCLE = 32

    def __init__(self, route: Route, seed: int, start_time: float, variant: str | Variant = "ebike48") -> None:
        if isinstance(variant, str):
            if variant not in VARIANTS:
                raise ValueError(f"unknown vehicle variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
            variant = VARIANTS[variant]
        self.variant = variant
        self.route = route
        self.seed = seed
        self.start_time = start_time
        rng = random.Random(seed)
        self._legs = _draw_legs(rng, self.LEGS_PER_CYCLE, variant)
        self._leg_starts = [leg.t0 for leg in self._legs]
        self._cycle_s = self._legs[-1].t0 + self._legs[-1].duration
        self._cycle_m = self._legs[-1].s0 + self._legs[-1].distance
        self._start_soc = rng.uniform(55.0, SWAPPED_SOC_PCT)
        self._soc_per_km = rng.uniform(*variant.soc_per_km)
        self._soh = rng.uniform(86.0, 99.5)
        self._ambient_c = rng.uniform(12.0, 34.0)
        self._catalogue = load_catalogue()

    def _kinematics(self, elapsed: float) -> tuple[float, float, float]:
        """(distance m, speed m/s, acceleration m/s²) after `elapsed` seconds of riding."""
        if elapsed <= 0.0:
            return 0.0, 0.0, 0.0
        cycles, r = divmod(elapsed, self._cycle_s)
        leg = self._legs[bisect.bisect_right(self._leg_starts, r) - 1]
        ds, v, a = leg.kinematics(r - leg.t0)
        return cycles * self._cycle_m + leg.s0 + ds, v, a

    def _soc(self, distance_m: float) -> float:
        window = SWAPPED_SOC_PCT - SWAP_AT_SOC_PCT
        used = (SWAPPED_SOC_PCT - self._start_soc) + distance_m / 1000.0 * self._soc_per_km
        return SWAPPED_SOC_PCT - used % window

    def state_at(self, t: float) -> VehicleState:
        elapsed = t - self.start_time
        s, v, a = self._kinematics(elapsed)
        point = self.route.position_at(s)

        recent_s, _, _ = self._kinematics(elapsed - THERMAL_WINDOW_S)
        load_kmh = max(0.0, s - recent_s) / THERMAL_WINDOW_S * 3.6
        warm = 1.0 - math.exp(-max(0.0, elapsed) / 900.0)
        warm_slow = 1.0 - math.exp(-max(0.0, elapsed) / 2400.0)

        vt = self.variant
        soc = self._soc(s)
        ocv = _cell_ocv(soc) * vt.cells_in_series
        m = vt.mass_kg
        p_mech = (m * a + m * _G * (vt.crr + point.grade) + 0.5 * _AIR_DENSITY * vt.cda_m2 * v * v) * v
        if p_mech >= 0.0:
            p_elec = p_mech / vt.drive_efficiency
        elif a < 0.0:
            p_elec = p_mech * vt.regen_fraction
        else:
            p_elec = 0.0  # rolling downhill the rider shuts the throttle and rides the brakes: no regen
        # Discharge current I (A, positive out of the pack) solves P = (OCV - R·I)·I; take the small root.
        r = vt.pack_resistance_ohm
        disc = max(0.0, ocv * ocv - 4.0 * r * p_elec)
        i_out = (ocv - math.sqrt(disc)) / (2.0 * r) + vt.idle_current_a
        i_out = max(-vt.controller_max_current_a / 3, min(vt.controller_max_current_a, i_out))
        # The BMS caps regen so the terminal voltage never exceeds the full-charge voltage.
        i_out = max(i_out, -max(0.0, vt.max_pack_voltage_v - ocv) / r)
        voltage = ocv - r * i_out

        speed_kmh = min(vt.max_speed_kmh, v * 3.6)
        return VehicleState(
            t=t,
            lat=point.lat,
            lon=point.lon,
            altitude_m=point.alt_m,
            heading_deg=point.heading_deg,
            speed_kmh=speed_kmh,
            motor_rpm=round(v / vt.wheel_circumference_m * 60.0),
            motor_temp_c=self._ambient_c + warm * (6.0 + 1.1 * load_kmh),
            controller_temp_c=self._ambient_c + warm * (3.0 + 0.6 * load_kmh),
            soc_pct=soc,
            pack_voltage_v=voltage,
            pack_current_a=-i_out,
            battery_temp_max_c=self._ambient_c + warm_slow * (1.5 + 0.25 * load_kmh),
            soh_pct=self._soh,
            distance_m=s,
        )

    def signals(self, state: VehicleState) -> dict[str, float | int | bool]:
        """Controller and BMS values of `state` under their catalogue names, at catalogue resolution."""
        raw: dict[str, float | int | bool] = {
            "Speed": state.speed_kmh,
            "Powertrain.ElectricMotor.Speed": state.motor_rpm,
            "Powertrain.ElectricMotor.Temperature": state.motor_temp_c,
            "Powertrain.ElectricMotor.ControllerTemperature": state.controller_temp_c,
            "Powertrain.TractionBattery.StateOfCharge": state.soc_pct,
            "Powertrain.TractionBattery.CurrentVoltage": state.pack_voltage_v,
            "Powertrain.TractionBattery.CurrentCurrent": state.pack_current_a,
            "Powertrain.TractionBattery.Temperature.Max": state.battery_temp_max_c,
            "Powertrain.TractionBattery.StateOfHealth": state.soh_pct,
        }
        return {name: quantize(self._catalogue, name, value) for name, value in raw.items()}


def quantize(catalogue: Catalogue, name: str, value: float | int | bool) -> float | int | bool:
    """Clamp `value` into the signal's range and round it to the signal's resolution."""
    sig = catalogue.by_name(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if sig.min is not None:
        value = max(sig.min, value)
    if sig.max is not None:
        value = min(sig.max, value)
    if sig.type is SignalType.INT:
        return round(value)
    # round() can land on -0.0; a plain 0.0 keeps the stored value and its signature bytes unremarkable.
    return round(float(value), sig.decimals) + 0.0


class SyntheticPowertrain:
    """The stand-in for the BMS and motor controller until their device protocols exist: reads the model."""

    def __init__(self, model: VehicleModel, devices: frozenset[str] = frozenset({"bms", "controller"})) -> None:
        # `devices` picks which catalogue sources to stand in for, e.g. only the controller when a BMS emulator
        # speaks the real protocol on a pty.
        self.model = model
        catalogue = load_catalogue()
        self._names = frozenset(s.name for s in catalogue if s.source in devices)

    def read(self, now: float) -> dict[str, float | int | bool]:
        values = self.model.signals(self.model.state_at(now))
        return {k: v for k, v in values.items() if k in self._names}
