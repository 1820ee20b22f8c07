"""Alarm notifications on the MQTT northbound topic (cloud_ingest/north_mqtt.py), against a real Mosquitto: the
publisher's PUBACK-confirmed QoS 1 delivery, its failures (broker down, a refusing ACL) and reconnects through the
durable outbox, the project's ACL over mutual TLS (only the cloud writes north/#, consumers read it, devices
neither), the MQTT 3.1.1 fallback, and `zhilian serve --north-mqtt` as deployed."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cloud_ingest.north_mqtt import NorthMqttConfig, NorthPublisher, parse_broker_address
from cloud_ingest.notify import DeliveryError, MqttSink, NotifyConfig, NotifyConfigError, OutboxRow, WebhookConfig
from cloud_ingest.service import IngestService
from protocol.tls import TlsConfigError, client_context
from protocol.topics import Channel, topic
from tests.conftest import ClientTls
from tests.test_alarms_support import KEY, RULE, Clock, Vehicle, vin_of
from tests.test_alarms_support import ingest as ingest_raw
from tests.test_notify import SECRET, Receiver
from tests.test_rules_pipeline_kill import Serve
from tests.test_tls_acl import VIN_A, Pki, _paho_publish, tls_broker, tls_pki  # noqa: F401  (fixtures)
from zhilian import pki
from zhilian.broker import MosquittoProcess, free_port
from zhilian.cli import ServiceOptions, app

pytestmark = pytest.mark.integration
VIN = vin_of(3)
OPERATOR_CN = "zhilian-operator"
NOT_AUTHORIZED = 0x87
FAST = NotifyConfig(backoff_base_s=0.05, backoff_max_s=0.2, poll_interval_s=0.05, max_attempts=50)


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


class Subscriber:
    """A northbound consumer: a real paho connection that records every message with its QoS."""

    def __init__(self, broker: MosquittoProcess, filters: list[str], tls: ClientTls | None = None) -> None:
        self.got: list[tuple[str, bytes, int]] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"north-consumer-{time.monotonic_ns()}", protocol=mqtt.MQTTv5
        )
        if tls is not None:
            self.client.tls_set_context(client_context(tls.ca, tls.cert, tls.key))
        self.client.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload), m.qos))
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        assert self._subscribed.wait(10), "no SUBACK"

    def bodies(self) -> list[bytes]:
        return [payload for _t, payload, _q in self.got]

    def wait_for_body(self, body: bytes, timeout: float = 30.0) -> None:
        wait_for(lambda: body in self.bodies(), timeout, f"{body!r} received")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def outbox(svc: IngestService) -> list[OutboxRow]:
    with Session(svc.engine) as s:
        return list(s.scalars(select(OutboxRow).order_by(OutboxRow.id)))


def operator_certs(tmp_path: Path) -> ClientTls:
    """A northbound consumer's identity, issued by the tls_broker fixture's CA (tmp_path/ca)."""
    ca = pki.Ca.load(tmp_path / "ca")
    files = pki.issue_client_cert(ca, tmp_path / "clients", OPERATOR_CN)
    return ClientTls(ca.cert, files.cert, files.key)


def north_config(broker: MosquittoProcess, tls: ClientTls | None = None, port: int | None = None) -> NorthMqttConfig:
    return NorthMqttConfig(
        broker.host,
        port or broker.port,
        tls_ca=tls.ca if tls else None,
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
        reconnect_min_s=1,
        reconnect_max_s=1,
    )


# -- (a) the publisher -------------------------------------------------------------------------------------------------


def test_the_publisher_delivers_the_exact_bytes_at_qos_1(mosquitto: MosquittoProcess) -> None:
    sub = Subscriber(mosquitto, ["north/alarms/+"])
    publisher = NorthPublisher(north_config(mosquitto)).start()
    sink = MqttSink(publisher.publish, timeout_s=10)
    try:
        wait_for(lambda: publisher.connected, what="publisher connected")
        assert publisher.protocol == MQTTProtocolVersion.MQTTv5
        assert publisher.client_id.startswith("zhilian-north-")

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(vin=st.from_regex(r"[A-HJ-NPR-Z0-9]{17}", fullmatch=True), body=st.binary(max_size=64 * 1024))
        def round_trip(vin: str, body: bytes) -> None:
            before = len(sub.got)
            sink.deliver(1, vin, "raised", body)  # returns once the broker has it (PUBACK)
            wait_for(lambda: len(sub.got) > before, 10, "subscriber received")
            assert sub.got[before:] == [(f"north/alarms/{vin}", body, 1)]

        round_trip()
    finally:
        publisher.close()
        sub.close()
    assert not publisher.connected


# -- (b) broker down: DeliveryError, then the outbox delivers once it is back ------------------------------------------


def test_a_broker_outage_is_retried_from_the_outbox_until_delivered(tmp_path: Path) -> None:
    port = free_port()
    brokers = [MosquittoProcess(tmp_path / f"broker-{i}", port=port) for i in (1, 2)]  # one port, two lives
    svc = IngestService.open(
        tmp_path / "svc", clock=Clock(), notify_config=FAST, north_mqtt=north_config(brokers[0], port=port)
    )
    with contextlib.ExitStack() as cleanup:
        for broker in brokers:
            cleanup.callback(broker.stop)
        cleanup.callback(svc.close)
        north, notifier = svc.north, svc.notifier
        assert north is not None and notifier is not None
        svc.registry.register_device(VIN, KEY.public_raw)
        v = Vehicle(VIN)
        # No broker at all yet: the publisher keeps trying in its thread, a publish fails within its timeout.
        with pytest.raises(DeliveryError, match="not connected"):
            north.publish(f"north/alarms/{VIN}", b"{}", 0.5)
        ingest_raw(svc, v.batch(0, [56.0] * 12))  # raised, queued while there is no broker
        assert [(r.channel, r.state) for r in outbox(svc)] == [("mqtt", "pending")]

        brokers[0].start()
        first = Subscriber(brokers[0], ["north/alarms/+"])
        cleanup.callback(first.close)
        svc.start_background()
        first.wait_for_body(outbox(svc)[0].body.encode())
        wait_for(lambda: outbox(svc)[0].state == "delivered", what="row settled")
        assert len(first.got) == 1
        first.close()

        # The broker goes away under a connected publisher, and comes back on the same port.
        brokers[0].stop()
        wait_for(lambda: not north.connected, what="publisher noticed the outage")
        ingest_raw(svc, v.batch(12, [61.0] * 6))  # escalated while the broker is down
        # The attempt waits for a connection up to the sink's timeout (10 s), then fails and is retried.
        wait_for(lambda: outbox(svc)[1].last_error is not None, what="a failed attempt")
        assert outbox(svc)[1].state == "pending" and "not connected" in (outbox(svc)[1].last_error or "")
        brokers[1].start()
        second = Subscriber(brokers[1], ["north/alarms/+"])
        cleanup.callback(second.close)
        second.wait_for_body(outbox(svc)[1].body.encode())
        wait_for(lambda: outbox(svc)[1].state == "delivered", what="row settled")
        escalated = outbox(svc)[1]
        assert len(second.got) == 1 and json.loads(escalated.body)["event"] == "escalated"
        assert escalated.attempts >= 2
        wait_for(lambda: notifier.counts["mqtt"]["delivered"] == 2, what="counted")
        assert notifier.counts["mqtt"]["retried"] == escalated.attempts - 1


# -- (c) end to end over mutual TLS and the project ACL ----------------------------------------------------------------


def test_an_alarm_reaches_a_northbound_consumer_over_tls(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811  (fixture imported from test_tls_acl)
    tls_pki: Pki,  # noqa: F811
) -> None:
    operator = Subscriber(tls_broker, ["north/alarms/+"], tls=operator_certs(tmp_path))
    receiver = Receiver()  # the webhook copy: the same bytes, HMAC-signed
    svc = IngestService.open(
        tmp_path / "svc",
        clock=Clock(),
        notify_config=FAST,
        webhook=WebhookConfig(receiver.url, SECRET),
        north_mqtt=north_config(tls_broker, tls_pki.bridge),  # the bridge's own identity, as `--north-mqtt bridge`
    )
    try:
        svc.registry.register_device(VIN, KEY.public_raw)
        svc.start_background()
        v = Vehicle(VIN)
        ingest_raw(svc, v.batch(0, [56.0] * 12))
        wait_for(lambda: len(operator.got) == 1 and len(receiver.ok()) == 1, what="both channels delivered")
        ((topic_, payload, qos),) = operator.got
        body = json.loads(payload)
        assert (topic_, qos, body["event"], body["vin"]) == (f"north/alarms/{VIN}", 1, "raised", VIN)
        assert (body["alarm"]["vin"], body["alarm"]["rule"], body["alarm"]["level"]) == (VIN, RULE, 2)
        # The MQTT body carries no signature of its own (the broker's TLS + ACL vouch for the sender); it is
        # byte for byte the body whose HMAC the webhook receiver verified.
        (hook,) = receiver.ok()
        assert hook["valid"] and hook["raw"] == payload
    finally:
        svc.close()
        operator.close()
        receiver.close()


# -- (d) the ACL: devices get nothing under north/ ---------------------------------------------------------------------


def test_devices_can_neither_publish_nor_read_north(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811
    tls_pki: Pki,  # noqa: F811
) -> None:
    operator_files = operator_certs(tmp_path)
    north = f"north/alarms/{VIN_A}"
    # Publishing: refused (MQTT 5 PUBACK 0x87) for a device, even on its own VIN's topic, and for a consumer.
    assert _paho_publish(tls_broker, tls_pki.device_a, north) == NOT_AUTHORIZED
    assert _paho_publish(tls_broker, operator_files, north) == NOT_AUTHORIZED
    device_publisher = NorthPublisher(north_config(tls_broker, tls_pki.device_a)).start()
    try:
        wait_for(lambda: device_publisher.connected, what="device connected")
        with pytest.raises(DeliveryError, match="Not authorized"):
            device_publisher.publish(north, b"forged alarm", 10)
    finally:
        device_publisher.close()

    # Reading: Mosquitto grants a device's subscription to north/# or # (it checks read access on each message it
    # would deliver), but hands it nothing under north/, while a consumer gets the bridge's notification. The
    # device's own command topic is the sentinel: same publisher, QoS 1, so it arrives after the north message would.
    device_north = Subscriber(tls_broker, ["north/#", f"ev/{VIN_A}/cmd"], tls=tls_pki.device_a)
    device_all = Subscriber(tls_broker, ["#"], tls=tls_pki.device_a)
    operator = Subscriber(tls_broker, ["north/#"], tls=operator_files)
    bridge = NorthPublisher(north_config(tls_broker, tls_pki.bridge)).start()
    try:
        wait_for(lambda: bridge.connected, what="bridge identity connected")
        bridge.publish(north, b"real alarm", 10)
        bridge.publish(topic(VIN_A, Channel.CMD), b"sentinel", 10)
        for device in (device_north, device_all):
            device.wait_for_body(b"sentinel")
            assert device.bodies() == [b"sentinel"]
        wait_for(lambda: operator.bodies() == [b"real alarm"], what="consumer got the notification")
    finally:
        bridge.close()
        for s in (device_north, device_all, operator):
            s.close()


# -- MQTT 3.1.1 fallback -----------------------------------------------------------------------------------------------


class _V311Front(socketserver.ThreadingTCPServer):
    """A 3.1.1-only front to the real Mosquitto: a CONNECT of protocol level 5 gets the refusal a 3.1.1 broker sends
    (CONNACK return code 1, unacceptable protocol version); any other connection is relayed to Mosquitto as is."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.refused = 0
        super().__init__(("127.0.0.1", 0), _Relay)


