"""Alarm notifications to the MQTT northbound topic: the PUBACK-confirmed publish function `MqttSink` delivers
through (cloud_ingest/notify.py), on a paho-mqtt client of its own.

- Called from the notifier's dispatcher thread, never from an event loop, so it may block (always with a
  timeout). paho runs the connection in its own network thread (`loop_start`): it connects, and reconnects with
  exponential backoff (`reconnect_min_s` doubling up to `reconnect_max_s`) for as long as the publisher is open.
  A broker that is down at start is not an error: notifications wait in the durable outbox meanwhile.
- MQTT 5 and QoS 1. A broker that refuses protocol version 5 (CONNACK "Unsupported protocol version", which is
  also how a 3.1.1-only broker's refusal reads) gets MQTT 3.1.1 from then on.
- `publish(topic, payload, timeout_s)` returns once the broker acknowledged the message, and raises DeliveryError
  when no connection came up within the timeout, when the broker refused it (an MQTT 5 PUBACK reason code of 0x80
  or more, e.g. 0x87 Not authorized: the broker's ACL), or when no PUBACK came in time. The outbox then retries
  the row. A message whose PUBACK was lost may still have reached the broker, and paho resends unacknowledged
  messages after a reconnect: consumers get at-least-once delivery and drop repeats by the body's
  (`alarm.id`, `alarm.version`, `event`), the same bytes every time.
- Identity: with TLS, the client certificate's CN is the MQTT username the broker's ACL sees; deployed, it is the
  bridge's own (`zhilian-bridge`), which deploy/mosquitto/acl lets write `north/#`. The client id,
  `zhilian-north-<host>-<pid>`, never collides with the bridge's, so it does not take over the bridge's session.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge

from cloud_ingest.notify import DeliveryError, NotifyConfigError
from protocol.tls import optional_client_context

log = logging.getLogger("zhilian.north")

UNSUPPORTED_PROTOCOL_VERSION = 0x84  # CONNACK reason; paho also reports a 3.1.1 broker's refusal (rc 1) as this
# Messages paho holds for a later (re)send: only ever those whose PUBACK timed out, as `publish` sends only while
# connected; the bound keeps a broker that never acknowledges from growing it without limit.
MAX_QUEUED = 1000
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)$")


def parse_broker_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT` → (host, port); anything else is a NotifyConfigError saying why."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise NotifyConfigError(f"MQTT broker address must be HOST:PORT, not {text!r}")
    if not _HOST.match(host):
        raise NotifyConfigError(f"MQTT broker host {host!r} is not a host name or IP address")
    number = int(port)
    if not 0 < number < 65536:
        raise NotifyConfigError(f"MQTT broker port {number} is outside 1..65535")
    return host.removeprefix("[").removesuffix("]"), number


def default_client_id() -> str:
    return f"zhilian-north-{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class NorthMqttConfig:
    """Where the northbound publisher connects and as whom (TLS: all three files or none)."""

    host: str
    port: int
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_id: str | None = None  # default: zhilian-north-<hostname>-<pid>
    keepalive_s: int = 30
    reconnect_min_s: int = 1  # paho's reconnect backoff, whole seconds
    reconnect_max_s: int = 30

    def __post_init__(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            raise NotifyConfigError(f"bad northbound MQTT broker {self.host!r}:{self.port}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise NotifyConfigError("reconnect backoff must satisfy 0 < min <= max")
        if self.keepalive_s < 5:
            raise NotifyConfigError("keepalive_s must be at least 5")


class NorthPublisher:
    """One MQTT connection that publishes alarm notifications; `publish` is an `MqttPublish` (notify.py)."""

    def __init__(self, config: NorthMqttConfig, metrics: CollectorRegistry | None = None) -> None:
        # Built here, so a missing or world-readable TLS file fails at start (TlsConfigError), not at the first alarm.
        self._tls: ssl.SSLContext | None = optional_client_context(config.tls_ca, config.tls_cert, config.tls_key)
        self.config = config
        self.client_id = config.client_id or default_client_id()
        self.protocol = MQTTProtocolVersion.MQTTv5
        self._lock = threading.Lock()  # guards _client and the PUBACK reason codes
        self._connected = threading.Event()
        self._closing = False
        # mid → PUBACK reason code, popped by the publish waiting on it (a late PUBACK's entry is overwritten when
        # paho reuses its mid: at most 65,535 entries).
        self._acks: dict[int, int] = {}
        self._client = self._new_client()
        reg = metrics if metrics is not None else CollectorRegistry()
        self._m_connected = Gauge(
            "zhilian_north_connected", "1 while the northbound publisher is connected", registry=reg
        )
        self._m_connects = Counter("zhilian_north_connects", "northbound publisher connections made", registry=reg)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> NorthPublisher:
        """Connect in paho's network thread (non-blocking); it reconnects by itself until `close`."""
        with self._lock:
            self._start(self._client)
        return self

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol)
        if self._tls is not None:
            client.tls_set_context(self._tls)
        client.reconnect_delay_set(min_delay=self.config.reconnect_min_s, max_delay=self.config.reconnect_max_s)
        client.max_queued_messages_set(MAX_QUEUED)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _start(self, client: mqtt.Client) -> None:
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            client.connect_async(self.config.host, self.config.port, self.config.keepalive_s, clean_start=True)
        else:
            client.connect_async(self.config.host, self.config.port, self.config.keepalive_s)
        client.loop_start()

    # -- paho callbacks (network thread) -------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if client is not self._client:
            return
        if not reason.is_failure:
            self._connected.set()
            self._m_connected.set(1)
            self._m_connects.inc()
            log.info(
                "northbound publisher connected",
                extra={"host": self.config.host, "port": self.config.port, "protocol": self.protocol.name},
            )
            return
        if reason.value == UNSUPPORTED_PROTOCOL_VERSION and self.protocol == MQTTProtocolVersion.MQTTv5:
            log.warning("broker refused MQTT 5; falling back to 3.1.1", extra={"host": self.config.host})
            # The protocol is fixed per paho client, and this thread cannot stop its own loop: a new client, from a
            # thread of its own.
            threading.Thread(target=self._downgrade, name="zhilian-north-downgrade", daemon=True).start()
            return
        log.warning("northbound publisher refused by the broker", extra={"reason": str(reason)})

    def _on_connect_fail(self, client: mqtt.Client, _u: Any) -> None:
        if client is self._client and not self._closing:
            log.warning(
                "northbound publisher cannot reach the broker; retrying",
                extra={"host": self.config.host, "port": self.config.port},
            )

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if client is not self._client:
            return
        self._connected.clear()
        self._m_connected.set(0)
        if not self._closing:
            log.warning("northbound publisher lost the broker; reconnecting", extra={"reason": str(reason)})

    def _on_publish(self, client: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        # Before paho marks the message published, so the waiting `publish` always finds its code here.
        with self._lock:
            if client is self._client:
                self._acks[mid] = reason.value

    def _downgrade(self) -> None:
        with self._lock:
            if self._closing or self.protocol != MQTTProtocolVersion.MQTTv5:
                return
            old = self._client
            self.protocol = MQTTProtocolVersion.MQTTv311
            self._client = self._new_client()
            self._acks.clear()
        old.disconnect()
        old.loop_stop()
        with self._lock:
            if not self._closing:
                self._start(self._client)

    # -- MqttPublish (the notifier's dispatcher thread) ----------------------------------------------------------

    def publish(self, topic: str, payload: bytes, timeout_s: float) -> None:
        """QoS 1; returns once the broker acknowledged, raises DeliveryError otherwise (see the module docstring)."""
        deadline = time.monotonic() + timeout_s
        if not self._connected.wait(timeout_s):
            raise DeliveryError(f"not connected to MQTT broker {self.config.host}:{self.config.port}")
        with self._lock:
            client = self._client
        info = client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise DeliveryError(f"MQTT publish: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise DeliveryError(f"MQTT publish: {exc}") from exc
        if not info.is_published():
            raise DeliveryError(f"no PUBACK from {self.config.host}:{self.config.port} within {timeout_s} s")
        with self._lock:
            code = self._acks.pop(info.mid, 0)
        if code >= 0x80:
            raise DeliveryError(
                f"broker refused the message on {topic}: {ReasonCode(PacketTypes.PUBACK, identifier=code)}"
            )

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread (paho's loop wakes at least once a second)."""
        with self._lock:
            self._closing = True
            client = self._client
        client.disconnect()
        client.loop_stop()
        self._connected.clear()
        self._m_connected.set(0)
