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
  network, a charger that over-charges or never stops, a BMS that trips or forgets its charge count.

Where a fault's effect builds up over time it is computed from the model's own physics, second by second and
remembered (`FaultedModel.memo`): a loose contact's I²R heat from the ride's current, a wrong charger's CC-CV
session on the chemistry's OCV curve extended past full (`battery.Chemistry.ocv_beyond`). A fault may also set the
weather (`ambient_c`: a winter night outdoors), which the model then has all day.

Every fault yields a `GroundTruth`: kind, VIN, window, parameters, and what the default hazard rules
(cloud_ingest/rules/default_rules.toml, docs/RULES.md) must make of it — the rule, the level, by when it must be
raised and by when cleared after the fault ended — plus the rules whose alarms are a legitimate side effect
(`collateral`) and the actions the scenario needs (`Action`, below). Where the level
depends on how the ride went (how long the speed stayed over a threshold, how far a thief got), it is measured on
the model, not assumed. A fault below the rule's first threshold is a *near miss*: its ground truth expects
nothing, which is how negative scenarios are written.

Thresholds are those of the default rules file (simulators never import the cloud). The first faults mirror them in
`THRESHOLDS`, which tests/test_faults.py holds against the loaded rules; the later ones read them from the file
itself through `rule_spec` (the same merge of model and chemistry overrides the rule engine does, held against it
by the same test) and grade the faulted model's own 1 Hz states with the engine's duration ladder (`_ladder`),
once with every threshold a margin harder and once a margin easier: when the two disagree the fault sits on a
threshold and its ground truth refuses to guess (`AmbiguousFault`).

A few faults need the cloud to know something the vehicle cannot send: `Action`s carry it — a profile change
(the owner locks the vehicle, a pack's production date is registered, a replaced pack's) or a geofence drawn
through the API before the vehicle charges inside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import tomllib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulators.battery import Pack, resistance_factor
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
    "hot_spot",
    "cold_charging",
    "overcharge",
    "over_discharged_pack",
    "bms_reset",
    "bms_overcurrent",
    "pack_end_of_life",
    "charger_no_cutoff",
    "forbidden_charging",
    "pushed_indoors",
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

RULES_FILE = Path(__file__).resolve().parent.parent / "cloud_ingest" / "rules" / "default_rules.toml"
_LEVEL_KEYS = ("l1", "l2", "l3")


class AmbiguousFault(ValueError):
    """A fault whose ground truth cannot be told: it sits on one of its rule's thresholds (move it off)."""


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule's settings for a (model, chemistry) as the default rules file gives them (seconds, not ms)."""

    rule: str
    levels: tuple[float | None, float | None, float | None]  # threshold rules; (None, None, None) otherwise
    clear: float | None
    durations_s: tuple[float, float, float]
    clear_duration_s: float
    params: dict[str, Any]


@functools.cache
def _rules_document() -> dict[str, Any]:
    doc: dict[str, Any] = tomllib.loads(RULES_FILE.read_text(encoding="utf-8"))
    return doc