class _Relay(socketserver.BaseRequestHandler):
    server: _V311Front

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        head = conn.recv(2)
        # CONNECT: 0x10, remaining length (one byte for ours), then "\x00\x04MQTT" and the protocol level.
        rest = b""
        while len(rest) < head[1]:
            chunk = conn.recv(head[1] - len(rest))
            if not chunk:
                return
            rest += chunk
        if rest[6] == 5:
            self.server.refused += 1
            conn.sendall(b"\x20\x02\x00\x01")
            return
        with socket.create_connection(self.server.upstream, timeout=10) as up:
            up.sendall(head + rest)
            pump = threading.Thread(target=_pump, args=(up, conn), daemon=True)
            pump.start()
            _pump(conn, up)
            pump.join(10)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    src.settimeout(None)
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def test_a_broker_that_refuses_mqtt_5_gets_3_1_1(mosquitto: MosquittoProcess) -> None:
    front = _V311Front((mosquitto.host, mosquitto.port))
    serving = threading.Thread(target=front.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    sub = Subscriber(mosquitto, ["north/alarms/+"])
    publisher = NorthPublisher(north_config(mosquitto, port=front.server_address[1])).start()
    try:
        wait_for(lambda: publisher.connected, what="connected after the fallback")
        assert publisher.protocol == MQTTProtocolVersion.MQTTv311 and front.refused == 1
        publisher.publish(f"north/alarms/{VIN}", b"over 3.1.1", 10)
        wait_for(lambda: sub.got == [(f"north/alarms/{VIN}", b"over 3.1.1", 1)], what="delivered")
    finally:
        publisher.close()
        sub.close()
        front.shutdown()
        front.server_close()


# -- `zhilian serve --north-mqtt bridge`, deployed shape ---------------------------------------------------------------


def test_serve_publishes_alarms_northbound_with_the_bridge_identity(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811
    tls_pki: Pki,  # noqa: F811
) -> None:
    data = tmp_path / "data"
    svc = IngestService.open(data)
    svc.registry.register_device(VIN_A, KEY.public_raw)
    svc.close()
    operator = Subscriber(tls_broker, ["north/alarms/+"], tls=operator_certs(tmp_path))
    serve = Serve(data, tls_broker, free_port(), tmp_path / "serve.log")
    b = tls_pki.bridge
    serve.args += ["--tls-ca", str(b.ca), "--tls-cert", str(b.cert), "--tls-key", str(b.key), "--north-mqtt", "bridge"]
    device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="north-test-vehicle", protocol=mqtt.MQTTv5)
    device.tls_set_context(client_context(tls_pki.device_a.ca, tls_pki.device_a.cert, tls_pki.device_a.key))
    try:
        serve.start()
        device.connect(tls_broker.host, tls_broker.port)
        device.loop_start()
        # Hot for 12 s, timestamped a minute ago: battery_over_temperature L2 (55 °C held 10 s).
        raw = Vehicle(VIN_A, t0=int(time.time() * 1000) - 60_000).batch(0, [56.0] * 12)
        info = device.publish(topic(VIN_A, Channel.TELEMETRY), raw, qos=1)
        info.wait_for_publish(10)
        assert info.is_published()
        wait_for(lambda: len(operator.got) == 1, 60, "notification from `zhilian serve`")
        ((topic_, payload, qos),) = operator.got
        body = json.loads(payload)
        assert (topic_, qos, body["event"]) == (f"north/alarms/{VIN_A}", 1, "raised")
        assert (body["alarm"]["vin"], body["alarm"]["rule"], body["alarm"]["level"]) == (VIN_A, RULE, 2)
    finally:
        device.disconnect()
        device.loop_stop()
        serve.stop()
        operator.close()


