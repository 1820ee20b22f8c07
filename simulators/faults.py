"""Fault injection: time-windowed faults on a vehicle model, with the ground truth to check detection against.

A `Fault` names what goes wrong, on which vehicle, from when to when, and how badly. `FaultedModel` is a
`VehicleModel` that carries a list of them; it is what the emulators (GNSS, JBD BMS, controller over UART, CAN)
and the protocol-level fleets read, so every path to the cloud sees the same faulted vehicle. A fault acts in one
or both of two ways:

- **on the rider's plan**, through scripted `Segment`s of the model: the vehicle is made to park (and lock) long
  enough before an at-rest fault, to ride during a riding fault, to ride with its limiter lifted, to be carried off
  while locked, to crash, to have its pack swapped;
- **on the state** the devices report, after the model computed it: a probe heating up, a cell collapsing or
  drifting, the configured speed limit or wheel size, the receiver losing its fix, the telematics unit losing the
  network.

Every fault yields a `GroundTruth`: kind, VIN, window, parameters, and what the default hazard rules
(cloud_ingest/rules/default_rules.toml, docs/RULES.md) must make of it — the rule, the level, by when it must be
raised and by when cleared after the fault ended — plus the rules whose alarms are a legitimate side effect
(`collateral`) and operator actions the scenario needs (locking the vehicle in the owner's app). Where the level
depends on how the ride went (how long the speed stayed over a threshold, how far a thief got), it is measured on
the model, not assumed. A fault below the rule's first threshold is a *near miss*: its ground truth expects
nothing, which is how negative scenarios are written.

Thresholds are those of the default rules file, mirrored in `THRESHOLDS` (simulators never import the cloud);
tests/test_faults.py holds the two together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulators.route import Route, haversine_m
from simulators.vehicle import Segment, VehicleModel, VehicleState

FAULT_KINDS = (
    "thermal_runaway",
    "thermal_runaway_precursor",
    "cell_imbalance",
    "internal_short",
    "speed_limiter_tampering",
    "wheel_size_tampering",
    "unbound_battery_swap",
    "theft",
    "crash",
    "gnss_jamming",
    "offline",
)

# The default rules' thresholds these faults are graded against (cloud_ingest/rules/default_rules.toml).
THRESHOLDS: dict[str, dict[str, Any]] = {
    "thermal_runaway": {
        "level": 3,
        "rate_c_per_s": 1.0,
        "rate_hold_s": 3.0,
        "max_temp_c": 60.0,
        "voltage_drop_pct": 25.0,
        "clear_temp_c": 50.0,
        "clear_duration_s": 300.0,
    },
    "thermal_runaway_precursor": {
        "levels": (2.0, 4.0, 8.0),
        "durations_s": (60.0, 30.0, 10.0),
        "tau_s": 60.0,
        "warmup_s": 60.0,
        "min_temp_c": 30.0,
        "clear_duration_s": 300.0,
    },
    "cell_voltage_spread": {
        "levels": (150.0, 300.0, 600.0),
        "durations_s": (60.0, 30.0, 10.0),
        "clear_duration_s": 120.0,
    },
    "internal_short_suspected": {
        "levels": (15.0, 30.0, 60.0),
        "durations_s": (300.0, 120.0, 60.0),
        "settle_s": 300.0,
        "clear_duration_s": 600.0,
    },
    "speed_limiter_tampering": {
        "levels": {"ebike48": (28.0, 32.0, 40.0), "emoto72": (65.0, 70.0, 80.0)},
        "durations_s": (15.0, 10.0, 5.0),
        "clear_duration_s": 30.0,
    },
    "wheel_size_tampering": {"levels": (10.0, 20.0, 35.0), "durations_s": (60.0, 30.0, 30.0), "clear_duration_s": 60.0},
    "controller_config_mismatch": {"level": 2, "raised_limit_level": 3},
    "battery_vehicle_mismatch": {
        "level": 2,
        "more_cells_level": 3,
        "more_cells_duration_s": 30.0,
        "clear_duration_s": 60.0,
    },
    "theft_displacement_while_locked": {
        "rolling_level": 1,
        "levels": (None, 50.0, 300.0),
        "duration_s": 10.0,
        "clear_duration_s": 60.0,
    },
    "crash_or_fall": {"decel_ms2": 7.0, "min_speed_kmh": 15.0, "levels": (3.0, 15.0, 120.0), "clear_duration_s": 10.0},
    "gnss_cut_or_jamming": {"levels": (90.0, 300.0), "moving_kmh": 10.0, "clear_duration_s": 30.0},
    "vehicle_offline": {"levels": (3.0, 720.0)},
}

# Every rule an injected fault may legitimately raise besides its own — a runaway cell also over-heats the pack,
# spreads the cells and trips the BMS — so a scenario can insist that nothing else fires.
_COLLATERAL: dict[str, tuple[str, ...]] = {
    "thermal_runaway": (
        "battery_over_temperature",
        "probe_temperature_difference",
        "cell_voltage_spread",
        "cell_under_voltage",
        "thermal_runaway_precursor",
        "internal_short_suspected",
        "bms_protection_repeated",
        "soc_jump",
    ),
    "thermal_runaway_precursor": ("battery_over_temperature", "probe_temperature_difference"),
    "cell_imbalance": ("cell_under_voltage",),
    "internal_short": ("cell_voltage_spread",),
    "speed_limiter_tampering": (),
    "wheel_size_tampering": ("speed_limiter_tampering",),
    "unbound_battery_swap": ("soc_jump",),
    "theft": (),
    "crash": (),
    "gnss_jamming": ("elevator_entry_suspected",),
    "offline": (),
}

_SLACK_S = 20.0  # sampling, batching and the pipeline: what an expectation's deadline adds to the rule's own time


@dataclass(frozen=True, slots=True)
class Fault:
    """`kind` (one of FAULT_KINDS) from `start` to `end` (unix seconds), with kind-specific `params`."""

    kind: str
    start: float
    end: float
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {', '.join(FAULT_KINDS)}")
        if not self.end > self.start:
            raise ValueError(f"{self.kind}: a fault must end after it starts")

    def param(self, name: str) -> Any:
        return self.params.get(name, _DEFAULTS[self.kind][name])

    def num(self, name: str) -> float:
        return float(self.param(name))


_DEFAULTS: dict[str, dict[str, Any]] = {
    # °C/s of the runaway probe's rise, how long it rises, which cell vents (its voltage collapses).
    "thermal_runaway": {"rate_c_per_s": 2.0, "rise_s": 40.0, "cell": 1, "collapse": True},
    # °C/min of the self-heating, at rest.
    "thermal_runaway_precursor": {"rate_c_per_min": 5.0},
    "cell_imbalance": {"delta_mv": 200.0, "cell": 3},
    "internal_short": {"fall_mv": 40.0, "rate_mv_per_min": 4.0, "cell": 5},
    "speed_limiter_tampering": {"limit_kmh": 40.0, "wish_kmh": (33.0, 38.0), "reconfigure": True},
    "wheel_size_tampering": {"configured_inch": 12.0},
    "unbound_battery_swap": {"cells": None, "nominal_ah": None, "bound": False},
    # ridden away, "carried" (in a van, wheel standing) or "nudged" (shifted a few metres: a near miss).
    "theft": {"mode": "ridden", "lock_before_s": 300.0},
    "crash": {"speed_kmh": 35.0, "decel_ms2": 30.0, "still_s": 40.0},
    "gnss_jamming": {},
    "offline": {"interval_s": 5.0},
}


@dataclass(frozen=True, slots=True)
class Expectation:
    """`rule` raised at `level` (at least) by `by_ms`, and cleared by `clear_by_ms` (None: not required)."""

    rule: str
    level: int
    by_ms: int
    clear_by_ms: int | None


@dataclass(frozen=True, slots=True)
class Action:
    """What a scenario does besides feeding telemetry: at `at_ms`, PUT this profile change (e.g. lock)."""

    at_ms: int
    profile: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GroundTruth:
    kind: str
    vin: str
    start_ms: int
    end_ms: int
    params: dict[str, Any]
    expected: tuple[Expectation, ...]
    collateral: tuple[str, ...]
    actions: tuple[Action, ...] = ()
    facts: dict[str, Any] = field(default_factory=dict)  # what happened, measured on the model

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(self), default=list))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> GroundTruth:
        return cls(
            kind=doc["kind"],
            vin=doc["vin"],
            start_ms=int(doc["start_ms"]),
            end_ms=int(doc["end_ms"]),
            params=dict(doc["params"]),
            expected=tuple(Expectation(**e) for e in doc["expected"]),
            collateral=tuple(doc["collateral"]),
            actions=tuple(Action(**a) for a in doc.get("actions", ())),
            facts=dict(doc.get("facts", {})),
        )


def dump_ground_truth(truths: Iterable[GroundTruth]) -> str:
    """The ground truth of a run as one JSON document (a list), for tests and the benchmark report."""
    return json.dumps([t.to_json() for t in truths], indent=1, sort_keys=True)


def load_ground_truth(text: str) -> list[GroundTruth]:
    return [GroundTruth.from_json(d) for d in json.loads(text)]


# -- the faulted model ------------------------------------------------------------------------------------------------


class FaultedModel(VehicleModel):
    """A `VehicleModel` with `faults` injected: the rider's plan bends around them and its states carry them."""

    def __init__(
        self,
        route: Route,
        seed: int,
        start_time: float,
        variant: str = "ebike48",
        *,
        faults: Sequence[Fault] = (),
        script: Sequence[Segment] = (),
        **kwargs: Any,
    ) -> None:
        self.faults = tuple(sorted(faults, key=lambda f: f.start))
        segments = list(script)
        for f in self.faults:
            for g in _SCRIPTS[f.kind](f, variant):
                # Faults speak unix time; the model's segments count from its start.
                params = dict(g.params)
                if "crash_at" in params:
                    params["crash_at"] = float(params["crash_at"]) - start_time
                segments.append(Segment(g.kind, g.t0 - start_time, g.t1 - start_time, params))
        super().__init__(route, seed, start_time, variant, script=segments, **kwargs)

    def state_at(self, t: float) -> VehicleState:
        state = super().state_at(t)
        for f in self.faults:
            # Effects outlast their window a while (a cooling probe, a recovering cell): each modifier decides.
            if t >= f.start:
                state = _MODIFIERS[f.kind](f, state, self)
        return state

    def baseline_at(self, t: float) -> VehicleState:
        """The state at `t` without the faults' state modifiers (the plan still bent around them)."""
        return super().state_at(t)

    def ground_truth(self, vin: str) -> list[GroundTruth]:
        return [_TRUTH[f.kind](f, vin, self) for f in self.faults]


