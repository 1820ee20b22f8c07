"""The InfluxDB store against a real influxd: escaping (what goes in comes back out), quarantine of rejected data,
batching, retries across a server restart, backpressure and credentials. The behaviour it shares with the SQLite
store is tested in test_tsstore.py."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cloud_ingest import line_protocol as lp
from cloud_ingest.errors import StorageError
from cloud_ingest.influx_store import InfluxSettings, InfluxTimeSeriesStore, field_key
from protocol import Batch, load_catalogue
from tests.influx_server import own_influxd
from zhilian.broker import free_port
from zhilian.influx import InfluxProcess
from zhilian.procs import spawn_zhilian, stop_process

pytestmark = pytest.mark.integration
CAT = load_catalogue()
SOC = "Powertrain.TractionBattery.StateOfCharge"
CYCLES = "Powertrain.TractionBattery.CycleCount"
BARCODE = "Powertrain.TractionBattery.Barcode"
CYCLES_KEY, SOC_KEY = field_key(CAT.by_name(CYCLES)), field_key(CAT.by_name(SOC))
VIN = "LZHINFLUX00000001"
END = 2**62


class Stores:
    """Opens stores on one database and closes them all at the end."""

    def __init__(self, server: InfluxProcess, database: str, quarantine: Path) -> None:
        self.server, self.database, self.quarantine = server, database, quarantine
        self.opened: list[InfluxTimeSeriesStore] = []

    def open(self, **options: Any) -> InfluxTimeSeriesStore:
        settings = InfluxSettings(self.server.url, database=self.database, **options)
        self.opened.append(InfluxTimeSeriesStore(settings, CAT, self.quarantine))
        return self.opened[-1]

    def close(self) -> None:
        for s in self.opened:
            s.close()


@pytest.fixture
def stores(influxd: InfluxProcess, influx_database: str, tmp_path: Path) -> Iterator[Stores]:
    s = Stores(influxd, influx_database, tmp_path / "quarantine.jsonl")
    yield s
    s.close()


def _write_raw(server: InfluxProcess, database: str, body: str) -> None:
    r = server.write(body, database)
    assert r.status_code == 204, r.text


def _encodable(fn: Any, *args: Any) -> bool:
    try:
        fn(*args)
    except lp.LineProtocolError:
        return False
    return True


# -- the line protocol encoder -----------------------------------------------------------------------------------

# Weighted towards the characters line protocol and InfluxQL treat specially.
_tricky_text = st.text(st.sampled_from(list(",= \\\"'#\tab0é漢_.-:*\n\x85")), min_size=1, max_size=8)
_any_name = st.text(st.characters(codec="utf-8", exclude_categories=["Cc"]), min_size=1, max_size=12)
_any_names = _any_name | _tricky_text  # including some the encoder must refuse
_names = (_any_name | _tricky_text.map(lambda s: s.replace("\t", "a").replace("\n", "b"))).filter(
    lambda s: _encodable(lp.key, "tag value", s)
)
_field_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(lp.INT64_MIN, lp.INT64_MAX),
    st.booleans(),
    st.text(st.characters(codec="utf-8"), max_size=30) | _tricky_text,
)


_field_types: dict[tuple[str, str, str], type] = {}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
@given(
    measurement=_names,
    tags=st.dictionaries(_names, _names, max_size=3),
    fields=st.dictionaries(_names, _field_values, min_size=1, max_size=3),
    # A few instants, the extremes included: every new week is a new shard, which costs the server fsyncs.
    ts=st.sampled_from([lp.MIN_TIME_MS, -1, 0, 1_767_225_600_123, lp.MAX_TIME_MS]),
)
def test_line_protocol_round_trips_through_the_server(
    influxd: InfluxProcess,
    influx_database: str,
    measurement: str,
    tags: dict[str, str],
    fields: dict[str, Any],
    ts: int,
) -> None:
    assume(_encodable(lp.measurement, measurement))
    assume(all(_encodable(lp.key, "tag key", k) and _encodable(lp.key, "tag value", v) for k, v in tags.items()))
    assume(all(_encodable(lp.key, "field key", k) for k in fields))
    # One database for all examples (creating one costs a metadata fsync): skip an example that would change a
    # field's type in it, which the server rightly refuses.
    for k, v in fields.items():
        assume(_field_types.setdefault((influx_database, measurement, k), type(v)) is type(v))
    line = lp.line(measurement, tags, fields, ts)
    if not _field_types.get((influx_database, "", "")):
        influxd.query(f'CREATE DATABASE "{influx_database}"')
        _field_types[(influx_database, "", "")] = bool
    _write_raw(influxd, influx_database, line)
    where = "".join(f" AND {lp.influxql_identifier(k)}::tag = {lp.influxql_string(v)}" for k, v in tags.items())
    for key, sent in fields.items():
        q = (
            f"SELECT {lp.influxql_identifier(key)}::field FROM {lp.influxql_identifier(measurement)}"
            f" WHERE time = {ts * 1_000_000}{where} GROUP BY *"
        )
        doc = influxd.query(q, db=influx_database).json()
        # Other examples' series may share some of these tags; ours is the one with exactly these.
        ours = [
            sr
            for sr in doc["results"][0].get("series", [])
            if all(v == tags.get(k, "") for k, v in sr.get("tags", {}).items())
        ]
        assert len(ours) == 1, (line, q, doc)
        [[t, back]] = ours[0]["values"]
        assert t == ts
        if isinstance(sent, float) and type(back) is int:
            back = float(back)  # JSON writes 2.0 as 2; the store converts by the catalogue's type
        assert back == sent and type(back) is type(sent), (line, back)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (lp.measurement, ("",)),
        (lp.measurement, ("#comment",)),
        (lp.measurement, ("ends\\",)),
        (lp.key, ("tag value", "a\\ b")),
        (lp.key, ("tag value", "a\\,b")),
        (lp.key, ("field key", 'a\\"b')),
        (lp.key, ("tag value", "line\nbreak")),
        (lp.key, ("tag key", "nul\x00")),
        (lp.key, ("field key", "time")),
        (lp.key, ("tag value", "")),
        (lp.float_value, (float("inf"),)),
        (lp.float_value, (float("nan"),)),
        (lp.float_value, (True,)),
        (lp.int_value, (2**63,)),
        (lp.int_value, (1.0,)),
        (lp.bool_value, (1,)),
        (lp.str_value, ("\ud800",)),
        (lp.timestamp_ms, (lp.MAX_TIME_MS + 1,)),
    ],
)
def test_encoder_refuses_what_the_protocol_cannot_carry(fn: Any, args: tuple[Any, ...]) -> None:
    with pytest.raises(lp.LineProtocolError):
        fn(*args)


# -- the store --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vin=_any_names, text=st.text(st.characters(codec="utf-8"), max_size=60) | _tricky_text)
def test_store_round_trips_any_vin_and_string_it_accepts(stores: Stores, vin: str, text: str) -> None:
    store = stores.opened[0] if stores.opened else stores.open()
    batch = Batch([1, 2], {BARCODE: [text, None], SOC: [None, 12.5]})
    if not _encodable(lp.key, "tag value", vin):
        with pytest.raises(StorageError):
            store.write_many([(vin, batch)])
        assert store.latest(vin) is None and store.query(vin, 0, END, None, 10).timestamps == []
        return
    store.write_many([(vin, batch)])
    assert store.query(vin, 0, END, [BARCODE, SOC], 10).columns == batch.columns
    assert store.latest(vin) == (2, {SOC: 12.5})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(st.characters(codec="utf-8"), max_size=40) | _tricky_text,
    soc=st.floats(0, 100, allow_nan=False) | st.integers(0, 100).map(float),
    cycles=st.integers(0, 10_000),
)
def test_msgpack_and_json_answers_read_the_same(stores: Stores, text: str, soc: float, cycles: int) -> None:
    """Queries ask InfluxDB 1.x for MessagePack; a server answering JSON (2.x/3.x v1 compatibility) must read the
    same, whole floats included (JSON has one number type)."""
    if not stores.opened:
        stores.open(msgpack_reads=True)
        stores.open(msgpack_reads=False)
    packed, plain = stores.opened
    packed.write_many([(VIN, Batch([1_000, 2_000], {BARCODE: [text, None], SOC: [soc, None], CYCLES: [None, cycles]}))])
    for store in (packed, plain):
        got = store.query(VIN, 0, END, [BARCODE, SOC, CYCLES], 10)
        assert got.columns[SOC][0] == soc and type(got.columns[SOC][0]) is float
        assert got.columns[BARCODE][0] == text and got.columns[CYCLES][1] == cycles
    assert packed.latest(VIN) == plain.latest(VIN)
    assert packed.fleet_snapshot([SOC, CYCLES]) == plain.fleet_snapshot([SOC, CYCLES])


def test_rejected_data_is_quarantined_and_the_rest_lands(stores: Stores) -> None:
    # An integer field that already exists as a float (a catalogue type change, or another writer): InfluxDB
    # answers 400 for that point and stores the others of the same request.
    store = stores.open(max_lines=1000)  # creates the database
    _write_raw(stores.server, stores.database, f"telemetry,vin=OTHERWRITER {CYCLES_KEY}=1.5 1000")
    good = (VIN, Batch(list(range(1, 21)), {SOC: [float(i) for i in range(1, 21)]}))
    bad = ("LZHINFLUXBAD00001", Batch([5, 6], {CYCLES: [7, None], SOC: [1.0, 2.0]}))
    more = (VIN, Batch([30], {SOC: [30.0]}))
    assert store.write_many([good, bad, more]) == 22  # 23 rows, one quarantined

    assert store.query(VIN, 0, END, [SOC], 100).timestamps == [*range(1, 21), 30]
    # The other row of the bad batch had nothing wrong with it and landed.
    assert store.query(bad[0], 0, END, [SOC, CYCLES], 10).timestamps == [6]
    records = [json.loads(x) for x in stores.quarantine.read_text().splitlines()]
    assert len(records) == 1
    assert records[0]["status"] == 400 and "field type conflict" in records[0]["reason"]
    assert records[0]["lines"] == [f"telemetry,vin={bad[0]} sample=t,{CYCLES_KEY}=7i,{SOC_KEY}=1.0 5"]
    assert store.stats()["quarantined_lines"] == 1

    # When every line of a request is rejected, the server's dropped= count quarantines them without bisecting.
    before = store.stats()["requests"]
    assert store.write_many([(bad[0], Batch([7, 8, 9], {CYCLES: [1, 2, 3]}))]) == 0
    assert store.stats()["requests"] == before + 1
    assert store.stats()["quarantined_lines"] == 4


def test_fleet_state_policy_dropped_under_the_store_is_made_again(stores: Stores) -> None:
    store = stores.open()
    store.write_many([(VIN, Batch([1], {SOC: [1.0]}))])
    stores.server.query(f'DROP RETENTION POLICY "zhilian_state" ON "{stores.database}"')
    # The state write answers 500 "retention policy not found": the store sets its policies up again and retries.
    assert store.write_many([(VIN, Batch([2], {SOC: [2.0]}))]) == 1
    assert [(e.vin, e.ts, e.values) for e in store.fleet_snapshot([SOC])] == [(VIN, 2, {SOC: 2.0})]
    assert store.stats()["state_errors"] == 0


def test_a_failing_fleet_state_write_does_not_fail_stored_samples(stores: Stores) -> None:
    # An operator-made database without the state policy, and an account that may not create it: the samples are
    # stored and acknowledged; the state failure is counted and logged, the snapshot lacks the vehicle.
    stores.server.query(f'CREATE DATABASE "{stores.database}"')
    store = stores.open(create_database=False, write_deadline_s=1.0)
    assert store.write_many([(VIN, Batch([1, 2], {SOC: [1.0, 2.0]}))]) == 2
    assert store.query(VIN, 0, END, [SOC], 10).timestamps == [1, 2]
    assert store.stats()["state_errors"] == 1 and store.fleet_snapshot([SOC]) == []
    # Once the policy exists, the next samples bring the vehicle's state back (it was forgotten, so in full).
    stores.server.query(f'CREATE RETENTION POLICY "zhilian_state" ON "{stores.database}" DURATION INF REPLICATION 1')
    store.write_many([(VIN, Batch([3], {SOC: [3.0], CYCLES: [7]}))])
    assert [(e.ts, e.values) for e in store.fleet_snapshot([SOC, CYCLES])] == [(3, {SOC: 3.0, CYCLES: 7})]


def test_a_missing_database_is_not_bad_data(stores: Stores) -> None:
    store = stores.open()
    store.write_many([(VIN, Batch([1], {SOC: [1.0]}))])
    stores.server.query(f'DROP DATABASE "{stores.database}"')
    # Dropped under the store: the 404 makes it create the database again and retry.
    assert store.write_many([(VIN, Batch([2], {SOC: [2.0]}))]) == 1
    assert store.query(VIN, 0, END, [SOC], 10).timestamps == [2]
    # Not allowed to create it: retried until the deadline, then StorageError — and never quarantined.
    stores.server.query(f'DROP DATABASE "{stores.database}"')
    bound = stores.open(create_database=False, write_deadline_s=0.5)
    with pytest.raises(StorageError, match="404"):
        bound.write_many([(VIN, Batch([3], {SOC: [3.0]}))])
    assert bound.stats()["retries"] >= 1 and not stores.quarantine.exists()


def test_large_calls_are_split_and_concurrent_calls_coalesced(stores: Stores) -> None:
    chunked = stores.open(max_lines=7, linger_s=0)
    rows = list(range(100, 150))
    assert chunked.write_many([(VIN, Batch(rows, {SOC: [1.0] * len(rows)}))]) == 50
    # ceil(50 / 7) for the samples, then one for the fleet state
    assert chunked.stats()["requests"] - chunked.stats()["state_requests"] == 8
    assert chunked.stats()["state_requests"] == 1
    assert chunked.query(VIN, 0, END, [SOC], 100).timestamps == rows

    # Four single-row callers and a linger longer than the test: the request leaves when it is full, once.
    coalescing = stores.open(max_lines=4, linger_s=600)
    errors: list[BaseException] = []

    def one(ts: int) -> None:
        try:
            coalescing.write_many([("LZHINFLUXCOAL0001", Batch([ts], {SOC: [float(ts)]}))])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(ts,)) for ts in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert coalescing.stats()["requests"] - coalescing.stats()["state_requests"] == 1
    assert coalescing.query("LZHINFLUXCOAL0001", 0, END, [SOC], 10).timestamps == [0, 1, 2, 3]


def test_writes_ride_out_a_server_restart_or_fail_cleanly(tmp_path: Path) -> None:
    server = own_influxd(tmp_path / "influxd")
    patient = InfluxTimeSeriesStore(InfluxSettings(server.url, write_deadline_s=120), CAT, tmp_path / "q.jsonl")
    hasty = InfluxTimeSeriesStore(InfluxSettings(server.url, write_deadline_s=0.5), CAT, tmp_path / "q.jsonl")
    try:
        patient.write_many([(VIN, Batch([1], {SOC: [1.0]}))])
        server.stop()
        with pytest.raises(StorageError):
            patient.ping()
        with pytest.raises(StorageError):
            hasty.write_many([(VIN, Batch([2], {SOC: [2.0]}))])
        with pytest.raises(StorageError):
            patient.latest(VIN)

        done = threading.Event()
        errors: list[BaseException] = []

        def write() -> None:
            try:
                patient.write_many([(VIN, Batch([3, 4], {SOC: [3.0, 4.0]}))])
            except BaseException as exc:
                errors.append(exc)
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        # Not done while the server is away: it retries (a connection refused is not an answer).
        assert not done.wait(1.0)
        assert patient.stats()["retries"] >= 1
        server.start()
        assert done.wait(60) and not errors
        patient.ping()
        assert patient.query(VIN, 0, END, [SOC], 10).timestamps == [1, 3, 4]
        writer.join()
    finally:
        patient.close()
        hasty.close()
        server.stop()


def test_a_full_backlog_blocks_writers_instead_of_growing(tmp_path: Path) -> None:
    server = own_influxd(tmp_path / "influxd")
    settings = InfluxSettings(server.url, max_pending_lines=8, write_deadline_s=120, linger_s=0)
    store = InfluxTimeSeriesStore(settings, CAT, tmp_path / "q.jsonl")
    errors: list[BaseException] = []

    def write(vin: str) -> None:
        try:
            store.write_many([(vin, Batch(list(range(5)), {SOC: [1.0] * 5}))])
        except BaseException as exc:
            errors.append(exc)

    try:
        server.stop()
        first = threading.Thread(target=write, args=("LZHINFLUXFIRST001",))
        first.start()
        _wait(lambda: store.stats()["pending_lines"] == 5)
        second = threading.Thread(target=write, args=("LZHINFLUXSECOND01",))
        second.start()
        _wait(lambda: store.stats()["blocked_writers"] == 1)
        assert store.stats()["pending_lines"] == 5  # the second call's lines are not held in memory
        server.start()
        first.join(60)
        second.join(60)
        assert not errors
        for vin in ("LZHINFLUXFIRST001", "LZHINFLUXSECOND01"):
            assert len(store.query(vin, 0, END, [SOC], 10)) == 5
        assert store.stats()["pending_lines"] == 0
    finally:
        store.close()
        server.stop()


def test_credentials_from_settings(tmp_path: Path) -> None:
    server = own_influxd(tmp_path / "influxd", auth=("zhilian", "s3cret 'quoted'"))
    ok = InfluxTimeSeriesStore(
        InfluxSettings(server.url, username="zhilian", password="s3cret 'quoted'"), CAT, tmp_path / "q.jsonl"
    )
    wrong = InfluxTimeSeriesStore(
        InfluxSettings(server.url, username="zhilian", password="guess", write_deadline_s=60),
        CAT,
        tmp_path / "q.jsonl",
    )
    try:
        ok.write_many([(VIN, Batch([1], {SOC: [1.0]}))])
        assert ok.latest(VIN) == (1, {SOC: 1.0})
        # Refused credentials are a configuration error: StorageError at once, not retries until the deadline.
        with pytest.raises(StorageError, match="credentials"):
            wrong.write_many([(VIN, Batch([2], {SOC: [2.0]}))])
        assert wrong.stats()["retries"] == 0
        with pytest.raises(StorageError):
            wrong.latest(VIN)
        assert not (tmp_path / "q.jsonl").exists()  # nothing was quarantined: the data was not at fault
    finally:
        ok.close()
        wrong.close()
        server.stop()


def _wait(predicate: Any, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_zhilian_ingest_stores_in_influx_when_given_a_url(influxd: InfluxProcess, tmp_path: Path) -> None:
    port = free_port()
    database = f"cli_{os.getpid()}"
    proc = spawn_zhilian(
        ["ingest", "--data-dir", str(tmp_path / "data"), "--http-port", str(port)],
        tmp_path / "ingest.log",
        # Credentials and the URL come from the environment, as a deployment passes secrets.
        env={"ZHILIAN_INFLUX_URL": influxd.url, "ZHILIAN_INFLUX_DB": database},
    )
    try:
        _wait(lambda: _healthz(port) == 200, timeout=60)
        databases = influxd.query("SHOW DATABASES").json()["results"][0]["series"][0]["values"]
        assert [database] in databases  # the store created its database on start
        assert not (tmp_path / "data" / "telemetry.db").exists()  # and SQLite was not used
    finally:
        assert stop_process(proc) == 0, (tmp_path / "ingest.log").read_text()
        influxd.query(f'DROP DATABASE "{database}"')


def _healthz(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
    except httpx.TransportError:
        return None


@given(
    values=st.lists(
        st.none() | st.floats() | st.integers(-(2**65), 2**65) | st.booleans() | st.text(max_size=5), max_size=8
    ),
    typ=st.sampled_from(list(lp.FORMATTERS)),
)
def test_column_fast_paths_agree_with_the_per_value_formatters(values: list[Any], typ: Any) -> None:
    def slow() -> list[str | None]:
        return [None if v is None else "k=" + lp.FORMATTERS[typ](v) for v in values]

    try:
        expected = slow()
    except lp.LineProtocolError:
        with pytest.raises(lp.LineProtocolError):
            lp.column(typ, "k=", values)
        return
    assert lp.column(typ, "k=", values) == expected