# -- the CLI's shared options and the address parser -------------------------------------------------------------------


def test_service_options_turn_into_open_arguments(tmp_path: Path) -> None:
    tls = (tmp_path / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key")
    opts = ServiceOptions(north_mqtt="bridge", north_topic="fleet/{vin}/alarms", influx_url="http://127.0.0.1:1")
    kwargs = opts.open_kwargs(("mqtt.example", 8883), tls)
    assert kwargs["north_mqtt"] == NorthMqttConfig("mqtt.example", 8883, *tls)
    assert kwargs["north_topic"] == "fleet/{vin}/alarms"
    assert (kwargs["influx_url"], kwargs["influx_db"]) == ("http://127.0.0.1:1", "zhilian")
    other = ServiceOptions(north_mqtt="[::1]:1884").open_kwargs(None, (None, None, None))
    assert other["north_mqtt"] == NorthMqttConfig("::1", 1884) and "north_topic" not in other
    assert "north_mqtt" not in ServiceOptions().open_kwargs(("h", 1), tls)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ingest", "--north-mqtt", "bridge"], "runs no bridge"),
        (["ingest", "--north-mqtt", "mqtt.example"], "HOST:PORT"),
        (["bridge", "--north-mqtt", "h:99999"], "1..65535"),
        (["serve", "--north-mqtt", "bridge", "--north-topic", "north/+/{vin}"], "wildcards"),
        (["serve", "--north-mqtt", "bridge", "--north-topic", "north/alarms"], "{vin}"),
        (["serve", "--north-topic", "north/{vin}"], "needs --north-mqtt"),
    ],
)
def test_bad_north_options_are_refused_before_anything_starts(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()).replace("│", "").replace("  ", " ")
    assert not (tmp_path / "d").exists()


