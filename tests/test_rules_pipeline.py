"""Hazard rules inside the ingest pipeline: alarms derived from signed telemetry, committed with the ledger.

On SQLite and PostgreSQL (`database_url`). The kill-and-restart acceptance is in test_rules_pipeline_kill.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud_ingest.alarms import AlarmRow, AlarmState, Profile, RuleStateConflict, RuleStateRow, _Loaded
from cloud_ingest.commands import VehicleStatusRow
from cloud_ingest.db import MessageLedger
from cloud_ingest.errors import StorageError
from cloud_ingest.rules import VehicleContext
from cloud_ingest.service import IngestService
from tests.test_alarms_support import (
    KEY,
    OFFLINE,
    RULE,
    Clock,
    Vehicle,
    alarms_of,
    count,
    ingest,
    open_service,
    rule_state_version,
    transitions_of,
    vin_of,
)

VIN = vin_of(1)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def svc(tmp_path: Path, database_url: str, clock: Clock) -> Iterator[IngestService]:
    s = open_service(tmp_path, database_url, clock)
    s.registry.register_device(VIN, KEY.public_raw)
    yield s
    s.close()


def test_raised_at_its_level_escalated_peak_updated_and_cleared_once(svc: IngestService) -> None:
    v = Vehicle(VIN)
    ingest(svc, v.batch(0, [56.0] * 5))
    assert alarms_of(svc, VIN) == []  # L2 needs 10 s at >= 55 °C
    ingest(svc, v.batch(5, [56.0] * 7))
    (a,) = alarms_of(svc, VIN)
    assert (a.level, a.state, a.opened_ms, a.peak, a.cleared_ms) == (2, "DETECTED", v.ts(10), 56.0, None)
    # L3 (60 °C for 5 s) in the next batch: the same alarm, level and peak raised.
    ingest(svc, v.batch(12, [61.0, 61.5, 62.0, 62.5, 63.0, 63.2, 63.4]))
    (a,) = alarms_of(svc, VIN)
    assert (a.level, a.opened_ms, a.peak, a.peak_ms) == (3, v.ts(10), 63.2, v.ts(17))
    # Below the clear threshold (45 °C) for 120 s: cleared, still awaiting people.
    ingest(svc, v.batch(19, [40.0] * 60), v.batch(79, [40.0] * 70))
    (a,) = alarms_of(svc, VIN)
    assert (a.level, a.state, a.cleared_ms, a.last_ms) == (3, "DETECTED", v.ts(139), v.ts(139))
    assert transitions_of(svc, a.id) == [(None, "DETECTED", "system:rules")]
    # Nothing else in these readings is a hazard.
    assert [x.rule for x in alarms_of(svc, VIN, rule=None)] == [RULE]


def test_vehicles_in_time_order_and_a_redelivered_duplicate_not_evaluated_again(svc: IngestService) -> None:
    other = vin_of(2)
    svc.registry.register_device(other, KEY.public_raw)
    a, b = Vehicle(VIN), Vehicle(other)
    first_a, second_a = a.batch(0, [56.0] * 6), a.batch(6, [56.0] * 6)
    first_b, second_b = b.batch(0, [57.0] * 6), b.batch(6, [57.0] * 6)
    # Delivered out of order and interleaved: the pipeline sorts each vehicle's batches by time.
    ingest(svc, second_b, second_a, first_a, first_b)
    assert [(x.level, x.opened_ms, x.peak) for x in alarms_of(svc, VIN)] == [(2, a.ts(10), 56.0)]
    assert [(x.level, x.opened_ms, x.peak) for x in alarms_of(svc, other)] == [(2, b.ts(10), 57.0)]
    version = rule_state_version(svc, VIN)
    before = [(x.id, x.version) for x in alarms_of(svc, VIN)]
    ingest(svc, second_a, first_a, expect="duplicate")
    assert rule_state_version(svc, VIN) == version
    assert [(x.id, x.version) for x in alarms_of(svc, VIN)] == before


def test_a_batch_whose_commit_failed_is_evaluated_again_from_the_persisted_state(
    svc: IngestService, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = Vehicle(VIN)
    ingest(svc, v.batch(0, [56.0] * 6))
    version = rule_state_version(svc, VIN)
    raising = v.batch(6, [56.0] * 6)
    assert svc.alarms is not None
    real_apply = svc.alarms._apply

    def crash(*args: object) -> None:
        raise StorageError("database went away mid-commit")

    # The failure comes after the engine already evaluated the batch in memory: that evaluation must not count.
    monkeypatch.setattr(svc.alarms, "_apply", crash)
    with pytest.raises(StorageError):
        ingest(svc, raising)
    monkeypatch.setattr(svc.alarms, "_apply", real_apply)
    assert alarms_of(svc, VIN) == []
    assert rule_state_version(svc, VIN) == version
    assert count(svc, MessageLedger) == 1
    # The redelivery is stored and evaluated from the state before it: raised once, on time.
    ingest(svc, raising)
    assert [(a.level, a.opened_ms) for a in alarms_of(svc, VIN)] == [(2, v.ts(10))]


def test_two_workers_alternating_one_vehicle_see_each_others_state(
    tmp_path: Path, database_url: str, svc: IngestService, clock: Clock
) -> None:
    # A second service on the same databases: a second bridge worker with its own engine cache.
    other = open_service(tmp_path / "worker2", database_url, clock)
    try:
        v = Vehicle(VIN)
        ingest(svc, v.batch(0, [56.0] * 4))
        ingest(other, v.batch(4, [56.0] * 4))
        ingest(svc, v.batch(8, [56.0] * 4))  # its cache is behind the row: reloaded, the condition began at 0 s
        assert [(a.level, a.opened_ms) for a in alarms_of(svc, VIN)] == [(2, v.ts(10))]
        ingest(other, v.batch(12, [61.0] * 6))  # escalates the same alarm, not a second one
        ingest(svc, v.batch(18, [61.2, 61.6]))  # +0.6 °C over the peak: at least update_step (0.5)
        (a,) = alarms_of(svc, VIN)
        assert (a.level, a.opened_ms, a.peak, a.peak_ms) == (3, v.ts(10), 61.6, v.ts(19))
    finally:
        other.close()


def test_the_state_row_is_authoritative_version_checked_and_an_unreadable_one_is_reset(
    tmp_path: Path, database_url: str, svc: IngestService, clock: Clock
) -> None:
    v = Vehicle(VIN)
    ingest(svc, v.batch(0, [56.0] * 3))
    assert svc.alarms is not None
    state = svc.alarms.rules.export_json(VIN)
    assert state is not None
    # A save based on an older version than the row's fails the transaction (it is retried from the row).
    with Session(svc.engine) as session, session.begin():
        session.execute(update(RuleStateRow).where(RuleStateRow.vin == VIN).values(version=RuleStateRow.version + 5))
    with pytest.raises(RuleStateConflict), Session(svc.engine) as session, session.begin():
        svc.alarms._save_many(session, [(VIN, _Loaded(1, VehicleContext()), state, v.ts(2), None)])
    # A state this release cannot read: the vehicle starts afresh instead of blocking its ingest.
    with Session(svc.engine) as session, session.begin():
        session.execute(update(RuleStateRow).where(RuleStateRow.vin == VIN).values(state_json='{"version": 99}'))
    other = open_service(tmp_path / "worker2", database_url, clock)
    try:
        ingest(other, v.batch(3, [56.0] * 12))
        # The condition restarted at 3 s (what began before is lost with the state), and the vehicle goes on.
        assert [(a.level, a.opened_ms) for a in alarms_of(other, VIN)] == [(2, v.ts(13))]
        with Session(other.engine) as session:
            saved = json.loads(session.scalar(select(RuleStateRow.state_json).where(RuleStateRow.vin == VIN)) or "")
        assert saved["version"] != 99
    finally:
        other.close()


def test_returning_condition_reopens_a_verified_or_recently_closed_alarm(svc: IngestService, clock: Clock) -> None:
    assert svc.alarms is not None
    v = Vehicle(VIN)
    ingest(svc, v.batch(0, [56.0] * 12), v.batch(12, [40.0] * 121))  # raised at 10 s, cleared at 132 s
    (a,) = alarms_of(svc, VIN)
    for to in (AlarmState.ACKNOWLEDGED, AlarmState.RECTIFYING, AlarmState.VERIFIED):
        svc.alarms.transition(a.id, to, "operator:test")
    ingest(svc, v.batch(133, [57.0] * 11))  # back at 143 s: the fix did not hold
    (a,) = alarms_of(svc, VIN)
    assert (a.state, a.reopen_count, a.cleared_ms) == ("REOPENED", 1, None)
    assert transitions_of(svc, a.id)[-1] == ("VERIFIED", "REOPENED", "system:rules")
    ingest(svc, v.batch(144, [40.0] * 121))
    for to in (AlarmState.ACKNOWLEDGED, AlarmState.RECTIFYING, AlarmState.VERIFIED, AlarmState.CLOSED):
        svc.alarms.transition(a.id, to, "operator:test")
    clock.advance(3600)  # within the reopen window (7 d)
    ingest(svc, v.batch(265, [57.0] * 11))
    (a,) = alarms_of(svc, VIN)
    assert (a.state, a.reopen_count, a.closed_ms) == ("REOPENED", 2, None)
    ingest(svc, v.batch(276, [40.0] * 121))
    for to in (AlarmState.ACKNOWLEDGED, AlarmState.RECTIFYING, AlarmState.VERIFIED, AlarmState.CLOSED):
        svc.alarms.transition(a.id, to, "operator:test")
    clock.advance(8 * 86_400)  # past the window: a new incident
    ingest(svc, v.batch(397, [57.0] * 11))
    old, new = alarms_of(svc, VIN)
    assert (old.id, old.state, new.state, new.reopen_count) == (a.id, "CLOSED", "DETECTED", 0)
    # The database itself holds the line: one alarm per (vehicle, rule) that is not CLOSED.
    with pytest.raises(IntegrityError), Session(svc.engine) as session, session.begin():
        session.add(
            AlarmRow(
                vin=VIN, rule=RULE, level=1, state="ACKNOWLEDGED", opened_ms=1, last_ms=1, detail_json="{}",
                reopen_count=0, created_ms=1, updated_ms=1,
            )
        )  # fmt: skip
    with Session(svc.engine) as session, session.begin():
        session.execute(update(AlarmRow).where(AlarmRow.id == new.id).values(state="CLOSED"))
        session.add(
            AlarmRow(
                vin=VIN, rule=RULE, level=1, state="DETECTED", opened_ms=1, last_ms=1, detail_json="{}",
                reopen_count=0, created_ms=1, updated_ms=1,
            )
        )  # fmt: skip


def test_deadline_escalates_once_on_the_injected_clock(svc: IngestService, clock: Clock) -> None:
    assert svc.alarms is not None
    v = Vehicle(VIN)
    ingest(svc, v.batch(0, [56.0] * 12))  # L2: 24 h deadline
    (a,) = alarms_of(svc, VIN)
    assert a.deadline_ms == clock.now + 86_400_000
    svc.alarms.transition(a.id, AlarmState.ACKNOWLEDGED, "operator:test")
    clock.advance(86_399)
    assert svc.alarms.tick_once()["escalated"] == 0
    clock.advance(2)
    assert svc.alarms.tick_once()["escalated"] == 1
    (a,) = alarms_of(svc, VIN)
    assert (a.state, a.escalated_ms) == ("ESCALATED", clock.now)
    assert transitions_of(svc, a.id)[-1] == ("ACKNOWLEDGED", "ESCALATED", "system:deadline")
    svc.alarms.transition(a.id, AlarmState.RECTIFYING, "operator:test")
    clock.advance(86_400)
    svc.alarms.tick_once()  # (escalates the vehicle_offline alarm the silence raised meanwhile)
    (a,) = alarms_of(svc, VIN)
    assert a.state == "RECTIFYING"  # once per deadline
    assert [t[1] for t in transitions_of(svc, a.id)] == ["DETECTED", "ACKNOWLEDGED", "ESCALATED", "RECTIFYING"]
    # Another vehicle: a higher level brings the deadline forward to that level's.
    other = Vehicle(vin_of(2))
    svc.registry.register_device(other.vin, KEY.public_raw)
    ingest(svc, other.batch(0, [56.0] * 12))
    clock.advance(60)
    ingest(svc, other.batch(12, [61.0] * 6))
    (b,) = alarms_of(svc, other.vin)
    assert (b.level, b.deadline_ms) == (3, clock.now + 3_600_000)


def test_offline_rule_runs_on_the_periodic_tick(svc: IngestService, clock: Clock) -> None:
    assert svc.alarms is not None
    v = Vehicle(VIN)
    ingest(svc, v.batch(0, [30.0] * 3))  # newest sample at 2 s; reporting interval 5 s → offline after 15 s
    clock.now = v.ts(2) + 14_000
    assert svc.alarms.tick_once()["ticked"] == 0  # not due: nothing can change before 15 s of silence
    assert alarms_of(svc, VIN, OFFLINE) == []
    clock.now = v.ts(2) + 15_000
    assert svc.alarms.tick_once()["ticked"] == 1
    (a,) = alarms_of(svc, VIN, OFFLINE)
    assert (a.level, a.state, a.cleared_ms, a.peak) == (1, "DETECTED", None, 3.0)
    version = rule_state_version(svc, VIN)
    clock.advance(10)
    assert svc.alarms.tick_once()["ticked"] == 0  # still offline, nothing due: no tick, no write
    assert rule_state_version(svc, VIN) == version
    # Next due: the peak's next step (update_step 60 intervals after the raise's 3): 63 x 5 s of silence.
    clock.now = v.ts(2) + 63 * 5_000 - 1
    assert svc.alarms.tick_once()["ticked"] == 0
    clock.now = v.ts(2) + 63 * 5_000
    assert svc.alarms.tick_once()["ticked"] == 1
    (a,) = alarms_of(svc, VIN, OFFLINE)
    assert (a.level, a.peak) == (1, 63.0)
    assert len(alarms_of(svc, VIN, OFFLINE)) == 1
    ingest(svc, v.batch(400, [30.0]))  # it reports again: the ingest engine sees the ticked state and clears
    (a,) = alarms_of(svc, VIN, OFFLINE)
    assert a.cleared_ms == v.ts(400)
    clock.now = v.ts(400) + 14_000
    assert svc.alarms.tick_once()["ticked"] == 0


def test_the_context_comes_from_the_profile_and_the_status_reports_lock(svc: IngestService) -> None:
    assert svc.alarms is not None
    alarms = svc.alarms
    with Session(svc.engine) as session, session.begin():
        session.add(
            VehicleStatusRow(
                vin=VIN, online=True, boot=1, conn=1, offline=0, seq=1, created_ms=1, received_ms=1, agent="t",
                metrics_json=json.dumps({"locked": True}),
            )
        )  # fmt: skip
    with Session(svc.engine) as session:
        ctx = alarms._contexts_for(session, [VIN])[VIN]
    assert (ctx.locked, ctx.model, ctx.battery, ctx.controller, ctx.reporting_interval_s) == (
        True,
        None,
        None,
        None,
        5.0,
    )
    alarms.put_profile(
        VIN,
        Profile(model="emoto72", chemistry="LFP", battery_barcodes=("B1", "B2"), battery_cell_count=20,
                wheel_inch=14.0, locked=False, reporting_interval_s=10.0),
    )  # fmt: skip
    with Session(svc.engine) as session:
        ctx = alarms._contexts_for(session, [VIN])[VIN]  # the PUT dropped the cached context
    assert (ctx.model, ctx.chemistry, ctx.locked, ctx.reporting_interval_s) == ("emoto72", "LFP", False, 10.0)
    assert ctx.battery is not None and ctx.battery.barcodes == frozenset({"B1", "B2"})
    assert ctx.battery.cell_count == 20
    assert ctx.controller is not None and (ctx.controller.wheel_inch, ctx.controller.speed_limit_kmh) == (14.0, None)
