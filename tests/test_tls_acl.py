"""Mutual TLS and per-device ACLs against a real Mosquitto: the certificate's CN is the MQTT identity, and a device
may only publish under its own ev/{vin}/ (DESIGN.md, Topics)."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from protocol import DeviceKey
from protocol.tls import TlsConfigError, client_context
from simulators.route import route_for
from simulators.vehicle import SyntheticPowertrain, VehicleModel
from tests.conftest import ClientTls, running_stack, wait_until
from zhilian import pki
from zhilian.broker import ACL_RULES, MosquittoProcess, TlsFiles

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
VIN_A = "LZHTLSA0000000001"
VIN_B = "LZHTLSB0000000002"
NOT_AUTHORIZED = 0x87


@dataclass(frozen=True)
class Pki:
    device_a: ClientTls
    bridge: ClientTls
    foreign: ClientTls  # a VIN_A certificate from another CA


@pytest.fixture
def tls_pki(tmp_path: Path) -> Pki:
    ca = pki.make_ca(tmp_path / "ca")
    other = pki.make_ca(tmp_path / "other-ca", common_name="not ours")

    def client(authority: pki.Ca, cn: str, where: str) -> ClientTls:
        files = pki.issue_client_cert(authority, tmp_path / where, cn)
        return ClientTls(ca.cert, files.cert, files.key)  # always verifying the broker against our CA

    return Pki(client(ca, VIN_A, "clients"), client(ca, pki.BRIDGE_CN, "clients"), client(other, VIN_A, "foreign"))


@pytest.fixture
def tls_broker(tmp_path: Path, tls_pki: Pki) -> Iterator[MosquittoProcess]:
    ca = pki.Ca.load(tmp_path / "ca")
    server = pki.issue_server_cert(ca, tmp_path / "server", ["127.0.0.1", "localhost"])
    broker = MosquittoProcess(tmp_path / "mosquitto", tls=TlsFiles(ca.cert, server.cert, server.key)).start()
    try:
        yield broker
    finally:
        broker.stop()


def _ctx(files: ClientTls) -> ssl.SSLContext:
    return client_context(files.ca, files.cert, files.key)


def _paho_publish(broker: MosquittoProcess, files: ClientTls, topic: str, timeout: float = 5.0) -> int:
    """Publish at QoS 1 with paho and return the PUBACK's MQTT 5 reason code (aiomqtt does not expose it)."""
    connected, acked = threading.Event(), threading.Event()
    codes: list[int] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{time.monotonic_ns()}", protocol=mqtt.MQTTv5)
    client.tls_set_context(_ctx(files))
    client.on_connect = lambda c, u, f, rc, p: connected.set()

    def on_publish(c: mqtt.Client, u: object, mid: int, rc: mqtt.ReasonCode, p: object) -> None:
        codes.append(rc.value)
        acked.set()

    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert connected.wait(timeout), "device did not connect"
        client.publish(topic, b"probe", qos=1)
        assert acked.wait(timeout), "no PUBACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


def test_acl_confines_a_device_to_its_own_topics(tls_broker: MosquittoProcess, tls_pki: Pki) -> None:
    async def scenario() -> None:
        async with aiomqtt.Client(
            tls_broker.host, tls_broker.port, identifier="test-bridge", tls_context=_ctx(tls_pki.bridge), timeout=5
        ) as sub:
            await sub.subscribe("ev/+/telemetry", qos=1)
            got: list[str] = []

            async def collect() -> None:
                async for msg in sub.messages:
                    got.append(str(msg.topic))

            reader = asyncio.create_task(collect())
            try:
                # Its own topic: accepted and delivered to the bridge identity.
                assert await asyncio.to_thread(
                    _paho_publish, tls_broker, tls_pki.device_a, f"ev/{VIN_A}/telemetry"
                ) in (0, 16)  # Success, or No matching subscribers should the subscription race
                await wait_until(lambda: got == [f"ev/{VIN_A}/telemetry"], timeout=5, interval=0.02)
                # Another vehicle's topic: refused by the broker and never delivered.
                rc = await asyncio.to_thread(_paho_publish, tls_broker, tls_pki.device_a, f"ev/{VIN_B}/telemetry")
                assert rc == NOT_AUTHORIZED
                await asyncio.sleep(0.5)
                assert got == [f"ev/{VIN_A}/telemetry"]
            finally:
                reader.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_clients_without_a_certificate_of_our_ca_cannot_connect(
    tls_broker: MosquittoProcess, tls_pki: Pki, who: str
) -> None:
    if who == "no certificate":
        ctx = ssl.create_default_context(cafile=str(tls_pki.device_a.ca))
    else:
        ctx = _ctx(tls_pki.foreign)

    async def scenario() -> None:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                tls_broker.host, tls_broker.port, identifier="intruder", tls_context=ctx, timeout=2
            ):
                pass

    asyncio.run(scenario())