_HOSTS = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,40}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
)


@given(host=_HOSTS, port=st.integers(1, 65535))
def test_broker_addresses_round_trip(host: str, port: int) -> None:
    assert parse_broker_address(f"{host}:{port}") == (host, port)


@given(address=st.ip_addresses(v=6), port=st.integers(1, 65535))
def test_ipv6_broker_addresses_need_brackets(address: object, port: int) -> None:
    assert parse_broker_address(f"[{address}]:{port}") == (str(address), port)


@given(text=st.text(max_size=60))
def test_any_address_text_parses_or_says_why(text: str) -> None:
    try:
        host, port = parse_broker_address(text)
    except NotifyConfigError as exc:
        assert str(exc)
    else:
        assert host and 0 < port < 65536 and f"{port}" in text


@pytest.mark.parametrize(
    "template", ["north/alarms", "north/{vin}/{rule}", "north/#/{vin}", "/north/{vin}", "$SYS/{vin}"]
)
def test_bad_topic_templates_are_refused(template: str) -> None:
    with pytest.raises(NotifyConfigError):
        MqttSink(lambda *_: None, template)


def test_a_missing_tls_key_fails_at_open(tmp_path: Path) -> None:
    certs = ClientTls(tmp_path / "ca.crt", tmp_path / "c.crt", tmp_path / "missing.key")
    with pytest.raises(TlsConfigError, match=r"missing\.key"):
        IngestService.open(tmp_path / "svc", north_mqtt=NorthMqttConfig("127.0.0.1", 8883, *vars_of(certs)))
    assert not (tmp_path / "svc").exists()  # refused before anything was opened


def vars_of(files: ClientTls) -> tuple[Path, Path, Path]:
    return files.ca, files.cert, files.key
