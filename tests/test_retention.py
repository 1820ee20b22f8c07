"""Retention and downsampling that really delete: raw telemetry past its retention is gone, the rollups remain.

The shared cases run on both backends (`make_store`). Time: the SQLite store purges when `maintain(now_ms)` says
so, so its own cases move time forward; InfluxDB deletes on its own clock (the test server checks every second),
so the shared cases instead shorten the raw retention of data written 20 days ago — as time passing would.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_ingest.errors import QueryError, StorageError
from cloud_ingest.influx_store import InfluxTimeSeriesStore
from cloud_ingest.retention import DAY_S, MaintenanceLoop, RetentionConfig
from cloud_ingest.tsstore import GNSS_SPEED, SqliteTimeSeriesStore, TimeSeriesStore
from protocol import Batch
from tests import test_tsstore as suite
from tests.test_tsstore import CAT, SOC, StoreFactory

make_store = suite.make_store
VIN = "LZHRETAIN00000001"
MINUTE = 60_000
BARCODE = "Powertrain.TractionBattery.Barcode"


def _minute(ms: int) -> int:
    return ms - ms % MINUTE


def _eventually(check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.2)


def _raw(store: TimeSeriesStore, start: int, end: int) -> list[int]:
    return store.query(VIN, start, end, [SOC], 1000).timestamps


def test_old_raw_data_is_deleted_and_its_rollups_remain(make_store: StoreFactory) -> None:
    now = int(time.time() * 1000)
    old = _minute(now - 20 * DAY_S * 1000)
    recent = _minute(now) - 10 * MINUTE
    store = make_store(retention=RetentionConfig())  # 30 days raw, 2 years of 1-minute rollups
    store.write_many(
        [
            (VIN, Batch([old, old + 10_000, old + 20_000], {GNSS_SPEED: [10.0, 20.0, 30.0], SOC: [80.0, 79.0, None]})),
            (VIN, Batch([old + MINUTE], {SOC: [70.0], "Powertrain.TractionBattery.CycleCount": [5]})),
            (VIN, Batch([recent, recent + 1000], {GNSS_SPEED: [5.0, 7.0], SOC: [60.0, 60.0]})),
        ]
    )
    # What the continuous query / the maintenance loop does on its schedule, here for the whole range.
    store.rollup(old - MINUTE, now)
    roll = store.query_rollup(VIN, old - MINUTE, now, [GNSS_SPEED, SOC, "Powertrain.TractionBattery.CycleCount"], 100)
    assert roll.timestamps == [old, old + MINUTE, recent]
    assert roll.samples == [3, 1, 2]
    assert roll.columns[GNSS_SPEED] == [pytest.approx(20.0), None, pytest.approx(6.0)]
    assert roll.columns[SOC] == [pytest.approx(79.5), pytest.approx(70.0), pytest.approx(60.0)]
    assert roll.columns["Powertrain.TractionBattery.CycleCount"] == [None, 5.0, None]  # ints average to floats
    assert _raw(store, old, now) == [old, old + 10_000, old + 20_000, old + MINUTE, recent, recent + 1000]
    store.close()

    # Twenty days later, so to speak: a 7-day raw retention makes the old samples expire.
    store = make_store(retention=RetentionConfig(raw_s=7 * DAY_S))

    def purged() -> bool:
        store.maintain()  # SQLite purges here; InfluxDB's retention service does it on its own
        return _raw(store, old - MINUTE, old + 2 * MINUTE) == []

    _eventually(purged)
    assert _raw(store, old, now) == [recent, recent + 1000]
    roll = store.query_rollup(VIN, old - MINUTE, now, [GNSS_SPEED], 100)
    assert roll.timestamps == [old, old + MINUTE, recent] and roll.columns[GNSS_SPEED][0] == pytest.approx(20.0)
    assert store.fleet_snapshot([SOC])[0].ts == recent + 1000


def test_maintenance_catches_rollups_up(make_store: StoreFactory) -> None:
    # Samples older than the continuous query's window and no rollup yet (a first start over a spool's backlog,
    # or the server having been down): the first maintenance run covers them.
    now = int(time.time() * 1000)
    three_hours_ago = _minute(now) - 180 * MINUTE
    store = make_store(retention=RetentionConfig())
    store.write_many([(VIN, Batch([three_hours_ago, three_hours_ago + 1000], {SOC: [50.0, 52.0]}))])
    report = store.maintain(now)
    assert report.rollup_rows >= 1 and report.rollup_from_ms is not None
    roll = store.query_rollup(VIN, 0, now, [SOC], 10)
    assert roll.timestamps == [three_hours_ago] and roll.samples == [2]
    assert roll.columns[SOC] == [pytest.approx(51.0)]


def test_rollups_need_retention_and_numeric_signals(make_store: StoreFactory) -> None:
    plain = make_store()
    with pytest.raises(QueryError):
        plain.query_rollup(VIN, 0, 1, None, 10)
    with pytest.raises(QueryError):
        plain.rollup(0, MINUTE)
    assert plain.maintain() == type(plain.maintain())()  # nothing configured, nothing done
    plain.close()
    store = make_store(retention=RetentionConfig())
    with pytest.raises(QueryError):
        store.query_rollup(VIN, 0, 1, [BARCODE], 10)


def test_retention_config_is_validated() -> None:
    with pytest.raises(ValueError):
        RetentionConfig(raw_s=60)  # InfluxDB's minimum is an hour
    with pytest.raises(ValueError):
        RetentionConfig(lateness_s=10, every_s=300)
    with pytest.raises(ValueError):
        RetentionConfig(raw_policy="x", rollup_policy="x")
    assert RetentionConfig.from_env({}) == RetentionConfig()
    assert RetentionConfig.from_env({"ZHILIAN_RAW_RETENTION_DAYS": "0"}) is None
    assert RetentionConfig.from_env({"ZHILIAN_RAW_RETENTION_DAYS": "7"}) == RetentionConfig(raw_s=7 * DAY_S)
    with pytest.raises(ValueError):
        RetentionConfig.from_env({"ZHILIAN_ROLLUP_RETENTION_DAYS": "two years"})


# -- SQLite: its own clock ----------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "ts.db"


def _rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_sqlite_moves_time_forward_through_both_retentions(sqlite_path: Path) -> None:
    t0 = 1_767_225_600_000  # 2026-01-01
    store = SqliteTimeSeriesStore(sqlite_path, CAT, RetentionConfig())
    store.PURGE_CHUNK = 7  # several purge transactions
    stamps = [t0 + 1000 * i for i in range(120)]
    store.write_many([(VIN, Batch(stamps, {SOC: [float(i % 10) for i in range(120)]}))])
    assert store.maintain(t0 + 10 * MINUTE).raw_purged == 0
    assert store.query_rollup(VIN, t0, t0 + MINUTE, [SOC], 10).samples == [60, 60]
    day = DAY_S * 1000
    report = store.maintain(t0 + 31 * day)
    assert report.raw_purged == 120 and report.rollups_purged == 0
    assert _rows(sqlite_path, "telemetry") == 0 and _rows(sqlite_path, "telemetry_60s") == 2
    assert store.query_rollup(VIN, t0, t0 + MINUTE, [SOC], 10).columns[SOC] == [pytest.approx(4.5)] * 2
    assert store.fleet_snapshot([SOC])[0].values == {SOC: 9.0}  # the last known state outlives raw retention
    assert store.maintain(t0 + 731 * day).rollups_purged == 2
    assert _rows(sqlite_path, "telemetry_60s") == 0
    store.close()


def test_sqlite_late_samples_within_lateness_are_rolled_up(sqlite_path: Path) -> None:
    t0 = 1_767_225_600_000
    store = SqliteTimeSeriesStore(sqlite_path, CAT, RetentionConfig(lateness_s=900, every_s=300))
    store.write_many([(VIN, Batch([t0 + 5_000], {SOC: [10.0]}))])
    store.maintain(t0 + 2 * MINUTE)
    store.write_many([(VIN, Batch([t0 + 6_000], {SOC: [20.0]}))])  # the same minute, 2 minutes late
    store.maintain(t0 + 7 * MINUTE)
    roll = store.query_rollup(VIN, t0, t0, [SOC], 10)
    assert roll.samples == [2] and roll.columns[SOC] == [pytest.approx(15.0)]
    # The current minute is not rolled up before it is complete.
    store.write_many([(VIN, Batch([t0 + 7 * MINUTE + 1], {SOC: [1.0]}))])
    store.maintain(t0 + 7 * MINUTE + 30_000)
    assert store.query_rollup(VIN, t0 + 7 * MINUTE, t0 + 8 * MINUTE, [SOC], 10).timestamps == []
    store.close()


def test_maintenance_loop_runs_and_survives_failures(sqlite_path: Path) -> None:
    t0 = 1_767_225_600_000
    store = SqliteTimeSeriesStore(sqlite_path, CAT, RetentionConfig())
    store.write_many([(VIN, Batch([t0], {SOC: [1.0]}))])
    clock = [t0 + 31 * DAY_S * 1000]
    loop = MaintenanceLoop(store, every_s=0.05, clock_ms=lambda: clock[0]).start()
    try:
        _eventually(lambda: loop.runs >= 1 and _rows(sqlite_path, "telemetry") == 0, timeout=30)
        # Break the store under the loop (its bookkeeping table gone): runs fail with StorageError, are logged and
        # retried; once repaired, maintenance goes on.
        with sqlite3.connect(sqlite_path, timeout=10) as conn:
            conn.execute("ALTER TABLE ts_meta RENAME TO ts_meta_away")
        _eventually(lambda: loop.failures >= 2, timeout=30)
        assert loop._thread.is_alive()
        with sqlite3.connect(sqlite_path, timeout=10) as conn:
            conn.execute("ALTER TABLE ts_meta_away RENAME TO ts_meta")
        store.write_many([(VIN, Batch([t0 + 1000], {SOC: [2.0]}))])
        _eventually(lambda: _rows(sqlite_path, "telemetry") == 0, timeout=30)
    finally:
        loop.stop(timeout=10)
        store.close()  # after the loop: a connection must not be closed under a running query
    assert not loop._thread.is_alive()
    with pytest.raises(StorageError):
        store.maintain()


def test_closing_the_store_under_a_running_maintenance_loop_is_safe(sqlite_path: Path) -> None:
    # The loop's connection is its thread's own: close() waits for the step in progress instead of closing the
    # connection under a running statement (which can crash the interpreter), and no step starts after it.
    t0 = 1_767_225_600_000
    for _ in range(5):
        store = SqliteTimeSeriesStore(sqlite_path, CAT, RetentionConfig())
        store.PURGE_CHUNK = 1
        store.write_many([(VIN, Batch([t0 + i for i in range(200)], {SOC: [1.0] * 200}))])
        loop = MaintenanceLoop(store, every_s=0.001, clock_ms=lambda: t0 + 31 * DAY_S * 1000).start()
        _eventually(lambda: loop.runs >= 1 or _rows(sqlite_path, "telemetry") < 200, timeout=30)  # noqa: B023
        store.close()
        _eventually(lambda: loop.failures >= 1, timeout=30)  # noqa: B023
        loop.stop(timeout=10)
        assert not loop._thread.is_alive()


# -- InfluxDB: the server's own machinery ---------------------------------------------------------------------


@pytest.mark.parametrize("make_store", ["influx"], indirect=True)
def test_influx_policies_and_continuous_query_are_created_idempotently(make_store: StoreFactory) -> None:
    first = make_store(retention=RetentionConfig())
    assert isinstance(first, InfluxTimeSeriesStore)
    make_store(retention=RetentionConfig())  # a second process starting: nothing changes, nothing fails
    make_store(retention=RetentionConfig(raw_s=14 * DAY_S, lateness_s=1800))  # reconfigured: altered, replaced
    db = first.settings.database
    _, policies = first._select(f'SHOW RETENTION POLICIES ON "{db}"')
    by_name = {p[0]: p for p in policies}
    assert by_name["raw"][1] == "336h0m0s" and by_name["raw"][4] is True  # 14 days, the default policy
    assert by_name["rollup"][1] == "17520h0m0s"  # 730 days
    cqs = [row for series in first._query("SHOW CONTINUOUS QUERIES")[0] for row in series["values"]]
    ours = [q for name, q in cqs if name == "zhilian_telemetry_60s" and f"ON {db} " in q]
    assert len(ours) == 1 and "FOR 30m" in ours[0] and "telemetry_60s" in ours[0]


@pytest.mark.parametrize("make_store", ["influx"], indirect=True)
def test_influx_continuous_query_rolls_up_on_its_own(make_store: StoreFactory) -> None:
    # One-second buckets recomputed every second, so the server's schedule shows within seconds.
    cfg = RetentionConfig(rollup_interval_s=1, every_s=1, lateness_s=5)
    store = make_store(retention=cfg)
    now = int(time.time() * 1000)
    second = now - now % 1000
    store.write_many([(VIN, Batch([second - 2000, second - 1500, second - 1000], {SOC: [1.0, 2.0, 4.0]}))])

    def rolled() -> bool:
        return store.query_rollup(VIN, second - 3000, second, [SOC], 10).timestamps != []

    _eventually(rolled, timeout=30)
    roll = store.query_rollup(VIN, second - 3000, second, [SOC], 10)
    assert roll.timestamps == [second - 2000, second - 1000]
    assert roll.samples == [2, 1] and roll.columns[SOC] == [pytest.approx(1.5), pytest.approx(4.0)]
