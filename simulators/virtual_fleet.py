"""Protocol-level virtual fleet: thousands of lightweight vehicles, each with its own MQTT connection, on one loop.

A virtual vehicle here has no devices and no agent: it produces exactly the envelopes an edge agent publishes —
rows of catalogue values batched with `protocol.batch.batch_from_rows`, encoded with `encode_batch` and sealed by
the agent's own `edge_agent.batcher.Sealer` with the vehicle's Ed25519 key — and publishes them at QoS 1 over its
own MQTT 3.1.1 connection to `ev/{vin}/telemetry`. The same rows can also go out unsigned as JSON (for a peer
pipeline such as a Node-RED flow, which cannot verify signatures) on another topic prefix.

Layers:

- **Sans-I/O MQTT publisher core** (`connect_packet`, `publish_packet`, `PacketReader`): the few MQTT 3.1.1
  packets a QoS 1 publisher needs, over bytes. paho-mqtt on an asyncio socket loop (broker_bridge/paho_loop.py)
  costs paho's per-message bookkeeping (message object, inflight map, its own packet encoding): measured ≈ 40 µs
  CPU per QoS 1 publish, against ≈ 3 µs to write a pre-built packet and ≈ 20–40 µs per message for this whole
  shell on asyncio, pacing and PUBACK handling included (BENCHMARKS.md). A load generator that must never be the
  bottleneck writes pre-built packets.
- **Generator** (`FleetGenerator.plan`): deterministic for (vehicles, seed, boot, start, rate): the message
  schedule (round robin over the fleet, `rate` messages/s), the sample timestamps (the newest sample of a message
  is taken at the moment the message is due, so "sample taken → stored" latency reads straight off its body) and
  the exact bytes (Ed25519 signatures are deterministic). Sample values come from `simulators.vehicle` models,
  computed once, on first use, into a bank of ride traces the vehicles share at different offsets: computing a model
  state costs ≈ 30 µs per sample, three times an envelope's encode + sign per message, and would make the
  generator the bottleneck.
- **I/O shell** (`ProtocolFleet`): one asyncio.Protocol per connection, connects in waves, sends a plan's
  pre-built packets paced by a token bucket, counts PUBACKs, records each message's send lag, measures its own CPU.
- **Control shells**: `worker_main` (a child process driven by JSON lines over its stdin/stdout, used by
  `zhilian bench`) and `run_standing_load` (`zhilian sim fleet --mode protocol`: constant load until stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from edge_agent.batcher import Sealer
from protocol import DeviceKey, encode_batch, load_catalogue
from protocol.batch import batch_from_rows
from protocol.catalogue import Catalogue
from simulators.route import route_for
from simulators.vehicle import VehicleModel

log = logging.getLogger("zhilian.sim.virtual_fleet")

SAMPLES_PER_MESSAGE = 10
VIN_PREFIX = "LZHVF"
JSON_TOPIC_PREFIX = "nr"
PayloadKind = Literal["signed", "json"]

# --- sans-I/O MQTT 3.1.1 publisher core ------------------------------------------------------------------------

CONNECT, CONNACK, PUBLISH, PUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 12, 13, 14
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
MAX_REMAINING_LENGTH = 268_435_455  # the largest a 4-byte variable length integer can say
# What a publisher may receive: CONNACK, PUBACK (and the other QoS 2 acks, never used here), SUBACK, UNSUBACK,
# PINGRESP — all tiny. A broker sending more is broken; refusing it bounds the reader's buffer.
MAX_INBOUND_PACKET = 1024


class MqttProtocolError(Exception):
    """The broker sent bytes that are not a well-formed MQTT 3.1.1 packet a publisher expects."""


def encode_remaining_length(n: int) -> bytes:
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("MQTT strings are at most 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str, keepalive_s: int, clean_session: bool = True) -> bytes:
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError("keepalive must fit 16 bits")
    body = _utf8("MQTT") + bytes([4, 0x02 if clean_session else 0x00]) + keepalive_s.to_bytes(2, "big")
    body += _utf8(client_id)
    return bytes([CONNECT << 4]) + encode_remaining_length(len(body)) + body


def publish_packet(topic: bytes, packet_id: int, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH (not retained, not a duplicate); `topic` is the UTF-8 topic name."""
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError("a QoS 1 packet id is 1..65535")
    if len(topic) > 0xFFFF:
        raise ValueError("topic too long")
    length = 2 + len(topic) + 2 + len(payload)
    return b"".join(
        (
            bytes([(PUBLISH << 4) | 0x02]),
            encode_remaining_length(length),
            len(topic).to_bytes(2, "big"),
            topic,
            packet_id.to_bytes(2, "big"),
            payload,
        )
    )


