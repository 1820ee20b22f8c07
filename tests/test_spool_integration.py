"""Store-and-forward against real processes: a `zhilian agent` SIGKILLed over and over, talking to a Mosquitto with
mutual TLS and the per-device ACL (as in production), loses and duplicates nothing it spooled; a broker outage is
bridged by the spool, and the backlog arrives complete, in order, flagged BACKFILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.spool import SPOOL_FILE
from protocol import DeviceKey, Envelope, Flags, decode_batch, load_catalogue, parse_envelope
from simulators.gnss import GnssEmulator
from simulators.route import route_for
from simulators.vehicle import VehicleModel
from tests.conftest import ClientTls, resubscribing, running_stack, wait_until
from zhilian import pki
from zhilian.broker import MosquittoProcess, TlsFiles, free_port

pytestmark = pytest.mark.integration
CAT = load_catalogue()
ROOT = Path(__file__).resolve().parents[1]
KILLS = 20
BATCH_INTERVAL_S = 0.3


@dataclass
class SpooledBatch:
    """One spooled row as the test learned of it: from the agent's 'batch spooled' log or from spool.db."""

    row: int
    samples: int
    first_ms: int
    last_ms: int
    timestamps: set[int] = field(default_factory=set)  # known only when read from the file


def _read_spool(path: Path) -> dict[int, SpooledBatch]:
    """The rows of a spool.db whose agent is dead (a killed agent may not even have created it)."""
    if not path.exists():
        return {}
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT id, n_samples, body FROM spool").fetchall()
    except sqlite3.OperationalError as exc:  # killed before the schema was created
        assert "no such table" in str(exc)
        return {}
    finally:
        db.close()
    out = {}
    for row_id, n, body in rows:
        ts = decode_batch(body, CAT).batch.timestamps
        assert len(ts) == n
        out[row_id] = SpooledBatch(row_id, n, ts[0], ts[-1], set(ts))
    return out


def _logged_batches(log_path: Path) -> dict[int, SpooledBatch]:
    out = {}
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by SIGKILL
        if doc.get("msg") == "batch spooled":
            out[doc["row"]] = SpooledBatch(doc["row"], doc["samples"], doc["first_ms"], doc["last_ms"])
    return out


def _count_lines(log_path: Path, msg: str) -> int:
    if not log_path.exists():
        return 0
    return log_path.read_text(encoding="utf-8", errors="replace").count(f'"msg": "{msg}"')


KILL_VIN = "LZHKILL9000000001"


@dataclass(frozen=True)
class TlsBroker:
    broker: MosquittoProcess
    device: ClientTls  # CN = KILL_VIN: the ACL confines it to ev/KILL_VIN/
    bridge: ClientTls


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TlsBroker]:
    """Mosquitto as deployed (deploy/mosquitto): TLS listener, client certificates required, CN = identity, ACL."""
    ca = pki.make_ca(tmp_path / "pki" / "ca")
    server = pki.issue_server_cert(ca, tmp_path / "pki" / "server", ["127.0.0.1"])
    device = pki.issue_client_cert(ca, tmp_path / "pki" / "clients", KILL_VIN)
    bridge = pki.issue_client_cert(ca, tmp_path / "pki" / "clients", pki.BRIDGE_CN)
    broker = MosquittoProcess(tmp_path / "mosquitto", tls=TlsFiles(ca.cert, server.cert, server.key)).start()
    try:
        yield TlsBroker(
            broker, ClientTls(ca.cert, device.cert, device.key), ClientTls(ca.cert, bridge.cert, bridge.key)
        )
    finally:
        broker.stop()


def test_kill_9_loses_and_duplicates_nothing_that_was_spooled(tmp_path: Path, tls_broker: TlsBroker) -> None:
    asyncio.run(_kill_scenario(tmp_path, tls_broker))


