"""Rule engine mechanics: durations, levels, peaks, hysteresis, ordering, state persistence, robustness.

The threshold rules are checked here with one "ladder" each (negative near-threshold stream, then every level at
exactly its duration, peak updates, the hysteresis band, the clear after its clear duration), for the model and
chemistry combinations whose overrides matter. Rules with their own measurement have their own tests in
test_rules_battery.py and test_rules_vehicle.py.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.rules import (
    RULES as RULE_CLASSES,
)
from cloud_ingest.rules import (
    ApprovedBattery,
    EventKind,
    RuleEngine,
    RuleStateError,
    VehicleContext,
    VehicleRuleState,
)
from cloud_ingest.rules import names as n
from cloud_ingest.rules.settings import RuleSettings
from protocol.catalogue import Value
from tests.test_rules_support import (
    BARCODE,
    CATALOGUE,
    CELLS,
    RULES,
    T0_MS,
    VIN,
    Feeder,
    context,
    engine,
    healthy,
    kinds,
    of_kind,
    probe,
    set_cells,
)
from tests.test_rules_support import settings as rule_settings

ROOT = Path(__file__).resolve().parents[1]

Make = Callable[[float, RuleSettings], dict[str, Value]]

# How to put each threshold rule's metric at a value `m` in an otherwise healthy sample (the other cells sit at
# 3.30 V, inside the limits of both chemistries).
LADDER: dict[str, Make] = {
    "battery_over_temperature": lambda m, s: healthy(**{n.TEMP_MAX: m}),
    "probe_temperature_difference": lambda m, s: healthy(
        **{probe(1): 25.0 + m, probe(2): 25.0, n.TEMP_MAX: 25.0 + m, n.TEMP_MIN: 25.0}
    ),
    "cell_voltage_spread": lambda m, s: set_cells(healthy(), [3.30 - m / 1000] + [3.30] * (CELLS - 1)),
    "cell_over_voltage": lambda m, s: set_cells(healthy(), [m] + [3.30] * (CELLS - 1)),
    "cell_under_voltage": lambda m, s: set_cells(healthy(), [m] + [3.30] * (CELLS - 1)),
    "battery_ageing": lambda m, s: healthy(**{n.SOH: m}),
    "charging_temperature": lambda m, s: healthy(**{n.PACK_I: 5.0, n.TEMP_MAX: s.params["max_temp_c"] + m}),
    "charging_over_voltage": lambda m, s: healthy(**{n.PACK_I: 5.0, n.PACK_V: m * CELLS}),
    "speed_limiter_tampering": lambda m, s: healthy(**{n.GNSS_SPEED: m, n.WHEEL_SPEED: m, n.SUPPLY_CURRENT: 12.0}),
}
COMBOS = [("ebike48", "NMC"), ("ebike48", "LFP"), ("emoto72", "NMC")]


@pytest.mark.parametrize(("model", "chemistry"), COMBOS)
@pytest.mark.parametrize("rule_id", sorted(LADDER))
def test_threshold_rule_ladder(rule_id: str, model: str, chemistry: str) -> None:
    ctx = context(model=model, chemistry=chemistry)
    s = rule_settings(rule_id, ctx)
    make = LADDER[rule_id]
    above = RULE_CLASSES[rule_id].DIRECTION == "above"
    present = [(i + 1, thr) for i, thr in enumerate(s.levels) if thr is not None]
    assert s.clear is not None
    eps = max(abs(present[0][1]) * 1e-3, 1e-3)

    def worse(x: float, by: float) -> float:
        return x + by if above else x - by

    def at(m: float) -> Callable[[float], dict[str, Value]]:
        return lambda t: make(m, s)

    f = Feeder(engine(rule_id), ctx)
    longest = max(s.duration_ms) / 1000 + 30

    # Just on the safe side of the first threshold, for longer than any duration: nothing.
    assert f.run(longest, at(worse(present[0][1], -eps))) == []

    # Every level, reached exactly when its condition has held for its duration.
    for idx, (level, thr) in enumerate(present):
        start = f.t
        event = f.until(at(worse(thr, eps)), lambda e: e.kind in (EventKind.RAISED, EventKind.ESCALATED), 400)
        assert event is not None, f"level {level} never reached"
        assert (event.kind, event.level) == ((EventKind.RAISED if idx == 0 else EventKind.ESCALATED), level)
        assert f.secs(event) - start == s.duration_ms[level - 1] / 1000
        assert event.value == pytest.approx(worse(thr, eps), rel=1e-6)

    # A worse value by at least update_step is a new peak; less than the step is not reported.
    top = worse(present[-1][1], eps)
    if s.update_step > 0:
        assert of_kind(f.run(5, at(worse(top, s.update_step / 2))), EventKind.UPDATED) == []
    peak = worse(top, 2 * s.update_step + eps)
    updates = of_kind(f.run(3, at(peak)), EventKind.UPDATED)
    assert len(updates) == 1
    assert updates[0].peak == pytest.approx(peak, rel=1e-6)
    assert updates[0].level == present[-1][0]

    # Between the clear threshold and L1 (hysteresis band) the alarm neither clears nor changes.
    band = (s.clear + present[0][1]) / 2
    assert f.run(s.clear_duration_ms / 1000 + 30, at(band)) == []

    # On the clear side it clears once that held for the clear duration, then stays quiet.
    start = f.t
    cleared = f.until(at(worse(s.clear, -eps)), lambda e: e.kind is EventKind.CLEARED, 1000)
    assert cleared is not None
    assert f.secs(cleared) - start == s.clear_duration_ms / 1000
    assert cleared.peak == pytest.approx(peak, rel=1e-6)
    assert f.run(30, at(worse(s.clear, -eps))) == []
    assert f.eng.state(VIN).open_alarms() == {}


# -- overrides per model and chemistry -------------------------------------------------------------------------


def test_chemistry_override_changes_cell_limits() -> None:
    over_lfp_only = set_cells(healthy(), [3.78] + [3.40] * (CELLS - 1))  # 3.78 V: over for LFP, fine for NMC
    for chemistry, expect in (("LFP", True), ("NMC", False)):
        f = Feeder(engine("cell_over_voltage"), context(chemistry=chemistry))
        events = f.run(60, lambda t: over_lfp_only)
        assert bool(of_kind(events, EventKind.RAISED)) is expect, chemistry


def test_model_override_changes_speed_limit() -> None:
    fast = healthy(**{n.GNSS_SPEED: 45.0, n.WHEEL_SPEED: 45.0, n.SUPPLY_CURRENT: 20.0})
    raised = {}
    for model in ("ebike48", "emoto72"):
        f = Feeder(engine("speed_limiter_tampering"), context(model=model))
        raised[model] = [e.level for e in of_kind(f.run(60, lambda t: fast), EventKind.RAISED)]
    assert raised == {"ebike48": [3], "emoto72": []}


def test_chemistry_override_applies_on_top_of_model_override() -> None:
    ctx = context(model="emoto72", chemistry="LFP")
    assert (
        rule_settings("cell_over_voltage", ctx).levels[0]
        == RULES.document["rules"]["cell_over_voltage"]["chemistry"]["LFP"]["levels"]["l1"]
    )
    assert (
        rule_settings("speed_limiter_tampering", ctx).levels
        == rule_settings("speed_limiter_tampering", context(model="emoto72", chemistry="NMC")).levels
    )


def test_undeclared_model_and_chemistry_get_the_base_settings(caplog: pytest.LogCaptureFixture) -> None:
    ctx = context(model="cargo-trike", chemistry="NaIon")
    f = Feeder(engine("speed_limiter_tampering"), ctx)
    fast = healthy(**{n.GNSS_SPEED: 45.0, n.SUPPLY_CURRENT: 20.0})
    with caplog.at_level("WARNING", logger="zhilian.rules"):
        assert [e.level for e in of_kind(f.run(30, lambda t: fast), EventKind.RAISED)] == [3]
    assert sum("not in the rules file" in r.message for r in caplog.records) == 1


# -- engine mechanics -------------------------------------------------------------------------------------------


def test_several_rules_fire_on_one_sample_and_one_alarm_per_rule() -> None:
    f = Feeder(engine(), context())
    assert f.run(5, lambda t: healthy()) == []
    bad = healthy(**{n.SOC: 85.0, n.SPEED_LIMIT: 35.0, n.CELL_COUNT: 16})
    events = f.run(1, lambda t: bad)
    assert {(e.rule, e.kind, e.level) for e in events} == {
        ("soc_jump", EventKind.RAISED, 3),
        ("controller_config_mismatch", EventKind.RAISED, 3),
        ("battery_vehicle_mismatch", EventKind.RAISED, 2),
    }
    assert len({e.ts_ms for e in events}) == 1
    # The conditions persist: still exactly one open alarm per rule, no second "raised".
    later = f.run(120, lambda t: bad)
    assert of_kind(later, EventKind.RAISED) == []
    assert set(f.eng.state(VIN).open_alarms()) == {"soc_jump", "controller_config_mismatch", "battery_vehicle_mismatch"}


def test_out_of_order_and_duplicate_samples_are_ignored_and_counted() -> None:
    eng = engine("battery_over_temperature")
    s = rule_settings("battery_over_temperature")
    hot = healthy(**{n.TEMP_MAX: s.levels[0] + 1})
    events = []
    d1 = s.duration_ms[0] // 1000
    for k in range(d1 + 1):
        ts = T0_MS + k * 1000
        events += eng.evaluate(VIN, context(), ts, hot)
        # A redelivered sample, and a late one from before: both would otherwise break the duration.
        events += eng.evaluate(VIN, context(), ts, healthy())
        events += eng.evaluate(VIN, context(), ts - 500, healthy())
    assert kinds(events) == [("raised", 1)]
    assert events[0].ts_ms == T0_MS + d1 * 1000
    assert eng.state(VIN).ignored == 2 * (d1 + 1)
    assert eng.stats.ignored == 2 * (d1 + 1)


def test_a_gap_in_observations_restarts_the_duration() -> None:
    eng = engine("battery_over_temperature")
    s = rule_settings("battery_over_temperature")
    hot = healthy(**{n.TEMP_MAX: s.levels[0] + 1})
    d1 = s.duration_ms[0]
    gap = RULES.engine.max_gap_ms + 1000
    assert eng.evaluate(VIN, context(), T0_MS, hot) == []
    # After a silence longer than max_gap the condition has not provably held throughout: it starts over.
    assert eng.evaluate(VIN, context(), T0_MS + gap, hot) == []
    assert eng.evaluate(VIN, context(), T0_MS + gap + d1 - 1000, hot) == []
    assert kinds(eng.evaluate(VIN, context(), T0_MS + gap + d1, hot)) == [("raised", 1)]


def test_vehicles_are_independent() -> None:
    eng = engine("battery_over_temperature")
    s = rule_settings("battery_over_temperature")
    hot = healthy(**{n.TEMP_MAX: s.levels[2] + 1})
    a, b = Feeder(eng, vin="LZHTEST000000000A"), Feeder(eng, vin="LZHTEST000000000B")
    a.run(60, lambda t: hot)
    assert b.run(60, lambda t: healthy()) == []
    assert [e.vin for e in a.events] == ["LZHTEST000000000A"]


def test_a_rule_that_raises_is_isolated_counted_and_reset(caplog: pytest.LogCaptureFixture) -> None:
    eng = engine("charging_in_no_charging_zone", "soc_jump")

    def broken_lookup(lat: float, lon: float) -> set[str]:
        raise RuntimeError("geofence index down")

    ctx = context(zones_at=broken_lookup)
    with caplog.at_level("ERROR", logger="zhilian.rules"):
        events = Feeder(eng, ctx).run(3, lambda t: healthy(**{n.PACK_I: 5.0, n.SOC: 60.0 + 20 * (t >= 2)}))
    # The failing rule does not hide the other rule's alarm.
    assert [(e.rule, e.kind) for e in events] == [("soc_jump", EventKind.RAISED)]
    assert eng.stats.rule_errors == 3
    assert any("rule failed" in r.message for r in caplog.records)


# -- state: persistence and resume -------------------------------------------------------------------------------


def _restart(eng: RuleEngine) -> RuleEngine:
    """What the service does across a restart: persist as JSON, build a new engine, restore."""
    saved = json.loads(json.dumps(eng.export_state(VIN), allow_nan=False))
    fresh = RuleEngine(eng.config, CATALOGUE)
    fresh.restore_state(VIN, saved)
    return fresh


@pytest.mark.parametrize("restart_after_s", [1, 10, 29])
def test_restart_mid_duration_raises_exactly_once_on_time(restart_after_s: int) -> None:
    s = rule_settings("battery_over_temperature")
    d1 = s.duration_ms[0] // 1000
    assert restart_after_s < d1
    hot = healthy(**{n.TEMP_MAX: s.levels[0] + 0.5})
    before = Feeder(RuleEngine(RULES, CATALOGUE))
    assert before.run(restart_after_s, lambda t: hot) == []
    after = Feeder(_restart(before.eng))
    after.t = before.t
    events = after.run(d1 + 60, lambda t: hot)
    raised = [e for e in events if e.rule == "battery_over_temperature"]
    assert kinds(raised) == [("raised", 1)]
    # The condition kept its start time from before the restart.
    assert after.secs(raised[0]) == d1


def test_restart_with_an_open_alarm_neither_raises_again_nor_loses_the_clear() -> None:
    s = rule_settings("battery_over_temperature")
    hot = healthy(**{n.TEMP_MAX: s.levels[1] + 0.5})
    before = Feeder(RuleEngine(RULES, CATALOGUE))
    raised = before.run(60, lambda t: hot)
    assert kinds(of_kind(raised, EventKind.RAISED)) == [("raised", 2)]
    after = Feeder(_restart(before.eng))
    after.t = before.t
    assert of_kind(after.run(60, lambda t: hot), EventKind.RAISED) == []
    cool = healthy(**{n.TEMP_MAX: s.clear - 1})
    cleared = of_kind(after.run(s.clear_duration_ms / 1000 + 5, lambda t: cool), EventKind.CLEARED)
    assert len(cleared) == 1
    assert cleared[0].raised_ms == raised[0].ts_ms


def test_restart_preserves_rule_memory_mid_measurement() -> None:
    """Thermal runaway's rate needs the previous sample: a restart between two samples must not lose it."""
    p = rule_settings("thermal_runaway").params
    before = Feeder(engine("thermal_runaway"))

    def rising(t: float) -> dict[str, Value]:
        temp = 30.0 + max(0.0, t - 10) * 1.5
        v = healthy(**{n.TEMP_MAX: temp})
        return set_cells(v, [3.85 if t < 11 else 2.6] + [3.85] * (CELLS - 1))

    before.run(12, rising)
    after = Feeder(_restart(before.eng))
    after.t = before.t
    events = after.run(10, rising)
    assert kinds(of_kind(events, EventKind.RAISED)) == [("raised", p["level"])]
    assert after.secs(of_kind(events, EventKind.RAISED)[0]) == 14.0  # rise began at 10 s; held > 3 s at 14 s


