"""The time-series store contract, run against every backend: the embedded SQLite store and a real InfluxDB.

The `make_store` fixture is parametrised ["sqlite", "influx"]; both backends must pass the same assertions.
SQLite-only tests (its table layout, its per-thread connections) are at the end.
"""

from __future__ import annotations

import gc
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest import line_protocol as lp
from cloud_ingest.errors import QueryError, StorageError, UnknownSignalError
from cloud_ingest.influx_store import InfluxSettings, InfluxTimeSeriesStore
from cloud_ingest.retention import RetentionConfig
from cloud_ingest.tsstore import SqliteTimeSeriesStore, TimeSeriesStore
from protocol import Batch, Catalogue, Signal, SignalType, load_catalogue
from zhilian.influx import InfluxProcess

CAT = load_catalogue()
LAT = "CurrentLocation.Latitude"
LON = "CurrentLocation.Longitude"
SATS = "CurrentLocation.GNSSReceiver.SatellitesUsed"
BEIDOU = "CurrentLocation.GNSSReceiver.BeiDouInUse"
SOC = "Powertrain.TractionBattery.StateOfCharge"
BARCODE = "Powertrain.TractionBattery.Barcode"
VIN = "LZHEB0A12P0000001"
END = 2**62

StoreFactory = Callable[..., TimeSeriesStore]