async def _kill_scenario(tmp_path: Path, tls: TlsBroker) -> None:
    broker = tls.broker
    vin = KILL_VIN
    key_file = tmp_path / "device.key"
    key = DeviceKey.generate()
    key.save(key_file)
    state = tmp_path / "agent"
    log_path = tmp_path / "agent.log"
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    emulator = GnssEmulator(VehicleModel(route_for(5), seed=5, start_time=time.time() - 600), rate_hz=5.0)
    await emulator.start()
    cmd = [
        sys.executable, "-m", "zhilian", "agent",
        "--vin", vin, "--key-file", str(key_file), "--state-dir", str(state),
        "--gnss-port", emulator.port, "--batch-interval", str(BATCH_INTERVAL_S), "--log-level", "debug",
        "--tls-ca", str(tls.device.ca), "--tls-cert", str(tls.device.cert), "--tls-key", str(tls.device.key),
    ]  # fmt: skip
    nobody = free_port()  # nothing listens there: lives pointed at it spool and never send

    async def spawn(port: int) -> asyncio.subprocess.Process:
        with log_path.open("ab") as log:
            return await asyncio.create_subprocess_exec(
                *cmd, "--broker-port", str(port), cwd=ROOT, stdout=log, stderr=log
            )

    spooled: dict[int, SpooledBatch] = {}
    proc: asyncio.subprocess.Process | None = None
    try:
        async with running_stack(tmp_path / "ingest", broker, tls=tls.bridge) as stack:
            stack.service.registry.register_device(vin, key.public_raw)
            found_after_kill = 0
            for life in range(KILLS):
                # Publishing takes milliseconds, so a random kill rarely finds a row in the spool. Lives 5..9 cannot
                # reach the broker: they pile rows up that later boots must deliver. The random moment is counted
                # from the GNSS port opening, not from the spawn: interpreter start-up varies with the machine's
                # load, and a kill during imports tests nothing.
                offline = life in range(5, 10)
                opened = _count_lines(log_path, "gnss port open")
                proc = await spawn(nobody if offline else broker.port)
                await wait_until(lambda n=opened: _count_lines(log_path, "gnss port open") > n, timeout=30)
                await asyncio.sleep(rng.uniform(0.6, 1.0) if offline else rng.uniform(0.0, 1.0))
                proc.kill()
                assert await proc.wait() == -signal.SIGKILL, f"agent died on its own; see {log_path}"
                left = _read_spool(state / SPOOL_FILE)
                found_after_kill += len(left)
                spooled.update(left)

            taken_by_killed = len(_logged_batches(log_path)) if log_path.exists() else 0
            # A clean run: it sends what the killed ones left, then, with the receiver silent, empties its spool.
            # Running (its port open) before anything is judged: a loaded machine may take seconds to start it, and
            # the spool the killed ones left may already be empty.
            opened = _count_lines(log_path, "gnss port open")
            proc = await spawn(broker.port)
            await wait_until(lambda: _count_lines(log_path, "gnss port open") > opened, timeout=30)
            await asyncio.sleep(3.0)
            await emulator.stop()

            def spool_empty() -> bool:
                return (state / SPOOL_FILE).exists() and not _read_spool(state / SPOOL_FILE)

            await wait_until(spool_empty, timeout=15, interval=2 * BATCH_INTERVAL_S)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 10) == 0
            assert _read_spool(state / SPOOL_FILE) == {}

            logged = _logged_batches(log_path)
            for row, batch in logged.items():
                spooled.setdefault(row, batch)
            expected = set().union(*(b.timestamps for b in spooled.values()))

            def stored_ts() -> list[int]:
                return stack.service.store.query(vin, 0, 2**62, ["Speed"], limit=100_000).timestamps

            await wait_until(lambda: expected <= set(stored_ts()), timeout=15)
            await asyncio.sleep(0.5)  # anything still arriving would be a duplicate the checks below must see
            stored = stored_ts()
            stats = stack.service.pipeline.stats()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await emulator.stop()

    context = f"seed={seed}, log={log_path}, stats={stats}"
    truth = {t.time_ms for t in emulator.truth}
    store = set(stored)
    print(f"kills={KILLS} taken_by_killed={taken_by_killed} left_in_spool={found_after_kill} {context}")
    # Not vacuous: the killed agents took batches (a kill during start-up takes none), and samples were stored.
    assert taken_by_killed >= KILLS // 4 and len(stored) >= KILLS and found_after_kill >= 1, context
    # Nothing spooled is missing: every batch the agents logged as taken, or left in spool.db, is in the store.
    for b in spooled.values():
        within = [t for t in stored if b.first_ms <= t <= b.last_ms]
        assert len(within) == b.samples, f"row {b.row}: {len(within)} of {b.samples} samples stored; {context}"
        assert b.timestamps <= store, context
    # Nothing twice: every stored message's samples are distinct samples (a re-sealed retry would store its
    # samples again under a new (boot, seq); the store's upsert would hide it, the sample count does not).
    assert stats["samples"] == len(store) == len(stored), context
    assert stats["stored"] >= len(spooled) and stats["rejected"] == {}, context
    assert stats["duplicate"] <= KILLS, context  # at most the row in flight at each kill is sent twice
    assert store <= truth, context  # and they are real GNSS epochs


