"""Alarm notifications to a webhook: HMAC-signed bodies, retries with backoff, a durable and bounded outbox.

The receiver is a real HTTP server (http.server in a thread) on a free loopback port; it verifies every signature
with the shared secret, as a customer's endpoint would.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud_ingest.alarms import AlarmState
from cloud_ingest.notify import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    NotifyConfig,
    NotifyConfigError,
    OutboxRow,
    WebhookConfig,
    signature,
)
from cloud_ingest.service import IngestService
from tests.test_alarms_support import KEY, RULE, T0, Clock, Vehicle, alarms_of, open_service, vin_of
from tests.test_alarms_support import ingest as ingest_raw
from zhilian.broker import MosquittoProcess, free_port

SECRET = b"s3cret-shared-with-the-receiver"
VIN = vin_of(1)
FAST = NotifyConfig(backoff_base_s=0.05, backoff_max_s=0.2, poll_interval_s=0.05, max_attempts=5)


class Receiver:
    """A webhook endpoint: verifies the signature, records what it got, answers 500 to the first `fail` posts."""

    def __init__(self, port: int = 0, fail: int = 0) -> None:
        self.received: list[dict[str, Any]] = []
        self.fail = fail
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                expected = hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                valid = hmac.compare_digest(expected, self.headers.get(SIGNATURE_HEADER, ""))
                with receiver.lock:
                    status = 401 if not valid else 500 if receiver.fail > 0 else 200
                    if valid and receiver.fail > 0:
                        receiver.fail -= 1
                    receiver.received.append(
                        {
                            "status": status,
                            "valid": valid,
                            "delivery": self.headers.get(DELIVERY_HEADER),
                            "event": self.headers.get("X-Zhilian-Event"),
                            "body": json.loads(body),
                            "raw": body,
                        }
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the test asserts on `received`; stderr noise helps nobody

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def ok(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.received if r["status"] == 200]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail=1)
    yield r
    r.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def outbox(svc: IngestService) -> list[OutboxRow]:
    with Session(svc.engine) as s:
        return list(s.scalars(select(OutboxRow).order_by(OutboxRow.id)))


def service(tmp: Path, url: str, database_url: str | None = None, config: NotifyConfig = FAST) -> IngestService:
    svc = open_service(
        tmp, database_url, Clock(), webhook=WebhookConfig(url, SECRET, timeout_s=5), notify_config=config
    )
    if svc.registry.get_device(VIN) is None:
        svc.registry.register_device(VIN, KEY.public_raw)
    return svc


def test_raised_escalated_cleared_and_transitioned_are_delivered_signed_after_a_500(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    svc = service(tmp_path, receiver.url, database_url)
    try:
        svc.start_background()
        v = Vehicle(VIN)
        ingest_raw(svc, v.batch(0, [56.0] * 12))  # raised (the receiver fails the first post)
        ingest_raw(svc, v.batch(12, [61.0] * 6))  # escalated
        ingest_raw(svc, v.batch(18, [40.0] * 121))  # cleared
        (alarm,) = alarms_of(svc, VIN)
        assert svc.alarms is not None
        svc.alarms.transition(alarm.id, AlarmState.ACKNOWLEDGED, "operator:test", note="on it")
        wait_for(lambda: len(receiver.ok()) == 4)
        assert all(r["valid"] for r in receiver.received)
        first, retried = receiver.received[0], next(r for r in receiver.received[1:] if r["delivery"] == "1")
        # The retry is the very same notification: same delivery id, same bytes, same signature.
        assert (first["status"], retried["status"], first["raw"]) == (500, 200, retried["raw"])
        by_event = {r["event"]: r["body"] for r in receiver.ok()}
        assert set(by_event) == {"raised", "escalated", "cleared", "transitioned"}
        assert by_event["raised"]["alarm"]["level"] == 2 and by_event["raised"]["vin"] == VIN
        assert by_event["escalated"]["alarm"]["level"] == 3
        assert by_event["cleared"]["alarm"]["cleared_ms"] == v.ts(138)
        assert by_event["transitioned"]["transition"] == {
            "at_ms": T0,  # the workflow's clock (injected); "at_ms" of the envelope is the enqueue time
            "actor": "operator:test",
            "from": "DETECTED",
            "to": "ACKNOWLEDGED",
            "note": "on it",
        }
        versions = [by_event[e]["alarm"]["version"] for e in ("raised", "escalated", "cleared", "transitioned")]
        assert versions == sorted(versions)  # receivers order one alarm's notifications by it
        # The receiver answers before the dispatcher records the outcome.
        wait_for(lambda: all(r.state == "delivered" for r in outbox(svc)))
        rows = outbox(svc)
        assert [(r.state, r.attempts) for r in rows] == [("delivered", 2)] + [("delivered", 1)] * 3
        assert svc.notifier is not None
        notifier = svc.notifier
        wait_for(lambda: notifier.counts["webhook"]["delivered"] == 4)  # counted once recorded
        assert notifier.counts["webhook"] == {
            "enqueued": 4,
            "delivered": 4,
            "retried": 1,
            "failed": 0,
            "dropped": 0,
        }
    finally:
        svc.close()


def test_a_restart_loses_no_notification(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    svc = service(tmp_path, url)
    try:
        ingest_raw(svc, Vehicle(VIN).batch(0, [56.0] * 12))
        assert svc.notifier is not None
        svc.notifier.dispatch_once("webhook")  # nobody listening: connection refused, retried later
        (row,) = outbox(svc)
        assert (row.state, row.attempts, row.last_error is not None) == ("pending", 1, True)
    finally:
        svc.close()  # the service goes down with the notification undelivered
    receiver = Receiver(port)
    svc = service(tmp_path, url)
    try:
        svc.start_background()
        wait_for(lambda: len(receiver.ok()) == 1)
        assert receiver.ok()[0]["body"]["event"] == "raised"
        wait_for(lambda: outbox(svc)[0].state == "delivered")
        assert outbox(svc)[0].attempts == 2
    finally:
        svc.close()
        receiver.close()


def test_the_outbox_is_bounded_and_its_drops_counted(tmp_path: Path, receiver: Receiver) -> None:
    receiver.fail = 0
    svc = service(tmp_path, receiver.url, config=NotifyConfig(max_pending=3, poll_interval_s=0.05))
    try:
        v = Vehicle(VIN)
        ingest_raw(svc, v.batch(0, [56.0] * 12), v.batch(12, [61.0] * 6), v.batch(18, [40.0] * 121))
        (alarm,) = alarms_of(svc, VIN)
        assert svc.alarms is not None and svc.notifier is not None
        svc.alarms.transition(alarm.id, AlarmState.ACKNOWLEDGED, "operator:test")
        svc.alarms.transition(alarm.id, AlarmState.RECTIFYING, "operator:test")
        assert svc.notifier.pending("webhook") == 5
        assert svc.notifier.dispatch_once("webhook") == 3
        assert [r.state for r in outbox(svc)] == ["dropped"] * 2 + ["delivered"] * 3
        assert [r["event"] for r in receiver.ok()] == ["cleared", "transitioned", "transitioned"]
        assert svc.notifier.counts["webhook"]["dropped"] == 2
        assert svc.notifier.pending("webhook") == 0
    finally:
        svc.close()


def test_a_receiver_that_keeps_failing_gets_max_attempts_then_failed(tmp_path: Path) -> None:
    always = Receiver(fail=10**6)
    config = NotifyConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, poll_interval_s=0.05)
    svc = service(tmp_path, always.url, config=config)
    try:
        ingest_raw(svc, Vehicle(VIN).batch(0, [56.0] * 12))
        assert svc.notifier is not None
        svc.start_background()
        notifier = svc.notifier
        wait_for(lambda: notifier.counts["webhook"]["failed"] == 1)
        (row,) = outbox(svc)
        assert (row.attempts, row.last_error) == (3, "HTTP 500")
        assert len(always.received) == 3
        assert notifier.counts["webhook"]["retried"] == 2
    finally:
        svc.close()
        always.close()


class NorthClient:
    """A real MQTT connection: `publish` is the blocking, PUBACK-confirmed function the service is given, and it
    subscribes to north/alarms/# like a northbound consumer would."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="north-consumer")
        self.client.on_message = lambda _c, _u, msg: self.got.append((msg.topic, bytes(msg.payload)))
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe("north/alarms/#", qos=1)
        assert self.subscribed.wait(10)

    def publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=timeout_s)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK within {timeout_s} s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_alarms_reach_the_mqtt_northbound_topic_alongside_the_webhook(
    tmp_path: Path, mosquitto: MosquittoProcess, receiver: Receiver
) -> None:
    receiver.fail = 0
    north = NorthClient(mosquitto)
    svc = IngestService.open(
        tmp_path, clock=Clock(), webhook=WebhookConfig(receiver.url, SECRET), mqtt_publish=north.publish
    )
    try:
        svc.registry.register_device(VIN, KEY.public_raw)
        ingest_raw(svc, Vehicle(VIN).batch(0, [56.0] * 12))
        assert svc.notifier is not None
        assert sorted(svc.notifier.channels) == ["mqtt", "webhook"]
        assert svc.notifier.dispatch_once("mqtt") == 1
        wait_for(lambda: len(north.got) == 1)
        (topic_, payload) = north.got[0]
        body = json.loads(payload)
        assert (topic_, body["event"], body["alarm"]["rule"]) == (f"north/alarms/{VIN}", "raised", RULE)
        assert svc.notifier.dispatch_once("webhook") == 1
        assert receiver.ok()[0]["raw"] == payload  # one notification, the same bytes on both channels
        assert [r.state for r in outbox(svc)] == ["delivered", "delivered"]
    finally:
        svc.close()
        north.close()