@functools.cache
def rule_spec(rule: str, model: str | None = None, chemistry: str | None = None) -> RuleSpec:
    """`rule` in the default rules file, with the model's and then the chemistry's overrides merged in key by key —
    what the rule engine resolves for that vehicle (tests/test_faults.py holds the two together)."""
    table = _rules_document()["rules"][rule]
    merged: dict[str, Any] = {k: v for k, v in table.items() if k not in ("model", "chemistry")}
    for section, name in (("model", model), ("chemistry", chemistry)):
        override = table.get(section, {}).get(name, {}) if name is not None else {}
        for key, value in override.items():
            base = merged.get(key)
            merged[key] = {**base, **value} if isinstance(value, dict) and isinstance(base, dict) else value
    levels = merged.get("levels", {})
    durations = merged.get("duration_s", 0.0)
    if not isinstance(durations, dict):
        durations = dict.fromkeys(_LEVEL_KEYS, durations)
    return RuleSpec(
        rule=rule,
        levels=(levels.get("l1"), levels.get("l2"), levels.get("l3")),
        clear=merged.get("clear"),
        durations_s=(
            float(durations.get("l1", 0.0)),
            float(durations.get("l2", 0.0)),
            float(durations.get("l3", 0.0)),
        ),
        clear_duration_s=float(merged.get("clear_duration_s", 0.0)),
        params=dict(merged.get("params", {})),
    )


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
    # The faults below grade every rule they can move on the model itself, so what they raise is expected, not
    # collateral.
    "hot_spot": (),
    "cold_charging": (),
    "overcharge": (),
    "over_discharged_pack": (),
    "bms_reset": (),
    "bms_overcurrent": (),
    "pack_end_of_life": (),
    "charger_no_cutoff": (),
    "forbidden_charging": (),
    "pushed_indoors": (),
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
    # A loose busbar at `probe` (1: the hottest): its contact resistance heats a small mass next to the probe
    # under the ride's current; `share` of that heat reaches the next probe. Fixed at the end (no more heat).
    "hot_spot": {"r_contact_ohm": 0.1, "probe": 1, "tau_s": 300.0, "r_th_k_w": 3.0, "share": 0.35},
    # Charged where it stood all night: outdoors at `ambient_c` (the day's mean air temperature); unplugged at
    # the end. `charger_a` None: the vehicle's own home charger.
    "cold_charging": {"ambient_c": -8.0, "charger_a": None},
    # A charger whose voltage is above the pack's (`charger_v_per_cell`, at `charger_a`) on a pack whose BMS
    # charge MOSFET failed shorted, so nothing stops it; plugged into a pack at `soc0` (a charged one from the
    # swap cabinet). Unplugged at the end; the over-charged cells come down as the rider rides the pack down.
    "overcharge": {"charger_v_per_cell": 4.35, "charger_a": 6.0, "soc0": 99.0},
    # A spare stored for months until it self-discharged `depth_pct` below what the BMS calls empty, swapped in
    # at the start and swapped out again at the end.
    "over_discharged_pack": {"depth_pct": 6.0},
    # The BMS browns out and re-estimates the SOC from the cell voltage it measures at that instant (under load,
    # so it reads low); it counts from there until the end, when it recalibrates at rest. `ride_s`: how long
    # the vehicle is ridden after the reset before it is parked.
    "bms_reset": {"ride_s": 120.0},
    # The pack's BMS trips its discharge over-current protection at `ocp_a`, below what the controller draws on
    # hard accelerations (an undersized replacement pack); it releases as soon as the current drops.
    "bms_overcurrent": {"ocp_a": 15.0},
    # The registered pack reaches its marked service life (`service_life_years`) at the start; at the end it is
    # replaced by a new pack and the registry told so.
    "pack_end_of_life": {"service_life_years": 3.0},
    # A charger whose cut-off failed keeps pushing `trickle_a` into a full pack (plugged in at `soc0`).
    "charger_no_cutoff": {"trickle_a": 0.5, "soc0": 99.3, "charger_a": None},
    # Charged in a stairwell: a no-charging zone (`zone_radius_m`, its centre `zone_offset_m` east of where the
    # vehicle stands) is drawn through the API before; unplugged at the end.
    "forbidden_charging": {"zone_radius_m": 20.0, "zone_offset_m": 0.0, "charger_a": None},
    # Pushed into a building at `walk_kmh` for `push_s` (the sky gone); with `floors` > 0 taken up in the lift
    # (`lift_s`) and pushed on as long (no fix, so no altitude reaches the cloud), 0: a ground-floor bike room;
    # parked inside until the end, then taken out and ridden away.
    "pushed_indoors": {"push_s": 45.0, "walk_kmh": 4.0, "floors": 3, "lift_s": 40.0},
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
    """What a scenario does besides feeding telemetry, at `at_ms`: PUT a change of the vehicle's profile (lock,
    a pack's production date) and/or create a geofence (the body of `POST /v1/geofences`)."""

    at_ms: int
    profile: dict[str, Any] = field(default_factory=dict)
    geofence: dict[str, Any] | None = None


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
        # Per-fault memory of effects that build up over time (a hot spot's heat, a charging session), filled in
        # time order on a 1 s grid, so a state never depends on which instants were asked for before.
        self.memo: dict[int, Any] = {}
        for f in self.faults:
            if "ambient_c" in _DEFAULTS[f.kind]:
                kwargs.setdefault("ambient_c", f.num("ambient_c"))  # the weather is part of the scenario
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
        for n, f in enumerate(self.faults):
            # Effects outlast their window a while (a cooling probe, a recovering cell): each modifier decides.
            if t >= f.start:
                state = _MODIFIERS[f.kind](f, state, self, n)
        return state

    def baseline_at(self, t: float) -> VehicleState:
        """The state at `t` without the faults' state modifiers (the plan still bent around them)."""
        return super().state_at(t)

    def ground_truth(self, vin: str) -> list[GroundTruth]:
        return [_TRUTH[f.kind](f, vin, self) for f in self.faults]

    def takes_over_at(self) -> float:
        """When the first fault's script (or the fault itself) takes the vehicle over: what happened before is
        the vehicle's ordinary day, which a scenario need not watch."""
        return min(min([f.start, *(g.t0 for g in _SCRIPTS[f.kind](f, self.variant.name))]) for f in self.faults)


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


def _charger_a(f: Fault, variant: str) -> float:
    from simulators.vehicle import VARIANTS

    given = f.param("charger_a")
    return float(given) if given is not None else VARIANTS[variant].home_charger_a


def _script_hot_spot(f: Fault, variant: str) -> list[Segment]:
    # An errand long enough for the spot to heat; then the vehicle stands at the repair shop while it cools.
    return [_ride(f.start - 120.0, f.end, deliveries=False), _park(f.end, f.end + 1500.0, locked=False)]


def _script_cold_charging(f: Fault, variant: str) -> list[Segment]:
    charge = {"locked": False, "charge": "home", "charger_a": _charger_a(f, variant)}
    return [
        _park(f.start - 1800.0, f.start, locked=False),  # outdoors since the night: the pack is at the air's
        Segment("park", f.start, f.end, charge),
        _park(f.end, f.end + 900.0, locked=False),
    ]


def _script_overcharge(f: Fault, variant: str) -> list[Segment]:
    # A charged pack from the cabinet, parked at home; the wrong charger's session is the modifier's (the model's
    # own charger would stop at full). After it the rider rides the extra charge off.
    return [
        Segment("swap", f.start - 360.0, f.start - 240.0, {"pack": "spare", "soc": f.num("soc0")}),
        _park(f.start - 240.0, f.end + 60.0, locked=False),
        _ride(f.end + 60.0, f.end + 2400.0, deliveries=False),
    ]


def _script_over_discharged(f: Fault, variant: str) -> list[Segment]:
    # The stored pack goes in at the middle of the first swap and out at the middle of the second. Ridden up to
    # the first and off from the second: a swap at rest would make the internal-short rule compare one pack's
    # cells with the other's (see docs/RULES.md, scenario notes).
    return [
        _ride(f.start - 400.0, f.start - 60.0, deliveries=False),
        Segment("swap", f.start - 60.0, f.start + 60.0, {"pack": "spare", "soc": 0.0}),
        _park(f.start + 60.0, f.end - 60.0, locked=False),
        Segment("swap", f.end - 60.0, f.end + 60.0, {"pack": "own"}),
        _ride(f.end + 60.0, f.end + 900.0, deliveries=False),
    ]


def _script_bms_reset(f: Fault, variant: str) -> list[Segment]:
    parked_at = f.start + f.num("ride_s")
    if parked_at >= f.end:
        raise ValueError("bms_reset: the vehicle must be parked before the BMS recalibrates at the end")
    return [
        _ride(f.start - 300.0, parked_at, deliveries=False),
        _park(parked_at, f.end + 1200.0, locked=False),
    ]


