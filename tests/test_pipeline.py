"""The ingest pipeline: every rejection reason, dedupe, replay window, validation, storage order.

Runs on SQLite and on PostgreSQL (the `database_url` fixture of tests/relational.py)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud_ingest.db import BootWindow, DeviceState, MessageLedger, create_engine_for, init_db
from cloud_ingest.errors import StorageError
from cloud_ingest.ledger import LedgerView
from cloud_ingest.pipeline import IngestPipeline
from cloud_ingest.registry import Registry
from cloud_ingest.tsstore import SqliteTimeSeriesStore
from protocol import (
    MAX_ENVELOPE_BYTES,
    Batch,
    DeviceKey,
    Envelope,
    Flags,
    Kind,
    encode_batch,
    load_catalogue,
    seal_envelope,
)
from protocol.catalogue import SignalType

CAT = load_catalogue()
VIN = "LZHEB0A12P0000001"
OTHER = "LZHEB0A12P0000002"
LAT = "CurrentLocation.Latitude"
LON = "CurrentLocation.Longitude"
SOC = "Powertrain.TractionBattery.StateOfCharge"
KEY = DeviceKey.from_seed(b"\x01" * 32)
STRANGER = DeviceKey.from_seed(b"\x02" * 32)
RETIRED = DeviceKey.from_seed(b"\x03" * 32)
T0 = 1_700_000_000_000


class Env:
    def __init__(self, tmp: Path, url: str, window: int = 4096) -> None:
        self.url = url
        self.engine = create_engine_for(url)
        init_db(self.engine)
        self.registry = Registry(self.engine)
        self.store = SqliteTimeSeriesStore(tmp / "telemetry.db", CAT)
        self.pipeline = IngestPipeline(self.registry, self.store, CAT, replay_window=window)
        self.registry.register_device(VIN, KEY.public_raw)

    def close(self) -> None:
        self.store.close()
        self.engine.dispose()

    def count(self, model: type) -> int:
        with Session(self.engine) as s:
            return s.scalar(select(func.count()).select_from(model)) or 0

    def state(self, vin: str = VIN) -> DeviceState:
        with Session(self.engine) as s:
            st_ = s.get(DeviceState, vin)
            assert st_ is not None
            return st_

    def metric(self, name: str, **labels: str) -> float:
        return self.pipeline.metrics.get_sample_value(name, labels) or 0.0


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[Env]:
    e = Env(tmp_path, database_url)
    yield e
    e.close()


def message(
    seq: int,
    ts: list[int] | None = None,
    *,
    key: DeviceKey = KEY,
    vin: str = VIN,
    boot: int = 1,
    kind: Kind = Kind.TELEMETRY,
    columns: dict[str, list[object]] | None = None,
    body: bytes | None = None,
) -> bytes:
    ts = ts if ts is not None else [T0 + seq * 1000]
    if body is None:
        cols = columns if columns is not None else {SOC: [50.0 + i for i in range(len(ts))]}
        body = encode_batch(Batch(ts, cols), CAT)  # type: ignore[arg-type]
    return seal_envelope(Envelope(vin, key.key_id, boot, seq, T0, kind, Flags.NONE, body), key)


def tamper_signature(raw: bytes) -> bytes:
    signed, sig = msgpack.unpackb(raw)
    return msgpack.packb([signed, bytes([sig[0] ^ 1]) + sig[1:]], use_bin_type=True)


def with_version(raw: bytes, version: int) -> bytes:
    signed, sig = msgpack.unpackb(raw)
    inner = msgpack.unpackb(signed)
    inner[0] = version
    return msgpack.packb([msgpack.packb(inner, use_bin_type=True), sig], use_bin_type=True)


def test_every_rejection_reason_is_counted_and_never_stored(tmp_path: Path, database_url: str) -> None:
    env = Env(tmp_path, database_url, window=16)
    try:
        env.registry.register_device(OTHER, STRANGER.public_raw)
        env.registry.add_key(VIN, RETIRED.public_raw)
        env.registry.revoke_key(VIN, RETIRED.key_id)
        assert env.pipeline.ingest_one(VIN, message(100, boot=7)).outcome == "stored"
        cases: list[tuple[str | None, str | None, bytes]] = [
            # (expected reason or None for stored, claimed vin, raw)
            (None, VIN, message(1, [T0 + 1])),
            ("oversized", VIN, b"\x00" * (MAX_ENVELOPE_BYTES + 1)),
            ("malformed", VIN, b"\x93garbage"),
            ("unsupported_version", VIN, with_version(message(2, [T0 + 2]), 9)),
            (None, None, message(3, [T0 + 3])),
            ("vin_mismatch", OTHER, message(4, [T0 + 4])),
            ("unknown_device", None, message(5, [T0 + 5], vin="LZHEB0A12P0000099")),
            ("bad_signature", VIN, tamper_signature(message(6, [T0 + 6]))),
            ("unknown_key", VIN, message(7, [T0 + 7], key=STRANGER)),  # OTHER's key, not one of VIN's
            ("revoked_key", VIN, message(11, [T0 + 11], key=RETIRED)),
            ("unsupported_kind", VIN, message(8, [T0 + 8], kind=Kind.STATUS)),
            ("bad_body", VIN, message(9, body=b"\xc1not a batch")),
            ("replay", VIN, message(84, [T0 + 84], boot=7)),  # hwm 100, window 16: 84 is outside
            (None, VIN, message(85, [T0 + 85], boot=7)),  # just inside the window
            ("malformed", VIN, message(2**63, [T0 + 10])),
        ]
        results = env.pipeline.ingest_many([(claimed, raw) for _, claimed, raw in cases])
        for (reason, _, _), result in zip(cases, results, strict=True):
            if reason is None:
                assert (result.outcome, result.reason, result.samples) == ("stored", None, 1)
            else:
                assert (result.outcome, result.reason, result.samples) == ("rejected", reason, 0)
        stored = env.store.query(VIN, 0, 2**62, [SOC], 1000).timestamps
        assert stored == [T0 + 1, T0 + 3, T0 + 85, T0 + 100 * 1000]
        assert env.store.latest("LZHEB0A12P0000099") is None
        stats = env.pipeline.stats()
        assert stats["stored"] == 4 and stats["samples"] == 4 and stats["duplicate"] == 0
        expected_rejections = {r for r, _, _ in cases if r is not None}
        assert set(stats["rejected"]) == expected_rejections
        assert stats["rejected"]["bad_signature"] == 1 and stats["rejected"]["malformed"] == 2
        for reason in expected_rejections:
            got = env.metric("zhilian_ingest_messages_total", outcome="rejected", reason=reason)
            assert got == stats["rejected"][reason]
        assert env.metric("zhilian_ingest_messages_total", outcome="stored", reason="") == 4
        assert env.metric("zhilian_ingest_samples_total") == 4
        assert env.state().messages == 4 and env.state().samples == 4
    finally:
        env.close()


def test_duplicate_is_stored_once(env: Env) -> None:
    raw = message(1, [T0, T0 + 10])
    first = env.pipeline.ingest_many([(VIN, raw), (VIN, raw)])
    assert [r.outcome for r in first] == ["stored", "duplicate"]
    again = env.pipeline.ingest_one(VIN, raw)
    assert (again.outcome, again.reason, again.vin) == ("duplicate", None, VIN)
    assert len(env.store.query(VIN, 0, 2**62, None, 100)) == 2
    assert env.state().messages == 1 and env.state().samples == 2
    assert env.pipeline.stats()["duplicate"] == 2
    assert env.metric("zhilian_ingest_messages_total", outcome="duplicate", reason="") == 2


def test_same_seq_in_another_boot_is_a_new_message(env: Env) -> None:
    results = env.pipeline.ingest_many([(VIN, message(1, boot=1)), (VIN, message(1, [T0 + 5], boot=2))])
    assert [r.outcome for r in results] == ["stored", "stored"]
    assert env.state().last_boot == 2


def test_out_of_range_values_are_dropped_and_the_rest_kept(env: Env) -> None:
    raw = message(1, [T0, T0 + 1], columns={LAT: [31.0, 95.0], LON: [121.0, 121.5], SOC: [101.0, 60.0]})
    result = env.pipeline.ingest_one(VIN, raw)
    assert (result.outcome, result.samples) == ("stored", 2)
    got = env.store.query(VIN, 0, 2**62, [LAT, LON, SOC], 10)
    assert got.columns == {LAT: [31.0, None], LON: [121.0, 121.5], SOC: [None, 60.0]}
    assert env.pipeline.stats()["invalid_values"] == {LAT: 1, SOC: 1}
    assert env.metric("zhilian_ingest_invalid_values_total", signal=LAT) == 1


def test_ledger_is_pruned_below_the_window(tmp_path: Path, database_url: str) -> None:
    env = Env(tmp_path, database_url, window=4)
    try:
        for seq in range(1, 21):
            assert env.pipeline.ingest_one(VIN, message(seq)).outcome == "stored"
        assert env.count(MessageLedger) <= 5
        with Session(env.engine) as s:
            assert s.get(BootWindow, (VIN, 1)).hwm_seq == 20  # type: ignore[union-attr]
        assert env.pipeline.ingest_one(VIN, message(16)).reason == "replay"
        assert env.pipeline.ingest_one(VIN, message(17)).outcome == "duplicate"
        # Out of order but inside the window is fine.
        assert env.pipeline.ingest_one(VIN, message(22)).outcome == "stored"
        assert env.pipeline.ingest_one(VIN, message(21)).outcome == "stored"
    finally:
        env.close()


def test_store_failure_raises_and_records_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_items: object) -> int:
        raise StorageError("disk on fire")

    monkeypatch.setattr(env.store, "write_many", boom)
    with pytest.raises(StorageError):
        env.pipeline.ingest_one(VIN, message(1))
    monkeypatch.undo()
    assert env.count(MessageLedger) == 0
    # The unacknowledged message is redelivered and now stored.
    assert env.pipeline.ingest_one(VIN, message(1)).outcome == "stored"


def test_crash_between_store_and_ledger_stores_once(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*_args: object) -> set[tuple[str, int, int]]:
        raise StorageError("process died")

    monkeypatch.setattr(env.pipeline.ledger, "commit", crash)
    with pytest.raises(StorageError):
        env.pipeline.ingest_one(VIN, message(1, [T0, T0 + 1]))
    monkeypatch.undo()
    assert env.pipeline.ingest_one(VIN, message(1, [T0, T0 + 1])).outcome == "stored"
    assert len(env.store.query(VIN, 0, 2**62, None, 100)) == 2


def test_two_workers_racing_store_once(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Env(tmp_path, database_url)
    b_pipeline = IngestPipeline(Registry(a.engine), a.store, CAT)
    try:
        raw, other = message(1), message(2)
        assert b_pipeline.ingest_one(VIN, raw).outcome == "stored"
        # Worker A looked the ledger up before B committed: only the ledger primary key can tell.
        real_lookup = a.pipeline.ledger.lookup
        calls = iter([LedgerView(hwm={}, seen=set())])
        monkeypatch.setattr(a.pipeline.ledger, "lookup", lambda ids: next(calls, None) or real_lookup(ids))
        results = a.pipeline.ingest_many([(VIN, raw), (VIN, other)])
        assert [r.outcome for r in results] == ["duplicate", "stored"]
        assert a.state().messages == 2
    finally:
        a.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=512), claimed=st.one_of(st.none(), st.just(VIN), st.text(max_size=40)))
def test_arbitrary_bytes_are_only_ever_rejected(env: Env, raw: bytes, claimed: str | None) -> None:
    result = env.pipeline.ingest_one(claimed, raw)
    assert result.outcome == "rejected" and result.reason


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256))
def test_arbitrary_bodies_in_valid_envelopes_are_rejected_or_stored(env: Env, raw: bytes) -> None:
    result = env.pipeline.ingest_one(VIN, message(next(_SEQ), body=raw))
    assert result.outcome in ("rejected", "stored")
    assert result.outcome == "stored" or result.reason == "bad_body"


_SEQ = itertools.count(1)
_VINS = (f"LZHEB0PROP{n:07d}" for n in itertools.count())


def _value_strategy(name: str) -> st.SearchStrategy[object]:
    sig = CAT.by_name(name)
    if sig.type is SignalType.BOOL:
        return st.booleans()
    if sig.type is SignalType.INT:
        return st.integers(int(sig.min or 0), int(sig.max or 0))
    if sig.type is SignalType.STR:
        return st.text(max_size=32)
    assert sig.resolution is not None and sig.min is not None and sig.max is not None
    res, dec = sig.resolution, sig.decimals
    lo, hi = round(sig.min / res), round(sig.max / res)
    return st.integers(lo, hi).map(lambda k: round(k * res, dec)).filter(lambda v: sig.in_range(v))


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    n = draw(st.integers(1, 20))
    deltas = draw(st.lists(st.integers(1, 10_000), min_size=n - 1, max_size=n - 1))
    ts = list(itertools.accumulate(deltas, initial=draw(st.integers(0, 2**41))))
    names = draw(st.lists(st.sampled_from(CAT.names()), min_size=1, max_size=6, unique=True))
    columns = {
        name: draw(st.lists(st.one_of(st.none(), _value_strategy(name)), min_size=n, max_size=n)) for name in names
    }
    return Batch(ts, columns)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=batches())
def test_valid_random_batches_round_trip_into_the_store(env: Env, batch: Batch) -> None:
    vin = next(_VINS)
    key = DeviceKey.generate()
    env.registry.register_device(vin, key.public_raw)
    body = encode_batch(batch, CAT)
    result = env.pipeline.ingest_one(vin, message(1, key=key, vin=vin, body=body))
    assert (result.outcome, result.samples) == ("stored", len(batch))
    got = env.store.query(vin, 0, 2**62, list(batch.columns), 100)
    assert got.timestamps == batch.timestamps
    assert got.columns == batch.columns


def test_concurrent_workers_on_shared_databases_store_each_message_once(env: Env) -> None:
    # Two pipelines (as two bridge workers would have) with their own engines and stores on the same files.
    engine_b = create_engine_for(env.url)
    store_b = SqliteTimeSeriesStore(env.store.path, CAT)
    worker_b = IngestPipeline(Registry(engine_b), store_b, CAT)
    raws = [(VIN, message(seq)) for seq in range(1, 41)]
    outcomes: list[str] = []
    errors: list[BaseException] = []

    def run(pipeline: IngestPipeline) -> None:
        try:
            for i in range(0, len(raws), 5):
                outcomes.extend(r.outcome for r in pipeline.ingest_many(raws[i : i + 5]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in (env.pipeline, worker_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store_b.close()
    engine_b.dispose()
    assert not errors
    assert outcomes.count("stored") == 40 and outcomes.count("duplicate") == 40
    assert env.state().messages == 40 and env.count(MessageLedger) == 40
    assert len(env.store.query(VIN, 0, 2**62, None, 1000)) == 40


class _Recorder:
    """An observer that fails on one vehicle: the others' observations must survive it (and commit)."""

    def __init__(self, bad: str) -> None:
        self.bad = bad
        self.prepared: list[list[str]] = []
        self.discards = 0

    def prepare(self, session: Session, by_vin: dict[str, list[Batch]]) -> None:
        self.prepared.append(list(by_vin))

    def discard(self, session: Session) -> None:
        self.discards += 1

    def observe(self, session: Session, vin: str, batch: Batch) -> None:
        session.add(BootWindow(vin=vin, boot=99, hwm_seq=batch.timestamps[0]))
        session.flush()
        if vin == self.bad:
            raise RuntimeError("observer bug")


def test_a_failing_observer_loses_only_the_vehicle_it_fails_on(env: Env) -> None:
    env.registry.register_device(OTHER, STRANGER.public_raw)
    recorder = _Recorder(bad=OTHER)
    env.pipeline.add_observer(recorder)
    results = env.pipeline.ingest_many([(VIN, message(1)), (OTHER, message(1, key=STRANGER, vin=OTHER))])
    assert [r.outcome for r in results] == ["stored", "stored"]
    # One call for both vehicles first (in VIN order), then vehicle by vehicle after the failure.
    assert recorder.prepared == [[VIN, OTHER], [VIN], [OTHER]]
    assert recorder.discards == 2  # after the whole call's savepoint, and after OTHER's own
    with Session(env.engine) as s:
        kept = s.scalars(select(BootWindow.vin).where(BootWindow.boot == 99)).all()
    assert kept == [VIN]
    assert env.metric("zhilian_ingest_observer_errors_total", observer="_Recorder") == 1