class PacketReader:
    """Splits the broker's byte stream into (packet type, flags, body); chunk boundaries may fall anywhere."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        self._buf += data
        out: list[tuple[int, int, bytes]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 2:
            ptype = buf[pos] >> 4
            if ptype in (0, 15):
                raise MqttProtocolError(f"reserved packet type {ptype}")
            length, multiplier, i, complete = 0, 1, pos + 1, False
            for _ in range(4):
                if i >= len(buf):
                    break
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                if not byte & 0x80:
                    complete = True
                    break
            else:
                raise MqttProtocolError("remaining length longer than 4 bytes")
            if not complete:
                break  # the length field itself is still incomplete
            if length > MAX_INBOUND_PACKET:
                raise MqttProtocolError(f"inbound packet of {length} bytes is more than a publisher accepts")
            if len(buf) - i < length:
                break
            out.append((ptype, buf[pos] & 0x0F, bytes(buf[i : i + length])))
            pos = i + length
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


def split_publish(packet: bytes) -> tuple[str, bytes]:
    """(VIN of the topic `ev|nr/{vin}/...`, payload) of a PUBLISH built by `publish_packet` (QoS 1)."""
    if not packet or packet[0] >> 4 != PUBLISH:
        raise MqttProtocolError("not a PUBLISH packet")
    i = 1
    while packet[i] & 0x80:
        i += 1
    i += 1
    topic_len = int.from_bytes(packet[i : i + 2], "big")
    topic = packet[i + 2 : i + 2 + topic_len].decode()
    return topic.split("/")[1], packet[i + 2 + topic_len + 2 :]


def parse_connack(body: bytes) -> int:
    """The CONNACK return code (0 = accepted)."""
    if len(body) != 2:
        raise MqttProtocolError("CONNACK body must be 2 bytes")
    return body[1]


def parse_puback(body: bytes) -> int:
    if len(body) != 2:
        raise MqttProtocolError("PUBACK body must be 2 bytes")
    return int.from_bytes(body, "big")


# --- vehicles, keys and sample traces --------------------------------------------------------------------------


def fleet_vin(index: int) -> str:
    """17 characters like an ISO 3779 VIN; the fleet's index in the serial number."""
    return f"{VIN_PREFIX}{index:012d}"


def fleet_variant(index: int) -> str:
    """Every fourth vehicle a 72 V e-motorcycle, the rest 48 V e-bikes (the device-level fleet's mix)."""
    return "emoto72" if index % 4 == 3 else "ebike48"


def fleet_key(seed: int, vin: str) -> DeviceKey:
    """The vehicle's signing key, derived from the fleet seed: the process that registers the fleet with the cloud
    and the process that drives it derive the same 10,000 keys without shipping key files between them."""
    return DeviceKey.from_seed(hashlib.sha256(f"zhilian-virtual-fleet/{seed}/{vin}".encode()).digest())


# Ride traces start at a fixed instant, so the values are the same whenever the fleet runs (determinism).
TRACE_T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
TRACE_WARMUP_S = 300.0  # skip the cold start: motors and packs warm up in the first minutes
TRACE_DT_S = 0.5  # model time between two trace rows
TRACE_S = 1800.0  # a trace covers half an hour of riding
# Vehicles start at most this far into their trace, so none wraps around (a jump in position and charge that rules
# would flag) within the first TRACE_S - TRACE_SPREAD_S seconds of a run — longer than a bench.
TRACE_SPREAD_S = 900.0
MAX_TRACES = 16

_GNSS_SIGNALS = (
    ("CurrentLocation.Latitude", "lat"),
    ("CurrentLocation.Longitude", "lon"),
    ("CurrentLocation.Altitude", "altitude_m"),
    ("CurrentLocation.Heading", "heading_deg"),
)
Value = float | int | bool | str
Row = dict[str, Value]


