"""The durable spool: send order, persistence, sealing once, the eviction policy, bounds (property-based), and the
agent's publisher reusing sealed bytes across a restart."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.spool import (
    PRIO_ALERT,
    PRIO_TELEMETRY,
    RowInfo,
    Spool,
    SpoolRow,
    SpoolRowTooLarge,
    backfill_flags,
    plan_eviction,
)
from protocol import DeviceKey, Flags, Kind, parse_envelope

KEY = DeviceKey.from_seed(b"\x02" * 32)
VIN = "LZHSPOOL000000001"
T, A = Kind.TELEMETRY, Kind.ALERT


def _ids(spool: Spool) -> list[int]:
    return [r.id for r in spool.rows()]


def test_send_order_is_alerts_then_telemetry_each_in_id_order(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db")
    t1 = s.put(T, 1, 1, b"t1")
    a1 = s.put(A, 2, 1, b"a1")
    t2 = s.put(T, 3, 1, b"t2")
    a2 = s.put(A, 4, 1, b"a2")
    taken = []
    while (row := s.next()) is not None:
        taken.append(row.id)
        assert s.ack(row.id)
    assert taken == [a1, a2, t1, t2]
    assert s.depth == 0 and s.bytes == 0
    assert not s.ack(t1)  # acking twice is harmless


def test_rows_counters_and_seals_survive_reopen(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db")
    first = s.put(T, 1000, 3, b"body-1", offline=True)
    s.put(T, 2000, 2, b"body-2")
    assert s.seal(first, b"sealed-1", boot=7, seq=0)
    before = s.rows()
    s.close()
    s = Spool(tmp_path / "spool.db")
    assert s.rows() == before
    assert before[0] == SpoolRow(first, T, 1000, 3, True, b"body-1", b"sealed-1", 7, 0)
    assert (s.depth, s.bytes) == (2, len(b"body-1sealed-1body-2"))
    third = s.put(T, 3000, 1, b"body-3")
    assert third > max(r.id for r in before)  # ids keep increasing: order holds across restarts


def test_a_sealed_row_keeps_its_bytes(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db")
    rid = s.put(T, 1, 1, b"body")
    assert s.seal(rid, b"first", 1, 0)
    assert not s.seal(rid, b"second", 2, 0)
    row = s.next()
    assert row is not None and (row.sealed, row.boot, row.seq) == (b"first", 1, 0)
    assert not s.seal(999, b"x", 1, 1)  # gone or never there


def test_backfill_rule() -> None:
    row = SpoolRow(1, T, created_ms=10_000, n_samples=1, offline=False, body=b"", sealed=None, boot=None, seq=None)
    assert backfill_flags(row, now_ms=10_000 + 600, max_live_wait_ms=600) is Flags.NONE
    assert backfill_flags(row, now_ms=10_000 + 601, max_live_wait_ms=600) is Flags.BACKFILL
    offline = SpoolRow(1, T, 10_000, 1, True, b"", None, None, None)
    assert backfill_flags(offline, now_ms=10_000, max_live_wait_ms=600) is Flags.BACKFILL


# -- eviction ---------------------------------------------------------------------------------------------------


def test_thinning_evicts_every_other_unsent_row_of_the_oldest_half(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_rows=10)
    alert = s.put(A, 0, 1, b"a")
    tel = [s.put(T, i, 1, b"t") for i in range(9)]
    assert s.evicted == 0
    tel.append(s.put(T, 9, 1, b"t"))  # 11 rows > 10: one thinning pass over 10 unsent telemetry rows
    # oldest half = tel[0:5]; every other one of it = tel[1], tel[3]
    assert _ids(s) == [alert, *(t for t in tel if t not in (tel[1], tel[3]))]
    assert (s.evicted, s.evicted_alerts, s.depth) == (2, 0, 9)
    s.close()
    s = Spool(tmp_path / "spool.db", max_rows=10)
    assert (s.evicted, s.evicted_alerts) == (2, 0)  # counted persistently


def test_sealed_rows_are_not_thinned(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_rows=4)
    ids = [s.put(T, i, 1, b"t") for i in range(4)]
    assert s.seal(ids[0], b"s", 1, 0)
    ids.append(s.put(T, 4, 1, b"t"))
    # unsent = ids[1:5], oldest half = ids[1:3], every other = ids[2]
    assert _ids(s) == [ids[0], ids[1], ids[3], ids[4]]


def test_without_thinning_candidates_oldest_telemetry_goes_then_alerts(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_rows=3)
    a1, a2 = s.put(A, 0, 1, b"a"), s.put(A, 1, 1, b"a")
    t1 = s.put(T, 2, 1, b"t")
    t2 = s.put(T, 3, 1, b"t")  # 4 > 3; the oldest half of [t1, t2] is [t1]: no second row to thin -> oldest t1
    assert _ids(s) == [a1, a2, t2] and t1 < t2 and s.evicted == 1
    a3 = s.put(A, 4, 1, b"a")  # telemetry still goes first, even though it is newer than every alert
    assert _ids(s) == [a1, a2, a3] and (s.evicted, s.evicted_alerts) == (2, 0)
    a4 = s.put(A, 5, 1, b"a")  # only alerts left: the oldest alert goes
    assert _ids(s) == [a2, a3, a4] and (s.evicted, s.evicted_alerts) == (3, 1)
    s.put(T, 6, 1, b"t")  # a new telemetry row in a spool full of alerts is itself the one evicted
    assert _ids(s) == [a2, a3, a4] and (s.evicted, s.evicted_alerts) == (4, 1)


def test_byte_bound_and_oversized_rows(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_bytes=4096)
    ids = [s.put(T, i, 1, bytes(1000)) for i in range(4)]
    ids.append(s.put(T, 4, 1, bytes(1000)))  # 5000 > 4096: thinning of [0, 1] evicts ids[1]
    assert _ids(s) == [ids[0], *ids[2:]] and s.bytes == 4000
    with pytest.raises(SpoolRowTooLarge):
        s.put(T, 5, 1, bytes(1025))
    # a seal adds the envelope's bytes and may evict others, never the row being sealed
    assert s.seal(ids[4], bytes(1000), 1, 0)
    assert ids[4] in _ids(s) and s.bytes <= 4096


def test_plan_eviction_is_a_pure_policy() -> None:
    rows = [RowInfo(i, PRIO_TELEMETRY, False, 1) for i in range(1, 9)] + [RowInfo(9, PRIO_ALERT, False, 1)]
    assert plan_eviction(rows, max_rows=9, max_bytes=100) == []
    assert plan_eviction(rows, max_rows=8, max_bytes=100) == [2, 4]  # the whole pass over the oldest half 1..4
    assert plan_eviction(rows, max_rows=6, max_bytes=100) == [2, 4, 1]
    assert plan_eviction(rows, max_rows=1, max_bytes=100) == [2, 4, 1, 3, 5, 6, 7, 8]
    # the protected row is not a thinning candidate either: the pass is over 1..7, whose oldest half is 1..3
    assert plan_eviction(rows, max_rows=1, max_bytes=100, protect=8) == [2, 1, 3, 4, 5, 6, 7, 9]


# (operation, a, b): put (alert if a == 0, body of b bytes) | take (seal it if a, sealed of b bytes) | ack (the
# a-th row in id order) | reopen
_op = st.tuples(st.sampled_from(["put", "put", "take", "ack", "reopen"]), st.integers(0, 3), st.integers(1, 1024))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_op, max_size=50), st.integers(1, 8), st.integers(4096, 8192))
def test_random_operations_keep_the_invariants(ops: list[tuple[str, int, int]], max_rows: int, max_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spool.db"
        s = Spool(path, max_rows=max_rows, max_bytes=max_bytes)
        kinds: dict[int, Kind] = {}
        seals: dict[int, bytes] = {}
        acked: set[int] = set()
        evicted: set[int] = set()
        for name, a, b in ops:
            protected = None
            if name == "put":
                kind = A if a == 0 else T
                kinds[s.put(kind, 0, 1, bytes(b))] = kind
            elif name == "take":
                row = s.next()
                if row is not None and a:
                    sealed = seals.get(row.id, bytes(b))
                    assert s.seal(row.id, sealed, 1, row.id) is (row.id not in seals)
                    seals[row.id] = sealed
                    protected = row.id
            elif name == "ack":
                present = sorted(r.id for r in s.rows())
                if present:
                    assert s.ack(present[a % len(present)])
                    acked.add(present[a % len(present)])
            else:
                s.close()
                s = Spool(path, max_rows=max_rows, max_bytes=max_bytes)
            rows = s.rows()
            now = {r.id for r in rows}
            # bounded, and the counters match the file
            with sqlite3.connect(path) as db:
                depth, size = db.execute(
                    "SELECT count(*), coalesce(sum(length(body) + coalesce(length(sealed), 0)), 0) FROM spool"
                ).fetchone()
            db.close()
            assert (s.depth, s.bytes) == (depth, size) and depth == len(rows)
            assert s.depth <= max_rows and s.bytes <= max_bytes
            # nothing vanishes unaccounted: every row ever put is spooled, acked, or counted as evicted
            newly = set(kinds) - now - acked - evicted
            evicted |= newly
            assert s.evicted == len(evicted)
            assert s.evicted_alerts == sum(1 for i in evicted if kinds[i] is A)
            # an alert is evicted only when no telemetry row (but the one being sealed) is left
            if any(kinds[i] is A for i in newly):
                assert all(r.kind is A or r.id == protected for r in rows)
            # send order: alerts, then telemetry, each in id order
            assert [r.id for r in rows] == sorted(now, key=lambda i: (kinds[i] is not A, i))
            # a sealed row keeps its bytes
            assert all(r.sealed == seals[r.id] for r in rows if r.sealed is not None)
        s.close()


# -- the agent's publisher ----------------------------------------------------------------------------------------


class _Broker:
    """Stands in for an aiomqtt client: records publishes, or fails them like a lost connection."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes, qos: int, timeout: float) -> None:
        if self.fail:
            raise aiomqtt.MqttError("connection lost")
        self.sent.append((topic, payload))


