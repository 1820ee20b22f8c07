"""MQTT → ingest pipeline, acknowledging only what the pipeline has durably decided.

Flow: paho delivers a QoS 1 message on the event loop → the inbound queue → a worker drains up to `max_batch`
messages (waiting up to `linger_s` for more when fewer are queued), runs the synchronous pipeline in a thread (one
durable commit for the lot), then PUBACKs each.  If the store fails nothing is acknowledged and the same batch is
retried; the broker also redelivers unacknowledged messages after a reconnect, and the pipeline's
(vin, boot, seq) ledger stores them once.

Backpressure is TCP's, not the broker's: we announce the MQTT 5 Receive Maximum, but Mosquitto 2.0 does not keep
to it once acknowledgements flow (a subscriber announcing 50 was measured holding thousands unacknowledged), so
the bridge trusts no broker's flow control.  When the queue reaches its high-water mark (`receive_maximum` unless
`queue_high_water` says otherwise) the bridge stops reading the socket (PahoOnAsyncio.pause_reading: the kernel
buffer fills, the TCP window closes, the broker keeps the rest in our session); when the worker has drained it to
the low-water mark (half of that) reading resumes.  No message is ever dropped, so the queue has no maxsize and
takes whatever the paho read that crossed the mark had already decoded.  paho 2 (2.2.0 here) reads at most
max(1, len(_out_messages) + len(_in_messages)) packets per loop_read call: our unacknowledged outgoing QoS 1
messages plus incoming QoS 2 messages awaiting PUBREL.  We subscribe at QoS 1 (no incoming QoS 2) and publish only
commands, at most the command publisher's `max_inflight` at a time, so the depth never exceeds `queue_bound` =
high-water mark + max(1, max_inflight) - 1, exactly the high-water mark without a control plane (max_inflight then
counts as 0).  Pauses are counted
(zhilian_bridge_read_pauses_total, BridgeStats.read_pauses); the depth is a gauge and its maximum is kept
(BridgeStats.max_queue_depth).

A pause longer than the keepalive (a pipeline stalled on a failing store) starves paho of the PINGRESP, and it drops
the connection one keepalive after its PINGREQ (after one to two keepalives of pause).  That is accepted: the
bridge waits until the worker has drained the queue to the low-water mark (the broker holds new messages
meanwhile), reconnects with a fresh, reading adapter (CONNACK must be read), and the broker redelivers what was
not acknowledged; the ledger stores it once.  Items of the dead connection still in the queue are stored but not
acknowledged (the broker redelivers them anyway).

With a control plane (`control`, cloud_ingest.commands.CommandService) the bridge also subscribes to ev/+/status and
ev/+/cmd/ack — those messages go to `control.ingest_control_many` instead of the pipeline, acknowledged the same
way — and publishes the command outbox to ev/{vin}/cmd while connected (broker_bridge/commands.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, Counter, Gauge

from broker_bridge.commands import CommandOutbox, CommandPublisher
from broker_bridge.paho_loop import PahoOnAsyncio
from protocol.errors import TopicError
from protocol.tls import optional_client_context
from protocol.topics import Channel, parse_topic, subscription

log = logging.getLogger("zhilian.bridge")


class IngestResultLike(Protocol):
    # Read-only, so frozen dataclasses (the pipeline's and the control plane's results) conform.
    @property
    def outcome(self) -> str: ...

    @property
    def reason(self) -> str | None: ...


IngestMany = Callable[[Sequence[tuple[str | None, bytes]]], Sequence[IngestResultLike]]
_CONTROL_CHANNELS = frozenset({Channel.STATUS, Channel.CMD_ACK})


class ControlPlane(CommandOutbox, Protocol):
    def ingest_control_many(self, items: Sequence[tuple[str | None, Channel, bytes]]) -> Sequence[IngestResultLike]: ...


@dataclass(slots=True)
class _Inbound:
    generation: int
    mid: int
    qos: int
    claimed_vin: str | None
    payload: bytes
    channel: Channel = Channel.TELEMETRY


@dataclass(slots=True)
class BridgeStats:
    received: int = 0
    acked: int = 0
    bad_topic: int = 0
    store_failures: int = 0
    connects: int = 0
    connected: bool = False
    read_pauses: int = 0
    max_queue_depth: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class MqttBridge:
    def __init__(
        self,
        ingest_many: IngestMany,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "zhilian-bridge",
        share_group: str | None = None,
        receive_maximum: int = 512,
        max_batch: int = 256,
        keepalive: int = 30,
        metrics: CollectorRegistry | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        control: ControlPlane | None = None,
        queue_high_water: int | None = None,
        linger_s: float = 0.02,
    ) -> None:
        # Built once (a bad TLS file fails construction with TlsConfigError); the certificate's CN, normally
        # "zhilian-bridge", is the identity the broker's ACL grants read on every vehicle's uplink.
        self._tls = optional_client_context(tls_ca, tls_cert, tls_key)
        self._ingest_many = ingest_many
        self._control = control
        self.commands = CommandPublisher(control) if control is not None else None
        self.host, self.port = host, port
        self.client_id = client_id
        self.share_group = share_group
        self.receive_maximum = receive_maximum
        self.max_batch = max_batch
        if not 0 <= linger_s <= 1:
            raise ValueError(f"linger_s must be 0..1 s, not {linger_s}")
        self.linger_s = linger_s
        self.keepalive = keepalive
        if not 1 <= receive_maximum <= 65535:
            raise ValueError(f"receive_maximum must be 1..65535 (an MQTT 5 Receive Maximum), not {receive_maximum}")
        self.stats = BridgeStats()
        # Reading pauses at `high_water` queued messages (default: the Receive Maximum, so a broker that keeps to it
        # never causes a pause) and resumes at half of it.
        self.high_water = receive_maximum if queue_high_water is None else queue_high_water
        if self.high_water < 1:
            raise ValueError(f"queue_high_water must be positive, not {queue_high_water}")
        self.low_water = self.high_water // 2
        # No maxsize: a full asyncio.Queue could only refuse a message paho has already decoded.  Pausing the socket
        # at `high_water` bounds it to `queue_bound` (module docstring).
        self._queue: asyncio.Queue[_Inbound] = asyncio.Queue()
        # Set while the queue has room: cleared with each pause, set again at the low-water mark.
        self._room = asyncio.Event()
        self._room.set()
        self._generation = 0
        self._client: mqtt.Client | None = None
        self._adapter: PahoOnAsyncio | None = None
        self._subscribed = asyncio.Event()
        reg = metrics if metrics is not None else CollectorRegistry()
        self._m_received = Counter("zhilian_bridge_received_total", "MQTT messages received", registry=reg)
        self._m_acked = Counter("zhilian_bridge_acked_total", "MQTT messages acknowledged", registry=reg)
        self._m_bad_topic = Counter("zhilian_bridge_bad_topic_total", "messages on malformed topics", registry=reg)
        self._m_store_fail = Counter(
            "zhilian_bridge_store_failures_total", "pipeline storage failures (batch retried)", registry=reg
        )
        self._m_queue = Gauge("zhilian_bridge_queue_depth", "messages waiting for the pipeline", registry=reg)
        self._m_pauses = Counter(
            "zhilian_bridge_read_pauses_total", "times the bridge stopped reading the broker (queue full)", registry=reg
        )
        self._m_connected = Gauge("zhilian_bridge_connected", "1 while connected to the broker", registry=reg)

    @property
    def queue_bound(self) -> int:
        """The most messages the inbound queue can hold: the high-water mark plus what the paho read that crossed
        it had already decoded (at most max(1, outstanding outgoing QoS 1 messages) packets per loop_read)."""
        outgoing = self.commands.max_inflight if self.commands is not None else 0
        return self.high_water + max(1, outgoing) - 1

    def _queue_changed(self) -> int:
        depth = self._queue.qsize()
        self._m_queue.set(depth)
        self.stats.max_queue_depth = max(self.stats.max_queue_depth, depth)
        return depth

    # --- MQTT callbacks (run on the event loop) ---------------------------------------------------------------

    def _topics(self) -> list[str]:
        filters = [subscription(Channel.TELEMETRY), subscription(Channel.ALERT)]
        if self._control is not None:
            filters += [subscription(Channel.STATUS), subscription(Channel.CMD_ACK)]
        if self.share_group:
            filters = [f"$share/{self.share_group}/{f}" for f in filters]
        return filters

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            log.error("broker refused connection", extra={"reason": str(rc)})
            return
        client.subscribe([(t, 1) for t in self._topics()])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any, props: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.stats.received += 1
        self._m_received.inc()
        try:
            claimed_vin, channel = parse_topic(msg.topic)
        except TopicError as exc:
            # Cannot come from a well-behaved device (the ACL confines it to ev/{vin}/); count, log, drop.
            self.stats.bad_topic += 1
            self._m_bad_topic.inc()
            log.warning("message on malformed topic dropped", extra={"topic": msg.topic[:200], "error": str(exc)})
            self._ack(msg.mid, msg.qos, self._generation)
            return
        item = _Inbound(self._generation, msg.mid, msg.qos, claimed_vin, bytes(msg.payload), channel)
        self._queue.put_nowait(item)  # never full (no maxsize); bounded by pausing below
        if self._queue_changed() >= self.high_water:
            self._room.clear()
            if self._adapter is not None and self._adapter.pause_reading():
                self.stats.read_pauses += 1
                self._m_pauses.inc()
                log.debug("inbound queue at high water; reading paused", extra={"depth": self._queue.qsize()})

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if self._client is None or generation != self._generation or qos == 0:
            return  # a message of a dead connection: the broker redelivers it; the ledger dedupes
        self._client.ack(mid, qos)
        self.stats.acked += 1
        self._m_acked.inc()

    # --- worker -----------------------------------------------------------------------------------------------

    async def _worker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            items = await self._fill_batch(first)
            if self._queue_changed() <= self.low_water and not self._room.is_set():
                self._room.set()
                if self._adapter is not None and self._adapter.resume_reading():
                    log.debug("inbound queue at low water; reading resumed", extra={"depth": self._queue.qsize()})
            await self._process(items, stop)

    async def _fill_batch(self, first: _Inbound) -> list[_Inbound]:
        """`first` and what arrives within `linger_s` of it, up to `max_batch`.  A pipeline call costs a fixed part
        (its transaction, a dozen statements, the store's write: several ms of CPU, BENCHMARKS.md) on top of its
        cost per message: taking the one or two messages a moderate load has queued would spend most of a core on
        that fixed part, a core the store and broker on the same machine need.  Under overload the queue already
        holds a full batch and nothing waits."""
        items = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_s
        while len(items) < self.max_batch:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                # A get cancelled by the timeout takes nothing: Queue.get removes the item only once it resumes.
                async with asyncio.timeout(remaining):
                    items.append(await self._queue.get())
            except TimeoutError:
                break
        return items

    async def _process(self, items: list[_Inbound], stop: asyncio.Event) -> None:
        backoff = 0.2
        while True:
            try:
                results = await asyncio.to_thread(self._ingest, items)
                break
            except Exception as exc:
                self.stats.store_failures += 1
                self._m_store_fail.inc()
                log.error(
                    "pipeline failed; batch not acknowledged, retrying",
                    extra={"error": repr(exc), "messages": len(items), "backoff_s": backoff},
                )
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 10.0)
        for item, res in zip(items, results, strict=True):
            key = res.outcome if res.reason is None or res.outcome == "duplicate" else f"{res.outcome}:{res.reason}"
            self.stats.outcomes[key] = self.stats.outcomes.get(key, 0) + 1
            self._ack(item.mid, item.qos, item.generation)

    def _ingest(self, items: list[_Inbound]) -> list[IngestResultLike]:
        """Telemetry and alerts to the pipeline, status and acks to the control plane; results in item order."""
        control = [i for i, item in enumerate(items) if item.channel in _CONTROL_CHANNELS]
        if not control or self._control is None:
            return list(self._ingest_many([(i.claimed_vin, i.payload) for i in items]))
        taken = set(control)
        uplink = [i for i in range(len(items)) if i not in taken]
        by_index: dict[int, IngestResultLike] = {}
        if uplink:
            stored = self._ingest_many([(items[i].claimed_vin, items[i].payload) for i in uplink])
            by_index.update(zip(uplink, stored, strict=True))
        answers = self._control.ingest_control_many(
            [(items[i].claimed_vin, items[i].channel, items[i].payload) for i in control]
        )
        by_index.update(zip(control, answers, strict=True))
        return [by_index[i] for i in range(len(items))]

    # --- connection -------------------------------------------------------------------------------------------

    async def wait_subscribed(self, timeout: float) -> None:
        await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def _wait_for_room(self, stop: asyncio.Event, worker: asyncio.Task[None]) -> None:
        """Before (re)connecting: wait until the worker has drained the queue to the low-water mark, so a new
        connection never starts above the high-water mark.  The broker holds new messages in our session."""
        if self._room.is_set():
            return
        log.info("waiting for the pipeline to drain before connecting", extra={"depth": self._queue.qsize()})
        while not self._room.is_set() and not stop.is_set() and not worker.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 1.0)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        worker = asyncio.create_task(self._worker(stop), name="bridge-worker")
        backoff = 0.5
        try:
            while not stop.is_set():
                await self._wait_for_room(stop, worker)
                if stop.is_set():
                    break
                if worker.done():
                    raise RuntimeError("bridge worker died") from worker.exception()
                self._generation += 1
                client = mqtt.Client(
                    CallbackAPIVersion.VERSION2,
                    client_id=self.client_id,
                    protocol=mqtt.MQTTv5,
                    manual_ack=True,
                )
                if self._tls is not None:
                    client.tls_set_context(self._tls)
                client.on_connect = self._on_connect
                client.on_subscribe = self._on_subscribe
                client.on_message = self._on_message
                if self.commands is not None:
                    client.on_publish = self.commands.on_publish
                adapter = PahoOnAsyncio(client, loop)  # reading: the queue is below the high-water mark
                props = Properties(PacketTypes.CONNECT)
                props.ReceiveMaximum = self.receive_maximum
                # A persistent session: messages published while the bridge restarts wait for it in the broker.
                props.SessionExpiryInterval = 3600
                self._client = client
                self._adapter = adapter
                try:
                    await adapter.connect(self.host, self.port, self.keepalive, properties=props)
                    self.stats.connects += 1
                    self.stats.connected = True
                    self._m_connected.set(1)
                    backoff = 0.5
                    log.info("bridge connected", extra={"host": self.host, "port": self.port})
                    stop_wait = asyncio.ensure_future(stop.wait())
                    waits: set[asyncio.Future[Any]] = {adapter.disconnected, stop_wait, worker}
                    publisher = None
                    if self.commands is not None:
                        publisher = asyncio.create_task(self.commands.run(client, stop), name="bridge-commands")
                        waits.add(publisher)
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        stop_wait.cancel()
                        if publisher is not None:
                            publisher.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await publisher
                    if publisher is not None and publisher.done() and not publisher.cancelled():
                        error = publisher.exception()
                        # Returning is how it stops once `stop` is set, and it may return in the very loop turn
                        # that ends the wait above (its poll timed out just then): that is no death.
                        if error is not None or not stop.is_set():
                            raise RuntimeError("bridge command publisher died") from error
                    if adapter.disconnected.done():
                        log.warning(
                            "bridge lost broker connection",
                            extra={
                                "error": repr(adapter.disconnected.result()),
                                # Paused past the keepalive, paho drops the connection (PINGRESP unread).
                                "reading_paused": adapter.reading_paused,
                            },
                        )
                except (OSError, TimeoutError) as exc:
                    log.warning("bridge cannot reach broker", extra={"error": repr(exc), "backoff_s": backoff})
                finally:
                    self.stats.connected = False
                    self._m_connected.set(0)
                    self._subscribed.clear()
                    await adapter.close()
                if not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    backoff = min(backoff * 2, 15.0)
        finally:
            stop.set()
            # Let an in-flight pipeline batch finish so its acks are not wasted; bounded.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(worker, timeout=10)
            worker.cancel()