def test_state_round_trips_through_json() -> None:
    f = Feeder(engine(), context(locked=True))
    f.run(30, lambda t: healthy(**{n.TEMP_MAX: 58.0, n.SOC: 60.0 - (t > 20) * 30}))
    saved = f.eng.export_state(VIN)
    assert saved is not None
    text = json.dumps(saved, allow_nan=False)
    restored = VehicleRuleState.from_dict(json.loads(text))
    assert json.dumps(restored.to_dict(), allow_nan=False) == text
    # The persisted form: the same document, and it restores to the same state.
    persisted = f.eng.export_json(VIN)
    assert persisted is not None and json.loads(persisted) == saved
    assert VehicleRuleState.from_dict(json.loads(persisted)).to_dict() == saved
    assert any(rule["open"] is not None for rule in saved["rules"].values())  # an open alarm went through too


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"version": 99},
        {"version": 1, "last_ts": "yesterday"},
        {"version": 1, "rules": {"soc_jump": {"since": [None, None]}}},
        {"version": 1, "rules": {"soc_jump": {"since": [None, None, None], "open": {"level": 7}}}},
        {"version": 1, "recent": {"Speed": [1]}},
    ],
)
def test_state_restore_rejects_what_it_did_not_write(bad: Any) -> None:
    with pytest.raises(RuleStateError):
        RuleEngine(RULES, CATALOGUE).restore_state(VIN, bad) if isinstance(bad, dict) else VehicleRuleState.from_dict(
            bad
        )