def _agent(state: Path) -> EdgeAgent:
    return EdgeAgent(AgentConfig(vin=VIN, key_file=state / "unused.key", state_dir=state), key=KEY)


def test_publisher_seals_once_and_a_later_boot_resends_the_same_bytes(tmp_path: Path) -> None:
    async def go() -> None:
        first = _agent(tmp_path)
        first.batcher.add(1_000, {"Speed": 12.5})
        await first.flush()
        with pytest.raises(aiomqtt.MqttError):
            await first._publish_next(_Broker(fail=True))  # type: ignore[arg-type]
        (row,) = first.spool.spool.rows()
        assert row.sealed is not None and (row.boot, row.seq) == (first.boot, 0)
        await first.spool.close()  # as if killed: the row stays, sealed

        second = _agent(tmp_path)
        assert second.boot == first.boot + 1
        broker = _Broker(fail=False)
        await second._publish_next(broker)  # type: ignore[arg-type]
        assert broker.sent == [(f"ev/{VIN}/telemetry", row.sealed)]
        env = parse_envelope(row.sealed).verify(KEY.public_raw)
        assert (env.boot, env.seq, env.flags) == (first.boot, 0, Flags.NONE)
        assert second.spool.depth == 0 and second.stats.published == 1

        second._broker_down = True  # spooled while the broker is known to be unreachable -> backfill
        second.batcher.add(2_000, {"Speed": 13.0})
        await second.flush()
        await second._publish_next(broker)  # type: ignore[arg-type]
        env = parse_envelope(broker.sent[-1][1]).verify(KEY.public_raw)
        assert (env.boot, env.seq, env.flags) == (second.boot, 0, Flags.BACKFILL)
        await second.spool.close()

    asyncio.run(go())
