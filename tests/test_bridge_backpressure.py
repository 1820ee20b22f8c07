"""The bridge's flow control against a real Mosquitto: it pauses reading the socket instead of dropping a message.

Mosquitto 2.0 does not keep to the Receive Maximum the bridge announces, so a fast publisher and a slow pipeline
push far more unacknowledged messages at the bridge than its queue's high-water mark.  Every message must still be
stored and acknowledged (a later session of the same client gets nothing redelivered), and the queue's depth must
stay within the bound the bridge documents.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker_bridge.bridge import MqttBridge
from broker_bridge.paho_loop import PahoOnAsyncio
from protocol.topics import Channel, topic
from tests.conftest import wait_until
from zhilian.broker import MosquittoProcess

pytestmark = pytest.mark.integration
VIN = "LZHBACKPRESSURE01"
TOPIC = topic(VIN, Channel.TELEMETRY)


@dataclass(frozen=True)
class Stored:
    outcome: str = "stored"
    reason: str | None = None


class SlowRecorder:
    """An ingest_many that records every payload and takes `delay_s` per call (it runs in the worker thread);
    with a `gate`, calls after the first `gate_after` block until the gate opens (a pipeline stalled on its store)."""

    def __init__(self, delay_s: float = 0.0, gate: threading.Event | None = None, gate_after: int = 0) -> None:
        self.delay_s = delay_s
        self.gate = gate
        self.gate_after = gate_after
        self.payloads: list[bytes] = []
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, items: Sequence[tuple[str | None, bytes]]) -> list[Stored]:
        with self._lock:
            gated = self.gate is not None and self.calls >= self.gate_after
        if gated and self.gate is not None and not self.gate.wait(timeout=60):
            raise TimeoutError("test gate never opened")
        time.sleep(self.delay_s)
        with self._lock:
            self.calls += 1
            self.payloads.extend(payload for _, payload in items)
        return [Stored() for _ in items]

    def snapshot(self) -> list[bytes]:
        with self._lock:
            return list(self.payloads)


def _publish_all(broker: MosquittoProcess, payloads: list[bytes], timeout: float = 60.0) -> None:
    """Publish at QoS 1 as fast as paho can (no in-flight limit) and wait for every PUBACK."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="backpressure-publisher", protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(0)
    pub.max_queued_messages_set(0)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        infos = [pub.publish(TOPIC, p, qos=1) for p in payloads]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge every publish in time"
    finally:
        pub.disconnect()
        pub.loop_stop()