# -- scripts: what each fault does to the rider's plan ----------------------------------------------------------------


def _park(t0: float, t1: float, locked: bool = True) -> Segment:
    return Segment("park", t0, t1, {"locked": locked})


def _ride(t0: float, t1: float, **params: Any) -> Segment:
    return Segment("ride", t0, t1, params)


def _script_runaway(f: Fault, variant: str) -> list[Segment]:
    return [_park(f.start - 120.0, f.end + THRESHOLDS["thermal_runaway"]["clear_duration_s"] + 300.0)]


def _script_precursor(f: Fault, variant: str) -> list[Segment]:
    # At rest from before the warm-up until the rule could clear: the rule only judges low current.
    return [_park(f.start - 180.0, f.end + THRESHOLDS["thermal_runaway_precursor"]["clear_duration_s"] + 900.0)]


def _script_imbalance(f: Fault, variant: str) -> list[Segment]:
    return [_ride(f.start - 60.0, f.end + THRESHOLDS["cell_voltage_spread"]["clear_duration_s"] + 120.0)]


def _script_short(f: Fault, variant: str) -> list[Segment]:
    th = THRESHOLDS["internal_short_suspected"]
    return [_park(f.start - th["settle_s"] - 120.0, f.end + th["clear_duration_s"] + 180.0)]