# -- robustness: arbitrary input never breaks the engine, and state stays bounded ------------------------------

_NAMES = CATALOGUE.names()
_ANY_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-100, max_value=500),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=70_000),
    st.booleans(),
    st.text(max_size=80),
)
_STEP = st.one_of(
    st.tuples(
        st.just("sample"),
        st.integers(min_value=-3_000, max_value=40_000),
        st.sampled_from([False, True]),
        st.dictionaries(st.sampled_from(_NAMES), _ANY_VALUE, max_size=12),
    ),
    st.tuples(st.just("tick"), st.integers(min_value=-10_000, max_value=10_000_000), st.just(False), st.just({})),
)


@st.composite
def _contexts(draw: st.DrawFn) -> VehicleContext:
    battery = draw(
        st.one_of(
            st.none(),
            st.builds(
                ApprovedBattery,
                barcodes=st.frozensets(st.sampled_from([BARCODE, "X", ""]), max_size=2),
                capacity_ah=st.one_of(st.none(), st.floats(min_value=0, max_value=100)),
                cell_count=st.one_of(st.none(), st.integers(min_value=0, max_value=30)),
                manufactured_ms=st.one_of(st.none(), st.integers(min_value=0, max_value=T0_MS)),
                service_life_years=st.one_of(st.none(), st.floats(min_value=0, max_value=20)),
            ),
        )
    )
    return VehicleContext(
        model=draw(st.sampled_from([None, "ebike48", "emoto72", "other"])),
        chemistry=draw(st.sampled_from([None, "NMC", "LFP", "other"])),
        battery=battery,
        locked=draw(st.booleans()),
        reporting_interval_s=draw(st.sampled_from([0.0, 1.0, 5.0, 60.0])),
        zones_at=lambda lat, lon: {"no_charging"} if lat > 0 else set(),
    )