async def _assert_nothing_redelivered(broker: MosquittoProcess, client_id: str) -> None:
    """A second session of the same persistent client: the broker resends whatever was left unacknowledged before
    anything new, so once a sentinel published now has arrived, it must be the only thing that did."""
    recorder = SlowRecorder()
    bridge = MqttBridge(recorder, host=broker.host, port=broker.port, client_id=client_id)
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await bridge.wait_subscribed(10)
        await asyncio.to_thread(_publish_all, broker, [b"sentinel"])
        await wait_until(lambda: b"sentinel" in recorder.snapshot(), timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    assert recorder.snapshot() == [b"sentinel"]


async def _run_until_ingested(
    bridge: MqttBridge, recorder: SlowRecorder, payloads: list[bytes], broker: MosquittoProcess
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        await bridge.wait_subscribed(10)
        await asyncio.to_thread(_publish_all, broker, payloads)
        await wait_until(lambda: set(recorder.snapshot()) >= set(payloads), timeout=60)
        # Each message is acknowledged once, by the connection that delivered it last.
        await wait_until(lambda: bridge.stats.acked >= len(payloads), timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def test_a_slow_pipeline_pauses_reading_and_loses_nothing(mosquitto: MosquittoProcess) -> None:
    async def go() -> None:
        payloads = [b"m%06d" % i for i in range(4000)]
        recorder = SlowRecorder(delay_s=0.003)
        bridge = MqttBridge(
            recorder,
            host=mosquitto.host,
            port=mosquitto.port,
            client_id="bridge-backpressure",
            receive_maximum=16,
            # Below what the broker may send (16) beside the worker's batch (8): the queue reaches it whether or
            # not the broker keeps to the Receive Maximum (Mosquitto 2.0.11 does until acknowledgements flow).
            queue_high_water=4,
            max_batch=8,
        )
        await _run_until_ingested(bridge, recorder, payloads, mosquitto)
        got = recorder.snapshot()
        assert set(got) == set(payloads)
        if bridge.stats.connects == 1:
            assert len(got) == len(payloads)  # duplicates only come from a redelivery after a reconnect
            assert bridge.stats.acked == len(payloads)
        assert bridge.stats.read_pauses > 0
        assert bridge.queue_bound == 4  # no control plane: no outgoing messages, one packet per paho read
        assert 4 <= bridge.stats.max_queue_depth <= bridge.queue_bound
        await _assert_nothing_redelivered(mosquitto, "bridge-backpressure")

    asyncio.run(go())


def test_a_pause_past_the_keepalive_reconnects_and_loses_nothing(
    mosquitto: MosquittoProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled pipeline keeps reading paused until paho gives up on the PINGRESP; the bridge must come back
    (reading again, or CONNACK would never be seen) once the pipeline recovers, and everything must arrive."""

    def logged(message: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == message]

    async def go() -> None:
        caplog.set_level(logging.INFO, logger="zhilian.bridge")
        payloads = [b"k%06d" % i for i in range(300)]
        gate = threading.Event()
        # Two batches go through first, then the pipeline stalls holding the third: the broker's next messages
        # (up to the Receive Maximum, or more) fill the queue past its high-water mark.
        recorder = SlowRecorder(gate=gate, gate_after=2)
        bridge = MqttBridge(
            recorder,
            host=mosquitto.host,
            port=mosquitto.port,
            client_id="bridge-keepalive",
            receive_maximum=16,
            # Below what the broker may send (16) beside the worker's batch (8): the queue reaches it whether or
            # not the broker keeps to the Receive Maximum (Mosquitto 2.0.11 does until acknowledgements flow).
            queue_high_water=4,
            max_batch=8,
            keepalive=1,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(bridge.run(stop))
        try:
            await bridge.wait_subscribed(10)
            await asyncio.to_thread(_publish_all, mosquitto, payloads)
            await wait_until(lambda: bridge.stats.read_pauses > 0, timeout=10)
            # Paused with the pipeline stuck: paho's keepalive ends the connection, and the bridge waits for the
            # queue to drain before it reconnects.
            await wait_until(lambda: logged("bridge lost broker connection"), timeout=20)
            assert [getattr(r, "reading_paused", None) for r in logged("bridge lost broker connection")] == [True]
            await wait_until(lambda: logged("waiting for the pipeline to drain before connecting"), timeout=10)
            assert bridge.stats.connects == 1
            assert not bridge.stats.connected
            gate.set()
            await wait_until(lambda: set(recorder.snapshot()) >= set(payloads), timeout=60)
            assert bridge.stats.connects >= 2
            await wait_until(lambda: bridge.stats.acked >= len(payloads), timeout=20)
        finally:
            gate.set()
            stop.set()
            await asyncio.wait_for(task, 20)
        assert set(recorder.snapshot()) == set(payloads)
        assert bridge.stats.max_queue_depth <= bridge.queue_bound
        await _assert_nothing_redelivered(mosquitto, "bridge-keepalive")

    asyncio.run(go())


def _readable(sock: object) -> bool:
    ready, _, _ = select.select([sock], [], [], 0)
    return bool(ready)


async def _yield_to_loop(times: int = 5) -> None:
    # A registered reader whose socket is readable runs within the next loop iteration; give it several.
    for _ in range(times):
        await asyncio.sleep(0)


def test_pause_and_resume_are_idempotent_and_a_socket_opened_while_paused_is_not_read(
    mosquitto: MosquittoProcess,
) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pause-unit", protocol=mqtt.MQTTv5)
        received: list[bytes] = []
        subacks: list[int] = []
        client.on_message = lambda c, u, msg: received.append(bytes(msg.payload))
        client.on_subscribe = lambda c, u, mid, rcs, props: subacks.append(mid)
        adapter = PahoOnAsyncio(client, loop)
        assert adapter.pause_reading() is True
        assert adapter.pause_reading() is False
        try:
            await adapter.connect(mosquitto.host, mosquitto.port, keepalive=30)
            # The CONNACK waits in the kernel buffer, unread.
            await wait_until(lambda: client.socket() is not None and _readable(client.socket()), timeout=10)
            await _yield_to_loop()
            assert not client.is_connected()
            assert _readable(client.socket())

            assert adapter.resume_reading() is True
            assert adapter.resume_reading() is False
            await wait_until(client.is_connected, timeout=10)
            client.subscribe(TOPIC, qos=1)
            await wait_until(lambda: bool(subacks), timeout=10)

            assert adapter.pause_reading() is True
            await asyncio.to_thread(_publish_all, mosquitto, [b"while-paused"])
            await wait_until(lambda: _readable(client.socket()), timeout=10)
            await _yield_to_loop()
            assert received == []
            assert adapter.resume_reading() is True
            await wait_until(lambda: received == [b"while-paused"], timeout=10)
        finally:
            await adapter.close()
        # The socket is gone: pausing and resuming are still safe, and only change the state.
        assert adapter.disconnected.done()
        assert adapter.pause_reading() is True
        assert adapter.resume_reading() is True

    asyncio.run(go())