def _script_speed(f: Fault, variant: str) -> list[Segment]:
    return [_ride(f.start, f.end, limiter_kmh=f.num("limit_kmh"), wish_kmh=tuple(f.param("wish_kmh")))]


def _script_wheel(f: Fault, variant: str) -> list[Segment]:
    from simulators.vehicle import VARIANTS

    vt = VARIANTS[variant]
    # The controller limits the speed it computes; with a smaller wheel configured that is not the real speed.
    real_limit = vt.speed_limit_kmh * vt.wheel_inch / f.num("configured_inch")
    th = THRESHOLDS["wheel_size_tampering"]
    return [
        _ride(f.start, f.end, limiter_kmh=real_limit, wish_kmh=(real_limit - 4.0, real_limit + 4.0)),
        _ride(f.end, f.end + th["clear_duration_s"] + 600.0),
    ]


def _script_swap(f: Fault, variant: str) -> list[Segment]:
    foreign: dict[str, Any] = {"pack": "foreign" if not f.param("bound") else "spare"}
    for name in ("cells", "nominal_ah"):
        if f.param(name) is not None:
            foreign[name] = f.param(name)
    hold = THRESHOLDS["battery_vehicle_mismatch"]["clear_duration_s"] + 180.0
    return [
        Segment("swap", f.start, f.start + 120.0, foreign),
        _park(f.start + 120.0, f.end, locked=False),
        Segment("swap", f.end, f.end + 120.0, {"pack": "own"}),
        _park(f.end + 120.0, f.end + 120.0 + hold, locked=False),
    ]


def _script_theft(f: Fault, variant: str) -> list[Segment]:
    mode = f.param("mode")
    if mode not in ("ridden", "carried", "nudged"):
        raise ValueError(f"theft mode {mode!r}: ridden, carried or nudged")
    carried = mode == "carried"
    # "nudged": someone shifts the locked vehicle in a crowded rack — at walking pace, a few metres.
    moving: dict[str, Any] = {"limiter_kmh": 0.8, "stops": False} if mode == "nudged" else {"stops": not carried}
    return [
        _park(f.start - f.num("lock_before_s"), f.start),
        _ride(f.start, f.end, locked=True, carried=carried, **moving),
        # The owner gets it back and unlocks it; it stays put while the alarm clears.
        _park(f.end, f.end + THRESHOLDS["theft_displacement_while_locked"]["clear_duration_s"] + 120.0, locked=False),
    ]


def _script_crash(f: Fault, variant: str) -> list[Segment]:
    impact = f.start
    still = f.num("still_s")
    v = f.num("speed_kmh")
    lead = max(40.0, v / 3.6 / 0.9 + 20.0)  # time to get up to speed and ride a while before the impact
    return [
        _ride(impact - lead, impact + still, crash_at=impact, crash_kmh=v, crash_decel_ms2=f.num("decel_ms2")),
        # Back on the road: riding on is what clears the alarm.
        _ride(impact + still, impact + still + 180.0, stops=False),
    ]


def _script_jamming(f: Fault, variant: str) -> list[Segment]:
    return [_ride(f.start - 30.0, f.end + THRESHOLDS["gnss_cut_or_jamming"]["clear_duration_s"] + 90.0)]


def _script_none(f: Fault, variant: str) -> list[Segment]:
    return []


_SCRIPTS: dict[str, Callable[[Fault, str], list[Segment]]] = {
    "thermal_runaway": _script_runaway,
    "thermal_runaway_precursor": _script_precursor,
    "cell_imbalance": _script_imbalance,
    "internal_short": _script_short,
    "speed_limiter_tampering": _script_speed,
    "wheel_size_tampering": _script_wheel,
    "unbound_battery_swap": _script_swap,
    "theft": _script_theft,
    "crash": _script_crash,
    "gnss_jamming": _script_jamming,
    "offline": _script_none,
}


# -- modifiers: what each fault does to the reported state ------------------------------------------------------------


def _with_cells(state: VehicleState, cells: list[float]) -> VehicleState:
    return dataclasses.replace(state, cell_voltages_v=tuple(cells), pack_voltage_v=sum(cells))


def _with_probes(state: VehicleState, probes: list[float], protection: int | None = None) -> VehicleState:
    changes: dict[str, Any] = {"probe_temps_c": tuple(probes), "battery_temp_max_c": max(probes)}
    if protection is not None:
        changes["bms_protection"] = protection
    return dataclasses.replace(state, **changes)


def runaway_excess_c(f: Fault, t: float) -> float:
    """Temperature excess of the runaway probe over the model's at `t`: a steep rise, a plateau (the sensor at its
    limit), and after the fault a fast decay (the pack cooled, doused or replaced)."""
    x = t - f.start
    peak = f.num("rate_c_per_s") * f.num("rise_s")
    if t <= f.end:
        return f.num("rate_c_per_s") * min(x, f.num("rise_s"))
    top = f.num("rate_c_per_s") * min(f.end - f.start, f.num("rise_s"))
    return min(peak, top) * math.exp(-(t - f.end) / 20.0)


