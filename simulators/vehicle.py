"""One virtual e-bike or e-motorcycle and its rider: a deterministic, seeded model that every emulator of it reads.

`VehicleModel.state_at(t)` is a pure function of `t` (random access, no stepping), so the GNSS emulator, the
BMS and controller emulators and the tests all see the same vehicle without sharing mutable state, and a test can
ask for any instant of a three-day ride without simulating the time before it step by step.

**The rider's day** is a plan drawn from the seed, day by day: a courier (the default — Chongqing's delivery
riders are most of its e-bike traffic) rides two shifts with delivery stops, takes a break (parked and locked,
sometimes charging at a station) and charges at home overnight — sometimes in the stairwell, where it is
forbidden; a commuter rides to work, parks there all day and rides back. A courier whose pack runs low swaps it
at a cabinet for a charged one of the packs bound to the vehicle; a commuter stops to charge. The plan is
realised as a chain of *activities* (ride, park, charge, swap), each closed-form in time, so an instant costs one
bisect into the chain, which is extended lazily.

**Motion.** A ride is a sequence of legs — accelerate, cruise, brake, wait — from one stop to the next: red lights
at the route's signalised junctions (simulators/roads.py), crossings and hold-ups in between, delivery stops.
The cruise speed is the rider's wish capped by the road class, rush-hour congestion and the controller's
speed limiter (25 km/h on an e-bike, GB 17761-2018). Speed is piecewise linear in time and distance piecewise
quadratic, both closed-form.

**Energy.** Each leg's traction and regenerated energy on the flat is closed-form (inertia, rolling resistance,
aerodynamic drag); hills add the climbing work from the route's cumulative ascent table. Charge drawn is energy
over the pack's nominal voltage plus the idle draw, so SOC is a table look-up too. The instantaneous current
solves P = (OCV − R·I)·I for the instantaneous power, within the controller's current limit and its low-voltage
cut-off.

**Heat.** Pack, motor and controller are first-order thermal bodies. Their heat input over the recent past is
taken as constant over a few windows of doubling length (the mean current over a window is a difference of the
cumulative charge throughput), and `battery.first_order_rise` adds up their exact responses.

**Battery** (simulators/battery.py): OCV–SOC curve per chemistry (NMC or LFP), resistance rising in the cold,
near empty and with age, SOH falling with cycles and calendar time, per-cell manufacturing spread, CC-CV
charging.

**Forced segments.** `script` places activities at given times — a ride at a tampered speed limit, a vehicle
parked and locked, a crash, a swap to a foreign pack. The natural plan yields around them: a ride that would
overlap one stops before it, and the plan resumes after it. simulators/faults.py builds its fault scenarios from
these and from modifiers of the resulting state.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol.catalogue import Catalogue, SignalType, load_catalogue
from simulators.battery import CHEMISTRIES, ChargeCurve, Charger, Chemistry, Pack, first_order_rise, resistance_factor
from simulators.roads import RouteProfile, congestion_factor
from simulators.route import Route

# The e-bike ("ebike48") values, kept as module constants for callers that predate variants.
WHEEL_CIRCUMFERENCE_M = 1.35  # 16-inch e-bike tyre; the hub motor turns with the wheel, so motor rpm = wheel rpm
MAX_SPEED_KMH = 25.0  # GB 17761-2018: an e-bike's maximum design speed
CELLS_IN_SERIES = 13  # the common "48 V" pack: 13s li-ion, 41.6 V empty .. 54.6 V full
MAX_PACK_VOLTAGE_V = 4.2 * CELLS_IN_SERIES
PACK_RESISTANCE_OHM = 0.12
CONTROLLER_MAX_CURRENT_A = 30.0
IDLE_CURRENT_A = 0.3  # lights, controller and the telematics board itself
PARKED_CURRENT_A = 0.05  # the telematics board alone, the rest switched off
CELL_FULL_V = 4.2
SWAP_AT_SOC_PCT = 18.0  # couriers swap at a cabinet rather than run flat
STATION_CHARGE_AT_SOC_PCT = 15.0  # commuters stop at a charging station instead
SWAPPED_SOC_PCT = (90.0, 98.0)  # what a cabinet hands out
ACTIVITIES = ("riding", "parked", "charging", "swapping")
CHARGING_PLACES = ("home", "station", "forbidden")

_G = 9.81
_AIR_DENSITY = 1.2
_INCH_M = 0.0254
_CLIMB_RECOVERY = 0.4  # share of the climbing work won back on the way down (less braking, some coasting)
_CREST = 1.25  # RMS over mean of the pack current in stop-and-go riding: heat goes with I², not with its mean
_WINDOW_EDGES_S = (0.0, 15.0, 45.0, 105.0, 225.0, 465.0, 945.0, 1905.0, 3825.0, 7665.0, 15345.0)
_MIN_LEG_M = 30.0
_THERMAL_GRID_S = 5.0


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
    max_speed_kmh: float  # the limiter: the model never reports more (unless a script lifts it)
    cruise_kmh: tuple[float, float]  # the speeds riders cruise at on a free road
    accel_ms2: tuple[float, float]
    decel_ms2: tuple[float, float]
    soc_per_km: tuple[float, float]  # % of the pack per km on the flat, for reference: the physics decides
    mass_kg: float  # vehicle + rider + cargo
    crr: float
    cda_m2: float
    drive_efficiency: float
    regen_fraction: float  # share of braking power recovered (only while braking)
    # LFP packs of the same nominal voltage have more cells (3.2 V each).
    lfp_cells_in_series: int = 15
    lfp_nominal_ah: float = 20.0
    pack_heat_capacity_j_k: float = 3500.0
    pack_r_th_k_w: float = 1.2
    motor_r_th_k_w: float = 0.5
    motor_tau_s: float = 900.0
    controller_r_th_k_w: float = 1.2
    controller_tau_s: float = 400.0
    home_charger_a: float = 3.0
    station_charger_a: float = 6.0

    @property
    def max_pack_voltage_v(self) -> float:
        return CELL_FULL_V * self.cells_in_series


VARIANTS: dict[str, Variant] = {
    # The common Chinese "48 V" e-bike: 13S NMC 24 Ah (1.15 kWh), 30 A controller, 16-inch hub-motor wheel, its
    # limiter at the 25 km/h GB 17761-2018 allows. Riding faster takes tampering (simulators/faults.py).
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
        cruise_kmh=(17.0, 25.0),
        accel_ms2=(0.9, 1.6),
        decel_ms2=(1.4, 2.4),
        soc_per_km=(1.0, 1.4),  # ≈ 12-16 Wh/km from a 1.15 kWh pack
        mass_kg=125.0,
        crr=0.012,
        cda_m2=0.6,
        drive_efficiency=0.8,
        regen_fraction=0.25,  # mild regen ("EABS") on e-bike hub controllers
        lfp_cells_in_series=15,
        lfp_nominal_ah=20.0,
        pack_heat_capacity_j_k=3500.0,
        pack_r_th_k_w=1.2,
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
        lfp_cells_in_series=23,
        lfp_nominal_ah=36.0,
        pack_heat_capacity_j_k=15000.0,
        pack_r_th_k_w=0.18,
        motor_r_th_k_w=0.25,
        controller_r_th_k_w=0.6,
        home_charger_a=5.0,
        station_charger_a=10.0,
    ),
}


@dataclass(frozen=True, slots=True)
class Rider:
    """How the vehicle is used: a day of shifts (courier) or a commute."""

    name: str
    shifts_h: tuple[tuple[float, float], ...]  # ride durations of the day's shifts, (low, high) hours each
    breaks_h: tuple[float, float]  # parked between shifts
    delivery_every_m: float  # mean distance between delivery stops (inf: none)
    break_charge_p: float  # charges at a station during a break
    home_charge_p: float  # charges overnight
    forbidden_share: float  # share of overnight charging done where it is forbidden (stairwell, corridor)


RIDERS: dict[str, Rider] = {
    "courier": Rider(
        name="courier",
        shifts_h=((3.5, 5.0), (3.0, 4.5)),
        breaks_h=(0.6, 1.2),
        delivery_every_m=2500.0,
        break_charge_p=0.35,
        home_charge_p=0.9,
        forbidden_share=0.12,
    ),
    "commuter": Rider(
        name="commuter",
        shifts_h=((0.4, 0.75), (0.4, 0.85)),
        breaks_h=(8.0, 9.5),
        delivery_every_m=math.inf,
        break_charge_p=0.25,
        home_charge_p=0.7,
        forbidden_share=0.15,
    ),
}


@dataclass(frozen=True, slots=True)
class VehicleState:
    t: float
    lat: float
    lon: float
    altitude_m: float
    heading_deg: float
    speed_kmh: float  # over ground (what GNSS measures)
    motor_rpm: int
    motor_temp_c: float
    controller_temp_c: float
    soc_pct: float
    pack_voltage_v: float
    pack_current_a: float  # positive into the battery (charging), negative while riding
    battery_temp_max_c: float
    soh_pct: float
    distance_m: float  # ridden since start_time
    activity: str = "riding"  # one of ACTIVITIES
    locked: bool = False
    charging_place: str = ""  # one of CHARGING_PLACES while charging
    chemistry: str = "NMC"
    battery_barcode: str = ""
    battery_bound: bool = True  # the pack in the vehicle is one bound to its VIN
    battery_present: bool = True  # False while the pack is out (swapping): the BMS is silent
    cell_count: int = 0
    nominal_ah: float = 0.0
    cycle_count: int = 0
    cell_voltages_v: tuple[float, ...] = ()  # their sum is the pack voltage
    probe_temps_c: tuple[float, ...] = ()  # hottest first; the first is battery_temp_max_c
    bms_protection: int = 0  # JBD protection bits
    ambient_c: float = 20.0
    carried: bool = False  # moving with the wheel standing (loaded into a van)
    speed_limit_cfg_kmh: float = 0.0  # the controller's configured limit; 0: the variant's factory value
    wheel_inch_cfg: float = 0.0  # the controller's configured wheel; 0: the variant's factory value
    gnss_fix: bool = True  # the receiver has a fix (no jamming, antenna connected)
    online: bool = True  # the telematics unit can reach the network


@dataclass(frozen=True, slots=True)
class Segment:
    """A scripted activity from `t0` to `t1` (seconds after the model's start_time).

    kind "ride": `limiter_kmh` (the limiter as tampered), `wish_kmh` (low, high), `locked` (ridden while the owner
    has it locked — theft), `carried` (moved with the wheel standing), `stops` (False: no red lights or
    hold-ups), `deliveries` (a courier's delivery stops; off unless asked for), `crash_at` with `crash_kmh`
    and `crash_decel_ms2` (a single leg up to speed that ends in an impact at `crash_at` and lies still until
    `t1`).
    kind "park": `locked`, `charge` ("" or a CHARGING_PLACES entry), `charger_a`.
    kind "swap": `pack` — "spare" (a bound pack) or "foreign" (one not bound to the VIN); `cells`, `nominal_ah`
    of a foreign pack (default: the vehicle's own spec).
    """

    kind: str
    t0: float
    t1: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Leg:
    """Accelerate to `v` m/s, cruise, brake to a stop, wait. Times are offsets from the model's start_time."""

    t0: float
    s0: float
    v: float
    accel: float
    t_accel: float
    t_cruise: float
    decel: float
    t_decel: float
    t_stop: float
    trac_wh: float  # traction energy of the whole leg on the flat (electrical, drawn)
    regen_wh: float  # regenerated while braking (electrical, returned)

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


class _Physics:
    """Closed-form flat-road energy of the leg phases for one vehicle (J)."""

    def __init__(self, variant: Variant, mass_kg: float) -> None:
        self.m = mass_kg
        self.roll = mass_kg * _G * variant.crr
        self.k = 0.5 * _AIR_DENSITY * variant.cda_m2
        self.eta = variant.drive_efficiency
        self.regen = variant.regen_fraction

    def accel_j(self, a: float, dt: float) -> float:
        v = a * dt
        return 0.5 * self.m * v * v + self.roll * 0.5 * a * dt * dt + self.k * a**3 * dt**4 / 4.0

    def cruise_j(self, v: float, dt: float) -> float:
        return (self.roll + self.k * v * v) * v * dt

    def decel_j(self, v: float, d: float, dt: float) -> float:
        """Mechanical work while braking from `v` at `d` for `dt` (negative: energy the wheel gives back)."""
        u = v - d * dt
        dist = (v + u) / 2.0 * dt
        return -0.5 * self.m * (v * v - u * u) + self.roll * dist + self.k * (v**4 - u**4) / (4.0 * d)

    def leg_energy_wh(self, leg: _Leg, dt: float) -> tuple[float, float]:
        """(traction drawn, regen returned) in Wh from the leg start to `dt` into it, flat road."""
        if dt <= 0.0:
            return 0.0, 0.0
        if dt < leg.t_accel:
            return self.accel_j(leg.accel, dt) / self.eta / 3600.0, 0.0
        trac = self.accel_j(leg.accel, leg.t_accel)
        dt -= leg.t_accel
        trac += self.cruise_j(leg.v, min(dt, leg.t_cruise))
        dt -= leg.t_cruise
        regen = 0.0
        if dt > 0.0 and leg.t_decel > 0.0:
            work = self.decel_j(leg.v, leg.decel, min(dt, leg.t_decel))
            if work < 0.0:
                regen = -work * self.regen
            else:
                trac += work
        return trac / self.eta / 3600.0, regen / 3600.0


@dataclass(slots=True)
class _Start:
    """The continuous state carried from one activity into the next."""

    t: float
    s: float
    soc: float
    q_pack: float  # charge throughput of the pack in the vehicle since the model took it in (Ah): its ageing
    q_all: float  # charge throughput of all packs (Ah): the heat in whichever pack is in
    q_drive: float  # traction discharge (Ah): the motor's and controller's heat
    pack: int
    thermal_reset_t: float  # when the current pack's thermal history began (start or swap)
    thermal_reset_c: float  # its temperature then


class _Activity:
    kind = "parked"

    def __init__(self, start: _Start, t1: float) -> None:
        self.start = start
        self.t0 = start.t
        self.t1 = t1

    def charge(self, t: float) -> tuple[float, float, float]:
        """(net charge drawn, throughput, traction discharge) in Ah from t0 to `t`; net is negative when charging."""
        raise NotImplementedError

    def end(self, model: VehicleModel) -> _Start:
        net, q, qd = self.charge(self.t1)
        st = self.start
        cap = model.capacity_ah(st.pack, st.q_pack, st.t)
        soc = max(0.0, min(100.0, st.soc - 100.0 * net / cap))
        return _Start(
            self.t1,
            self.final_s(),
            soc,
            st.q_pack + q,
            st.q_all + q,
            st.q_drive + qd,
            st.pack,
            st.thermal_reset_t,
            st.thermal_reset_c,
        )

    def final_s(self) -> float:
        return self.start.s


class _Ride(_Activity):
    kind = "riding"

    def __init__(
        self,
        start: _Start,
        t1: float,
        legs: list[_Leg],
        physics: _Physics,
        profile: RouteProfile,
        params: dict[str, Any],
        idle_a: float,
        nominal_v: float,
    ) -> None:
        super().__init__(start, t1)
        self.legs = legs
        self.leg_t0 = [leg.t0 for leg in legs]
        self.physics = physics
        self.profile = profile
        self.params = params
        self.idle_a = idle_a
        self.nominal_v = nominal_v
        self.locked = bool(params.get("locked", False))
        self.carried = bool(params.get("carried", False))
        self.limiter_kmh: float | None = params.get("limiter_kmh")
        self.climb0 = profile.climb(start.s)[0]
        trac = regen = 0.0
        self.trac0: list[float] = []
        self.regen0: list[float] = []
        for leg in legs:
            self.trac0.append(trac)
            self.regen0.append(regen)
            trac += leg.trac_wh
            regen += leg.regen_wh

    def final_s(self) -> float:
        return self.kinematics(self.t1)[0]

    def kinematics(self, t: float) -> tuple[float, float, float]:
        i = bisect.bisect_right(self.leg_t0, t) - 1
        if i < 0:
            return self.start.s, 0.0, 0.0
        leg = self.legs[i]
        ds, v, a = leg.kinematics(t - leg.t0)
        return leg.s0 + ds, v, a

    def charge(self, t: float) -> tuple[float, float, float]:
        t = min(t, self.t1)
        if self.carried:  # in a van: the vehicle is switched off
            idle = PARKED_CURRENT_A * max(0.0, t - self.t0) / 3600.0
            return idle, idle, 0.0
        idle_ah = self.idle_a * max(0.0, t - self.t0) / 3600.0
        i = bisect.bisect_right(self.leg_t0, t) - 1
        if i < 0:
            return idle_ah, idle_ah, 0.0
        leg = self.legs[i]
        trac, regen = self.physics.leg_energy_wh(leg, t - leg.t0)
        trac += self.trac0[i]
        regen += self.regen0[i]
        ds, _, _ = leg.kinematics(t - leg.t0)
        climb_wh = (self.profile.climb(leg.s0 + ds)[0] - self.climb0) * self.physics.m * _G
        climb_wh *= (1.0 - _CLIMB_RECOVERY) / self.physics.eta / 3600.0
        drive = (trac + climb_wh) / self.nominal_v
        back = regen / self.nominal_v
        return drive - back + idle_ah, drive + back + idle_ah, drive


class _Park(_Activity):
    """Parked (locked or not), charging, or at a swap cabinet."""

    def __init__(
        self,
        start: _Start,
        t1: float,
        kind: str,
        locked: bool,
        place: str = "",
        curve: ChargeCurve | None = None,
        swap_to: tuple[int, float] | None = None,
    ) -> None:
        super().__init__(start, t1)
        self.kind = kind
        self.locked = locked
        self.place = place
        self.curve = curve
        self.swap_to = swap_to  # (pack index, its SOC) handed over at the middle of a swap
        self.t_mid = (self.t0 + t1) / 2.0

    def charge(self, t: float) -> tuple[float, float, float]:
        dt = max(0.0, min(t, self.t1) - self.t0)
        idle = PARKED_CURRENT_A * dt / 3600.0
        if self.curve is None:
            return idle, idle, 0.0
        ah = self.curve.charge_ah(dt)
        return idle - ah, idle + ah, 0.0

    def end(self, model: VehicleModel) -> _Start:
        st = super().end(model)
        if self.swap_to is not None:
            pack, soc = self.swap_to
            # The cabinet kept the new pack charged and a little above the air temperature.
            warm = model.ambient_c(model.start_time + self.t_mid) + 2.0
            return _Start(self.t1, st.s, soc, 0.0, st.q_all, st.q_drive, pack, self.t_mid, warm)
        return st


@dataclass(frozen=True, slots=True)
class _Intent:
    kind: str  # "ride" | "park"
    t0: float
    t1: float
    locked: bool = False
    charge: str = ""  # "" or a charging place
    charger_a: float = 0.0


class VehicleModel:
    """The ground truth of one vehicle on `route` from `start_time` (unix seconds), drawn from `seed`.

    `variant` names an entry of `VARIANTS` (or is a `Variant`); `rider` one of `RIDERS`; `chemistry` "NMC" or
    "LFP"; `script` forced `Segment`s (see simulators/faults.py); `ambient_c` fixes the day's mean temperature.
    """

    def __init__(
        self,
        route: Route,
        seed: int,
        start_time: float,
        variant: str | Variant = "ebike48",
        *,
        rider: str = "courier",
        chemistry: str = "NMC",
        script: Sequence[Segment] = (),
        ambient_c: float | None = None,
    ) -> None:
        if isinstance(variant, str):
            if variant not in VARIANTS:
                raise ValueError(f"unknown vehicle variant {variant!r}; known: {', '.join(sorted(VARIANTS))}")
            variant = VARIANTS[variant]
        if rider not in RIDERS:
            raise ValueError(f"unknown rider {rider!r}; known: {', '.join(sorted(RIDERS))}")
        if chemistry not in CHEMISTRIES:
            raise ValueError(f"unknown chemistry {chemistry!r}; known: {', '.join(sorted(CHEMISTRIES))}")
        self.variant = variant
        self.route = route
        self.seed = seed
        self.start_time = start_time
        self.rider = RIDERS[rider]
        self.chemistry: Chemistry = CHEMISTRIES[chemistry]
        self.script = tuple(sorted(script, key=lambda g: g.t0))
        for a, b in zip(self.script, self.script[1:], strict=False):
            if b.t0 < a.t1:
                raise ValueError(f"scripted segments overlap: {a.kind} until {a.t1}, {b.kind} from {b.t0}")
        rng = random.Random(seed)
        self.profile = RouteProfile(route)
        self.cells = variant.cells_in_series if chemistry == "NMC" else variant.lfp_cells_in_series
        self.nominal_ah = variant.nominal_ah if chemistry == "NMC" else variant.lfp_nominal_ah
        self.pack_resistance_ohm = variant.pack_resistance_ohm * self.cells / variant.cells_in_series
        self._start_soc = rng.uniform(55.0, 95.0)
        self._mean_ambient_c = rng.uniform(8.0, 30.0) if ambient_c is None else ambient_c
        self._physics = _Physics(variant, variant.mass_kg * rng.uniform(0.92, 1.08))
        self._catalogue = load_catalogue()
        # The packs bound to this VIN: the one it was sold with and two spares (the swap cabinet's share).
        self.packs: list[Pack] = [
            Pack.draw(random.Random(f"{seed}-pack-{k}"), self._barcode(k), self.chemistry, self.cells, self.nominal_ah)
            for k in range(3)
        ]
        self._nominal_v = self.cells * self.chemistry.cell_nominal_v
        self._intents: list[_Intent] = []
        self._intent_t0: list[float] = []
        self._day = 0
        start = _Start(0.0, 0.0, self._start_soc, 0.0, 0.0, 0.0, 0, 0.0, self.ambient_c(start_time))
        self._acts: list[_Activity] = []
        self._act_t0: list[float] = []
        self._next: _Start = start
        self._thermal_cache: dict[tuple[float, float], tuple[float, float, float]] = {}
        self._first = start

    # -- identity ----------------------------------------------------------------------------------------------

    def _barcode(self, k: int) -> str:
        base = f"{self.variant.barcode_prefix}-{self.seed % 1_000_000:06d}"
        return base if k == 0 else f"{base}-S{k}"

    @property
    def bound_barcodes(self) -> frozenset[str]:
        """Barcodes of the packs bound to this vehicle's VIN (what its registration record lists)."""
        return frozenset(p.barcode for p in self.packs if p.bound)

    def capacity_ah(self, pack: int, q: float, t: float) -> float:
        p = self.packs[pack]
        return p.nominal_ah * max(0.3, p.soh(q, t / 86_400.0) / 100.0)

    def ambient_c(self, unix_s: float) -> float:
        """Air temperature: the day's mean with a ±3 °C daily swing peaking at 15:00 local time."""
        hour = (unix_s / 3600.0 + 8.0) % 24.0
        return self._mean_ambient_c + 3.0 * math.cos((hour - 15.0) / 24.0 * 2.0 * math.pi)

    # -- the plan ----------------------------------------------------------------------------------------------

    def _plan_day(self) -> None:
        """Append the intents of the next day (days start at start_time + k·24 h)."""
        day = self._day
        self._day += 1
        rng = random.Random(f"{self.seed}-day-{day}")
        r = self.rider
        t = day * 86_400.0
        end = t + 86_400.0
        out: list[_Intent] = []
        for k, (lo, hi) in enumerate(r.shifts_h):
            ride = rng.uniform(lo, hi) * 3600.0
            out.append(_Intent("ride", t, t + ride))
            t += ride
            if k + 1 < len(r.shifts_h):
                brk = rng.uniform(*r.breaks_h) * 3600.0
                charge = rng.random() < r.break_charge_p
                out.append(
                    _Intent(
                        "park",
                        t,
                        t + brk,
                        locked=True,
                        charge="station" if charge else "",
                        charger_a=self.variant.station_charger_a,
                    )
                )
                t += brk
        home = rng.random() < r.home_charge_p
        place = ("forbidden" if rng.random() < r.forbidden_share else "home") if home else ""
        out.append(_Intent("park", t, end, locked=True, charge=place, charger_a=self.variant.home_charger_a))
        for i in out:
            self._intents.append(i)
            self._intent_t0.append(i.t0)

    def _intent_at(self, t: float) -> _Intent:
        while not self._intents or self._intents[-1].t1 <= t:
            self._plan_day()
        return self._intents[bisect.bisect_right(self._intent_t0, t) - 1]

    def _forced_after(self, t: float) -> Segment | None:
        for seg in self.script:
            if seg.t1 > t:
                return seg
        return None

    def _extend(self, t: float) -> None:
        """Realise activities until one covers elapsed time `t`."""
        while not self._acts or self._acts[-1].t1 <= t:
            st = self._next
            seg = self._forced_after(st.t)
            if seg is not None and seg.t0 <= st.t + 1e-9:
                act = self._realise_segment(st, seg)
            else:
                intent = self._intent_at(st.t)
                hard_end = min(intent.t1, seg.t0 if seg is not None else math.inf)
                act = self._realise_intent(st, intent, hard_end)
            if act.t1 <= act.t0:
                raise RuntimeError(f"empty {act.kind} activity at {act.t0}")
            self._acts.append(act)
            self._act_t0.append(act.t0)
            self._next = act.end(self)

    def _realise_intent(self, st: _Start, intent: _Intent, end: float) -> _Activity:
        if intent.kind == "ride":
            if st.soc < (SWAP_AT_SOC_PCT if self.rider.name == "courier" else STATION_CHARGE_AT_SOC_PCT):
                return self._low_battery_stop(st, end)
            rng = random.Random(f"{self.seed}-ride-{st.t:.3f}")
            low = SWAP_AT_SOC_PCT if self.rider.name == "courier" else STATION_CHARGE_AT_SOC_PCT
            return self._ride(st, end, {}, rng, stop_below=low)
        curve = None
        if intent.charge:
            curve = self._charge_curve(st, intent.charger_a)
        return _Park(st, end, "charging" if curve else "parked", intent.locked, intent.charge, curve)

    def _low_battery_stop(self, st: _Start, end: float) -> _Activity:
        rng = random.Random(f"{self.seed}-low-{st.t:.3f}")
        if self.rider.name == "courier":
            # The cabinet hands out one of the spares bound to this vehicle, charged.
            spare = 2 if st.pack == 1 else 1
            duration = min(end - st.t, rng.uniform(120.0, 240.0))
            return _Park(st, st.t + duration, "swapping", False, swap_to=(spare, rng.uniform(*SWAPPED_SOC_PCT)))
        duration = min(end - st.t, rng.uniform(3600.0, 5400.0))
        curve = self._charge_curve(st, self.variant.station_charger_a)
        return _Park(st, st.t + duration, "charging", True, "station", curve)

    def _charge_curve(self, st: _Start, current_a: float) -> ChargeCurve:
        cap = self.capacity_ah(st.pack, st.q_pack, st.t)
        # Chargers stop at C/50: well before the BMS would call the pack full, and never for hours at 100 %.
        charger = Charger(current_a, cap * 0.02)
        return ChargeCurve.plan(st.soc, charger, cap, self.cells, self.chemistry, self.pack_resistance_ohm)

    def _realise_segment(self, st: _Start, seg: Segment) -> _Activity:
        p = seg.params
        if seg.kind == "ride":
            low = SWAP_AT_SOC_PCT if self.rider.name == "courier" else STATION_CHARGE_AT_SOC_PCT
            if "crash_at" in p:
                return self._ride(st, seg.t1, p, random.Random(f"{self.seed}-seg-{seg.t0:.3f}"), stop_below=None)
            # A long scripted ride still stops for a charged pack when this one runs low, then rides on.
            if st.soc < low:
                return self._low_battery_stop(st, seg.t1)
            rng = random.Random(f"{self.seed}-seg-{st.t:.3f}")
            return self._ride(st, seg.t1, p, rng, stop_below=low)
        if seg.kind == "park":
            place = str(p.get("charge", ""))
            curve = self._charge_curve(st, float(p.get("charger_a", self.variant.home_charger_a))) if place else None
            return _Park(st, seg.t1, "charging" if curve else "parked", bool(p.get("locked", False)), place, curve)
        if seg.kind == "swap":
            rng = random.Random(f"{self.seed}-swap-{seg.t0:.3f}")
            which = p.get("pack", "spare")
            if which == "foreign":
                k = len(self.packs)
                default = f"ZLX{self.variant.barcode_prefix[2:5]}-{(self.seed * 7919 + k) % 1_000_000:06d}"
                pack = Pack.draw(
                    rng,
                    str(p.get("barcode", default)),
                    self.chemistry,
                    int(p.get("cells", self.cells)),
                    float(p.get("nominal_ah", self.nominal_ah)),
                    bound=False,
                )
                self.packs.append(pack)
                target = k
            elif which == "own":
                target = 0
            elif which == "spare":
                target = 2 if st.pack == 1 else 1
            else:
                raise ValueError(f"unknown pack {which!r} for a swap: spare, own or foreign")
            soc = float(p.get("soc", rng.uniform(*SWAPPED_SOC_PCT)))
            return _Park(st, seg.t1, "swapping", False, swap_to=(target, soc))
        raise ValueError(f"unknown segment kind {seg.kind!r}")

    # -- rides -------------------------------------------------------------------------------------------------

    def _ride(
        self, st: _Start, end: float, p: dict[str, Any], rng: random.Random, stop_below: float | None
    ) -> _Activity:
        vt = self.variant
        phys = self._physics
        if "crash_at" in p:
            legs = [self._crash_leg(st, end, p, rng)]
            return _Ride(st, end, legs, phys, self.profile, p, vt.idle_current_a, self._nominal_v)
        limiter = float(p.get("limiter_kmh", vt.max_speed_kmh))
        lo, hi = p.get("wish_kmh", vt.cruise_kmh)
        wish = (float(lo), float(hi))
        stops = bool(p.get("stops", True))
        legs = []
        t, s, soc = st.t, st.s, st.soc
        cap = self.capacity_ah(st.pack, st.q_pack, st.t)
        climb_wh_per_m = phys.m * _G * (1.0 - _CLIMB_RECOVERY) / phys.eta / 3600.0
        # Scripted rides are errands of their own: no deliveries unless asked for.
        every = self.rider.delivery_every_m if p.get("deliveries", not p) else math.inf
        next_delivery = s + rng.expovariate(1.0 / every) if stops and every < math.inf else math.inf
        while t < end:
            # Where this leg ends: the first red light, hold-up (crossing, turning traffic) or delivery ahead.
            if stops:
                stop_at = s
                while True:
                    stop_at = self.profile.next_signal(stop_at, _MIN_LEG_M)
                    if stop_at == math.inf or rng.random() < 0.55:  # red more often than not, as it feels
                        break
                kind = "light"
                hold = s + _MIN_LEG_M + rng.expovariate(1.0 / 900.0)
                if hold < stop_at:
                    stop_at, kind = hold, "hold"
                if next_delivery < stop_at:
                    stop_at, kind = max(s + _MIN_LEG_M, next_delivery), "delivery"
            else:
                stop_at, kind = s + rng.uniform(1500.0, 3000.0), "hold"
            dist = stop_at - s
            cap_kmh = self.profile.cap_kmh(s) * congestion_factor(self.profile.klass(s), self.start_time + t)
            v = min(limiter, cap_kmh, rng.uniform(*wish)) / 3.6
            accel = rng.uniform(*vt.accel_ms2)
            decel = rng.uniform(*vt.decel_ms2)
            if dist < v * v / (2 * accel) + v * v / (2 * decel):
                v = math.sqrt(2.0 * dist * accel * decel / (accel + decel))
            t_cruise = max(0.0, (dist - v * v / (2 * accel) - v * v / (2 * decel)) / v)
            if kind == "light":
                t_stop = rng.uniform(8.0, 70.0)
            elif kind == "delivery":
                t_stop = rng.uniform(60.0, 240.0)
                next_delivery = stop_at + rng.expovariate(1.0 / every)
            else:
                t_stop = 0.0 if rng.random() < 0.3 else rng.uniform(3.0, 25.0)
            moving = v / accel + t_cruise + v / decel
            if t + moving > end:
                # The ride must be over before the next stop: pull over where the remaining time allows.
                t_cruise = end - t - v / accel - v / decel
                if t_cruise < 0.0 or v <= 0.0:
                    legs.append(_Leg(t, s, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, end - t, 0.0, 0.0))
                    break
                moving, t_stop = end - t, 0.0
            t_stop = min(t_stop, end - t - moving)
            shape = _Leg(t, s, v, accel, v / accel, t_cruise, decel, v / decel, t_stop, 0.0, 0.0)
            trac, regen = phys.leg_energy_wh(shape, shape.duration)
            leg = _Leg(t, s, v, accel, v / accel, t_cruise, decel, v / decel, t_stop, trac, regen)
            legs.append(leg)
            t += leg.duration
            climb = self.profile.climb(s + leg.distance)[0] - self.profile.climb(s)[0]
            s += leg.distance
            wh = trac - regen + climb * climb_wh_per_m
            soc -= 100.0 * (wh / self._nominal_v + vt.idle_current_a * leg.duration / 3600.0) / cap
            if stop_below is not None and soc < stop_below:
                break  # to the swap cabinet (or a charging station) from this stop
        ride_end = legs[-1].t0 + legs[-1].duration
        return _Ride(st, ride_end, legs, phys, self.profile, p, vt.idle_current_a, self._nominal_v)

    def _crash_leg(self, st: _Start, end: float, p: dict[str, Any], rng: random.Random) -> _Leg:
        """Up to `crash_kmh`, cruise, and at `crash_at` a stop at `crash_decel_ms2`; then still until `end`."""
        v = min(float(p.get("crash_kmh", 25.0)), float(p.get("limiter_kmh", self.variant.max_speed_kmh))) / 3.6
        accel = rng.uniform(*self.variant.accel_ms2)
        decel = float(p.get("crash_decel_ms2", 9.0))
        t_accel = v / accel
        t_cruise = float(p["crash_at"]) - st.t - t_accel
        if t_cruise < 0.0:
            raise ValueError("a crash needs time to get up to speed: start its segment earlier")
        t_decel = v / decel
        t_stop = end - st.t - (t_accel + t_cruise + t_decel)
        if t_stop < 0.0:
            raise ValueError("a crash segment must last until the vehicle has stopped")
        shape = _Leg(st.t, st.s, v, accel, t_accel, t_cruise, decel, t_decel, t_stop, 0.0, 0.0)
        trac, regen = self._physics.leg_energy_wh(shape, shape.duration)
        return _Leg(st.t, st.s, v, accel, t_accel, t_cruise, decel, t_decel, t_stop, trac, regen)

    # -- state -------------------------------------------------------------------------------------------------

    def _activity_at(self, elapsed: float) -> _Activity:
        self._extend(elapsed)
        return self._acts[bisect.bisect_right(self._act_t0, elapsed) - 1]

    def _soc_soh_at(self, elapsed: float) -> tuple[float, float]:
        """SOC at `elapsed` and the SOH its pack had at the start (for heat: ageing is far slower than heat)."""
        if elapsed <= 0.0:
            return self._first.soc, self.packs[self._first.pack].soh0_pct
        act = self._activity_at(elapsed)
        st = act.start
        if isinstance(act, _Park) and act.swap_to is not None and elapsed >= act.t_mid:
            return act.swap_to[1], self.packs[act.swap_to[0]].soh0_pct
        net, _, _ = act.charge(elapsed)
        soc = min(100.0, max(0.0, st.soc - 100.0 * net / self.capacity_ah(st.pack, st.q_pack, st.t)))
        return soc, self.packs[st.pack].soh0_pct

    def _throughput(self, elapsed: float) -> tuple[float, float]:
        """(throughput of all packs, traction discharge) in Ah, cumulative at `elapsed` (0 before the start)."""
        if elapsed <= 0.0:
            return 0.0, 0.0
        act = self._activity_at(elapsed)
        _, q, qd = act.charge(elapsed)
        return act.start.q_all + q, act.start.q_drive + qd

    def activities(self, until: float) -> list[tuple[str, float, float]]:
        """(kind, start, end) in unix seconds of every activity that began before `until` — the rider's day."""
        self._extend(until - self.start_time)
        return [
            (a.kind, self.start_time + a.t0, self.start_time + a.t1)
            for a in self._acts
            if a.t0 < until - self.start_time
        ]

    def state_at(self, t: float) -> VehicleState:
        elapsed = t - self.start_time
        vt = self.variant
        chem = self.chemistry
        s, v, a = 0.0, 0.0, 0.0
        activity, locked, place, carried, present = "parked", False, "", False, True
        charge_a = 0.0
        limiter: float | None = None
        reset_t, reset_c = 0.0, self._first.thermal_reset_c
        if elapsed <= 0.0:
            # Before its start the vehicle stands where the ride will begin.
            st = self._first
            pack_idx, soc, q_pack = st.pack, st.soc, 0.0
        else:
            act = self._activity_at(elapsed)
            st = act.start
            pack_idx, s = st.pack, st.s
            reset_t, reset_c = st.thermal_reset_t, st.thermal_reset_c
            net, q, _ = act.charge(elapsed)
            cap = self.capacity_ah(st.pack, st.q_pack, st.t)
            soc, q_pack = st.soc - 100.0 * net / cap, st.q_pack + q
            if isinstance(act, _Ride):
                s, v, a = act.kinematics(elapsed)
                activity, locked, carried, limiter = "riding", act.locked, act.carried, act.limiter_kmh
            elif isinstance(act, _Park):
                activity, locked, place = act.kind, act.locked, act.place
                if act.curve is not None:
                    charge_a = act.curve.current(elapsed - act.t0)
                    if charge_a <= 0.0:
                        activity = "parked"  # the charger cut off; the plug may still be in
                if act.swap_to is not None:
                    # The old pack comes out, the bay is empty for a moment, the new one goes in at t_mid.
                    present = abs(elapsed - act.t_mid) > min(20.0, (act.t1 - act.t0) / 4.0)
                    if elapsed >= act.t_mid:
                        pack_idx, soc, q_pack = act.swap_to[0], act.swap_to[1], 0.0
                        reset_t = act.t_mid
                        reset_c = self.ambient_c(self.start_time + act.t_mid) + 2.0
        soc = min(100.0, max(0.0, soc))
        pack = self.packs[pack_idx]
        soh = pack.soh(q_pack, max(0.0, elapsed) / 86_400.0)
        point = self.route.position_at(s)
        amb = self.ambient_c(t)
        pack_c, motor_c, ctrl_c = self._temperatures_at(max(0.0, elapsed), soc, soh, reset_t, reset_c)
        r = self.pack_resistance_ohm * resistance_factor(pack_c, soc, soh)
        cells = pack.cells
        ocv = chem.ocv(soc) * cells

        if not present:
            i_out = 0.0
        elif charge_a > 0.0:
            i_out = -charge_a
        elif activity == "riding" and not carried:
            m = self._physics.m
            p_mech = (m * a + m * _G * (vt.crr + point.grade) + self._physics.k * v * v) * v
            if p_mech >= 0.0:
                p_elec = p_mech / vt.drive_efficiency
            elif a < 0.0:
                p_elec = p_mech * vt.regen_fraction
            else:
                p_elec = 0.0  # rolling downhill the rider shuts the throttle and rides the brakes: no regen
            # Discharge current I (A, positive out of the pack) solves P = (OCV - R·I)·I; take the small root.
            disc = max(0.0, ocv * ocv - 4.0 * r * p_elec)
            i_out = (ocv - math.sqrt(disc)) / (2.0 * r) + vt.idle_current_a
            i_out = max(-vt.controller_max_current_a / 3, min(vt.controller_max_current_a, i_out))
            # The controller's low-voltage cut-off: it draws no more than keeps the pack above it.
            i_out = min(i_out, max(vt.idle_current_a, (ocv - chem.cell_cutoff_v * cells) / r))
            # The BMS caps regen so the terminal voltage never exceeds the full-charge voltage.
            i_out = max(i_out, -max(0.0, chem.cell_charge_v * cells - ocv) / r)
        elif activity in ("riding", "swapping") and not carried:
            i_out = vt.idle_current_a
        else:
            i_out = PARKED_CURRENT_A

        cell_r = r / cells
        cell_v = [
            chem.ocv(soc + off) - i_out * cell_r * (1.0 + roff)
            for off, roff in zip(pack.cell_soc_offsets, pack.cell_r_offsets, strict=True)
        ]
        total = sum(cell_v)
        limit_v = chem.cell_charge_v * cells
        if total > limit_v:
            # The charger holds the pack at its CV setpoint; the cells share it as their spread dictates.
            shift = (total - limit_v) / cells
            cell_v = [c - shift for c in cell_v]
            total = limit_v
        speed_kmh = min(limiter if limiter is not None else vt.max_speed_kmh, v * 3.6)
        return VehicleState(
            t=t,
            lat=point.lat,
            lon=point.lon,
            altitude_m=point.alt_m,
            heading_deg=point.heading_deg,
            speed_kmh=speed_kmh,
            motor_rpm=0 if carried else round(v / vt.wheel_circumference_m * 60.0),
            motor_temp_c=motor_c,
            controller_temp_c=ctrl_c,
            soc_pct=soc,
            pack_voltage_v=total,
            pack_current_a=-i_out,
            battery_temp_max_c=pack_c,
            soh_pct=soh,
            distance_m=s,
            activity=activity,
            locked=locked,
            charging_place=place if activity == "charging" else "",
            chemistry=chem.name,
            battery_barcode=pack.barcode,
            battery_bound=pack.bound,
            battery_present=present,
            cell_count=cells,
            nominal_ah=pack.nominal_ah,
            cycle_count=pack.cycles(q_pack),
            cell_voltages_v=tuple(cell_v),
            probe_temps_c=tuple(pack_c - 0.8 * k for k in range(vt.temperature_probes)),
            ambient_c=amb,
            carried=carried,
        )

    def _temperatures_at(
        self, elapsed: float, soc: float, soh: float, reset_t: float, reset_c: float
    ) -> tuple[float, float, float]:
        """Temperatures at `elapsed`, interpolated between the points of a 5 s grid (cached): thermal time
        constants are minutes, and a fleet asks for consecutive seconds of each vehicle."""
        g0 = math.floor(elapsed / _THERMAL_GRID_S) * _THERMAL_GRID_S
        if g0 < reset_t:
            # A swap put this pack in since the grid point: its history is too short to interpolate.
            return self._temperatures(elapsed, self.ambient_c(self.start_time + elapsed), soc, soh, reset_t, reset_c)
        f = (elapsed - g0) / _THERMAL_GRID_S
        lo = self._grid_temperatures(g0, reset_t, reset_c)
        if f == 0.0:
            return lo
        hi = self._grid_temperatures(g0 + _THERMAL_GRID_S, reset_t, reset_c)
        return (
            lo[0] + (hi[0] - lo[0]) * f,
            lo[1] + (hi[1] - lo[1]) * f,
            lo[2] + (hi[2] - lo[2]) * f,
        )

    def _grid_temperatures(self, g: float, reset_t: float, reset_c: float) -> tuple[float, float, float]:
        key = (g, reset_t)
        found = self._thermal_cache.get(key)
        if found is None:
            if len(self._thermal_cache) >= 4096:
                self._thermal_cache.clear()  # bounded; a fleet walks forward in time, old points are not asked again
            # Everything from the grid point itself, so a cached point never depends on who asked first.
            soc, soh = self._soc_soh_at(g)
            found = self._temperatures(g, self.ambient_c(self.start_time + g), soc, soh, reset_t, reset_c)
            self._thermal_cache[key] = found
        return found

    def _temperatures(
        self, elapsed: float, amb: float, soc: float, soh: float, reset_t: float, reset_c: float
    ) -> tuple[float, float, float]:
        """(pack, motor, controller) temperatures: first-order responses to the heat of the recent past, each
        window's heat taken as constant at its mean current; the pack's history begins at `reset_t` (start, or
        the swap that put it in) at `reset_c`."""
        vt = self.variant
        tau_pack = vt.pack_heat_capacity_j_k * vt.pack_r_th_k_w
        since = elapsed - reset_t
        pack = amb + (reset_c - amb) * math.exp(-since / tau_pack)
        motor = ctrl = amb
        if elapsed <= 0.0:
            return pack, motor, ctrl
        r = self.pack_resistance_ohm * resistance_factor(pack, soc, soh)
        loss_v = self._nominal_v * (1.0 - vt.drive_efficiency)
        prev_q, prev_qd = self._throughput(elapsed)
        for a_s, b_s in itertools.pairwise(_WINDOW_EDGES_S):
            if a_s >= elapsed:
                break
            b = min(b_s, elapsed)
            q, qd = self._throughput(elapsed - b)
            drive_a = (prev_qd - qd) * 3600.0 / (b - a_s)
            # Motor copper and iron losses, and the controller's switching losses, go with the traction current.
            motor += first_order_rise(loss_v * drive_a * 0.8, vt.motor_r_th_k_w, vt.motor_tau_s, a_s, b)
            ctrl_w = (loss_v * 0.2 + 0.5) * drive_a
            ctrl += first_order_rise(ctrl_w, vt.controller_r_th_k_w, vt.controller_tau_s, a_s, b)
            if a_s < since:
                b_pack = min(b, since)
                q_pack = q if b_pack == b else self._throughput(elapsed - b_pack)[0]
                i_mean = (prev_q - q_pack) * 3600.0 / (b_pack - a_s)
                pack += first_order_rise((_CREST * i_mean) ** 2 * r, vt.pack_r_th_k_w, tau_pack, a_s, b_pack)
            prev_q, prev_qd = q, qd
        return pack, motor, ctrl

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
