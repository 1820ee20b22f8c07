"""A broker outage many times longer than the agent's spool can hold (issue 4: "spool full → eviction exactly per
the policy, with the counts reported"), against a real Mosquitto stopped and restarted on the same port, a real
agent reading a GNSS emulator on a pty, and a tiny spool bound.

The oracle is the spool's own pure policy (`plan_eviction`), not a second copy of it: every call the agent makes on
its spool is recorded (in the spool thread's order, with its result), and replaying those calls through
`plan_eviction` says which batches the policy evicted. Whatever was not evicted must arrive, in spool order, the
backlog flagged BACKFILL; the retained status reports the eviction counts.

The broker keeps sessions across its restart (persistence on, the test subscriber on a persistent session), so
the subscriber misses nothing the restarted broker accepts whichever of it and the agent reconnects first.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.spool import RowInfo, Spool, plan_eviction, priority_of
from protocol import DeviceKey, Envelope, Flags, Kind, decode_batch, load_catalogue, parse_envelope
from protocol.commands import StatusReport, decode_status
from simulators.gnss import GnssEmulator
from simulators.route import route_for
from simulators.vehicle import VehicleModel
from tests.conftest import resubscribing, wait_until
from zhilian.broker import MosquittoProcess

pytestmark = pytest.mark.integration
CAT = load_catalogue()
VIN = "LZHOVERFLOW000001"
BATCH_INTERVAL_S = 0.1  # with 10 Hz GNSS: about one sample, and one spool row, every 0.1 s
MAX_ROWS = 12  # binds first: a one-sample batch is about 90 bytes, a sealed one about twice that
MAX_BYTES = 4096  # the smallest byte bound the spool accepts
OUTAGE_ROWS = 5 * MAX_ROWS  # the outage lasts until this many rows were spooled offline: five spools' worth


class PersistentMosquitto(MosquittoProcess):
    """The project's test broker with persistence on: sessions and their queued messages survive a restart."""

    def config_text(self) -> str:
        text = super().config_text()
        assert "persistence false\n" in text
        return text.replace("persistence false\n", f"persistence true\npersistence_location {self.workdir}/\n")


# -- recording the agent's spool calls ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One completed spool call: put (row = the new id), seal or ack, with its result and the bytes it added."""

    name: str
    row: int
    ok: bool
    size: int = 0
    kind: Kind = Kind.TELEMETRY
    offline: bool = False
    body: bytes = b""


Log = list[Op | str]  # ops in the spool thread's order, and the test's markers ("stop", "restart") between them


def record(spool: Spool, log: Log) -> None:
    """Record every put/seal/ack the agent's SpoolWorker makes (it looks them up on the spool at each call).

    The real methods run unchanged; all calls run on the worker's one thread, so `log` is in execution order."""
    put, seal, ack = spool.put, spool.seal, spool.ack

    def recording_put(kind: Kind, created_ms: int, n_samples: int, body: bytes, offline: bool = False) -> int:
        row = put(kind, created_ms, n_samples, body, offline)
        log.append(Op("put", row, True, len(body), kind, offline, body))
        return row

    def recording_seal(row_id: int, sealed: bytes, boot: int, seq: int) -> bool:
        ok = seal(row_id, sealed, boot, seq)
        log.append(Op("seal", row_id, ok, len(sealed)))
        return ok

    def recording_ack(row_id: int) -> bool:
        ok = ack(row_id)
        log.append(Op("ack", row_id, ok))
        return ok

    spool.put = recording_put  # type: ignore[method-assign]
    spool.seal = recording_seal  # type: ignore[method-assign]
    spool.ack = recording_ack  # type: ignore[method-assign]


@dataclass
class Replay:
    victims: dict[int, RowInfo] = field(default_factory=dict)  # evicted rows as they were when evicted
    remaining: dict[int, RowInfo] = field(default_factory=dict)
    victims_at: dict[str, int] = field(default_factory=dict)  # how many were evicted when the test set a marker
    passes: int = 0  # evictions that evicted something


def replay(log: Log, max_rows: int, max_bytes: int) -> Replay:
    """Which rows `plan_eviction` evicts over the recorded calls. Bookkeeping only: the policy is the spool's.

    Every recorded result is checked against the replayed state, so a spool that evicted other rows than its
    policy says (or counted them wrongly) makes an ack or seal disagree here."""
    out = Replay()
    rows = out.remaining

    def enforce(protect: int | None) -> None:
        victims = plan_eviction([rows[i] for i in sorted(rows)], max_rows, max_bytes, protect)
        out.passes += bool(victims)
        for v in victims:
            out.victims[v] = rows.pop(v)

    last_id = 0
    for op in log:
        if isinstance(op, str):
            out.victims_at[op] = len(out.victims)
        elif op.name == "put":
            assert op.row > last_id, "spool ids must only increase"
            last_id = op.row
            rows[op.row] = RowInfo(op.row, priority_of(op.kind), False, op.size)
            enforce(None)
        elif op.name == "seal":
            # A seal succeeds exactly when the row is there and unsealed (the publisher seals each row once).
            assert op.ok == (op.row in rows and not rows[op.row].sealed), op
            if op.ok:
                r = rows[op.row]
                rows[op.row] = RowInfo(r.id, r.prio, True, r.size + op.size)
                enforce(op.row)
        else:
            assert op.ok == (op.row in rows), op  # acked rows are deleted; an evicted one is no longer there
            rows.pop(op.row, None)
    return out