# -- broker outage ------------------------------------------------------------------------------------------------


@dataclass
class Received:
    envelopes: list[Envelope] = field(default_factory=list)
    subscriptions: int = 0


@contextlib.asynccontextmanager
async def _subscriber(broker: MosquittoProcess, vin: str, key: DeviceKey) -> AsyncIterator[Received]:
    """Collects verified envelopes from ev/+/telemetry, resubscribing whenever the broker comes back."""
    got = Received()

    def subscribed() -> None:
        got.subscriptions += 1

    def received(message: aiomqtt.Message) -> None:
        assert isinstance(message.payload, bytes)
        got.envelopes.append(parse_envelope(message.payload).verify(key.public_raw))

    async with resubscribing(broker, "zl-test-sub", [(f"ev/{vin}/telemetry", 1)], subscribed, received):
        yield got


class _UpperBound(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_broker_outage_is_bridged_by_the_spool_with_backfill(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    asyncio.run(_outage_scenario(tmp_path, mosquitto))


async def _outage_scenario(tmp_path: Path, broker: MosquittoProcess) -> None:
    vin = "LZHOUTAGE00000001"
    key = DeviceKey.generate()
    emulator = GnssEmulator(VehicleModel(route_for(6), seed=6, start_time=time.time() - 600), rate_hz=5.0)
    await emulator.start()
    agent = EdgeAgent(
        AgentConfig(
            vin=vin,
            key_file=tmp_path / "unused.key",
            state_dir=tmp_path / "agent",
            broker_port=broker.port,
            gnss_port=emulator.port,
            batch_interval_s=BATCH_INTERVAL_S,
        ),
        key=key,
    )
    # Reconnect delays are drawn with full jitter; this scenario needs them at their upper bound (0.5, 1, 2 s)
    # so that the restarted broker has our subscriber back before the agent's backlog arrives.
    agent._rng = _UpperBound()
    stop = asyncio.Event()
    restarted = MosquittoProcess(broker.workdir, port=broker.port)  # the same port, as after a broker reboot
    try:
        async with _subscriber(broker, vin, key) as got:
            task = asyncio.create_task(agent.run(stop))
            await wait_until(lambda: len(got.envelopes) >= 3, timeout=10)

            broker.stop()
            errors = agent.stats.publish_errors
            # The publisher backs off 0.5, 1, 2 s between attempts: right after its third failure it sleeps 2 s,
            # so the restarted broker has our subscriber back before the agent's backlog arrives.
            await wait_until(lambda: agent.stats.publish_errors >= errors + 3, timeout=15, interval=0.01)
            backlog = agent.spool.depth
            restarted.start()
            await wait_until(lambda: got.subscriptions == 2, timeout=5, interval=0.01)
            assert agent.stats.connects == 1, "the agent reconnected before the subscriber; the test lost its race"

            await wait_until(lambda: agent.stats.connects == 2 and agent.spool.depth == 0, timeout=15)
            await asyncio.sleep(1.0)  # some live batches after the backlog
            stop.set()
            await asyncio.wait_for(task, 15)
            await wait_until(lambda: len(got.envelopes) >= agent.stats.published, timeout=5)
    finally:
        stop.set()
        await emulator.stop()
        restarted.stop()

    assert backlog >= 3, f"only {backlog} batches waited in the spool"
    assert agent.spool.depth == 0 and agent.stats.published == agent.stats.batches
    # Each message once (a message in flight when the broker died may come twice: QoS 1), in spool order.
    unique: dict[tuple[int, int], Envelope] = {}
    for env in got.envelopes:
        unique.setdefault((env.boot, env.seq), env)
    messages = list(unique.values())
    stamps = [t for env in messages for t in decode_batch(env.body, CAT).batch.timestamps]
    assert len(messages) == agent.stats.batches
    assert len(stamps) == agent.stats.samples
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    truth = sorted(t.time_ms for t in emulator.truth)
    assert [t for t in truth if stamps[0] <= t <= stamps[-1]] == stamps  # no epoch missing in between
    # Live before the outage, then the backlog flagged BACKFILL, then live again.
    pattern = "".join("B" if env.flags & Flags.BACKFILL else "L" for env in messages)
    print(f"backlog={backlog} pattern={pattern}")
    assert re.fullmatch(r"L+B{3,}L+", pattern), pattern
    assert pattern.count("B") >= backlog - 1  # the one sealed before the outage was sent live and keeps its bytes