_FUZZ_ENGINE = RuleEngine(RULES, CATALOGUE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ctx=_contexts(), steps=st.lists(_STEP, max_size=60))
def test_arbitrary_streams_never_break_the_engine(ctx: VehicleContext, steps: list[Any]) -> None:
    eng = _FUZZ_ENGINE
    eng.forget(VIN)
    errors_before = eng.stats.rule_errors
    ts = T0_MS
    events = []
    for kind, delta, on_healthy, values in steps:
        ts += delta
        if kind == "tick":
            events += eng.tick(VIN, ctx, ts)
        else:
            events += eng.evaluate(VIN, ctx, ts, {**healthy(), **values} if on_healthy else values)
    assert eng.stats.rule_errors == errors_before
    saved = eng.export_state(VIN)
    if saved is not None:
        text = json.dumps(saved, allow_nan=False)
        assert len(text) < 20_000
        assert VehicleRuleState.from_dict(json.loads(text)).to_dict() == json.loads(text)
        # What the alarm service persists (orjson over the dataclasses) says the same as the dict.
        assert json.loads(eng.export_json(VIN) or "null") == json.loads(text)
    _assert_well_formed(events)


def _assert_well_formed(events: list[Any]) -> None:
    """Per rule: raised, then escalations/updates with non-decreasing level, then cleared — never two open."""
    open_level: dict[str, int] = {}
    for e in events:
        assert 1 <= e.level <= 3
        if e.kind is EventKind.RAISED:
            assert e.rule not in open_level
            open_level[e.rule] = e.level
        else:
            assert e.rule in open_level, (e.rule, e.kind)
            if e.kind is EventKind.ESCALATED:
                assert e.level > open_level[e.rule]
            assert e.level >= open_level[e.rule]
            open_level[e.rule] = e.level
            if e.kind is EventKind.CLEARED:
                del open_level[e.rule]