def _script_overcurrent(f: Fault, variant: str) -> list[Segment]:
    return [_ride(f.start - 60.0, f.end + 800.0, deliveries=False)]


def _script_end_of_life(f: Fault, variant: str) -> list[Segment]:
    # The new pack goes in at the middle of the swap, at the end of the fault.
    return [
        _park(f.start - 600.0, f.end - 60.0, locked=False),
        Segment("swap", f.end - 60.0, f.end + 60.0, {"pack": "spare"}),
        _park(f.end + 60.0, f.end + 1200.0, locked=False),
    ]


def _script_no_cutoff(f: Fault, variant: str) -> list[Segment]:
    charge = {"locked": False, "charge": "home", "charger_a": _charger_a(f, variant)}
    return [
        Segment("swap", f.start - 150.0, f.start - 30.0, {"pack": "spare", "soc": f.num("soc0")}),
        _park(f.start - 30.0, f.start, locked=False),
        Segment("park", f.start, f.end, charge),
        _park(f.end, f.end + 600.0, locked=False),
    ]


def _script_forbidden_charging(f: Fault, variant: str) -> list[Segment]:
    charge = {"locked": False, "charge": "forbidden", "charger_a": _charger_a(f, variant)}
    return [
        _ride(f.start - 600.0, f.start - 180.0, deliveries=False),
        _park(f.start - 180.0, f.start, locked=False),
        Segment("park", f.start, f.end, charge),
        _park(f.end, f.end + 900.0, locked=False),
    ]


def _indoor_phases(f: Fault) -> list[tuple[str, float, float]]:
    """(kind, t0, t1) of what happens inside: pushed ("push"), in the lift or parked ("still")."""
    push, lift = f.num("push_s"), f.num("lift_s")
    out = [("push", f.start, f.start + push)]
    t = f.start + push
    if int(f.param("floors")) > 0:
        out += [("still", t, t + lift), ("push", t + lift, t + lift + push)]
        t += lift + push
    if t >= f.end:
        raise ValueError("pushed_indoors: the fault must last past the pushing and the lift")
    return [*out, ("still", t, f.end)]


def _script_pushed_indoors(f: Fault, variant: str) -> list[Segment]:
    walk = f.num("walk_kmh")
    out = [_ride(f.start - 300.0, f.start, deliveries=False)]
    for kind, t0, t1 in _indoor_phases(f):
        if kind == "push":
            out.append(_ride(t0, t1, limiter_kmh=walk, wish_kmh=(walk - 0.3, walk), stops=False))
        else:
            out.append(_park(t0, t1, locked=False))
    return [*out, _ride(f.end, f.end + 600.0, deliveries=False)]


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
    "hot_spot": _script_hot_spot,
    "cold_charging": _script_cold_charging,
    "overcharge": _script_overcharge,
    "over_discharged_pack": _script_over_discharged,
    "bms_reset": _script_bms_reset,
    "bms_overcurrent": _script_overcurrent,
    "pack_end_of_life": _script_end_of_life,
    "charger_no_cutoff": _script_no_cutoff,
    "forbidden_charging": _script_forbidden_charging,
    "pushed_indoors": _script_pushed_indoors,
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


