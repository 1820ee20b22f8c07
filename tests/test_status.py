"""The status side of the control plane: shared subscriptions under the broker ACL (the bridge's scale-out path),
self-metrics and the reconnect backoff."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_bridge.bridge import MqttBridge
from cloud_ingest.service import IngestService
from edge_agent.agent import full_jitter_backoff
from edge_agent.selfmetrics import ProcessMeter, rss_bytes
from protocol import DeviceKey, Envelope, Flags, Kind, seal_envelope
from protocol.commands import AckStatus, CommandAck, StatusReport, encode_ack, encode_status
from protocol.tls import client_context
from tests.conftest import ClientTls, wait_until
from tests.test_tls_acl import NOT_AUTHORIZED, VIN_A, VIN_B, Pki, _paho_publish, tls_broker, tls_pki  # noqa: F401
from zhilian import pki
from zhilian.broker import MosquittoProcess


def _ctx(files: ClientTls) -> ssl.SSLContext:
    return client_context(files.ca, files.cert, files.key)


def _device_b(tmp_path: Path) -> ClientTls:
    ca = pki.Ca.load(tmp_path / "ca")
    files = pki.issue_client_cert(ca, tmp_path / "clients-b", VIN_B)
    return ClientTls(ca.cert, files.cert, files.key)


async def _collect(client: aiomqtt.Client, into: list[str]) -> None:
    async for message in client.messages:
        into.append(str(message.topic))


@pytest.mark.integration
def test_shared_subscriptions_pass_the_acl_for_the_bridge_and_widen_nothing_for_a_device(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811  (fixture imported from test_tls_acl)
    tls_pki: Pki,  # noqa: F811
) -> None:
    device_b = _device_b(tmp_path)

    async def scenario() -> None:
        broker = tls_broker
        own = [f"ev/{VIN_A}/{c}" for c in ("telemetry", "alert", "status", "cmd/ack")]
        async with (
            aiomqtt.Client(broker.host, broker.port, identifier="w1", tls_context=_ctx(tls_pki.bridge)) as bridge,
            aiomqtt.Client(broker.host, broker.port, identifier="snoop", tls_context=_ctx(device_b)) as snoop,
        ):
            for channel in ("telemetry", "alert", "status", "cmd/ack"):
                await bridge.subscribe(f"$share/workers/ev/+/{channel}", qos=1)
            # Another vehicle tries every way to read VIN_A's traffic, shared subscriptions included.
            for flt in ("$share/x/ev/+/telemetry", "$share/x/ev/+/status", "ev/+/telemetry", "#", f"ev/{VIN_A}/#"):
                await snoop.subscribe(flt, qos=1)
            seen_by_bridge: list[str] = []
            seen_by_snoop: list[str] = []
            tasks = [
                asyncio.create_task(_collect(bridge, seen_by_bridge)),
                asyncio.create_task(_collect(snoop, seen_by_snoop)),
            ]
            try:
                for name in own:
                    assert await asyncio.to_thread(_paho_publish, broker, tls_pki.device_a, name) == 0
                await wait_until(lambda: sorted(seen_by_bridge) == sorted(own), timeout=10, interval=0.05)
                # VIN_B may not command VIN_A, nor speak for it.
                for name in (f"ev/{VIN_A}/cmd", f"ev/{VIN_A}/status"):
                    assert await asyncio.to_thread(_paho_publish, broker, device_b, name) == NOT_AUTHORIZED
                await asyncio.sleep(0.5)
                assert seen_by_snoop == []
                assert sorted(seen_by_bridge) == sorted(own)
            finally:
                for t in tasks:
                    t.cancel()

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_bridge_worker_on_a_shared_subscription_records_status_and_acks(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811  (fixture imported from test_tls_acl)
    tls_pki: Pki,  # noqa: F811
) -> None:
    async def scenario() -> None:
        service = IngestService.open(tmp_path / "ingest")
        key = DeviceKey.generate()
        service.registry.register_device(VIN_A, key.public_raw)
        command = service.commands.issue(VIN_A, "lock", {})
        files = tls_pki.bridge
        stop = asyncio.Event()
        bridge = MqttBridge(
            service.pipeline.ingest_many,
            host=tls_broker.host,
            port=tls_broker.port,
            client_id="zhilian-bridge-1",
            share_group="workers",
            control=service.commands,
            tls_ca=files.ca,
            tls_cert=files.cert,
            tls_key=files.key,
        )
        task = asyncio.create_task(bridge.run(stop))
        try:
            await bridge.wait_subscribed(10)
            status = encode_status(StatusReport(True, 1, "test", {"rss_kb": 1234}))
            ack = encode_ack(CommandAck(bytes.fromhex(command.command_id), AckStatus.DONE, "locked", 1))
            async with aiomqtt.Client(
                tls_broker.host, tls_broker.port, identifier="vehicle", tls_context=_ctx(tls_pki.device_a)
            ) as vehicle:
                for seq, (channel, kind, body) in enumerate(
                    [("status", Kind.STATUS, status), ("cmd/ack", Kind.COMMAND_ACK, ack)]
                ):
                    env = Envelope(VIN_A, key.key_id, 1, seq, int(time.time() * 1000), kind, Flags.NONE, body)
                    await vehicle.publish(f"ev/{VIN_A}/{channel}", seal_envelope(env, key), qos=1, retain=seq == 0)

            def recorded() -> bool:
                latest = service.commands.latest_status(VIN_A)
                got = service.commands.get(command.command_id)
                return latest is not None and got is not None and got.state == "acked"

            await wait_until(recorded, timeout=10)
            latest = service.commands.latest_status(VIN_A)
            assert latest is not None and latest.online and latest.metrics == {"rss_kb": 1234}
            assert bridge.stats.outcomes == {"stored": 2}
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
            service.close()

    asyncio.run(scenario())


@given(st.integers(0, 200), st.floats(0.01, 5), st.floats(0.1, 120), st.integers(0, 2**32))
def test_full_jitter_backoff_stays_within_its_envelope(attempt: int, initial: float, cap: float, seed: int) -> None:
    import random

    delay = full_jitter_backoff(attempt, initial, cap, random.Random(seed))
    assert 0.0 <= delay <= min(cap, initial * 2 ** min(attempt, 32))


def test_full_jitter_spreads_a_fleet_out() -> None:
    import random

    rng = random.Random(4)
    delays = [full_jitter_backoff(6, 0.5, 30.0, rng) for _ in range(1000)]
    # Uniform over [0, 30]: a fleet reconnecting together is spread over the whole window, not bunched.
    assert min(delays) < 3 and max(delays) > 27
    assert 12 < sum(delays) / len(delays) < 18


def test_process_meter_reads_rss_and_cpu() -> None:
    meter = ProcessMeter()
    assert rss_bytes() > 5 * 1024 * 1024
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn a little CPU so the reading has something to show
        os.urandom(64)
    fp = meter.read()
    assert fp.rss_kb > 5 * 1024 and fp.cpu_s > 0 and fp.cpu_pct > 0 and fp.uptime_s >= 0


@pytest.mark.parametrize(
    "bad",
    [
        {"status_interval_s": 0.0},
        {"reconnect_initial_s": 0.0},
        {"reconnect_initial_s": 5.0, "reconnect_max_s": 1.0},
        {"command_max_horizon_s": 0.0},
        {"command_clock_skew_s": -1.0},
    ],
)
def test_control_plane_settings_that_cannot_work_fail_the_start(tmp_path: Path, bad: dict[str, float]) -> None:
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig, ConfigError

    config = AgentConfig(vin=VIN_A, key_file=tmp_path / "unused", state_dir=tmp_path / "state", **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        EdgeAgent(config, key=DeviceKey.generate())