def test_state_stays_bounded_on_a_long_noisy_stream() -> None:
    """Hours of flapping protections, jumping SOC and wandering fixes: every rule's memory stays small."""
    rng = random.Random(7)
    eng = RuleEngine(RULES, CATALOGUE)
    ctx = context(locked=True)
    sizes = []
    for k in range(6000):
        v = healthy(
            **{
                n.PROTECTION: rng.getrandbits(16),
                n.SOC: rng.uniform(0, 100),
                n.TEMP_MAX: rng.uniform(-20, 140),
                n.PACK_I: rng.uniform(-40, 40),
                n.LAT: 29.56 + rng.uniform(-0.01, 0.01),
                n.WHEEL_SPEED: rng.uniform(0, 50),
                n.BARCODE: f"PACK-{rng.randrange(10**6)}",
            }
        )
        set_cells(v, [rng.uniform(2.5, 4.3) for _ in range(CELLS)])
        eng.evaluate(VIN, ctx, T0_MS + k * 1000, v)
        if k % 500 == 0:
            sizes.append(len(json.dumps(eng.export_state(VIN))))
    assert eng.stats.rule_errors == 0
    assert max(sizes) < 20_000
    assert sizes[-1] <= sizes[2] * 1.5  # no growth with time once every rule has state


# -- the rules file ---------------------------------------------------------------------------------------------