class TraceBank:
    """Half an hour of riding of MAX_TRACES models, one row every TRACE_DT_S of model time; vehicle i rides trace
    i % MAX_TRACES from its own offset, its model clock running with its sample timestamps, so the values a sample
    carries belong to the time it says it was taken (rates of change — what crash, theft and thermal rules look
    at — are physical, whatever the sampling rate).

    A row holds the GNSS position (latitude, longitude, altitude, heading) and the model's controller and BMS
    values (`VehicleModel.signals`): 13 signals at catalogue resolution, what an agent's pass-through profile sends
    while riding. Rows are computed on first use and kept (a model state costs ≈ 30 µs; a long bench touches all
    of them, a short test only a few).
    """

    def __init__(self, seed: int, catalogue: Catalogue) -> None:
        self.seed = seed
        self.length = int(TRACE_S / TRACE_DT_S)
        self._decimals = {name: catalogue.by_name(name).decimals for name, _ in _GNSS_SIGNALS}
        self._models: list[VehicleModel | None] = [None] * MAX_TRACES
        self._rows: list[list[tuple[Value, ...] | None]] = [[None] * self.length for _ in range(MAX_TRACES)]
        self._wire = {sig.name: f"s{sig.id}" for sig in catalogue}
        self.names: list[str] = []
        self.wire_keys: list[str] = []

    def __len__(self) -> int:
        return MAX_TRACES

    def _values(self, trace: int, model_s: float) -> tuple[Value, ...]:
        i = int(model_s / TRACE_DT_S) % self.length
        row = self._rows[trace][i]
        if row is not None:
            return row
        model = self._models[trace]
        if model is None:
            model = VehicleModel(
                route_for(trace), seed=self.seed * 100_003 + trace, start_time=TRACE_T0, variant=fleet_variant(trace)
            )
            self._models[trace] = model
        state = model.state_at(TRACE_T0 + TRACE_WARMUP_S + i * TRACE_DT_S)
        values: dict[str, Value] = {}
        for name, attr in _GNSS_SIGNALS:
            value = getattr(state, attr)
            if name == "CurrentLocation.Heading":
                value = value % 360.0
            values[name] = round(value, self._decimals[name]) + 0.0
        values.update(model.signals(state))
        if not self.names:
            self.names = list(values)
            self.wire_keys = [self._wire[name] for name in self.names]
        row = tuple(values[name] for name in self.names)
        self._rows[trace][i] = row
        return row

    def row(self, trace: int, model_s: float) -> Row:
        values = self._values(trace, model_s)
        return dict(zip(self.names, values, strict=True))

    def wire_row(self, trace: int, model_s: float) -> dict[str, Value]:
        """The row keyed by wire id (`s<id>`), as the JSON feed and our InfluxDB fields name signals."""
        values = self._values(trace, model_s)
        return dict(zip(self.wire_keys, values, strict=True))


@dataclass(slots=True)
class _Vehicle:
    index: int
    vin: str
    sealer: Sealer
    signed_topic: bytes
    json_topic: bytes
    trace: int
    offset_s: float  # where in its trace the vehicle starts
    last_ms: int = -1
    packet_id: int = 0

    def next_packet_id(self) -> int:
        self.packet_id = self.packet_id % 0xFFFF + 1
        return self.packet_id