def test_a_service_without_a_webhook_queues_nothing(tmp_path: Path) -> None:
    svc = open_service(tmp_path, None, Clock())
    try:
        svc.registry.register_device(VIN, KEY.public_raw)
        ingest_raw(svc, Vehicle(VIN).batch(0, [56.0] * 12))
        assert len(alarms_of(svc, VIN)) == 1
        assert outbox(svc) == []
    finally:
        svc.close()


def test_bad_webhook_settings_are_refused() -> None:
    for url, secret in (("ftp://x", SECRET), ("http://127.0.0.1/hook", b"")):
        with pytest.raises(NotifyConfigError):
            WebhookConfig(url, secret)
    with pytest.raises(NotifyConfigError):
        NotifyConfig(backoff_base_s=2, backoff_max_s=1)


@given(secret=st.binary(min_size=1, max_size=64), body=st.binary(max_size=2048), flip=st.integers(0, 2**16))
def test_the_signature_is_hmac_sha256_of_the_exact_body(secret: bytes, body: bytes, flip: int) -> None:
    sig = signature(secret, body)
    assert hmac.compare_digest(sig, hmac.new(secret, body, hashlib.sha256).hexdigest())
    if body:
        i = flip % len(body)
        tampered = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        assert signature(secret, tampered) != sig


@given(attempts=st.integers(1, 100), base=st.floats(0.01, 10), cap=st.floats(10, 1000))
def test_backoff_is_exponential_capped_and_jittered(attempts: int, base: float, cap: float) -> None:
    cfg = NotifyConfig(backoff_base_s=base, backoff_max_s=cap)
    nominal = min(cap, base * 2 ** (attempts - 1)) * 1000
    assert 0.8 * nominal - 1 <= cfg.backoff_ms(attempts) <= 1.2 * nominal + 1