# -- the subscriber -----------------------------------------------------------------------------------------------


@dataclass
class Arrival:
    env: Envelope
    epoch: int  # the subscriber's connection it came on: 1 before the broker restart, 2 after


@dataclass
class Received:
    telemetry: list[Arrival] = field(default_factory=list)
    statuses: list[tuple[Envelope, StatusReport]] = field(default_factory=list)
    connections: int = 0


@contextlib.asynccontextmanager
async def subscriber(broker: MosquittoProcess, key: DeviceKey) -> AsyncIterator[Received]:
    """Every envelope on ev/{VIN}/telemetry and every live status, on a persistent session (QoS 1)."""
    got = Received()

    def connected() -> None:
        got.connections += 1

    def received(message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        env = parse_envelope(message.payload).verify(key.public_raw)
        if env.kind is Kind.STATUS:
            if not message.retain:  # a retained copy replayed by a (re)subscribe is not news
                got.statuses.append((env, decode_status(env.body)))
        else:
            assert env.kind is Kind.TELEMETRY, env.kind
            got.telemetry.append(Arrival(env, got.connections))

    topics = [(f"ev/{VIN}/telemetry", 1), (f"ev/{VIN}/status", 1)]
    async with resubscribing(broker, "zl-test-overflow", topics, connected, received, clean_session=False):
        yield got


# -- the scenario -------------------------------------------------------------------------------------------------


def test_long_outage_overflows_the_spool_evicting_per_policy_and_reporting_it(tmp_path: Path) -> None:
    asyncio.run(_overflow_scenario(tmp_path))


def _puts(log: Log, pred: Callable[[Op], bool] = lambda op: True) -> list[Op]:
    return [op for op in list(log) if isinstance(op, Op) and op.name == "put" and pred(op)]


async def _overflow_scenario(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    broker = PersistentMosquitto(tmp_path / "mosquitto")
    restarted = PersistentMosquitto(broker.workdir, port=broker.port)  # same port, same persistence file
    await asyncio.to_thread(broker.start)
    try:
        await _with_broker(tmp_path, key, broker, restarted)
    finally:
        await asyncio.to_thread(restarted.stop)
        await asyncio.to_thread(broker.stop)


async def _with_broker(tmp_path: Path, key: DeviceKey, broker: MosquittoProcess, restarted: MosquittoProcess) -> None:
    emulator = GnssEmulator(VehicleModel(route_for(7), seed=7, start_time=time.time() - 600), rate_hz=10.0)
    await emulator.start()
    stop = asyncio.Event()
    try:
        agent = EdgeAgent(
            AgentConfig(
                vin=VIN,
                key_file=tmp_path / "unused.key",
                state_dir=tmp_path / "agent",
                broker_port=broker.port,
                gnss_port=emulator.port,
                batch_interval_s=BATCH_INTERVAL_S,
                spool_max_rows=MAX_ROWS,
                spool_max_bytes=MAX_BYTES,
                status_interval_s=0.5,
                reconnect_initial_s=0.2,
                reconnect_max_s=1.0,
            ),
            key=key,
        )
        spool = agent.spool.spool
        log: Log = []
        record(spool, log)
        async with subscriber(broker, key) as got:
            task = asyncio.create_task(agent.run(stop))
            await wait_until(lambda: len(got.telemetry) >= 3 and got.statuses, timeout=15)

            errors = agent.stats.publish_errors
            log.append("stop")
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: agent.stats.publish_errors > errors, timeout=10)
            # Long relative to the spool: it fills five times over while the broker is away.
            await wait_until(lambda: len(_puts(log, lambda op: op.offline)) >= OUTAGE_ROWS, timeout=20)
            log.append("restart")
            await asyncio.to_thread(restarted.start)

            await wait_until(lambda: agent.stats.connects == 2 and agent.spool.depth == 0, timeout=15)
            drained = len(got.telemetry)
            await wait_until(lambda: len(got.telemetry) >= drained + 3, timeout=10)  # live batches after it
            stop.set()
            await asyncio.wait_for(task, 15)
            # Sent before the agent stopped: its goodbye (an offline status of the new connection) arrives last.
            await wait_until(lambda: any(not s.online and s.conn > 1 for _, s in got.statuses), timeout=10)
            plan = replay(log, MAX_ROWS, MAX_BYTES)
            expected = {op.row for op in _puts(log)} - set(plan.victims)
            body_row = {op.body: op.row for op in _puts(log)}

            def arrived_rows() -> set[int]:
                return {body_row[a.env.body] for a in got.telemetry}

            await wait_until(lambda: expected <= arrived_rows(), timeout=10)
    finally:
        stop.set()
        await emulator.stop()

    puts = _puts(log)
    offline = {op.row for op in puts if op.offline}
    body_of = {op.row: op.body for op in puts}
    context = (
        f"rows={len(puts)} offline={len(offline)} evicted={sorted(plan.victims)} passes={plan.passes} "
        f"arrivals={len(got.telemetry)} body_bytes={min(map(len, body_of.values()))}..{max(map(len, body_of.values()))}"
    )
    print(context)

    # The scenario did what it claims: only telemetry, a spool overflowed many times, several eviction passes.
    assert len(body_of) == len(puts) and all(op.kind is Kind.TELEMETRY for op in puts), context
    assert len(offline) >= OUTAGE_ROWS and len(plan.victims) >= len(offline) - MAX_ROWS, context
    assert plan.passes >= 3, context
    # Thinned, not cut off: older rows of the backlog survive between the evicted ones.
    kept_old = [r for r in offline if r < max(plan.victims) and r not in plan.victims]
    assert len(kept_old) >= 2, context

    # The spool's own state and counters agree with the policy replayed over its calls.
    assert agent.spool.depth == 0 and plan.remaining == {}, context
    assert spool.evicted == len(plan.victims) > 0, context
    assert spool.evicted_alerts == sum(v.prio == priority_of(Kind.ALERT) for v in plan.victims.values()) == 0

    # Each message once, except what was in flight when the broker died (QoS 1): the agent's unacknowledged
    # publish, which it sends again, and the broker's unacknowledged delivery to us, which it redelivers after its
    # restart — so at most two extra copies, of messages sealed (first sent) before the broker stopped.
    unique: dict[tuple[int, int], Arrival] = {}
    for a in got.telemetry:
        first = unique.setdefault((a.env.boot, a.env.seq), a)
        assert first.env.body == a.env.body, "one (boot, seq), two different messages"
    duplicates = [body_row[a.env.body] for a in got.telemetry if unique[(a.env.boot, a.env.seq)] is not a]
    sealed_first = {op.row for op in log[: log.index("restart")] if isinstance(op, Op) and op.name == "seal" and op.ok}
    assert len(duplicates) <= 2 and set(duplicates) <= sealed_first, (duplicates, context)
    messages = list(unique.values())

    # Exactly the batches the policy kept arrived. A victim already sealed was in flight when it was evicted and
    # may have arrived as well; the policy evicts unsent rows first, so that is at most a rare one.
    rows = [body_row[a.env.body] for a in messages]
    sealed_victims = {r for r, info in plan.victims.items() if info.sealed}
    assert len(rows) == len(set(rows)), "one batch sealed twice"
    assert expected <= set(rows) <= expected | sealed_victims, context
    # In spool order (one priority: telemetry), and no sample missing outside the evicted batches.
    assert rows == sorted(rows), context
    stamps = [t for a in messages for t in decode_batch(a.env.body, CAT).batch.timestamps]
    evicted_stamps = {t for r in set(plan.victims) - set(rows) for t in decode_batch(body_of[r], CAT).batch.timestamps}
    all_stamps = {t for op in puts for t in decode_batch(op.body, CAT).batch.timestamps}
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), context
    assert set(stamps) | evicted_stamps == all_stamps and not set(stamps) & evicted_stamps, context
    truth = {f.time_ms for f in emulator.truth}
    assert {t for t in truth if min(all_stamps) <= t <= max(all_stamps)} == all_stamps  # the agent took every epoch

    # Live before the outage, the backlog flagged BACKFILL, live again after it. Every batch spooled during the
    # outage is in the backlog: spooled while the agent knew the broker gone, or, in the instant before it noticed,
    # held back for seconds — far longer than the two batch intervals a live batch may wait.
    pattern = "".join("B" if a.env.flags & Flags.BACKFILL else "L" for a in messages)
    assert re.fullmatch(r"L+B+L+", pattern), pattern
    flagged = {r for r, a in zip(rows, messages, strict=True) if a.env.flags & Flags.BACKFILL}
    during = {op.row for op in _puts(log[log.index("stop") : log.index("restart")])}
    resealed = {op.row for op in log[log.index("restart") :] if isinstance(op, Op) and op.name == "seal" and op.ok}
    assert (offline | during) & resealed & set(rows) <= flagged, pattern

    # The status reports the evictions: already at the reconnect (everything the outage evicted), exactly at the
    # end, never decreasing in between.
    reports = [s for _, s in sorted(got.statuses, key=lambda es: es[0].seq) if s.conn > 1]
    assert reports and reports[0].online and not reports[-1].online, reports
    counts = [c for s in reports if isinstance(c := s.metrics["evicted"], int)]
    assert len(counts) == len(reports), reports
    assert plan.victims_at["restart"] > 0 and counts[0] >= plan.victims_at["restart"], (counts, plan.victims_at)
    assert counts == sorted(counts), counts
    assert counts[-1] == spool.evicted == len(plan.victims), counts
    assert all(s.metrics["evicted_alerts"] == spool.evicted_alerts for s in reports), reports