def _mod_runaway(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
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


def _mod_precursor(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    excess = _precursor_excess(f, s.t)
    probes = list(s.probe_temps_c) or [s.battery_temp_max_c]
    return _with_probes(s, [p + excess * (1.0 if k == 0 else 0.9) for k, p in enumerate(probes)])


def _ramp(f: Fault, t: float, ramp_s: float) -> float:
    """0 → 1 over `ramp_s` from the start, 1 until the end, back to 0 over `ramp_s`."""
    if t <= f.end:
        return min(1.0, (t - f.start) / ramp_s)
    return max(0.0, 1.0 - (t - f.end) / ramp_s)


def _mod_imbalance(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
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


def _mod_short(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    fall = short_fall_mv(f, s.t)
    if fall <= 0.0 or not s.cell_voltages_v:
        return s
    cells = list(s.cell_voltages_v)
    k = min(int(f.param("cell")), len(cells)) - 1
    cells[k] -= fall / 1000.0
    return _with_cells(s, cells)


def _mod_speed(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t > f.end or not f.param("reconfigure"):
        return s
    return dataclasses.replace(s, speed_limit_cfg_kmh=float(f.num("limit_kmh")))


def _mod_wheel(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t > f.end:
        return s
    return dataclasses.replace(s, wheel_inch_cfg=float(f.num("configured_inch")))


def _mod_jamming(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    return s if s.t > f.end else dataclasses.replace(s, gnss_fix=False)


def _mod_offline(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    return s if s.t > f.end else dataclasses.replace(s, online=False)


def _mod_none(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    return s


def _pack_in(m: VehicleModel, s: VehicleState) -> Pack | None:
    return next((p for p in m.packs if p.barcode == s.battery_barcode), None)


def _cell_r(m: VehicleModel, s: VehicleState, soc: float | None = None) -> float:
    """One cell's share of the pack resistance at the state's temperature, SOC and health (the model's)."""
    soc = s.soc_pct if soc is None else soc
    factor = resistance_factor(s.battery_temp_max_c, min(100.0, max(0.0, soc)), s.soh_pct)
    return m.pack_resistance_ohm * factor / max(1, len(s.cell_voltages_v) or m.cells)


def _r_offsets(m: VehicleModel, s: VehicleState) -> tuple[float, ...]:
    pack = _pack_in(m, s)
    n = len(s.cell_voltages_v)
    return pack.cell_r_offsets if pack is not None and len(pack.cell_r_offsets) == n else (0.0,) * n


def _with_current(m: VehicleModel, s: VehicleState, current_a: float) -> VehicleState:
    """`s` with the pack current changed to `current_a` (positive into the pack): each cell's terminal voltage
    moves by the change across its resistance, as the model computes it."""
    if not s.cell_voltages_v:
        return dataclasses.replace(s, pack_current_a=current_a)
    delta = (current_a - s.pack_current_a) * _cell_r(m, s)
    cells = [v + delta * (1.0 + r) for v, r in zip(s.cell_voltages_v, _r_offsets(m, s), strict=True)]
    return dataclasses.replace(_with_cells(s, cells), pack_current_a=current_a)


def _cells_at_soc(m: VehicleModel, s: VehicleState, soc: float) -> list[float]:
    """The cells' terminal voltages with the pack at `soc` (which may lie beyond 0..100 %) and the state's
    current: each at its own SOC offset and resistance, on the chemistry's extended OCV curve."""
    pack = _pack_in(m, s)
    n = len(s.cell_voltages_v)
    if pack is None or len(pack.cell_soc_offsets) != n:
        offsets: Sequence[float] = (0.0,) * n
        r_offsets: Sequence[float] = (0.0,) * n
    else:
        offsets, r_offsets = pack.cell_soc_offsets, pack.cell_r_offsets
    chem = m.chemistry
    r = _cell_r(m, s, soc)
    return [
        chem.ocv_beyond(soc + off) + s.pack_current_a * r * (1.0 + roff)
        for off, roff in zip(offsets, r_offsets, strict=True)
    ]


def _grid(memo: list[Any], f: Fault, t: float, step: Callable[[list[Any], float], Any]) -> tuple[Any, Any, float]:
    """Values of a quantity built up second by second from `f.start` (`step(memo, t_of_next)` appends the next):
    the two grid values around `t` and where `t` lies between them."""
    k = t - f.start
    while len(memo) < math.ceil(k) + 2:
        memo.append(step(memo, f.start + len(memo)))
    k0 = math.floor(k)
    return memo[k0], memo[k0 + 1], k - k0


def hot_spot_excess_c(f: Fault, m: FaultedModel, n: int, t: float) -> float:
    """Temperature excess of the hot spot at `t`: a first-order body (`tau_s`, `r_th_k_w`) heated by I²·R of the
    contact at the pack's current, sampled each second; after the fault (fixed) it only cools."""
    tau, heat = f.num("tau_s"), f.num("r_contact_ohm") * f.num("r_th_k_w")
    keep = math.exp(-1.0 / tau)

    def step(memo: list[Any], t_next: float) -> float:
        current = m.baseline_at(t_next - 1.0).pack_current_a
        return float(memo[-1]) * keep + current * current * heat * (1.0 - keep)

    memo = m.memo.setdefault(n, [0.0])
    if t > f.end:
        a, b, x = _grid(memo, f, f.end, step)
        return float(a + (b - a) * x) * math.exp(-(t - f.end) / tau)
    a, b, x = _grid(memo, f, t, step)
    return float(a + (b - a) * x)


def _mod_hot_spot(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    excess = hot_spot_excess_c(f, m, n, s.t)
    if excess < 0.01 or not s.probe_temps_c:
        return s
    at = min(int(f.param("probe")), len(s.probe_temps_c)) - 1
    share = f.num("share")
    probes = [p + excess * (1.0 if k == at else share / abs(k - at)) for k, p in enumerate(s.probe_temps_c)]
    return _with_probes(s, probes)


def overcharge_session(f: Fault, m: FaultedModel, n: int, t: float) -> tuple[float, float]:
    """(SOC %, which passes 100; current A) of the wrong charger's session at `t` (clamped to the fault), second
    by second: constant current until a cell's terminal voltage reaches the charger's voltage, then constant
    voltage on the chemistry's extended OCV curve — it keeps pushing charge past full."""
    memo = m.memo.get(n)
    if memo is None:
        base = m.baseline_at(f.start)
        memo = m.memo[n] = [(base.soc_pct, 0.0)]
    chem = m.chemistry
    v_set, i_cc = f.num("charger_v_per_cell"), f.num("charger_a")

    def step(memo: list[Any], t_next: float) -> tuple[float, float]:
        base = m.baseline_at(t_next - 1.0)
        soc = float(memo[-1][0])
        r = _cell_r(m, base, soc)
        ocv = chem.ocv_beyond(soc)
        current = i_cc if ocv + i_cc * r <= v_set else max(0.0, (v_set - ocv) / r)
        capacity = base.nominal_ah * base.soh_pct / 100.0
        return soc + current / (capacity * 36.0), current

    a, b, x = _grid(memo, f, min(t, f.end), step)
    return a[0] + (b[0] - a[0]) * x, a[1] + (b[1] - a[1]) * x


def _mod_overcharge(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if not s.battery_present or not s.cell_voltages_v:
        return s
    if s.t <= f.end:
        soc, current = overcharge_session(f, m, n, s.t)
        s = dataclasses.replace(s, pack_current_a=current, activity="charging", charging_place="home")
        cells = _cells_at_soc(m, s, soc)
        limit = f.num("charger_v_per_cell") * len(cells)
        if sum(cells) > limit:  # the charger holds the pack at its voltage; the cells share it
            shift = (sum(cells) - limit) / len(cells)
            cells = [c - shift for c in cells]
        return dataclasses.replace(_with_cells(s, cells), soc_pct=min(100.0, soc))
    # Unplugged: the extra charge stays in the cells (over the model's own SOC) until the rides take it out.
    pack = m.memo.get(-1 - n)
    if pack is None:
        end = m.baseline_at(f.end)
        pack = m.memo[-1 - n] = (end.battery_barcode, overcharge_session(f, m, n, f.end)[0] - end.soc_pct)
    if s.battery_barcode != pack[0]:
        return s
    soc = s.soc_pct + pack[1]
    return dataclasses.replace(_with_cells(s, _cells_at_soc(m, s, soc)), soc_pct=min(100.0, soc))


def _mod_over_discharged(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t > f.end or not s.battery_present or not s.cell_voltages_v or s.battery_barcode == m.packs[0].barcode:
        return s
    cells = _cells_at_soc(m, s, -f.num("depth_pct"))
    return dataclasses.replace(_with_cells(s, cells), soc_pct=0.0)


def bms_reset_estimate(f: Fault, m: FaultedModel) -> tuple[float, float]:
    """(the SOC the BMS estimates at its reset, the true SOC then): the estimate is where the chemistry's OCV
    curve puts the mean cell voltage it measures — under load, so a riding pack reads low."""
    s = m.baseline_at(f.start)
    return m.chemistry.soc_at_ocv(s.pack_voltage_v / max(1, s.cell_count or m.cells)), s.soc_pct


def _mod_bms_reset(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t >= f.end:
        return s  # recalibrated at rest: the true SOC again
    estimate, true = m.memo.get(n) or m.memo.setdefault(n, bms_reset_estimate(f, m))
    return dataclasses.replace(s, soc_pct=min(100.0, max(0.0, estimate + s.soc_pct - true)))


OVERCURRENT_BIT = 9  # JBD protection status: discharge over-current


def _mod_overcurrent(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t > f.end or -s.pack_current_a < f.num("ocp_a"):
        return s
    return dataclasses.replace(s, bms_protection=s.bms_protection | 1 << OVERCURRENT_BIT)


def _mod_no_cutoff(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t > f.end or not s.battery_present or s.pack_current_a >= f.num("trickle_a"):
        return s
    return dataclasses.replace(_with_current(m, s, f.num("trickle_a")), activity="charging", charging_place="home")


def _mod_pushed_indoors(f: Fault, s: VehicleState, m: FaultedModel, n: int) -> VehicleState:
    if s.t > f.end:
        return s
    s = dataclasses.replace(s, gnss_fix=False)
    pushed = any(kind == "push" and t0 <= s.t <= t1 for kind, t0, t1 in _indoor_phases(f))
    if pushed and s.activity == "riding":
        # Pushed, not ridden: the controller is on but the motor does not drive.
        s = _with_current(m, s, -m.variant.idle_current_a)
    return s


_MODIFIERS: dict[str, Callable[[Fault, VehicleState, FaultedModel, int], VehicleState]] = {
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
    "hot_spot": _mod_hot_spot,
    "cold_charging": _mod_none,
    "overcharge": _mod_overcharge,
    "over_discharged_pack": _mod_over_discharged,
    "bms_reset": _mod_bms_reset,
    "bms_overcurrent": _mod_overcurrent,
    "pack_end_of_life": _mod_none,
    "charger_no_cutoff": _mod_no_cutoff,
    "forbidden_charging": _mod_none,
    "pushed_indoors": _mod_pushed_indoors,
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


# -- grading on the model: the engine's duration ladder over the faulted model's 1 Hz states -----------------------

LevelOf = Callable[[VehicleState], int]
StateTest = Callable[[VehicleState], bool]
MS_PER_YEAR = 365.25 * 24 * 3600 * 1000  # the rule engine's year (battery_ageing)


class _Timeline:
    """The states the agent samples (whole seconds) from `t0` to `t1`, computed only as far as they are asked for:
    a truth stops looking once it knows (the model costs a fraction of a millisecond per instant)."""

    def __init__(self, m: FaultedModel, t0: float, t1: float) -> None:
        self.m = m
        self.t0, self.t1 = math.ceil(t0), math.floor(t1)
        self.seen: list[VehicleState] = []

    def upto(self, t: float) -> Iterator[VehicleState]:
        k = 0
        while True:
            if k == len(self.seen):
                if self.t0 + k > min(t, self.t1):
                    return
                self.seen.append(self.m.state_at(float(self.t0 + k)))
            s = self.seen[k]
            if s.t > t:
                return
            yield s
            k += 1

    def __iter__(self) -> Iterator[VehicleState]:
        return self.upto(math.inf)


def _spec(m: VehicleModel, rule: str) -> RuleSpec:
    return rule_spec(rule, m.variant.name, m.chemistry.name)


def _threshold_level(value: float | None, spec: RuleSpec, margin: float, falling: bool = False) -> int:
    """The highest level whose threshold `value` passes by `margin` (negative: falls short of by at most that)."""
    if value is None:
        return 0
    level = 0
    for k, th in enumerate(spec.levels, start=1):
        if th is not None and (value <= th - margin if falling else value >= th + margin):
            level = k
    return level


def _usable(spec: RuleSpec) -> frozenset[int]:
    used = {k for k, th in enumerate(spec.levels, start=1) if th is not None}
    used |= {int(v) for k, v in spec.params.items() if k == "level" or k.endswith("_level")}
    return frozenset(used)


def _ladder(states: Iterable[VehicleState], level_of: LevelOf, spec: RuleSpec, extra_s: float) -> dict[int, float]:
    """The engine's ladder: each level is reached once its condition held unbroken for its duration (+ `extra_s`,
    never below zero); a state graded -1 says nothing. Returns {level: when first reached}."""
    usable = _usable(spec)
    since: list[float | None] = [None, None, None]
    reached: dict[int, float] = {}
    for s in states:
        level = level_of(s)
        if level < 0:
            continue  # the rule heard nothing: its pending conditions keep their start
        for i in range(3):
            if i + 1 not in usable:
                continue
            if level > i:
                start = since[i]
                if start is None:
                    start = since[i] = s.t
                if s.t - start >= max(0.0, spec.durations_s[i] + extra_s) and i + 1 not in reached:
                    reached[i + 1] = s.t
            else:
                since[i] = None
    return reached


def _held_from(states: Iterable[VehicleState], t_from: float, test: StateTest, hold_s: float) -> float | None:
    """When `test` first held unbroken for `hold_s` among the states from `t_from` on."""
    since: float | None = None
    for s in states:
        if s.t < t_from:
            continue
        if test(s):
            since = s.t if since is None else since
            if s.t - since >= hold_s:
                return s.t
        else:
            since = None
    return None


def _expectation(
    rule: str,
    spec: RuleSpec,
    states: _Timeline,
    sure: LevelOf,
    could: LevelOf,
    cleared: StateTest,
    may_clear: StateTest,
    t_end: float,
) -> Expectation | None:
    """What `rule` must make of the states: `sure`/`could` grade each state with every threshold a margin harder /
    easier, `cleared`/`may_clear` its clear condition likewise. The level is certain only when both ladders agree;
    the alarm must hold until `t_end` (the end of the fault) and clear after it. Graded until the clear condition
    held after the fault (the whole timeline if it never does)."""
    done = _held_from(states, t_end, cleared, spec.clear_duration_s)
    horizon = math.inf if done is None else done
    hard = _ladder(states.upto(horizon), sure, spec, min(2.0, max(spec.durations_s)))
    easy = _ladder(states.upto(horizon), could, spec, -2.0)
    level, at_most = max(hard, default=0), max(easy, default=0)
    if level != at_most:
        raise AmbiguousFault(f"{rule}: L{level} for sure but L{at_most} possible; move the fault off the threshold")
    if not level:
        return None
    raised = min(hard.values())
    early = _held_from(states.upto(t_end), min(easy.values()), may_clear, max(0.0, spec.clear_duration_s - 2.0))
    if early is not None:
        raise AmbiguousFault(f"{rule}: the alarm may clear at {early:.0f}, before the fault ends at {t_end:.0f}")
    if done is None:
        raise AmbiguousFault(f"{rule}: the alarm would not clear by {states.t1}; watch the fault longer")
    return Expectation(rule, level, _ms(raised + _SLACK_S), _ms(done + _SLACK_S))


def _graded(
    m: FaultedModel,
    rule: str,
    states: _Timeline,
    metric: Callable[[VehicleState], float | None],
    margin: float,
    t_end: float,
    falling: bool = False,
) -> Expectation | None:
    """`_expectation` for a threshold rule whose metric the state gives (None: the rule sees nothing to grade,
    which counts as clear — e.g. not charging). While the pack is out its BMS is silent and so is the rule: that
    counts as neither, the harder way for each bound."""
    spec = _spec(m, rule)
    clear = spec.clear
    assert clear is not None, rule

    def cleared(s: VehicleState, by: float) -> bool:
        v = metric(s)
        return v is None or (v >= clear + by if falling else v <= clear - by)

    return _expectation(
        rule,
        spec,
        states,
        lambda s: _threshold_level(metric(s), spec, margin, falling) if s.battery_present else 0,
        lambda s: _threshold_level(metric(s), spec, -margin, falling) if s.battery_present else -1,
        lambda s: s.battery_present and cleared(s, margin),
        lambda s: not s.battery_present or cleared(s, -margin),
        t_end,
    )


def _collect(*found: Expectation | None) -> list[Expectation]:
    return [e for e in found if e is not None]


def _probes(m: VehicleModel, s: VehicleState) -> tuple[float, ...]:
    """What the BMS reports of the probes (it has the variant's number of them)."""
    return s.probe_temps_c[: m.variant.temperature_probes] or (s.battery_temp_max_c,)


def _charging(s: VehicleState, spec: RuleSpec, margin: float) -> bool:
    return s.battery_present and s.pack_current_a >= float(spec.params["charge_current_a"]) + margin


def _truth_hot_spot(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    states = _Timeline(m, f.start - 5.0, f.end + 1500.0)

    def spread(s: VehicleState) -> float:
        probes = _probes(m, s)
        return max(probes) - min(probes)

    expected = _collect(
        _graded(m, "probe_temperature_difference", states, spread, 0.2, f.end),
        _graded(m, "battery_over_temperature", states, lambda s: max(_probes(m, s)), 0.2, f.end),
    )
    peak = max(hot_spot_excess_c(f, m, m.faults.index(f), s.t) for s in states)
    return _truth(
        f, vin, expected, facts={"peak_excess_c": peak, "peak_temp_c": max(s.battery_temp_max_c for s in states)}
    )


def _truth_cold_charging(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "charging_temperature"
    spec = _spec(m, rule)
    lo_c, hi_c = float(spec.params["min_temp_c"]), float(spec.params["max_temp_c"])
    states = _Timeline(m, f.start - 5.0, f.end + 600.0)

    def outside(s: VehicleState, charging_margin: float) -> float | None:
        if not _charging(s, spec, charging_margin):
            return None
        probes = _probes(m, s)
        return max(max(probes) - hi_c, lo_c - min(probes))

    clear = spec.clear
    assert clear is not None
    found = _expectation(
        rule,
        spec,
        states,
        lambda s: _threshold_level(outside(s, 0.05), spec, 0.2),
        lambda s: _threshold_level(outside(s, -0.05), spec, -0.2),
        lambda s: (v := outside(s, -0.05)) is None or v <= clear - 0.2,
        lambda s: (v := outside(s, 0.05)) is None or v <= clear + 0.2,
        f.end,
    )
    coldest = min(min(_probes(m, s)) for s in states.upto(f.end) if f.start <= s.t)
    return _truth(f, vin, _collect(found), facts={"coldest_probe_c": coldest})


def _truth_overcharge(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    states = _Timeline(m, f.start - 5.0, f.end + 2400.0)
    spec = _spec(m, "charging_over_voltage")

    def per_cell(s: VehicleState) -> float | None:
        return s.pack_voltage_v / len(s.cell_voltages_v) if _charging(s, spec, 0.0) and s.cell_voltages_v else None

    def top_cell(s: VehicleState) -> float | None:
        return max(s.cell_voltages_v) if s.battery_present and s.cell_voltages_v else None

    expected = _collect(
        _graded(m, "charging_over_voltage", states, per_cell, 0.002, f.end),
        _graded(m, "cell_over_voltage", states, top_cell, 0.003, f.end),
    )
    soc, _ = overcharge_session(f, m, m.faults.index(f), f.end)
    top = max(v for s in states.upto(f.end + 60.0) if (v := top_cell(s)) is not None)
    return _truth(f, vin, expected, facts={"soc_at_unplug_pct": soc, "max_cell_v": top})


def _truth_over_discharged(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    states = _Timeline(m, f.start - 5.0, f.end + 900.0)

    def low_cell(s: VehicleState) -> float | None:
        return min(s.cell_voltages_v) if s.battery_present and s.cell_voltages_v else None

    def spread_mv(s: VehicleState) -> float | None:
        cells = s.cell_voltages_v
        return (max(cells) - min(cells)) * 1000.0 if s.battery_present and cells else None

    expected = _collect(
        _graded(m, "cell_under_voltage", states, low_cell, 0.003, f.end, falling=True),
        _graded(m, "cell_voltage_spread", states, spread_mv, 3.0, f.end),
    )
    inside = [v for s in states.upto(f.end) if f.start <= s.t and (v := low_cell(s)) is not None]
    return _truth(f, vin, expected, facts={"min_cell_v": min(inside)})


def _soc_jumps(m: FaultedModel, states: Iterable[VehicleState]) -> list[tuple[float, float]]:
    """(time, jump %) as the soc_jump rule computes it from what the JBD BMS reports: whole-% SOC, 10 mA current,
    its nominal capacity."""
    spec = _spec(m, "soc_jump")
    factor = float(spec.params["explain_factor"])
    out: list[tuple[float, float]] = []
    prev: VehicleState | None = None
    for s in states:
        if prev is not None and prev.battery_present and s.battery_present:
            amps = max(abs(round(s.pack_current_a, 2)), abs(round(prev.pack_current_a, 2)))
            explained = factor * amps * (s.t - prev.t) / 3600.0 / s.nominal_ah * 100.0
            out.append((s.t, max(0.0, abs(round(s.soc_pct) - round(prev.soc_pct)) - explained)))
        prev = s
    return out


def _truth_bms_reset(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "soc_jump"
    spec = _spec(m, rule)
    states = _Timeline(m, f.start - 5.0, f.end + spec.clear_duration_s + 60.0)
    jumps = _soc_jumps(m, states)
    clear = spec.clear
    assert clear is not None
    sure = max((_threshold_level(j, spec, 0.01) for _, j in jumps), default=0)
    could = max((_threshold_level(j, spec, -0.01) for _, j in jumps), default=0)
    if sure != could:
        raise AmbiguousFault(f"{rule}: L{sure} for sure but L{could} possible; reset the BMS at another instant")
    expected: list[Expectation] = []
    if sure:
        raised = min(t for t, j in jumps if _threshold_level(j, spec, 0.01))
        last = max(t for t, j in jumps if j > clear)
        if last < f.end - 1.0:
            raise AmbiguousFault(f"{rule}: the alarm would clear before the BMS recalibrates")
        expected.append(Expectation(rule, sure, _ms(raised + _SLACK_S), _ms(last + spec.clear_duration_s + _SLACK_S)))
    estimate, true = bms_reset_estimate(f, m)
    return _truth(
        f, vin, expected, facts={"estimate_pct": estimate, "true_pct": true, "max_jump_pct": max(j for _, j in jumps)}
    )


def _truth_overcurrent(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "bms_protection_repeated"
    spec = _spec(m, rule)
    window = float(spec.params["window_s"])
    states = _Timeline(m, f.start - 5.0, f.end + window + 60.0)
    events: list[float] = []
    prev = None
    level, raised = 0, None
    for s in states:
        bit = s.bms_protection >> OVERCURRENT_BIT & 1
        if bit and not prev:
            events.append(s.t)
        prev = bit
        count = sum(1 for e in events if e > s.t - window)
        now = _threshold_level(float(count), spec, 0.0)
        if now and raised is None:
            raised = s.t
        level = max(level, now)
    expected: list[Expectation] = []
    if level and raised is not None:
        expected.append(Expectation(rule, level, _ms(raised + _SLACK_S), _ms(events[-1] + window + 1.0 + _SLACK_S)))
    return _truth(f, vin, expected, facts={"trips": len(events), "trips_at_s": [round(e - f.start) for e in events]})


def _truth_end_of_life(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "battery_ageing"
    spec = _spec(m, rule)
    life = f.num("service_life_years")
    hold = spec.durations_s[int(spec.params["service_life_level"]) - 1]
    expired_s = f.end - f.start  # the new pack is registered at the end (the scenario's own granularity added)
    if hold - 2 * _SLACK_S <= expired_s < hold + _SLACK_S:
        raise AmbiguousFault(f"{rule}: a pack replaced {expired_s:.0f} s after its end of life is on the threshold")
    expected: list[Expectation] = []
    if expired_s >= hold:
        level = int(spec.params["service_life_level"])
        by = f.start + hold + _SLACK_S
        expected.append(Expectation(rule, level, _ms(by), _ms(f.end + spec.clear_duration_s + 2 * _SLACK_S)))
    born = _ms(f.start) - round(life * MS_PER_YEAR)
    actions = (
        Action(_ms(m.start_time), {"battery_manufactured_ms": born, "battery_service_life_years": life}),
        # The new pack, made a month ago.
        Action(_ms(f.end), {"battery_manufactured_ms": _ms(f.end - 30 * 86_400.0), "battery_service_life_years": life}),
    )
    return _truth(f, vin, expected, actions=actions, facts={"manufactured_ms": born})


def _truth_no_cutoff(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "charging_after_full"
    spec = _spec(m, rule)
    full = float(spec.params["full_soc_pct"])
    first = min(th for th in spec.levels if th is not None) * 3600.0
    states = _Timeline(m, f.start - 5.0, f.end + 120.0)

    def graded(margin: float, slack_s: float) -> tuple[int, float | None, float]:
        """(level, when first raised, longest run) with the charge current `margin` and the run's length
        `slack_s` harder (positive) or easier: the rule's "hours charging since full", from the first sample at
        full on. Stops once no run can reach the first level before the fault ends."""
        level, raised, since, longest = 0, None, None, 0.0
        for s in states:
            if _charging(s, spec, margin) and round(s.soc_pct) >= full:
                since = s.t if since is None else since
                longest = max(longest, s.t - since)
                now = _threshold_level((s.t - since - slack_s) / 3600.0, spec, 0.0)
                if now and raised is None:
                    raised = s.t
                level = max(level, now)
            else:
                since = None
                if f.end - s.t < first - slack_s:
                    break
        return level, raised, longest

    level, raised, _ = graded(0.02, 2.0)
    at_most, _, longest = graded(-0.02, -2.0)
    if level != at_most:
        raise AmbiguousFault(f"{rule}: L{level} for sure but L{at_most} possible")
    expected: list[Expectation] = []
    if level and raised is not None:
        stopped = next(s.t for s in states if s.t > f.end and not _charging(s, spec, -0.02))
        expected.append(Expectation(rule, level, _ms(raised + _SLACK_S), _ms(stopped + _SLACK_S)))
    return _truth(f, vin, expected, facts={"hours_charging_at_full": longest / 3600.0})


def zone_centre(f: Fault, m: FaultedModel) -> tuple[float, float]:
    """Where the no-charging zone of a `forbidden_charging` fault is drawn: `zone_offset_m` east of the spot."""
    s = m.state_at(f.start)
    east = f.num("zone_offset_m") / (6_371_008.8 * math.cos(math.radians(s.lat)))
    return s.lat, s.lon + math.degrees(east)


def _truth_forbidden_charging(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "charging_in_no_charging_zone"
    spec = _spec(m, rule)
    lat, lon = zone_centre(f, m)
    radius = f.num("zone_radius_m")
    level = int(spec.params["level"])
    states = _Timeline(m, f.start - 5.0, f.end + 900.0)

    def inside(s: VehicleState, margin: float) -> bool:
        return haversine_m(lat, lon, s.lat, s.lon) <= radius - margin

    found = _expectation(
        rule,
        spec,
        states,
        lambda s: level if _charging(s, spec, 0.05) and inside(s, 2.0) else 0,
        lambda s: level if _charging(s, spec, -0.05) and inside(s, -2.0) else 0,
        lambda s: not _charging(s, spec, -0.05) or not inside(s, -2.0),
        lambda s: not _charging(s, spec, 0.05) or not inside(s, 2.0),
        f.end,
    )
    fence = {
        "name": f"stairwell of {vin}",
        "kind": spec.params["zone_kind"],
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
        "radius_m": radius,
    }
    spot = m.state_at(f.start)
    facts = {"distance_m": haversine_m(lat, lon, spot.lat, spot.lon), "place": spot.charging_place}
    return _truth(f, vin, _collect(found), actions=(Action(_ms(f.start - 300.0), geofence=fence),), facts=facts)


def _truth_pushed_indoors(f: Fault, vin: str, m: FaultedModel) -> GroundTruth:
    rule = "elevator_entry_suspected"
    spec = _spec(m, rule)
    p = spec.params
    states = _Timeline(m, f.start - 5.0, f.end + 600.0)

    def pushed(s: VehicleState, margin: float) -> int:
        walking = float(p["walk_min_kmh"]) + margin <= s.speed_kmh <= float(p["walk_max_kmh"]) - margin
        idle = -s.pack_current_a < float(p["drive_current_a"]) - 0.1
        return int(p["push_level"]) if not s.gnss_fix and walking and idle else 0

    found = _expectation(
        rule,
        spec,
        states,
        lambda s: pushed(s, 0.2),
        lambda s: pushed(s, -0.2),
        lambda s: s.gnss_fix,  # outdoors the sky model's fixes are good (HDOP ~1, ten satellites and more)
        lambda s: s.gnss_fix,
        f.end,
    )
    if found is not None:  # the first good fix comes with the first epoch outside; DOPs and counts a sample later
        found = dataclasses.replace(found, clear_by_ms=found.clear_by_ms + _ms(_SLACK_S) if found.clear_by_ms else None)
    walked = sum(1 for s in states.upto(f.end) if pushed(s, -0.2))
    return _truth(f, vin, _collect(found), facts={"pushed_without_sky_s": walked})


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
    "hot_spot": _truth_hot_spot,
    "cold_charging": _truth_cold_charging,
    "overcharge": _truth_overcharge,
    "over_discharged_pack": _truth_over_discharged,
    "bms_reset": _truth_bms_reset,
    "bms_overcurrent": _truth_overcurrent,
    "pack_end_of_life": _truth_end_of_life,
    "charger_no_cutoff": _truth_no_cutoff,
    "forbidden_charging": _truth_forbidden_charging,
    "pushed_indoors": _truth_pushed_indoors,
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
    "hot_spot": 900.0,
    "cold_charging": 300.0,
    "overcharge": 900.0,
    "over_discharged_pack": 300.0,
    "bms_reset": 600.0,
    "bms_overcurrent": 600.0,
    "pack_end_of_life": 600.0,
    "charger_no_cutoff": 3720.0,
    "forbidden_charging": 300.0,
    "pushed_indoors": 300.0,
}
# How long before and after its window a fault's script takes over the vehicle.
_LEAD_S = 600.0
_TAIL_S = 1200.0


def schedule_faults(
    vehicles: int, start: float, duration_s: float, seed: int, kinds: Sequence[str] = FAULT_KINDS, share: float = 0.1
) -> dict[int, list[Fault]]:
    """Faults for a fleet of `vehicles` over [start, start + duration_s]: about `share` of the vehicles get one
    fault each, kinds taken in turn, at a random time that leaves room for its lead-in and for its alarm to clear.
    Deterministic for `seed`. Returns {vehicle index: [faults]}. Some kinds' ground truth carries `Action`s (a lock,
    a pack's production date, a no-charging zone) that the consumer must apply for the expected alarms to come."""
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