def _mod_runaway(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    excess = runaway_excess_c(f, s.t)
    if excess < 0.01:
        return s
    probes = list(s.probe_temps_c) or [s.battery_temp_max_c]
    # The probe next to the venting cell sees it all; its neighbours some.
    probes = [p + excess * (1.0 if k == 0 else 0.35 / k) for k, p in enumerate(probes)]
    protection = s.bms_protection | (1 << 6) if max(probes) > 60.0 else s.bms_protection
    s = _with_probes(s, probes, protection)
    if f.param("collapse") and s.cell_voltages_v:
        cells = list(s.cell_voltages_v)
        k = min(int(f.param("cell")), len(cells)) - 1
        # The venting cell's voltage collapses over a few seconds (separator melt-down, internal short).
        x = s.t - f.start
        drop = min(1.0, x / 6.0) if s.t <= f.end else math.exp(-(s.t - f.end) / 10.0)
        cells[k] *= 1.0 - 0.8 * drop
        s = _with_cells(s, cells)
    return s


def _precursor_excess(f: Fault, t: float) -> float:
    rate = f.num("rate_c_per_min") / 60.0
    if t <= f.end:
        return rate * (t - f.start)
    # After the fault the self-heating stops and the pack cools back with its own time constant.
    return rate * (f.end - f.start) * math.exp(-(t - f.end) / 900.0)


def _mod_precursor(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    excess = _precursor_excess(f, s.t)
    probes = list(s.probe_temps_c) or [s.battery_temp_max_c]
    return _with_probes(s, [p + excess * (1.0 if k == 0 else 0.9) for k, p in enumerate(probes)])


def _ramp(f: Fault, t: float, ramp_s: float) -> float:
    """0 → 1 over `ramp_s` from the start, 1 until the end, back to 0 over `ramp_s`."""
    if t <= f.end:
        return min(1.0, (t - f.start) / ramp_s)
    return max(0.0, 1.0 - (t - f.end) / ramp_s)


def _mod_imbalance(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    share = _ramp(f, s.t, 60.0)
    if share <= 0.0 or not s.cell_voltages_v:
        return s
    cells = list(s.cell_voltages_v)
    k = min(int(f.param("cell")), len(cells)) - 1
    cells[k] -= f.num("delta_mv") / 1000.0 * share
    return _with_cells(s, cells)


def short_fall_mv(f: Fault, t: float) -> float:
    """How far the shorted cell has fallen at `t` (it recovers over a minute after the fault: replaced)."""
    if t <= f.end:
        return min(f.num("fall_mv"), f.num("rate_mv_per_min") / 60.0 * (t - f.start))
    reached = min(f.num("fall_mv"), f.num("rate_mv_per_min") / 60.0 * (f.end - f.start))
    return max(0.0, reached * (1.0 - (t - f.end) / 60.0))


def _mod_short(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    fall = short_fall_mv(f, s.t)
    if fall <= 0.0 or not s.cell_voltages_v:
        return s
    cells = list(s.cell_voltages_v)
    k = min(int(f.param("cell")), len(cells)) - 1
    cells[k] -= fall / 1000.0
    return _with_cells(s, cells)


def _mod_speed(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    if s.t > f.end or not f.param("reconfigure"):
        return s
    return dataclasses.replace(s, speed_limit_cfg_kmh=float(f.num("limit_kmh")))


def _mod_wheel(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    if s.t > f.end:
        return s
    return dataclasses.replace(s, wheel_inch_cfg=float(f.num("configured_inch")))


def _mod_jamming(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    return s if s.t > f.end else dataclasses.replace(s, gnss_fix=False)


def _mod_offline(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    return s if s.t > f.end else dataclasses.replace(s, online=False)


def _mod_none(f: Fault, s: VehicleState, m: VehicleModel) -> VehicleState:
    return s


_MODIFIERS: dict[str, Callable[[Fault, VehicleState, VehicleModel], VehicleState]] = {
    "thermal_runaway": _mod_runaway,
    "thermal_runaway_precursor": _mod_precursor,
    "cell_imbalance": _mod_imbalance,
    "internal_short": _mod_short,
    "speed_limiter_tampering": _mod_speed,
    "wheel_size_tampering": _mod_wheel,
    "unbound_battery_swap": _mod_none,
    "theft": _mod_none,
    "crash": _mod_none,
    "gnss_jamming": _mod_jamming,
    "offline": _mod_offline,
}


# -- ground truth -----------------------------------------------------------------------------------------------------


def _ms(t: float) -> int:
    return round(t * 1000)


def _level(value: float, levels: Sequence[float | None], falling: bool = False) -> int:
    """The highest level whose threshold `value` reaches (0: none)."""
    reached = 0
    for k, th in enumerate(levels, start=1):
        if th is not None and (value <= th if falling else value >= th):
            reached = k
    return reached


def _truth(f: Fault, vin: str, expected: list[Expectation], **extra: Any) -> GroundTruth:
    # JSON-shaped (lists, not tuples), so the ground truth reads back equal to what was written.
    params = json.loads(json.dumps({k: f.param(k) for k in _DEFAULTS[f.kind]} | f.params))
    return GroundTruth(
        kind=f.kind,
        vin=vin,
        start_ms=_ms(f.start),
        end_ms=_ms(f.end),
        params=params,
        expected=tuple(expected),
        collateral=_COLLATERAL[f.kind],
        **extra,
    )


def _truth_runaway(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["thermal_runaway"]
    rate, rise = f.num("rate_c_per_s"), min(f.num("rise_s"), f.end - f.start)
    base = m.baseline_at(f.start).battery_temp_max_c
    peak = base + rate * rise
    expected: list[Expectation] = []
    # GB 38031: the rise must last more than rate_hold_s, and the cell collapse or the maximum temperature must
    # come with it (the collapse passes 25 % within 2 s of the start).
    criteria = f.param("collapse") or peak >= th["max_temp_c"]
    if rate >= th["rate_c_per_s"] and rise > th["rate_hold_s"] + 1.0 and criteria:
        to_max = max(0.0, (th["max_temp_c"] - base) / rate) if not f.param("collapse") else 2.0
        by = f.start + max(th["rate_hold_s"] + 1.0, to_max) + _SLACK_S
        cooled = f.end + 20.0 * math.log(max(1.0, (peak - th["clear_temp_c"] + 10.0) / 10.0)) + 30.0
        clear_by = cooled + th["clear_duration_s"] + _SLACK_S
        expected.append(Expectation("thermal_runaway", th["level"], _ms(by), _ms(clear_by)))
    return _truth(f, vin, expected, facts={"base_temp_c": base, "peak_temp_c": peak})


def _truth_precursor(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["thermal_runaway_precursor"]
    rate = f.num("rate_c_per_min")
    base = m.baseline_at(f.start).battery_temp_max_c
    level = _level(rate, th["levels"])
    expected: list[Expectation] = []
    if level:
        # The script parked the vehicle long enough for the warm-up; graded once above min_temp_c, the filtered
        # rate then converges on the true one.
        hot_at = max(0.0, (th["min_temp_c"] - base) / (rate / 60.0))
        converge = -th["tau_s"] * math.log(max(1e-3, 1.0 - th["levels"][level - 1] / rate))
        by = f.start + hot_at + converge + th["durations_s"][level - 1] + 2 * _SLACK_S
        if by > f.end:
            level = 0
        else:
            clear_by = f.end + th["clear_duration_s"] + 3 * th["tau_s"] + _SLACK_S
            expected.append(Expectation("thermal_runaway_precursor", level, _ms(by), _ms(clear_by)))
    peak = base + rate * (f.end - f.start) / 60.0
    return _truth(f, vin, expected, facts={"base_temp_c": base, "peak_temp_c": peak})


def _truth_imbalance(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["cell_voltage_spread"]
    delta = f.num("delta_mv")
    # The pack's own spread adds to the injected one; grade with the smallest it shows during the fault.
    spreads = [
        (max(s.cell_voltages_v) - min(s.cell_voltages_v)) * 1000.0
        for s in (m.state_at(f.start + 60.0 + k) for k in range(0, max(1, int(f.end - f.start - 60.0)), 5))
    ]
    level = _level(min(spreads), th["levels"])
    expected: list[Expectation] = []
    if level:
        by = f.start + 60.0 + th["durations_s"][level - 1] + _SLACK_S
        clear_by = f.end + 60.0 + th["clear_duration_s"] + _SLACK_S
        expected.append(Expectation("cell_voltage_spread", level, _ms(by), _ms(clear_by)))
    return _truth(f, vin, expected, facts={"min_spread_mv": min(spreads), "delta_mv": delta})


def _truth_short(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["internal_short_suspected"]
    fall = min(f.num("fall_mv"), f.num("rate_mv_per_min") * (f.end - f.start) / 60.0)
    level = _level(fall - 2.0, th["levels"])  # 2 mV: the BMS's millivolt rounding on both cells
    expected: list[Expectation] = []
    if level:
        reach = th["levels"][level - 1] / (f.num("rate_mv_per_min") / 60.0)
        by = f.start + reach + th["durations_s"][level - 1] + _SLACK_S
        if by <= f.end:
            clear_by = f.end + 60.0 + th["clear_duration_s"] + _SLACK_S
            expected.append(Expectation("internal_short_suspected", level, _ms(by), _ms(clear_by)))
    return _truth(f, vin, expected, facts={"fall_mv": fall})


def _sustained(
    m: FaultedModel, t0: float, t1: float, value: Callable[[VehicleState], float], threshold: float, hold_s: float
) -> float | None:
    """The first time in [t0, t1] (1 s steps) that `value` has been ≥ `threshold` for `hold_s`, or None."""
    since: float | None = None
    t = t0
    while t <= t1:
        if value(m.state_at(t)) >= threshold:
            since = t if since is None else since
            if t - since >= hold_s:
                return t
        else:
            since = None
        t += 1.0
    return None


def _truth_speed(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["speed_limiter_tampering"]
    levels = th["levels"][m.variant.name]
    expected: list[Expectation] = []
    reached: dict[str, Any] = {}
    # The highest level the ride actually held long enough, with margins for GNSS rounding and sample alignment.
    for level in (3, 2, 1):
        at = _sustained(
            m, f.start, f.end, lambda s: s.speed_kmh, levels[level - 1] + 0.5, th["durations_s"][level - 1] + 2.0
        )
        if at is not None:
            clear_by = f.end + th["clear_duration_s"] + 30.0 + _SLACK_S
            expected.append(Expectation("speed_limiter_tampering", level, _ms(at + _SLACK_S), _ms(clear_by)))
            reached = {"level_held_at_ms": _ms(at)}
            break
    if f.param("reconfigure"):
        cfg = THRESHOLDS["controller_config_mismatch"]
        raised = f.num("limit_kmh") > m.variant.speed_limit_kmh
        level = cfg["raised_limit_level"] if raised else cfg["level"]
        # The agent reads the configuration at connect and every 30 s.
        expected.append(
            Expectation(
                "controller_config_mismatch", level, _ms(f.start + 30.0 + _SLACK_S), _ms(f.end + 30.0 + _SLACK_S)
            )
        )
    top = max(m.state_at(f.start + k).speed_kmh for k in range(int(f.end - f.start)))
    return _truth(f, vin, expected, facts={"max_speed_kmh": top, **reached})


def _truth_wheel(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["wheel_size_tampering"]
    factory = m.variant.wheel_inch
    under = (1.0 - f.num("configured_inch") / factory) * 100.0
    level = _level(under - 1.0, th["levels"])
    expected: list[Expectation] = []
    if level:
        # Graded once 200 m are in the window (≈ 30 s at speed), then the level's duration; stops add time.
        by = f.start + 60.0 + th["durations_s"][level - 1] + 120.0 + _SLACK_S
        clear_by = f.end + 60.0 * math.log(under / 5.0) * 2.0 + th["clear_duration_s"] + 300.0
        expected.append(Expectation("wheel_size_tampering", level, _ms(by), _ms(clear_by)))
    if abs(f.num("configured_inch") - factory) > 0.3:
        expected.append(
            Expectation(
                "controller_config_mismatch",
                THRESHOLDS["controller_config_mismatch"]["level"],
                _ms(f.start + 30.0 + _SLACK_S),
                _ms(f.end + 30.0 + _SLACK_S),
            )
        )
    return _truth(f, vin, expected, facts={"under_read_pct": under})


def _truth_swap(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["battery_vehicle_mismatch"]
    inside = m.baseline_at(f.start + 119.0)
    expected: list[Expectation] = []
    if not inside.battery_bound:
        more = inside.cell_count > m.cells
        level = th["more_cells_level"] if more else th["level"]
        wait = th["more_cells_duration_s"] if more else 0.0
        # The pack goes in mid-swap (60 s); the agent reads its barcode once the BMS answers again.
        by = f.start + 60.0 + 20.0 + wait + _SLACK_S
        clear_by = f.end + 60.0 + 20.0 + th["clear_duration_s"] + _SLACK_S
        expected.append(Expectation("battery_vehicle_mismatch", level, _ms(by), _ms(clear_by)))
    return _truth(
        f,
        vin,
        expected,
        facts={"barcode": inside.battery_barcode, "cells": inside.cell_count, "bound": inside.battery_bound},
    )


def _truth_theft(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["theft_displacement_while_locked"]
    lock_at = f.start - f.num("lock_before_s")
    anchor = m.state_at(f.start - 1.0)
    expected: list[Expectation] = []

    def displacement(s: VehicleState) -> float:
        return haversine_m(anchor.lat, anchor.lon, s.lat, s.lon)

    # Displacement held for the rule's duration plus margins (GNSS rounding, sample alignment).
    top = max(displacement(m.state_at(f.start + k)) for k in range(int(f.end - f.start)))
    for level in (3, 2):
        at = _sustained(m, f.start, f.end, displacement, th["levels"][level - 1] + 5.0, th["duration_s"] + 2.0)
        if at is not None:
            expected.append(
                Expectation(
                    "theft_displacement_while_locked",
                    level,
                    _ms(at + _SLACK_S),
                    _ms(f.end + th["clear_duration_s"] + 2 * _SLACK_S),
                )
            )
            break
    else:
        rolling = f.param("mode") == "ridden" and _sustained(
            m, f.start, f.end, lambda s: s.speed_kmh if not s.carried else 0.0, 2.0, th["duration_s"] + 2.0
        )
        if rolling:
            expected.append(
                Expectation(
                    "theft_displacement_while_locked",
                    th["rolling_level"],
                    _ms(float(rolling) + _SLACK_S),
                    _ms(f.end + th["clear_duration_s"] + 2 * _SLACK_S),
                )
            )
    actions = (Action(_ms(lock_at), {"locked": True}), Action(_ms(f.end), {"locked": False}))
    return _truth(f, vin, expected, actions=actions, facts={"max_displacement_m": top})


def _truth_crash(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["crash_or_fall"]
    speed = min(f.num("speed_kmh"), m.variant.max_speed_kmh)  # the limiter holds a crash's speed too
    decel, still = f.num("decel_ms2"), f.num("still_s")
    expected: list[Expectation] = []
    # Between samples 1 s apart, the measured deceleration is at most the speed lost in that second.
    measurable = min(decel, speed / 3.6 / 1.0)
    if speed >= th["min_speed_kmh"] and measurable >= th["decel_ms2"]:
        level = _level(still - 2.0, th["levels"])
        if level:
            by = f.start + th["levels"][level - 1] + 2.0 + _SLACK_S
            clear_by = f.start + still + th["clear_duration_s"] + 20.0 + _SLACK_S
            expected.append(Expectation("crash_or_fall", level, _ms(by), _ms(clear_by)))
    return _truth(f, vin, expected, facts={"measurable_decel_ms2": measurable})


def _truth_jamming(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["gnss_cut_or_jamming"]
    expected: list[Expectation] = []
    riding = 0.0
    at_level: dict[int, float] = {}
    for k in range(int(f.end - f.start)):
        if m.state_at(f.start + k).speed_kmh >= th["moving_kmh"] + 1.0:
            riding += 1.0
            for level, need in enumerate(th["levels"], start=1):
                if riding >= need + 3.0 and level not in at_level:
                    at_level[level] = f.start + k
    if at_level:
        level = max(at_level)
        expected.append(
            Expectation(
                "gnss_cut_or_jamming",
                level,
                _ms(at_level[level] + _SLACK_S),
                _ms(f.end + th["clear_duration_s"] + 2 * _SLACK_S),
            )
        )
    return _truth(f, vin, expected, facts={"riding_without_fix_s": riding})


def _truth_offline(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    th = THRESHOLDS["vehicle_offline"]
    interval = f.num("interval_s")
    silence = f.end - f.start
    level = _level(silence / interval - 1.0, th["levels"])
    expected: list[Expectation] = []
    if level:
        by = f.start + th["levels"][level - 1] * interval + 2 * _SLACK_S
        expected.append(Expectation("vehicle_offline", level, _ms(by), _ms(f.end + 2 * _SLACK_S)))
    return _truth(f, vin, expected, facts={"silence_s": silence})


_TRUTH: dict[str, Callable[[Fault, str, FaultedModel], GroundTruth]] = {
    "thermal_runaway": _truth_runaway,
    "thermal_runaway_precursor": _truth_precursor,
    "cell_imbalance": _truth_imbalance,
    "internal_short": _truth_short,
    "speed_limiter_tampering": _truth_speed,
    "wheel_size_tampering": _truth_wheel,
    "unbound_battery_swap": _truth_swap,
    "theft": _truth_theft,
    "crash": _truth_crash,
    "gnss_jamming": _truth_jamming,
    "offline": _truth_offline,
}


# -- a schedule for a fleet -------------------------------------------------------------------------------------------

# A duration (s) for each kind that lets its rule raise and, after the fault, clear.
_TYPICAL_S: dict[str, float] = {
    "thermal_runaway": 60.0,
    "thermal_runaway_precursor": 300.0,
    "cell_imbalance": 240.0,
    "internal_short": 660.0,
    "speed_limiter_tampering": 300.0,
    "wheel_size_tampering": 360.0,
    "unbound_battery_swap": 300.0,
    "theft": 300.0,
    "crash": 40.0,
    "gnss_jamming": 200.0,
    "offline": 120.0,
}
# How long before and after its window a fault's script takes over the vehicle.
_LEAD_S = 600.0
_TAIL_S = 1200.0


def schedule_faults(
    vehicles: int, start: float, duration_s: float, seed: int, kinds: Sequence[str] = FAULT_KINDS, share: float = 0.1
) -> dict[int, list[Fault]]:
    """Faults for a fleet of `vehicles` over [start, start + duration_s]: about `share` of the vehicles get one
    fault each, kinds taken in turn, at a random time that leaves room for its lead-in and for its alarm to clear.
    Deterministic for `seed`. Returns {vehicle index: [faults]}."""
    rng = random.Random(f"faults-{seed}")
    picked = sorted(rng.sample(range(vehicles), max(1, round(vehicles * share)) if vehicles else 0))
    out: dict[int, list[Fault]] = {}
    for n, index in enumerate(picked):
        kind = kinds[n % len(kinds)]
        length = _TYPICAL_S[kind]
        latest = start + duration_s - _TAIL_S - length
        earliest = start + _LEAD_S
        if latest < earliest:
            continue  # the run is too short for this kind to raise and clear
        at = rng.uniform(earliest, latest)
        out[index] = [Fault(kind, at, at + length)]
    return out


# -- what the edge agent would send -----------------------------------------------------------------------------------


class AgentView:
    """The catalogue values an edge agent takes from this vehicle's devices at each GNSS epoch, without ptys.

    - GNSS: what `simulators.nmea.encode_epoch` writes for the state, as the agent's decoder reads it back (NMEA
      minutes, knots to three decimals, altitude to 0.1 m; satellites, DOPs and constellation counts of the
      epoch), computed without writing the sentences; no position and fix mode 1 while jammed.
    - BMS (while the pack is in) and controller: the emulators' own value methods (`JbdBmsEmulator.basic_info`,
      `cell_millivolts`, `pack_of`; `ControllerEmulator.status`, `config`), through the agent's codecs to bytes
      and back, so quantisation is the wire's.
    - Mapped to catalogue names at catalogue resolution, out-of-range values dropped — the agent's
      `signals()` rules, applied from a table built once (they cost more than the rest of a sample).

    tests/test_faults.py holds this against the agent's own decoder and `signals()`, value for value. A
    protocol-level vehicle (tests/test_scenarios.py) seals these rows exactly as the agent does.
    """

    def __init__(self, model: VehicleModel, receiver: str = "gn-multi") -> None:
        from edge_agent.devices import controller as ctl
        from edge_agent.devices import jbd
        from protocol import SignalType, load_catalogue
        from simulators.bms_jbd import JbdBmsEmulator
        from simulators.controller_uart import ControllerEmulator
        from simulators.nmea import COURSE_MIN_SPEED_KMH, KNOTS_PER_KMH, RECEIVERS, SkyModel, dops, format_angle

        self.model = model
        self.catalogue = load_catalogue()
        self.bms = JbdBmsEmulator(model)
        self.controller = ControllerEmulator(model)
        self.receiver = RECEIVERS[receiver]
        self._sky = SkyModel(model.seed)
        self._dops = dops
        self._angle = format_angle
        self._knots_per_kmh = KNOTS_PER_KMH
        self._course_min_kmh = COURSE_MIN_SPEED_KMH
        self._jbd = jbd
        self._ctl = ctl
        self._previous: VehicleState | None = None
        self._lagged: dict[str, Any] = {}
        # name -> (kind, decimals, min, max); kind: "f" float, "i" int, "b" bool, "s" str
        kinds = {SignalType.FLOAT: "f", SignalType.INT: "i", SignalType.BOOL: "b", SignalType.STR: "s"}
        self._meta = {
            sig.name: (
                kinds[sig.type],
                sig.decimals,
                -math.inf if sig.min is None else sig.min,
                math.inf if sig.max is None else sig.max,
            )
            for sig in self.catalogue
        }

    def _put(self, out: dict[str, Any], name: str, value: Any) -> None:
        """`value` under `name` as the agent's `signals()` would put it: rounded to the catalogue's resolution,
        left out when unknown to the catalogue, of the wrong type or out of range."""
        meta = self._meta.get(name)
        if meta is None or value is None:
            return
        kind, decimals, lo, hi = meta
        if kind == "b" or kind == "s":
            if isinstance(value, bool if kind == "b" else str):
                out[name] = value
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        if kind == "f":
            value = round(float(value), decimals) + 0.0
            if not math.isfinite(value):
                return
        elif not isinstance(value, int):
            return
        if lo <= value <= hi:
            out[name] = value

    def gnss(self, state: VehicleState, time_ms: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rx = "CurrentLocation.GNSSReceiver."
        put = self._put
        # The receiver writes GSA and GSV after RMC and GGA, and the agent closes an epoch once it has those two:
        # DOPs and satellite counts in a sample are the previous fix epoch's (none before the first).
        for name, value in self._lagged.items():
            put(out, name, value)
        if not state.gnss_fix:
            if self._lagged:
                put(out, rx + "BeiDouInUse", False)  # the agent reports no constellation in use without a fix
            # Jammed or antenna cut: the receiver keeps time but has no position (simulators.gnss.no_fix_epoch).
            put(out, rx + "FixMode", 1)
            put(out, rx + "FixQuality", 0)
            put(out, rx + "HDOP", 99.99)
            put(out, rx + "SatellitesUsed", 0)
            return out
        # The sky of this very instant, as the emulator writes it: satellites rise, set and cross the SNR line used
        # for a fix between any two seconds, so a sky cached over a longer slot drifts from what the agent decodes.
        sky = self._sky.at(state.t)
        systems = self.receiver.systems
        used = [v for v in sky.used() if v.system in systems]
        n_used = len(used)
        used_by = {system: sum(1 for v in used if v.system == system) for system in systems}
        in_view = {system: len(sky.in_view(system)) for system in systems}
        pdop, hdop, vdop = self._dops(n_used, state.t)
        knots = float(f"{state.speed_kmh * self._knots_per_kmh:.3f}")
        heading = None
        if state.speed_kmh >= self._course_min_kmh:
            heading = float(f"{state.heading_deg % 360.0:.1f}") % 360.0
        put(out, "CurrentLocation.Latitude", self._angle(state.lat, 2, "NS")[2])
        put(out, "CurrentLocation.Longitude", self._angle(state.lon, 3, "EW")[2])
        put(out, "CurrentLocation.Altitude", float(f"{state.altitude_m:.1f}"))
        put(out, "CurrentLocation.Heading", heading)
        put(out, rx + "GroundSpeed", knots * 1.852)
        put(out, rx + "FixMode", 3)
        put(out, rx + "FixQuality", self.receiver.quality)
        put(out, rx + "HDOP", hdop)
        put(out, rx + "SatellitesUsed", n_used)
        if not self._lagged and self.receiver.talker in ("GB", "BD"):
            put(out, rx + "BeiDouInUse", True)  # a BeiDou talker says so before any GSA; GN says nothing
        lagged: dict[str, Any] = {rx + "PDOP": pdop, rx + "VDOP": vdop, rx + "BeiDouInUse": used_by.get(4, 0) > 0}
        for system, segment in ((1, "GPS"), (4, "BeiDou"), (2, "GLONASS"), (3, "Galileo"), (5, "QZSS")):
            lagged[f"{rx}{segment}.SatellitesUsed"] = used_by.get(system, 0)
            lagged[f"{rx}{segment}.SatellitesInView"] = in_view.get(system, 0)
        self._lagged = lagged
        return out

    def devices(self, state: VehicleState, earlier: VehicleState | None = None) -> dict[str, Any]:
        """BMS (when the pack is in) and controller values of `state`; `earlier`: the previous sample's state."""
        jbd, ctl = self._jbd, self._ctl
        out: dict[str, Any] = {}
        put = self._put
        b = "Powertrain.TractionBattery."
        if state.battery_present:
            info = jbd.parse_basic_info(jbd.build_basic_info(self.bms.basic_info(state)))
            put(out, b + "CurrentVoltage", info.voltage_v)
            put(out, b + "CurrentCurrent", info.current_a)
            put(out, b + "StateOfCharge", float(info.soc_pct))
            put(out, b + "RemainingCapacity", info.remaining_ah)
            put(out, b + "NominalCapacity", info.nominal_ah)
            put(out, b + "CycleCount", info.cycles)
            put(out, b + "ProtectionStatus", info.protection)
            put(out, b + "CellCount", info.cell_count)
            temps = info.temperatures_c
            if temps:
                put(out, b + "Temperature.Max", max(temps))
                put(out, b + "Temperature.Min", min(temps))
            for i, t in enumerate(temps[: jbd.CATALOGUE_PROBES], start=1):
                put(out, f"{b}Temperature.Probe{i}", t)
            cells = jbd.parse_cell_voltages(
                jbd.build_cell_voltages([mv / 1000 for mv in self.bms.cell_millivolts(state)])
            )
            if cells:
                put(out, b + "CellVoltage.Max", max(cells))
                put(out, b + "CellVoltage.Min", min(cells))
            for i, v in enumerate(cells[: jbd.CATALOGUE_CELLS], start=1):
                put(out, f"{b}CellVoltage.Cell{i}", v)
            barcode = self.bms.pack_of(state)[0]
            if barcode:
                put(out, b + "Barcode", barcode)
        m = "Powertrain.ElectricMotor."
        st = ctl.parse_status(ctl.build_status(self.controller.status(state, earlier)))
        put(out, "Speed", st.speed_kmh)
        put(out, m + "Speed", st.motor_rpm)
        put(out, m + "PhaseCurrent", st.phase_current_a)
        put(out, m + "SupplyCurrent", st.supply_current_a)
        put(out, m + "ControllerTemperature", st.controller_temp_c)
        put(out, m + "FaultCode", st.faults)
        put(out, "Chassis.Brake.IsEngaged", st.brake)
        put(out, "Chassis.Accelerator.PedalPosition", st.throttle_pct)
        put(out, m + "AssistLevel", st.assist_level)
        put(out, m + "Temperature", st.motor_temp_c)
        cfg = ctl.parse_config(ctl.build_config(self.controller.config(state)))
        put(out, m + "ConfiguredSpeedLimit", cfg.speed_limit_kmh)
        put(out, "Chassis.Wheel.Size", cfg.wheel_inch)
        put(out, m + "PolePairs", cfg.pole_pairs)
        if cfg.firmware:
            put(out, m + "FirmwareVersion", cfg.firmware)
        return out

    def sample(self, t: float) -> tuple[int, dict[str, Any], VehicleState]:
        """(timestamp ms, values, the state they describe) of the sample the agent takes at `t`."""
        time_ms = round(t * 1000)
        state = self.model.state_at(time_ms / 1000.0)
        values = self.gnss(state, time_ms)
        values.update(self.devices(state, self._previous))
        self._previous = state
        return time_ms, values, state
