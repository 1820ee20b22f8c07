"""The life-cycle machines and the sans-I/O telemetry tracker, without a database."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_ingest.lifecycle import (
    BATTERY,
    BATTERY_TRANSITIONS,
    CYCLES,
    GNSS_SPEED,
    PACK_CURRENT,
    SOH,
    VEHICLE,
    VEHICLE_TRANSITIONS,
    WHEEL_SPEED,
    Activity,
    BatteryState,
    BatteryTrack,
    Change,
    EventKind,
    IllegalTransition,
    LifecycleError,
    LifecycleSettings,
    Source,
    TelemetryTracker,
    VehicleState,
    VehicleTrack,
    clean_barcode,
)
from protocol import Batch, load_catalogue
from protocol.catalogue import Catalogue

VIN = "LZLCCORE000000001"
T0 = 1_767_225_600_000
SETTINGS = LifecycleSettings()


def reachable(initial: object, transitions: dict[tuple[object, object], frozenset[Source]]) -> set[object]:
    seen = {initial}
    todo = deque([initial])
    while todo:
        state = todo.popleft()
        for (frm, to), who in transitions.items():
            if frm == state and Source.API in who and to not in seen:
                seen.add(to)
                todo.append(to)
    return seen


def test_every_state_is_reachable_by_operators_and_only_terminal_states_are_dead_ends() -> None:
    assert reachable(VehicleState.MANUFACTURED, dict(VEHICLE_TRANSITIONS)) == set(VehicleState)
    assert reachable(BatteryState.MANUFACTURED, dict(BATTERY_TRANSITIONS)) == set(BatteryState)
    assert [s for s in VehicleState if not VEHICLE.next_states(s, Source.API)] == [VehicleState.SCRAPPED]
    assert [s for s in BatteryState if not BATTERY.next_states(s, Source.API)] == [BatteryState.RECYCLED]
    assert all(frm != to for frm, to in [*VEHICLE_TRANSITIONS, *BATTERY_TRANSITIONS])


def test_illegal_transition_names_from_to_and_the_legal_next_states() -> None:
    with pytest.raises(IllegalTransition) as err:
        VEHICLE.check(VehicleState.REGISTERED, VehicleState.SCRAPPED, Source.API)
    e = err.value
    assert (e.from_state, e.to_state) == ("registered", "scrapped")
    assert e.allowed == ["active", "transferred"]
    assert "registered -> scrapped" in str(e) and "active, transferred" in str(e)
    with pytest.raises(IllegalTransition, match="already active"):
        VEHICLE.check(VehicleState.ACTIVE, VehicleState.ACTIVE, Source.API)
    with pytest.raises(IllegalTransition, match="only api may trigger it"):
        BATTERY.check(BatteryState.WARNING, BatteryState.IN_SERVICE, Source.TELEMETRY)
    with pytest.raises(IllegalTransition, match="legal next states from scrapped: none"):
        VEHICLE.check(VehicleState.SCRAPPED, VehicleState.ACTIVE, Source.API)


def test_tracker_refuses_a_catalogue_without_its_signals() -> None:
    TelemetryTracker(catalogue=load_catalogue())
    with pytest.raises(LifecycleError, match="StateOfHealth"):
        TelemetryTracker(catalogue=Catalogue([s for s in load_catalogue() if s.name != SOH]))


def test_barcodes_are_what_a_url_path_can_carry() -> None:
    assert clean_barcode("  BT-2024.001_A ") == "BT-2024.001_A"
    for bad in ("", "   ", "a/b", "a b", "x" * 65, "é", "\x00", 7, None):
        assert clean_barcode(bad) is None


def series(start: int, seconds: int, **columns: object) -> Batch:
    """One sample per second; each column a constant (or None)."""
    ts = [start + i * 1000 for i in range(seconds)]
    return Batch(ts, {name: [value] * seconds for name, value in columns.items()})


def active_vehicle() -> VehicleTrack:
    return VehicleTrack(
        VIN, VehicleState.ACTIVE, T0, Activity.PARKED, T0, next_service_m=SETTINGS.service_interval_km * 1000
    )


def activity_events(changes: list[Change]) -> list[tuple[str | None, str]]:
    return [(c.from_state, c.to_state) for c in changes if c.event is EventKind.ACTIVITY]


def test_sub_states_follow_speed_and_current_with_dwell_and_hysteresis() -> None:
    tracker = TelemetryTracker()
    v = active_vehicle()
    t = T0
    log: list[Change] = []

    def feed(seconds: int, speed: float | None = None, amps: float | None = None) -> None:
        nonlocal t
        out = tracker.step(v, {}, series(t, seconds, **{GNSS_SPEED: speed, PACK_CURRENT: amps}))
        log.extend(out.changes)
        t += seconds * 1000

    feed(5, speed=20.0)  # shorter than the riding dwell: still parked
    assert v.activity is Activity.PARKED and v.pending is Activity.RIDING
    feed(10, speed=20.0)
    assert v.activity is Activity.RIDING
    feed(60, speed=3.5)  # between ride_off and ride_on: hysteresis keeps riding
    feed(90, speed=0.0)  # a red light, shorter than the parked dwell
    feed(20, speed=15.0)
    assert v.activity is Activity.RIDING
    feed(130, speed=0.0)
    assert v.activity is Activity.PARKED
    feed(40, speed=0.0, amps=3.0)
    assert v.activity is Activity.CHARGING
    feed(60, speed=0.0, amps=0.3)  # tapering: above charge_off, stays charging
    assert v.activity is Activity.CHARGING
    feed(150, speed=0.0, amps=0.0)
    assert activity_events(log) == [
        ("parked", "riding"),
        ("riding", "parked"),
        ("parked", "charging"),
        ("charging", "parked"),
    ]
    # Dated when the new sub-state began, not when the dwell confirmed it.
    riding = next(c for c in log if c.to_state == "riding")
    assert riding.ts_ms == T0


def test_regenerative_braking_while_riding_is_not_charging() -> None:
    tracker = TelemetryTracker()
    v = active_vehicle()
    out = tracker.step(v, {}, series(T0, 120, **{GNSS_SPEED: 18.0, PACK_CURRENT: 6.0}))
    assert activity_events(out.changes) == [("parked", "riding")]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.floats(0, 60), st.floats(-20, 10)), min_size=1, max_size=30))
def test_sub_state_changes_are_never_shorter_apart_than_the_dwell(segments: list[tuple[int, float, float]]) -> None:
    """No event spam: however speed and current jump, consecutive changes are at least a dwell time apart."""
    tracker = TelemetryTracker()
    v = active_vehicle()
    t = T0
    events: list[Change] = []
    for seconds, speed, amps in segments:
        events += tracker.step(v, {}, series(t, seconds, **{WHEEL_SPEED: speed, PACK_CURRENT: amps})).changes
        t += seconds * 1000
    acts = [c for c in events if c.event is EventKind.ACTIVITY]
    for before, after in itertools.pairwise(acts):
        assert after.from_state == before.to_state
        assert after.ts_ms - before.ts_ms >= SETTINGS.dwell_ms(Activity(before.to_state))


def test_first_telemetry_activates_only_a_registered_vehicle() -> None:
    tracker = TelemetryTracker()
    for state in VehicleState:
        v = VehicleTrack(VIN, state, T0, next_service_m=1e9)
        out = tracker.step(v, {}, series(T0 + 1000, 1, **{WHEEL_SPEED: 0.0}))
        moved = [(c.from_state, c.to_state) for c in out.changes if c.event is EventKind.TRANSITION]
        if state is VehicleState.REGISTERED:
            assert moved == [("registered", "active")] and v.activity is Activity.PARKED
        else:
            assert moved == [] and v.state is state


def test_distance_integrates_speed_skips_gaps_and_raises_maintenance_once() -> None:
    tracker = TelemetryTracker(LifecycleSettings(service_interval_km=1.0))
    v = active_vehicle()
    v.next_service_m = 1000.0
    out = tracker.step(v, {}, series(T0, 101, **{GNSS_SPEED: 36.0}))  # 10 m/s for 100 s
    assert v.odometer_m == pytest.approx(1000.0)
    due = [c for c in out.changes if c.event is EventKind.MAINTENANCE_DUE]
    assert len(due) == 1 and v.maintenance_due
    # A 10-minute gap contributes nothing (the distance is unknown), and maintenance is not raised again.
    out = tracker.step(v, {}, series(T0 + 700_000, 11, **{GNSS_SPEED: 36.0}))
    assert v.odometer_m == pytest.approx(1100.0)
    assert not [c for c in out.changes if c.event is EventKind.MAINTENANCE_DUE]
    # GNSS jitter at rest does not creep into the distance; controller speed fills in without a fix.
    tracker.step(v, {}, series(T0 + 800_000, 60, **{GNSS_SPEED: 0.6}))
    assert v.odometer_m == pytest.approx(1100.0)
    tracker.step(v, {}, series(T0 + 860_000, 11, **{WHEEL_SPEED: 36.0}))
    assert v.odometer_m == pytest.approx(1205.0)  # 5 m for the second accelerating from rest, then 100 m


def test_samples_older_than_the_newest_processed_are_not_replayed() -> None:
    tracker = TelemetryTracker()
    v = active_vehicle()
    tracker.step(v, {}, series(T0 + 60_000, 10, **{GNSS_SPEED: 10.0}))
    before = v.odometer_m
    out = tracker.step(v, {}, series(T0, 30, **{GNSS_SPEED: 30.0}))
    assert out.skipped_rows == 30 and v.odometer_m == before


def pack(state: BatteryState, **kw: object) -> BatteryTrack:
    return BatteryTrack("PACK1", state, T0, VIN, **kw)  # type: ignore[arg-type]


def test_battery_health_thresholds() -> None:
    tracker = TelemetryTracker()
    v = active_vehicle()
    v.battery = "PACK1"
    b = pack(BatteryState.PAIRED, chemistry="NMC")
    steps = [
        ({PACK_CURRENT: 0.2, SOH: 95.0}, BatteryState.PAIRED),  # below the in-service current
        ({PACK_CURRENT: -4.0, SOH: 95.0}, BatteryState.IN_SERVICE),
        ({SOH: 80.5}, BatteryState.IN_SERVICE),
        ({SOH: 80.0}, BatteryState.IN_SERVICE),  # one report past a threshold is not enough
        ({PACK_CURRENT: -3.0}, BatteryState.IN_SERVICE),  # samples without SOH confirm nothing
        ({SOH: 80.0}, BatteryState.WARNING),
        ({SOH: 85.0}, BatteryState.WARNING),  # leaving warning is an operator's decision
        ({SOH: 70.0}, BatteryState.WARNING),
        ({SOH: 69.0}, BatteryState.QUARANTINED),
        ({SOH: 99.0}, BatteryState.QUARANTINED),  # only an inspection brings it back
    ]
    t = T0
    for columns, expected in steps:
        t += 1000
        out = tracker.step(v, {"PACK1": b}, Batch([t], {k: [val] for k, val in columns.items()}))
        assert b.state is expected, (columns, b.state)
        if out.changes:
            assert all(c.entity_id == "PACK1" for c in out.changes)
    notes = [c.note for c in out.changes]
    assert notes == [] and b.soh_pct == 99.0


def test_cycle_life_and_service_life() -> None:
    tracker = TelemetryTracker()
    b = pack(BatteryState.IN_SERVICE, chemistry="LFP", soh_pct=95.0, soh_confirmed_pct=95.0, cycles=1999)
    assert tracker.health(b, T0) == (BatteryState.IN_SERVICE, [])
    b.cycles = 2000
    assert tracker.health(b, T0) == (BatteryState.WARNING, ["2000 cycles >= rated 2000"])
    b.rated_cycles = 3000
    assert tracker.health(b, T0)[0] is BatteryState.IN_SERVICE
    b.manufactured_ms = T0 - int(3.1 * 365.25 * 86_400_000)
    b.service_life_years = 3.0
    state, reasons = tracker.health(b, T0)
    assert state is BatteryState.QUARANTINED and reasons[0].startswith("service life ended 2025-11-")


def test_a_changed_barcode_swaps_the_packs() -> None:
    tracker = TelemetryTracker()
    v = active_vehicle()
    old = BatteryTrack("OLD", BatteryState.IN_SERVICE, T0, VIN)
    v.battery = "OLD"
    elsewhere = BatteryTrack("NEW", BatteryState.IN_SERVICE, T0, "LZLCOTHER00000001")
    packs = {"OLD": old, "NEW": elsewhere}
    out = tracker.step(v, packs, Batch([T0 + 1000], {"Powertrain.TractionBattery.Barcode": [" NEW "]}))
    assert v.battery == "NEW" and old.vin is None and elsewhere.vin == VIN
    assert out.released == [("LZLCOTHER00000001", "NEW")]
    assert {(c.entity_id, c.event) for c in out.changes} == {
        ("OLD", EventKind.UNPAIRED),
        ("NEW", EventKind.PAIRED),
        (VIN, EventKind.PAIRED),
    }
    # An unknown barcode becomes a new pack, paired at once; a repeated barcode changes nothing.
    out = tracker.step(v, packs, Batch([T0 + 2000, T0 + 3000], {"Powertrain.TractionBattery.Barcode": ["X9", "X9"]}))
    assert packs["X9"].state is BatteryState.PAIRED and packs["X9"].vin == VIN
    moved = [(c.from_state, c.to_state) for c in out.changes if c.entity_id == "X9"]
    assert moved == [(None, "manufactured"), ("manufactured", "paired")]
    assert tracker.step(v, packs, Batch([T0 + 4000], {"Powertrain.TractionBattery.Barcode": ["X9"]})).changes == []


def test_cycle_count_is_read_from_its_signal() -> None:
    tracker = TelemetryTracker()
    v = active_vehicle()
    v.battery = "PACK1"
    b = pack(BatteryState.IN_SERVICE, chemistry="NMC")
    tracker.step(v, {"PACK1": b}, Batch([T0 + 1], {CYCLES: [1000]}))
    assert b.cycles == 1000 and b.state is BatteryState.WARNING
