"""The embedded SQLite time-series store: schema from the catalogue, idempotent upserts, queries."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from cloud_ingest.errors import QueryError, StorageError, UnknownSignalError
from cloud_ingest.tsstore import SqliteTimeSeriesStore
from protocol import Batch, Catalogue, Signal, SignalType, load_catalogue

CAT = load_catalogue()
LAT = "CurrentLocation.Latitude"
LON = "CurrentLocation.Longitude"
SATS = "CurrentLocation.GNSSReceiver.SatellitesUsed"
BEIDOU = "CurrentLocation.GNSSReceiver.BeiDouInUse"
SOC = "Powertrain.TractionBattery.StateOfCharge"
VIN = "LZHEB0A12P0000001"


@pytest.fixture
def store(tmp_path: Path) -> SqliteTimeSeriesStore:
    s = SqliteTimeSeriesStore(tmp_path / "ts.db", CAT)
    yield s
    s.close()


def test_columns_follow_the_catalogue(store: SqliteTimeSeriesStore) -> None:
    with sqlite3.connect(store.path) as conn:
        info = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(telemetry)")}
    assert info["vin"] == "TEXT" and info["ts"] == "INTEGER"
    for sig in CAT:
        expected = {"float": "REAL", "int": "INTEGER", "bool": "INTEGER", "str": "TEXT"}[sig.type.value]
        assert info[sig.column] == expected


def test_write_and_query_round_trip_keeps_types(store: SqliteTimeSeriesStore) -> None:
    batch = Batch([1000, 2000, 3000], {LAT: [31.2, None, 31.3], SATS: [7, 8, None], BEIDOU: [True, False, True]})
    assert store.write_many([(VIN, batch)]) == 3
    got = store.query(VIN, 0, 10_000, [LAT, SATS, BEIDOU], 100)
    assert got.timestamps == [1000, 2000, 3000]
    assert got.columns == batch.columns
    assert all(type(v) is bool for v in got.columns[BEIDOU])
    assert all(type(v) is int for v in got.columns[SATS] if v is not None)


def test_query_range_is_inclusive_ordered_and_limited(store: SqliteTimeSeriesStore) -> None:
    store.write_many([(VIN, Batch([5, 1, 3, 4, 2], {SOC: [5.0, 1.0, 3.0, 4.0, 2.0]}))])
    got = store.query(VIN, 2, 4, [SOC], 100)
    assert got.timestamps == [2, 3, 4] and got.columns[SOC] == [2.0, 3.0, 4.0]
    assert store.query(VIN, 0, 100, [SOC], 2).timestamps == [1, 2]
    assert store.query("OTHERVIN0001", 0, 100, [SOC], 10).timestamps == []
    assert set(store.query(VIN, 0, 100, None, 10).columns) == set(CAT.names())


def test_rewrite_is_idempotent_and_overlaps_merge(store: SqliteTimeSeriesStore) -> None:
    store.write_many([(VIN, Batch([1, 2], {LAT: [10.0, 11.0], SOC: [None, 50.0]}))])
    store.write_many([(VIN, Batch([1, 2], {LAT: [10.0, 11.0], SOC: [None, 50.0]}))])  # redelivery
    store.write_many([(VIN, Batch([2, 3], {LON: [120.0, 121.0], LAT: [None, 12.0]}))])  # overlapping batch
    got = store.query(VIN, 0, 10, [LAT, LON, SOC], 100)
    assert got.timestamps == [1, 2, 3]
    assert got.columns == {LAT: [10.0, 11.0, 12.0], LON: [None, 120.0, 121.0], SOC: [None, 50.0, None]}
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM telemetry").fetchone()[0] == 3


def test_write_many_is_one_transaction(store: SqliteTimeSeriesStore) -> None:
    good = (VIN, Batch([1], {SATS: [3]}))
    bad = (VIN, Batch([2], {SATS: [2**70]}))  # does not fit a SQLite integer
    with pytest.raises(StorageError):
        store.write_many([good, bad])
    assert store.latest(VIN) is None


def test_latest_is_the_newest_row_without_nulls(store: SqliteTimeSeriesStore) -> None:
    assert store.latest(VIN) is None
    store.write_many([(VIN, Batch([1, 9], {LAT: [1.0, 2.0], SOC: [80.0, None]}))])
    store.write_many([("LZHEB0A12P0000002", Batch([50], {LAT: [5.0]}))])
    assert store.latest(VIN) == (9, {LAT: 2.0})


def test_unknown_signal_and_bad_limit_are_typed_errors(store: SqliteTimeSeriesStore) -> None:
    with pytest.raises(UnknownSignalError) as err:
        store.query(VIN, 0, 1, [LAT, "No.Such", "Nope"], 10)
    assert err.value.names == ["No.Such", "Nope"]
    with pytest.raises(QueryError):
        store.query(VIN, 0, 1, None, 0)
    with pytest.raises(UnknownSignalError):
        store.write_many([(VIN, Batch([1], {"No.Such": [1]}))])


def test_catalogue_growth_adds_columns_and_keeps_data(tmp_path: Path) -> None:
    small = Catalogue([CAT.by_name(LAT)])
    s1 = SqliteTimeSeriesStore(tmp_path / "ts.db", small)
    s1.write_many([(VIN, Batch([1], {LAT: [1.5]}))])
    s1.close()
    grown = Catalogue([*small, Signal("Extra.Counter", 999, SignalType.INT, "count", "agent", min=0, max=10)])
    s2 = SqliteTimeSeriesStore(tmp_path / "ts.db", grown)
    s2.write_many([(VIN, Batch([2], {"Extra.Counter": [4]}))])
    got = s2.query(VIN, 0, 10, None, 10)
    assert got.columns == {LAT: [1.5, None], "Extra.Counter": [None, 4]}
    s2.close()


def test_reads_and_writes_from_several_threads(store: SqliteTimeSeriesStore) -> None:
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(50):
                store.write_many([(VIN, Batch([i], {SOC: [float(i)]}))])
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(50):
                store.latest(VIN)
                store.query(VIN, 0, 100, [SOC], 100)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.query(VIN, 0, 100, [SOC], 100)) == 50


def test_closed_store_raises_storage_error(tmp_path: Path) -> None:
    s = SqliteTimeSeriesStore(tmp_path / "ts.db", CAT)
    s.close()
    with pytest.raises(StorageError):
        s.latest(VIN)


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    # Web and executor worker threads come and go over a service's uptime; their connections must not pile up.
    import gc
    import threading

    store = SqliteTimeSeriesStore(tmp_path / "t.db", CAT)
    try:
        for _ in range(5):
            threads = [threading.Thread(target=store.latest, args=("LZHTEST0000000001",)) for _ in range(10)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        gc.collect()
        assert len(store._all) <= 1  # only the opening thread's own connection remains
        assert store.latest("LZHTEST0000000001") is None  # the store still works from this thread
    finally:
        store.close()


def test_latest_position_is_the_newest_row_that_has_one(tmp_path: Path) -> None:
    vin = "LZHTEST0000000001"
    store = SqliteTimeSeriesStore(tmp_path / "t.db", CAT)
    try:
        assert store.latest_position(vin) is None
        store.write_many(
            [
                (vin, Batch([1000], {"CurrentLocation.Latitude": [29.5], "CurrentLocation.Longitude": [106.5]})),
                # Then the vehicle rides into a tunnel: BMS data keeps coming, GNSS has no fix.
                (vin, Batch([2000, 3000], {"Powertrain.TractionBattery.StateOfCharge": [80.0, 79.9]})),
            ]
        )
        assert store.latest_position(vin) == (1000, 29.5, 106.5)
        assert store.latest(vin) == (3000, {"Powertrain.TractionBattery.StateOfCharge": 79.9})
    finally:
        store.close()