@pytest.fixture(params=["sqlite", "influx"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a store of the parametrised backend; every call opens the same storage (a reopen), closed at the end.

    Shared by the query and retention suites (tests/test_queries.py, tests/test_retention.py)."""
    opened: list[TimeSeriesStore] = []
    if request.param == "sqlite":

        def make(catalogue: Catalogue = CAT, retention: RetentionConfig | None = None) -> TimeSeriesStore:
            opened.append(SqliteTimeSeriesStore(tmp_path / "ts.db", catalogue, retention))
            return opened[-1]
    else:
        server: InfluxProcess = request.getfixturevalue("influxd")
        database: str = request.getfixturevalue("influx_database")

        def make(catalogue: Catalogue = CAT, retention: RetentionConfig | None = None) -> TimeSeriesStore:
            settings = InfluxSettings(server.url, database=database)
            opened.append(InfluxTimeSeriesStore(settings, catalogue, tmp_path / "quarantine.jsonl", retention))
            return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store: StoreFactory) -> TimeSeriesStore:
    return make_store()


def stored_rows(store: TimeSeriesStore) -> int:
    """Rows in the backend itself, counted past the store's read path."""
    if isinstance(store, SqliteTimeSeriesStore):
        with sqlite3.connect(store.path) as conn:
            return int(conn.execute("SELECT count(*) FROM telemetry").fetchone()[0])
    assert isinstance(store, InfluxTimeSeriesStore)
    _, rows = store._select('SELECT count("sample") FROM "telemetry"')
    return int(rows[0][1]) if rows else 0


def test_write_and_query_round_trip_keeps_types(store: TimeSeriesStore) -> None:
    batch = Batch([1000, 2000, 3000], {LAT: [31.2, None, 31.3], SATS: [7, 8, None], BEIDOU: [True, False, True]})
    assert store.write_many([(VIN, batch)]) == 3
    got = store.query(VIN, 0, 10_000, [LAT, SATS, BEIDOU], 100)
    assert got.timestamps == [1000, 2000, 3000]
    assert got.columns == batch.columns
    assert all(type(v) is bool for v in got.columns[BEIDOU])
    assert all(type(v) is int for v in got.columns[SATS] if v is not None)


def test_whole_numbers_in_float_signals_come_back_as_floats(store: TimeSeriesStore) -> None:
    # InfluxDB answers JSON, where 50.0 is written 50; the catalogue says the signal is a float.
    store.write_many([(VIN, Batch([1, 2], {SOC: [50.0, 0.0], LAT: [-90.0, 90.0]}))])
    got = store.query(VIN, 0, 10, [SOC, LAT], 10)
    assert got.columns == {SOC: [50.0, 0.0], LAT: [-90.0, 90.0]}
    assert all(type(v) is float for col in got.columns.values() for v in col)
    assert store.latest(VIN) == (2, {SOC: 0.0, LAT: 90.0})
    assert all(type(v) is float for v in store.latest(VIN)[1].values())  # type: ignore[index]


def test_query_range_is_inclusive_ordered_and_limited(store: TimeSeriesStore) -> None:
    store.write_many([(VIN, Batch([5, 1, 3, 4, 2], {SOC: [5.0, 1.0, 3.0, 4.0, 2.0]}))])
    got = store.query(VIN, 2, 4, [SOC], 100)
    assert got.timestamps == [2, 3, 4] and got.columns[SOC] == [2.0, 3.0, 4.0]
    assert store.query(VIN, 0, 100, [SOC], 2).timestamps == [1, 2]
    assert store.query("OTHERVIN0001", 0, 100, [SOC], 10).timestamps == []
    assert set(store.query(VIN, 0, 100, None, 10).columns) == set(CAT.names())
    assert store.query(VIN, 5, 4, [SOC], 10).timestamps == []  # empty range


def test_rows_come_back_even_when_the_asked_signals_are_empty_in_them(store: TimeSeriesStore) -> None:
    store.write_many([(VIN, Batch([1, 2, 3], {LAT: [1.0, 2.0, 3.0], SOC: [None, 50.0, None]}))])
    got = store.query(VIN, 0, 10, [SOC], 10)
    assert got.timestamps == [1, 2, 3] and got.columns == {SOC: [None, 50.0, None]}


def test_a_sample_without_values_is_still_a_row(store: TimeSeriesStore) -> None:
    # The pipeline turns out-of-range values into None; a sample can end up with nothing valid in it.
    store.write_many([(VIN, Batch([7, 8], {SOC: [None, None]})), (VIN, Batch([9], {}))])
    assert store.query(VIN, 0, 10, [SOC], 10).timestamps == [7, 8, 9]
    assert store.latest(VIN) == (9, {})
    assert stored_rows(store) == 3


def test_timestamps_far_from_now_and_unbounded_ranges(store: TimeSeriesStore) -> None:
    early, late = -86_400_000 * 365 * 50, 86_400_000 * 365 * 200  # 1920 and 2170
    store.write_many([(VIN, Batch([early, 0, late], {SOC: [1.0, 2.0, 3.0]}))])
    assert store.query(VIN, -(2**62), END, [SOC], 10).timestamps == [early, 0, late]
    assert store.latest(VIN) == (late, {SOC: 3.0})


def test_rewrite_is_idempotent_and_overlaps_merge(store: TimeSeriesStore) -> None:
    store.write_many([(VIN, Batch([1, 2], {LAT: [10.0, 11.0], SOC: [None, 50.0]}))])
    store.write_many([(VIN, Batch([1, 2], {LAT: [10.0, 11.0], SOC: [None, 50.0]}))])  # redelivery
    store.write_many([(VIN, Batch([2, 3], {LON: [120.0, 121.0], LAT: [None, 12.0]}))])  # overlapping batch
    got = store.query(VIN, 0, 10, [LAT, LON, SOC], 100)
    assert got.timestamps == [1, 2, 3]
    assert got.columns == {LAT: [10.0, 11.0, 12.0], LON: [None, 120.0, 121.0], SOC: [None, 50.0, None]}
    assert stored_rows(store) == 3


def test_write_many_fails_whole_on_an_unstorable_value(store: TimeSeriesStore) -> None:
    good = (VIN, Batch([1], {SATS: [3]}))
    bad = (VIN, Batch([2], {SATS: [2**70]}))  # fits neither a SQLite nor an InfluxDB integer
    with pytest.raises(StorageError):
        store.write_many([good, bad])
    assert store.latest(VIN) is None


def test_latest_is_the_newest_row_without_nulls(store: TimeSeriesStore) -> None:
    assert store.latest(VIN) is None
    store.write_many([(VIN, Batch([1, 9], {LAT: [1.0, 2.0], SOC: [80.0, None]}))])
    store.write_many([("LZHEB0A12P0000002", Batch([50], {LAT: [5.0]}))])
    assert store.latest(VIN) == (9, {LAT: 2.0})


def test_latest_position_is_the_newest_row_that_has_one(store: TimeSeriesStore) -> None:
    vin = "LZHTEST0000000001"
    assert store.latest_position(vin) is None
    store.write_many(
        [
            (vin, Batch([1000], {LAT: [29.5], LON: [106.5]})),
            # Then the vehicle rides into a tunnel: BMS data keeps coming, GNSS has no fix.
            (vin, Batch([2000, 3000], {SOC: [80.0, 79.9]})),
            # A half position (latitude without longitude) is no position.
            (vin, Batch([4000], {LAT: [30.0]})),
        ]
    )
    assert store.latest_position(vin) == (1000, 29.5, 106.5)
    assert store.latest(vin) == (4000, {LAT: 30.0})
    assert store.latest_position("LZHTEST0000000002") is None


def test_unknown_signal_and_bad_limit_are_typed_errors(store: TimeSeriesStore) -> None:
    with pytest.raises(UnknownSignalError) as err:
        store.query(VIN, 0, 1, [LAT, "No.Such", "Nope"], 10)
    assert err.value.names == ["No.Such", "Nope"]
    with pytest.raises(QueryError):
        store.query(VIN, 0, 1, None, 0)
    with pytest.raises(UnknownSignalError):
        store.write_many([(VIN, Batch([1], {"No.Such": [1]}))])


def test_catalogue_growth_keeps_data_and_adds_signals(make_store: StoreFactory) -> None:
    small = Catalogue([CAT.by_name(LAT)])
    s1 = make_store(small)
    s1.write_many([(VIN, Batch([1], {LAT: [1.5]}))])
    s1.close()
    grown = Catalogue([*small, Signal("Extra.Counter", 999, SignalType.INT, "count", "agent", min=0, max=10)])
    s2 = make_store(grown)
    s2.write_many([(VIN, Batch([2], {"Extra.Counter": [4]}))])
    got = s2.query(VIN, 0, 10, None, 10)
    assert got.columns == {LAT: [1.5, None], "Extra.Counter": [None, 4]}


def test_reads_and_writes_from_several_threads(store: TimeSeriesStore) -> None:
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for i in range(offset, 50, 2):
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

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    threads += [threading.Thread(target=reader), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = store.query(VIN, 0, 100, [SOC], 100)
    assert got.timestamps == list(range(50)) and got.columns[SOC] == [float(i) for i in range(50)]


def test_closed_store_raises_storage_error(make_store: StoreFactory) -> None:
    s = make_store()
    s.write_many([(VIN, Batch([1], {SOC: [1.0]}))])
    s.close()
    with pytest.raises(StorageError):
        s.latest(VIN)
    with pytest.raises(StorageError):
        s.write_many([(VIN, Batch([2], {SOC: [2.0]}))])


def test_ping_answers_while_the_backend_is_up(store: TimeSeriesStore) -> None:
    store.ping()  # raises StorageError otherwise


# Values of every catalogue type, as wide as the backends must carry them (the pipeline's range checks are
# narrower); strings get every character that UTF-8 can carry, quotes, backslashes and line breaks included.
_SIGS = [CAT.by_name(n) for n in (LAT, SATS, BEIDOU, BARCODE)]
_VALUES = {
    SignalType.FLOAT: st.floats(allow_nan=False, allow_infinity=False),
    SignalType.INT: st.integers(lp.INT64_MIN, lp.INT64_MAX),
    SignalType.BOOL: st.booleans(),
    SignalType.STR: st.text(st.characters(codec="utf-8"), max_size=40),
}


@st.composite
def _batches(draw: st.DrawFn) -> Batch:
    timestamps = sorted(draw(st.sets(st.integers(0, 2**41), min_size=1, max_size=6)))
    columns: dict[str, list[Any]] = {}
    for sig in draw(st.lists(st.sampled_from(_SIGS), unique=True, max_size=4)):
        columns[sig.name] = draw(
            st.lists(st.none() | _VALUES[sig.type], min_size=len(timestamps), max_size=len(timestamps))
        )
    return Batch(timestamps, columns)


_vins = iter(range(10**9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_batches())
def test_what_goes_in_comes_back_out(store: TimeSeriesStore, batch: Batch) -> None:
    vin = f"LZHPROP{next(_vins):010d}"  # one vehicle per example: examples do not see each other's rows
    assert store.write_many([(vin, batch)]) == len(batch)
    names = [s.name for s in _SIGS]
    got = store.query(vin, 0, END, names, 100)
    assert got.timestamps == batch.timestamps
    for name in names:
        assert got.columns[name] == batch.columns.get(name, [None] * len(batch)), name
        for sent, back in zip(batch.columns.get(name, []), got.columns[name], strict=False):
            assert type(back) is type(sent)
    last = {k: v[-1] for k, v in batch.columns.items() if v[-1] is not None}
    assert store.latest(vin) == (batch.timestamps[-1], last)


# -- SQLite only ------------------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteTimeSeriesStore]:
    s = SqliteTimeSeriesStore(tmp_path / "ts.db", CAT)
    yield s
    s.close()


def test_sqlite_columns_follow_the_catalogue(sqlite_store: SqliteTimeSeriesStore) -> None:
    with sqlite3.connect(sqlite_store.path) as conn:
        info = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(telemetry)")}
    assert info["vin"] == "TEXT" and info["ts"] == "INTEGER"
    for sig in CAT:
        expected = {"float": "REAL", "int": "INTEGER", "bool": "INTEGER", "str": "TEXT"}[sig.type.value]
        assert info[sig.column] == expected


def test_sqlite_connections_of_finished_threads_are_closed(sqlite_store: SqliteTimeSeriesStore) -> None:
    # Web and executor worker threads come and go over a service's uptime; their connections must not pile up.
    for _ in range(5):
        threads = [threading.Thread(target=sqlite_store.latest, args=("LZHTEST0000000001",)) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    gc.collect()
    assert len(sqlite_store._all) <= 1  # only the opening thread's own connection remains
    assert sqlite_store.latest("LZHTEST0000000001") is None  # the store still works from this thread