def test_a_key_file_readable_by_others_is_refused(tls_pki: Pki) -> None:
    tls_pki.device_a.key.chmod(0o640)
    with pytest.raises(TlsConfigError, match="group/others"):
        _ctx(tls_pki.device_a)


def test_client_identities_are_vins_or_service_names(tmp_path: Path) -> None:
    ca = pki.make_ca(tmp_path)
    for bad in ("+", "#", "ev/x", "Zhilian Bridge", ""):
        with pytest.raises(pki.PkiError):
            pki.issue_client_cert(ca, tmp_path, bad)
    assert not (tmp_path / "ca.key").stat().st_mode & 0o077
    with pytest.raises(pki.PkiError, match="refusing"):
        pki.make_ca(tmp_path)


def test_the_shipped_broker_acl_is_the_tested_one() -> None:
    def rules(text: str) -> list[str]:
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    assert rules((ROOT / "deploy/mosquitto/acl").read_text(encoding="utf-8")) == rules(ACL_RULES)
    conf = (ROOT / "deploy/mosquitto/zhilian.conf").read_text(encoding="utf-8")
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false"):
        assert line in conf


def test_an_agent_over_mutual_tls_delivers_into_the_store(
    tmp_path: Path, tls_broker: MosquittoProcess, tls_pki: Pki
) -> None:
    asyncio.run(_e2e(tmp_path, tls_broker, tls_pki))


async def _e2e(tmp_path: Path, broker: MosquittoProcess, certs: Pki) -> None:
    key_file = tmp_path / "device.key"
    DeviceKey.generate().save(key_file)
    model = VehicleModel(route_for(2), seed=2, start_time=time.time() - 300)
    agent = EdgeAgent(
        AgentConfig(
            vin=VIN_A,
            key_file=key_file,
            state_dir=tmp_path / "agent",
            broker_host=broker.host,
            broker_port=broker.port,
            batch_interval_s=0.3,
            sample_interval_s=0.1,
            tls_ca=certs.device_a.ca,
            tls_cert=certs.device_a.cert,
            tls_key=certs.device_a.key,
        ),
        sources=[SyntheticPowertrain(model)],
    )
    stop_agent = asyncio.Event()
    async with running_stack(tmp_path / "ingest", broker, tls=certs.bridge) as stack:
        admin = {"Authorization": f"Bearer {stack.admin_key}"}
        viewer = {"Authorization": f"Bearer {stack.viewer_key}"}
        async with httpx.AsyncClient(base_url=stack.api, timeout=10) as http:
            r = await http.post(
                "/v1/devices",
                headers=admin,
                json={"vin": VIN_A, "public_key": base64.b64encode(agent.key.public_raw).decode()},
            )
            assert r.status_code == 201, r.text
            agent_task = asyncio.create_task(agent.run(stop_agent))
            try:

                async def enough() -> bool:
                    vs = (await http.get("/v1/vehicles", headers=viewer)).json()
                    return any(v["vin"] == VIN_A and v["samples"] >= 5 for v in vs)

                await wait_until(enough, timeout=10)
            finally:
                stop_agent.set()
                await asyncio.wait_for(agent_task, 15)
            await wait_until(lambda: stack.service.pipeline.stats()["stored"] == agent.stats.published, 10)
    assert agent.stats.connects >= 1 and agent.stats.published >= 1 and agent.spool.depth == 0
