"""Battery physics for the vehicle model: cell chemistry, packs with an identity and an age, CC-CV charging.

Everything here is closed-form, so the vehicle model can evaluate any instant without stepping:

- **Open-circuit voltage** per chemistry, piecewise linear in SOC: NMC falls steadily from 4.20 V to 3.30 V; LFP
  sits on its famous plateau (3.26-3.34 V over most of the range) and only bends at the ends — which is why an
  LFP pack's SOC cannot be read from its voltage and cell faults hide longer.
- **Internal resistance** of the pack grows in the cold (electrolyte), near empty (electrode kinetics) and with
  age (SEI growth: +2 % per % of SOH lost is in line with published NMC/LFP ageing data).
- **Heat**: I²R into a lumped thermal mass that loses heat to ambient through a thermal resistance — a first-order
  system. `first_order_rise` is its exact answer to a heat input that is constant over a time window, so a
  temperature is a sum over a few windows of the recent past rather than an integration.
- **Ageing**: state of health falls with equivalent full cycles and with calendar time, per chemistry (LFP ages
  several times slower per cycle than NMC).
- **Charging**: constant current until the terminal voltage reaches the charge voltage, then constant voltage
  with the current tapering off exponentially until the charger's cut-off current — the CC-CV profile every
  e-bike charger follows, in closed form.
- **Abuse** (`Chemistry.ocv_beyond`): past 100 % a cell keeps taking charge at a steeply rising voltage (an NMC
  cell charged to 4.35 V holds some 8 % more than at 4.20 V); below 0 % — the point the controller and BMS call
  empty — its voltage falls off a cliff. simulators/faults.py uses it for a charger that over-charges and a pack
  stored until it over-discharged; the vehicle model itself never leaves 0..100 %.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Chemistry:
    name: str
    ocv_curve: tuple[tuple[float, float], ...]  # (SOC %, cell V), rising
    cell_nominal_v: float
    cell_charge_v: float  # the charger's constant-voltage setpoint per cell
    cell_cutoff_v: float  # the controller's low-voltage cut-off per cell (under load)
    cycle_fade_pct: float  # SOH lost per equivalent full cycle
    calendar_fade_pct_per_year: float
    overcharge_v_per_pct: float = 0.018  # OCV slope above 100 % (V per % of extra charge)
    overdischarge_v_per_pct: float = 0.1  # OCV slope below 0 % (V per % of charge missing)

    def ocv(self, soc_pct: float) -> float:
        """Open-circuit voltage of one cell at `soc_pct`."""
        curve = self.ocv_curve
        soc = min(100.0, max(0.0, soc_pct))
        i = bisect.bisect_left(_SOC_POINTS[self.name], soc)
        if i <= 0:
            return curve[0][1]
        (s0, v0), (s1, v1) = curve[i - 1], curve[i]
        return v0 + (v1 - v0) * (soc - s0) / (s1 - s0)

    def ocv_beyond(self, soc_pct: float) -> float:
        """Open-circuit voltage of one cell at `soc_pct` including the abuse ranges: linear past 100 % (over-charge)
        and below 0 % (over-discharge, down to a floor of 0.5 V, where the cell is dead); `ocv` inside them."""
        if soc_pct > 100.0:
            return self.ocv_curve[-1][1] + self.overcharge_v_per_pct * (soc_pct - 100.0)
        if soc_pct < 0.0:
            return max(0.5, self.ocv_curve[0][1] + self.overdischarge_v_per_pct * soc_pct)
        return self.ocv(soc_pct)

    def soc_at_ocv(self, cell_v: float) -> float:
        """The SOC whose open-circuit voltage is `cell_v` (the curve is strictly rising, so this is unique)."""
        curve = self.ocv_curve
        if cell_v <= curve[0][1]:
            return curve[0][0]
        for (s0, v0), (s1, v1) in itertools.pairwise(curve):
            if cell_v <= v1:
                return s0 + (s1 - s0) * (cell_v - v0) / (v1 - v0)
        return curve[-1][0]


NMC = Chemistry(
    name="NMC",
    # The curve the model always used for its li-ion cells.
    ocv_curve=(
        (0.0, 3.30),
        (5.0, 3.45),
        (10.0, 3.55),
        (20.0, 3.65),
        (40.0, 3.75),
        (60.0, 3.87),
        (80.0, 4.02),
        (100.0, 4.20),
    ),
    cell_nominal_v=3.65,
    cell_charge_v=4.20,
    cell_cutoff_v=3.23,  # 42 V on a 13S pack, the usual "48 V" controller cut-off
    cycle_fade_pct=0.02,  # ≈ 1000 cycles to 80 %
    calendar_fade_pct_per_year=2.5,
    overcharge_v_per_pct=0.018,  # ≈ 8 % more charge between 4.20 and 4.35 V
    overdischarge_v_per_pct=0.1,  # 3.0 V at 3 % below empty, 2.5 V at 8 %
)

LFP = Chemistry(
    name="LFP",
    ocv_curve=(
        (0.0, 2.80),
        (5.0, 3.10),
        (10.0, 3.20),
        (20.0, 3.26),
        (40.0, 3.29),
        (60.0, 3.31),
        (80.0, 3.33),
        (95.0, 3.36),
        (100.0, 3.45),
    ),
    cell_nominal_v=3.2,
    cell_charge_v=3.65,
    cell_cutoff_v=2.9,
    cycle_fade_pct=0.007,  # ≈ 3000 cycles to 80 %
    calendar_fade_pct_per_year=1.5,
    overcharge_v_per_pct=0.04,  # past its plateau LFP climbs fast: 3.65 V with 5 % extra
    overdischarge_v_per_pct=0.12,
)

CHEMISTRIES: dict[str, Chemistry] = {c.name: c for c in (NMC, LFP)}
_SOC_POINTS: dict[str, list[float]] = {c.name: [s for s, _ in c.ocv_curve] for c in CHEMISTRIES.values()}


def resistance_factor(temp_c: float, soc_pct: float, soh_pct: float) -> float:
    """Pack resistance relative to a new pack at 25 °C and mid SOC."""
    # Cold: about ×1.65 at 0 °C; warm packs are slightly better, down to ×0.85.
    f_t = math.exp(0.02 * (25.0 - temp_c)) if temp_c < 25.0 else max(0.85, math.exp(0.008 * (25.0 - temp_c)))
    f_soc = 1.0 + 0.5 * max(0.0, (20.0 - soc_pct) / 20.0)
    f_soh = 1.0 + 0.02 * max(0.0, 100.0 - soh_pct)
    return f_t * f_soc * f_soh


def first_order_rise(power_w: float, r_th: float, tau_s: float, a_s: float, b_s: float) -> float:
    """Temperature rise now of a first-order body (thermal resistance `r_th` K/W, time constant `tau_s`) caused by
    a constant `power_w` that flowed from `b_s` until `a_s` seconds ago (a < b): the exact solution, so windows of
    the past add up."""
    return power_w * r_th * (math.exp(-a_s / tau_s) - math.exp(-b_s / tau_s))


@dataclass(frozen=True, slots=True)
class Pack:
    """One physical battery pack: its barcode, age and the small manufacturing spread between its cells."""

    barcode: str
    chemistry: Chemistry
    cells: int
    nominal_ah: float
    soh0_pct: float  # state of health when the model starts
    cycles0: int
    cell_soc_offsets: tuple[float, ...]  # per cell, % SOC against the pack mean (the balancer keeps it small)
    cell_r_offsets: tuple[float, ...]  # per cell, relative resistance deviation
    bound: bool = True  # bound to the vehicle's VIN at registration (a foreign pack is not)

    @classmethod
    def draw(
        cls,
        rng: random.Random,
        barcode: str,
        chemistry: Chemistry,
        cells: int,
        nominal_ah: float,
        soh_range: tuple[float, float] = (86.0, 99.5),
        bound: bool = True,
    ) -> Pack:
        soh = rng.uniform(*soh_range)
        soc_off = [rng.gauss(0.0, 0.25) for _ in range(cells)]
        mean = sum(soc_off) / cells
        return cls(
            barcode=barcode,
            chemistry=chemistry,
            cells=cells,
            nominal_ah=nominal_ah,
            soh0_pct=soh,
            # Cycles roughly in line with the fade so far (calendar ageing takes the rest).
            cycles0=round((100.0 - soh) * 0.5 / chemistry.cycle_fade_pct),
            cell_soc_offsets=tuple(o - mean for o in soc_off),
            cell_r_offsets=tuple(rng.gauss(0.0, 0.03) for _ in range(cells)),
            bound=bound,
        )

    def soh(self, throughput_ah: float, days: float) -> float:
        """SOH after `throughput_ah` of charge moved in and out and `days` of calendar time since the start."""
        efc = throughput_ah / (2.0 * self.nominal_ah)
        fade = efc * self.chemistry.cycle_fade_pct + days / 365.0 * self.chemistry.calendar_fade_pct_per_year
        return max(0.0, self.soh0_pct - fade)

    def cycles(self, throughput_ah: float) -> int:
        return self.cycles0 + int(throughput_ah / (2.0 * self.nominal_ah))


@dataclass(frozen=True, slots=True)
class Charger:
    """An e-bike charger: constant current `current_a`, then constant voltage at the chemistry's charge voltage
    until the current falls below `cutoff_a`."""

    current_a: float
    cutoff_a: float


@dataclass(frozen=True, slots=True)
class ChargeCurve:
    """The closed-form CC-CV session of one pack from `soc0`; times in seconds from the session start.

    In the CV phase the charge still missing and the current both decay with the same time constant, so the
    taper delivers exactly what the pack lacks (SOC approaches 100 % and never passes it).
    """

    soc0: float
    current_a: float  # the CC current
    soc_cv: float  # SOC where the constant-voltage phase begins
    t_cv: float  # end of the CC phase (0 when the pack was already past soc_cv)
    i_cv: float  # current at the start of the CV phase
    tau_s: float
    t_done: float  # the charger cuts off here

    @classmethod
    def plan(
        cls, soc0: float, charger: Charger, capacity_ah: float, cells: int, chem: Chemistry, r_ohm: float
    ) -> ChargeCurve:
        i_cc = charger.current_a
        # CV begins where OCV + I·R reaches the charge voltage.
        soc_cv = min(99.0, max(50.0, chem.soc_at_ocv(chem.cell_charge_v - i_cc * r_ohm / cells)))
        ah_per_pct = capacity_ah / 100.0
        t_cv = max(0.0, (soc_cv - soc0) * ah_per_pct / i_cc * 3600.0)
        start = max(soc0, soc_cv)
        tau = (100.0 - soc_cv) * ah_per_pct * 3600.0 / i_cc
        i_cv = i_cc * (100.0 - start) / (100.0 - soc_cv)
        t_done = t_cv + (tau * math.log(i_cv / charger.cutoff_a) if i_cv > charger.cutoff_a else 0.0)
        return cls(soc0, i_cc, soc_cv, t_cv, i_cv, tau, t_done)

    def soc(self, dt: float) -> float:
        dt = min(max(0.0, dt), self.t_done)
        if dt < self.t_cv:
            return self.soc0 + (self.soc_cv - self.soc0) * dt / self.t_cv
        start = max(self.soc0, self.soc_cv)
        return 100.0 - (100.0 - start) * math.exp(-(dt - self.t_cv) / self.tau_s)

    def current(self, dt: float) -> float:
        """Charge current (A, positive into the pack); zero once the charger cut off."""
        if dt < 0.0 or dt >= self.t_done:
            return 0.0
        if dt < self.t_cv:
            return self.current_a
        return self.i_cv * math.exp(-(dt - self.t_cv) / self.tau_s)

    def charge_ah(self, dt: float) -> float:
        """Charge put in (Ah) after `dt` seconds."""
        dt = min(max(0.0, dt), self.t_done)
        if dt < self.t_cv:
            return self.current_a * dt / 3600.0
        tail = self.i_cv * self.tau_s * (1.0 - math.exp(-(dt - self.t_cv) / self.tau_s))
        return (self.current_a * self.t_cv + tail) / 3600.0