@dataclass(slots=True)
class Plan:
    """Messages due in one window, in send order: `due[i]` (unix seconds) is when `packets[i]` goes to `vehicle[i]`."""

    kind: PayloadKind
    start_s: float
    duration_s: float
    rate: float
    due: array[float] = field(default_factory=lambda: array("d"))
    vehicle: array[int] = field(default_factory=lambda: array("I"))
    packets: list[bytes] = field(default_factory=list)
    samples: int = 0
    first_ms: int = 0  # oldest sample timestamp in the plan
    last_ms: int = 0  # newest sample timestamp in the plan
    generate_cpu_s: float = 0.0
    # For vehicles with an injected fault: the newest sample time (= due time) of each of their messages, so a
    # rule's raise time (a sample time) maps to the message that carried it.
    injected_sends: dict[str, list[int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.packets)


Injection = Mapping[int, tuple[int, Mapping[str, Value]]]


class FleetGenerator:
    """Deterministic message generator for `vehicles` virtual vehicles (sans-I/O: no clock, no sockets).

    `plan(start_s, duration_s, rate)` yields the window's messages: message n is due at start_s + n / rate and goes
    to the next vehicle in round robin (the cursor carries over between plans). A vehicle's samples are evenly
    spaced over the time since its previous message (at most one message interval), its newest sample taken when
    the message is due; a vehicle's timestamps only ever increase (InfluxDB would merge two samples of a vehicle
    with the same timestamp into one point, which a count would report as a loss).
    """

    def __init__(
        self,
        vehicles: int,
        seed: int = 0,
        boot: int = 1,
        samples_per_message: int = SAMPLES_PER_MESSAGE,
        json_topic_prefix: str = JSON_TOPIC_PREFIX,
        catalogue: Catalogue | None = None,
    ) -> None:
        if vehicles < 1:
            raise ValueError("a fleet needs at least one vehicle")
        if not 1 <= samples_per_message <= 1000:
            raise ValueError("samples_per_message must be 1..1000")
        self.catalogue = catalogue if catalogue is not None else load_catalogue()
        self.seed = seed
        self.boot = boot
        self.samples_per_message = samples_per_message
        self.bank = TraceBank(seed, self.catalogue)
        self.vehicles: list[_Vehicle] = []
        self.keys: list[DeviceKey] = []
        for i in range(vehicles):
            vin = fleet_vin(i)
            self.keys.append(fleet_key(seed, vin))
            self.vehicles.append(
                _Vehicle(
                    index=i,
                    vin=vin,
                    sealer=Sealer(vin, self.keys[-1], boot),
                    signed_topic=f"ev/{vin}/telemetry".encode(),
                    json_topic=f"{json_topic_prefix}/{vin}/telemetry".encode(),
                    trace=i % len(self.bank),
                    offset_s=float((i * 7919) % int(TRACE_SPREAD_S)),
                )
            )
        self._cursor = 0
        self._floor_ms = -1
        self._epoch_ms: int | None = None  # the first plan's start: model time 0 of every vehicle's clock

    @property
    def public_keys(self) -> list[tuple[str, bytes]]:
        return [(v.vin, k.public_raw) for v, k in zip(self.vehicles, self.keys, strict=True)]

    def _stamps(self, v: _Vehicle, newest_ms: int, floor_ms: int) -> list[int]:
        """Timestamps of the message's samples; advances the vehicle's clock."""
        n = self.samples_per_message
        lo = max(v.last_ms, floor_ms) + 1
        if newest_ms < lo + n:
            newest_ms = lo + n  # a vehicle's clock never runs backwards, even when asked to
        span = newest_ms - lo
        out: list[int] = []
        for j in range(n):
            # Evenly spaced from just after the previous sample to the due time; integer ms, strictly increasing.
            out.append(newest_ms - (span * (n - 1 - j)) // n if n > 1 else newest_ms)
        v.last_ms = newest_ms
        return out

    def plan(
        self,
        start_s: float,
        duration_s: float,
        rate: float,
        kind: PayloadKind = "signed",
        inject: Injection | None = None,
        isolate: bool = False,
        active: int | None = None,
    ) -> Plan:
        """`inject`: vehicle index → (from_ms, {signal: value}) overriding the trace from that sample time on (a
        fault with a known onset). `isolate`: every sample of this plan comes after every sample of the earlier
        plans (a bench step counted by time range); consecutive windows of a standing load need not be.
        `active`: only the first `active` vehicles send (a realistic reporting interval for a few of them)."""
        if rate <= 0 or duration_s <= 0:
            raise ValueError("rate and duration must be positive")
        cpu0 = time.process_time()
        count = int(duration_s * rate)
        plan = Plan(kind, start_s, duration_s, rate)
        nveh = len(self.vehicles) if active is None else max(1, min(active, len(self.vehicles)))
        interval_ms = nveh / rate * 1000.0
        spacing_cap = max(1, int(interval_ms / self.samples_per_message))
        floor_ms = self._floor_ms if isolate else -1
        if self._epoch_ms is None:
            self._epoch_ms = int(start_s * 1000)
        epoch_ms = self._epoch_ms
        first_ms: int | None = None
        last_ms = -1
        for n in range(count):
            due = start_s + n / rate
            v = self.vehicles[self._cursor % nveh]
            self._cursor += 1
            newest_ms = int(due * 1000)
            # Spacing at most the cap: a vehicle idle for long (the gap between two bench steps) sends its recent
            # past, not samples smeared over the idle time.
            cap_lo = newest_ms - spacing_cap * self.samples_per_message
            if v.last_ms < cap_lo:
                v.last_ms = cap_lo
            stamps = self._stamps(v, newest_ms, floor_ms)
            inj = inject.get(v.index) if inject else None
            if kind == "signed":
                rows: list[tuple[int, Mapping[str, Value]]] = []
                for ts in stamps:
                    row = self.bank.row(v.trace, (ts - epoch_ms) / 1000 + v.offset_s)
                    if inj is not None and ts >= inj[0]:
                        row.update(inj[1])
                    rows.append((ts, row))
                body = encode_batch(batch_from_rows(rows), self.catalogue)
                sealed = v.sealer.seal_body(body, len(rows), stamps[-1])
                packet = publish_packet(v.signed_topic, v.next_packet_id(), sealed.payload)
            else:
                samples = []
                for ts in stamps:
                    wrow = self.bank.wire_row(v.trace, (ts - epoch_ms) / 1000 + v.offset_s)
                    if inj is not None and ts >= inj[0]:
                        wrow.update({f"s{self.catalogue.by_name(k).id}": val for k, val in inj[1].items()})
                    samples.append({"t": ts, **wrow})
                payload = json.dumps({"vin": v.vin, "samples": samples}, separators=(",", ":")).encode()
                packet = publish_packet(v.json_topic, v.next_packet_id(), payload)
            if inj is not None:
                plan.injected_sends.setdefault(v.vin, []).append(stamps[-1])
            plan.due.append(due)
            plan.vehicle.append(v.index)
            plan.packets.append(packet)
            plan.samples += len(stamps)
            if first_ms is None or stamps[0] < first_ms:
                first_ms = stamps[0]
            last_ms = max(last_ms, stamps[-1])
        plan.first_ms = first_ms if first_ms is not None else int(start_s * 1000)
        plan.last_ms = last_ms
        self._floor_ms = max(self._floor_ms, last_ms)
        plan.generate_cpu_s = time.process_time() - cpu0
        return plan


# --- I/O shell: one asyncio.Protocol per connection ------------------------------------------------------------


class FleetError(RuntimeError):
    """The fleet could not connect or lost its broker."""


def raise_nofile_limit(needed: int) -> int:
    """Raise this process's open-file soft limit towards `needed` (up to the hard limit); returns the new limit.

    Children started afterwards (a broker) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


@dataclass(slots=True)
class FleetCounters:
    sent: int = 0
    acked: int = 0
    skipped: int = 0  # due while its vehicle was disconnected
    disconnects: int = 0
    protocol_errors: int = 0


class _Connection(asyncio.Protocol):
    __slots__ = ("_reader", "connack", "counters", "index", "last_write", "lost", "transport")

    def __init__(self, index: int, counters: FleetCounters, loop: asyncio.AbstractEventLoop) -> None:
        self.index = index
        self.counters = counters
        self.transport: asyncio.Transport | None = None
        self._reader = PacketReader()
        self.connack: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.last_write = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # Fast path: a run of PUBACKs (0x40 0x02 id id), which is nearly everything a publisher receives.
        n = len(data)
        if (
            n % 4 == 0
            and not self._reader.buffered
            and data[::4] == b"\x40" * (n // 4)
            and data[1::4] == b"\x02" * (n // 4)
        ):
            self.counters.acked += n // 4
            return
        try:
            packets = self._reader.feed(data)
        except MqttProtocolError as exc:
            self.counters.protocol_errors += 1
            log.error("broker sent a malformed packet; closing", extra={"vehicle": self.index, "error": str(exc)})
            if self.transport is not None:
                self.transport.close()
            return
        for ptype, _flags, body in packets:
            if ptype == PUBACK:
                self.counters.acked += 1
            elif ptype == CONNACK and not self.connack.done():
                try:
                    self.connack.set_result(parse_connack(body))
                except MqttProtocolError as exc:
                    self.connack.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(f"connection lost before CONNACK: {exc!r}"))
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, data: bytes, now: float) -> bool:
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(data)
        self.last_write = now
        return True


@dataclass
class StepResult:
    """What the fleet did in one plan: counts, send lag (actual − due) and its own CPU while sending."""

    messages: int
    samples: int
    sent: int
    acked: int
    skipped: int
    unacked: int
    send_seconds: float
    cpu_s: float
    lag_ms_p50: float
    lag_ms_p99: float
    lag_ms_max: float
    first_ms: int
    last_ms: int
    generate_cpu_s: float
    write_buffer_peak: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[k])


class ProtocolFleet:
    """The fleet's connections on the running event loop. `vehicles` VINs come from `fleet_vin`."""

    def __init__(
        self,
        vehicles: int,
        host: str,
        port: int,
        keepalive_s: int = 120,
        client_id_prefix: str = "vf-",
    ) -> None:
        self.vehicles = vehicles
        self.host, self.port = host, port
        self.keepalive_s = keepalive_s
        self.client_id_prefix = client_id_prefix
        self.tick_s = 0.002
        self.counters = FleetCounters()
        self._conns: list[_Connection | None] = [None] * vehicles
        self._pinger: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def connected(self) -> int:
        return sum(1 for c in self._conns if c is not None and c.transport is not None)

    async def _open(self, index: int, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(index, self.counters, loop)
        await asyncio.wait_for(loop.create_connection(lambda: conn, self.host, self.port), timeout)
        client_id = f"{self.client_id_prefix}{fleet_vin(index)}"
        conn.write(connect_packet(client_id, self.keepalive_s), time.monotonic())
        try:
            rc = await asyncio.wait_for(conn.connack, timeout)
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        if rc != 0:
            if conn.transport is not None:
                conn.transport.close()
            raise FleetError(f"broker refused vehicle {index}: CONNACK return code {rc}")
        conn.lost.add_done_callback(functools.partial(self._on_lost, index))
        return conn

    def _on_lost(self, index: int, _lost: asyncio.Future[None]) -> None:
        if self._closing:
            return
        self.counters.disconnects += 1
        self._conns[index] = None
        log.warning("vehicle connection lost", extra={"vehicle": index})

    async def connect(
        self, wave: int = 500, timeout: float = 30.0, progress: Callable[[int], None] | None = None
    ) -> float:
        """Open every connection, `wave` at a time (a listen backlog takes bursts, not 10,000 at once); returns the
        seconds it took. Raises FleetError if any vehicle cannot connect."""
        raise_nofile_limit(self.vehicles + 256)
        t0 = time.monotonic()
        for start in range(0, self.vehicles, wave):
            idx = range(start, min(self.vehicles, start + wave))
            results = await asyncio.gather(*(self._open(i, timeout) for i in idx), return_exceptions=True)
            failed = [(i, r) for i, r in zip(idx, results, strict=True) if isinstance(r, BaseException)]
            for i, r in zip(idx, results, strict=True):
                if isinstance(r, _Connection):
                    self._conns[i] = r
            if failed:
                i, exc = failed[0]
                raise FleetError(f"{len(failed)} of {len(idx)} vehicles failed to connect (first: {i}: {exc!r})")
            if progress is not None:
                progress(idx.stop)
        self._pinger = asyncio.create_task(self._keepalive(), name="fleet-keepalive")
        self._reconnector = asyncio.create_task(self._reconnect_loop(), name="fleet-reconnect")
        return time.monotonic() - t0

    async def _keepalive(self) -> None:
        # One timer for the whole fleet: a vehicle that wrote nothing for half its keepalive sends a PINGREQ.
        while True:
            await asyncio.sleep(self.keepalive_s / 4)
            now = time.monotonic()
            for c in self._conns:
                if c is not None and now - c.last_write > self.keepalive_s / 2:
                    c.write(PINGREQ_PACKET, now)

    async def _reconnect_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            for i, c in enumerate(self._conns):
                if c is None and not self._closing:
                    try:
                        self._conns[i] = await self._open(i, 10.0)
                    except (OSError, TimeoutError, FleetError) as exc:
                        log.warning("vehicle reconnect failed", extra={"vehicle": i, "error": repr(exc)})
                        break  # the broker is probably down: try again next round

    async def run_plan(self, plan: Plan, ack_timeout: float = 30.0, stop: asyncio.Event | None = None) -> StepResult:
        """Send the plan's packets at their due times (wall clock), then wait up to `ack_timeout` for the PUBACKs.

        Pacing is a token bucket refilled by the clock: each wake-up sends every message already due, then sleeps
        until the next is; a late wake-up sends the backlog at once rather than shifting the schedule."""
        counters = self.counters
        sent0, acked0, skipped0 = counters.sent, counters.acked, counters.skipped
        lags = array("f")
        cpu0 = time.process_time()
        wall0 = time.time()
        conns = self._conns
        due, vehicle, packets = plan.due, plan.vehicle, plan.packets
        n = len(packets)
        i = 0
        peak_buffer = 0
        next_buffer_check = 0.0
        while i < n:
            if stop is not None and stop.is_set():
                break
            now = time.time()
            mono = time.monotonic()
            while i < n and due[i] <= now:
                c = conns[vehicle[i]]
                if c is not None and c.write(packets[i], mono):
                    counters.sent += 1
                    lags.append(now - due[i])
                else:
                    counters.skipped += 1
                i += 1
            if i < n:
                # At least one tick between wake-ups: a wake-up per message would cost the loop more than the
                # message (≈ 40 µs at 3,000 msg/s); a tick sends the few due in it together, ≤ 2 ms late.
                await asyncio.sleep(max(due[i] - time.time(), self.tick_s))
                if mono >= next_buffer_check:
                    # Bytes the kernel did not take yet: grows when the broker cannot keep up. Summing 10,000
                    # transports costs ≈ 1 ms, so twice a second.
                    peak_buffer = max(peak_buffer, self._write_buffered())
                    next_buffer_check = mono + 0.5
        send_seconds = time.time() - wall0
        cpu = time.process_time() - cpu0
        sent = counters.sent - sent0
        await self.wait_acked(acked0 + sent, ack_timeout)
        sorted_lags = sorted(lags)
        return StepResult(
            messages=n,
            samples=plan.samples,
            sent=sent,
            acked=counters.acked - acked0,
            skipped=counters.skipped - skipped0,
            unacked=sent - (counters.acked - acked0),
            send_seconds=send_seconds,
            cpu_s=cpu,
            lag_ms_p50=_percentile(sorted_lags, 0.50) * 1000,
            lag_ms_p99=_percentile(sorted_lags, 0.99) * 1000,
            lag_ms_max=(sorted_lags[-1] * 1000) if sorted_lags else 0.0,
            first_ms=plan.first_ms,
            last_ms=plan.last_ms,
            generate_cpu_s=plan.generate_cpu_s,
            write_buffer_peak=peak_buffer,
        )

    async def wait_acked(self, target: int, timeout: float) -> bool:
        """Until the fleet's PUBACK count reaches `target` or `timeout` passes; True if it did."""
        deadline = time.monotonic() + timeout
        # Polls a counter: an Event set per PUBACK would cost every acknowledgement a wake-up instead.
        while self.counters.acked < target and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        return self.counters.acked >= target

    def _write_buffered(self) -> int:
        return sum(c.transport.get_write_buffer_size() for c in self._conns if c is not None and c.transport)

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        for task in (self._pinger, self._reconnector):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        waits = []
        for c in self._conns:
            if c is not None and c.transport is not None:
                c.transport.write(DISCONNECT_PACKET)
                c.transport.close()
                waits.append(c.lost)
        if waits:
            await asyncio.wait(waits, timeout=timeout)


# --- control shells --------------------------------------------------------------------------------------------


def _plan_lead_s(per_message_s: float, messages: int) -> float:
    """How far ahead of its first due time a plan is started: its generation time with a margin."""
    return 1.0 + 2.0 * per_message_s * messages


class _StdioChannel:
    """The bench's pipe to a fleet process: JSON-line commands on stdin, JSON-line events on stdout."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._loop = loop
        self._inbox = inbox
        self._buf = b""
        self._fd = sys.stdin.fileno()
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.close()
            self._inbox.put_nowait(None)
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            if line.strip():
                self._inbox.put_nowait(json.loads(line))

    def send(self, msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._fd)


async def _worker(vehicles: int, seed: int, boot: int, host: str, port: int) -> None:
    """Serves the bench's commands until "close" or EOF on stdin (see `_StdioChannel`).

    Commands: {"op": "connect", "wave": n} → {"op": "connected", "seconds", "vehicles"};
    {"op": "step", "rate", "duration_s", "kind", "inject"?} → {"op": "planned", "start_s", "first_ms", ...} then
    {"op": "step_done", "result": StepResult}; {"op": "close"} → {"op": "closed", "counters"}.
    Errors go back as {"op": "error", "error"} and end the worker.
    """
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=64)
    conn = _StdioChannel(loop, inbox)
    gen_cpu0 = time.process_time()
    generator = FleetGenerator(vehicles, seed=seed, boot=boot)
    conn.send({"op": "ready", "setup_cpu_s": time.process_time() - gen_cpu0})
    fleet = ProtocolFleet(vehicles, host, port)
    # Wall seconds per generated message: a cautious first guess (trace rows are computed on first use, the
    # machine may be busy), then what the previous plan took.
    per_message_s = 1e-3
    try:
        while True:
            try:
                cmd = await asyncio.wait_for(inbox.get(), timeout=3600)
            except TimeoutError:
                continue
            if cmd is None or cmd["op"] == "close":
                break
            if cmd["op"] == "connect":
                seconds = await fleet.connect(wave=int(cmd.get("wave", 500)))
                conn.send({"op": "connected", "seconds": seconds, "vehicles": fleet.connected})
            elif cmd["op"] == "step":
                rate, duration = float(cmd["rate"]), float(cmd["duration_s"])
                count = int(rate * duration)
                start = time.time() + _plan_lead_s(per_message_s, count)
                inject: dict[int, tuple[int, Mapping[str, Value]]] | None = None
                inject_from_ms = None
                if cmd.get("inject"):
                    # A fault with a known onset, `after_s` into the step: {"after_s", "vehicles", "values"}.
                    spec = cmd["inject"]
                    inject_from_ms = int((start + float(spec["after_s"])) * 1000)
                    inject = {int(i): (inject_from_ms, spec["values"]) for i in spec["vehicles"]}
                t_gen = time.monotonic()
                plan = generator.plan(
                    start,
                    duration,
                    rate,
                    kind=cmd.get("kind", "signed"),
                    inject=inject,
                    isolate=True,
                    active=cmd.get("vehicles"),
                )
                if count:
                    per_message_s = max(50e-6, (time.monotonic() - t_gen) / count)
                conn.send(
                    {
                        "op": "planned",
                        "start_s": start,
                        "late_s": max(0.0, time.time() - start),
                        "messages": len(plan),
                        "samples": plan.samples,
                        "first_ms": plan.first_ms,
                        "last_ms": plan.last_ms,
                        "generate_cpu_s": plan.generate_cpu_s,
                        "inject_from_ms": inject_from_ms,
                        "injected_sends": plan.injected_sends,
                    }
                )
                wait = start - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                result = await fleet.run_plan(plan, ack_timeout=float(cmd.get("ack_timeout", 30.0)))
                del plan
                conn.send({"op": "step_done", "result": result.as_dict()})
            else:
                raise FleetError(f"unknown fleet command {cmd['op']!r}")
    except Exception as exc:
        log.exception("fleet worker failed")
        with contextlib.suppress(OSError):
            conn.send({"op": "error", "error": repr(exc)})
    finally:
        conn.close()
        await fleet.close()
        with contextlib.suppress(OSError):
            conn.send({"op": "closed", "counters": dataclasses.asdict(fleet.counters)})


def worker_main(argv: Sequence[str] | None = None) -> None:
    """`python -m simulators.virtual_fleet --vehicles N --seed S --boot B --host H --port P`: the bench's fleet
    process (a subprocess, not multiprocessing: spawning would re-import the CLI's __main__)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boot", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_worker(args.vehicles, args.seed, args.boot, args.host, args.port))


async def run_standing_load(
    vehicles: int,
    rate: float,
    host: str,
    port: int,
    stop: asyncio.Event,
    seed: int = 0,
    boot: int = 1,
    kind: PayloadKind = "signed",
    duration_s: float | None = None,
    window_s: float = 0.2,
    report: Callable[[dict[str, Any]], None] | None = None,
    report_every_s: float = 10.0,
) -> FleetCounters:
    """Constant load until `stop` (or `duration_s`): short windows of `window_s` are generated about a second
    ahead of sending, on the same loop (one window at a time, so sending is never held up for more than one
    window's generation). At rates where generating (≈ 100 µs per message) plus sending exceeds a core, the send
    lag grows and `report` shows it."""
    generator = FleetGenerator(vehicles, seed=seed, boot=boot)
    fleet = ProtocolFleet(vehicles, host, port)
    await fleet.connect()
    log.info("protocol fleet connected", extra={"vehicles": vehicles})
    windows: asyncio.Queue[Plan] = asyncio.Queue(maxsize=max(2, int(1.0 / window_s)))
    t_end = None if duration_s is None else time.time() + duration_s

    async def producer() -> None:
        start = time.time() + 1.0
        while not stop.is_set() and (t_end is None or start < t_end):
            plan = generator.plan(start, window_s, rate, kind=kind)
            await windows.put(plan)
            start += window_s

    totals = {"sent": 0, "acked": 0, "cpu_s": 0.0, "lag_ms_p99": 0.0}
    last_report = time.monotonic()
    prod = asyncio.create_task(producer(), name="fleet-producer")
    try:
        while not stop.is_set():
            try:
                plan = await asyncio.wait_for(windows.get(), timeout=window_s * 4 + 5)
            except TimeoutError:
                if prod.done():
                    break
                continue
            res = await fleet.run_plan(plan, ack_timeout=0.0, stop=stop)
            totals["sent"] += res.sent
            totals["cpu_s"] += res.cpu_s + plan.generate_cpu_s
            totals["lag_ms_p99"] = max(totals["lag_ms_p99"], res.lag_ms_p99)
            if time.monotonic() - last_report >= report_every_s:
                snapshot = {
                    "sent": fleet.counters.sent,
                    "acked": fleet.counters.acked,
                    "skipped": fleet.counters.skipped,
                    "disconnects": fleet.counters.disconnects,
                    "connected": fleet.connected,
                    "cpu_s": totals["cpu_s"],
                    "lag_ms_p99": totals["lag_ms_p99"],
                }
                totals["lag_ms_p99"] = 0.0
                last_report = time.monotonic()
                if report is not None:
                    report(snapshot)
                log.info("protocol fleet", extra=snapshot)
            if prod.done() and windows.empty():
                break
        if prod.done() and prod.exception() is not None:
            raise FleetError("fleet generator failed") from prod.exception()
    finally:
        prod.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prod
        # Let the last PUBACKs in (bounded) so the counters say what the broker took.
        await fleet.wait_acked(fleet.counters.sent, 5.0)
        await fleet.close()
    return fleet.counters


if __name__ == "__main__":
    worker_main()