def test_every_rule_is_configured_sourced_and_documented() -> None:
    doc = (ROOT / "docs" / "RULES.md").read_text(encoding="utf-8")
    for rule_id in RULE_CLASSES:
        s = rule_settings(rule_id)
        assert s.source, rule_id
        assert f"`{rule_id}`" in doc, f"docs/RULES.md does not document {rule_id}"


def test_the_issue_list_of_rules_is_covered() -> None:
    assert set(RULE_CLASSES) >= {
        "thermal_runaway",
        "thermal_runaway_precursor",
        "battery_over_temperature",
        "probe_temperature_difference",
        "cell_voltage_spread",
        "cell_over_voltage",
        "cell_under_voltage",
        "internal_short_suspected",
        "soc_jump",
        "bms_protection_repeated",
        "speed_limiter_tampering",
        "wheel_size_tampering",
        "controller_config_mismatch",
        "battery_vehicle_mismatch",
        "charging_temperature",
        "charging_over_voltage",
        "charging_after_full",
        "charging_in_no_charging_zone",
        "elevator_entry_suspected",
        "theft_displacement_while_locked",
        "crash_or_fall",
        "gnss_cut_or_jamming",
        "vehicle_offline",
        "battery_ageing",
    }


def test_only_disables_every_other_rule_in_every_combination() -> None:
    cfg = RULES.only("soc_jump")
    for combo_settings in cfg.resolved.values():
        assert {rid for rid, s in combo_settings.items() if s.enabled} == {"soc_jump"}


def test_a_fresh_vehicle_has_no_state_until_its_first_sample() -> None:
    eng = RuleEngine(RULES, CATALOGUE)
    assert eng.export_state(VIN) is None
    assert eng.tick(VIN, context(), T0_MS) == []
    assert eng.vins() == []
    assert eng.evaluate(VIN, context(), T0_MS, {}) == []
    assert eng.state(VIN).ignored == 0
