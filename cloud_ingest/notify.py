"""Alarm notifications: a durable outbox table, delivered to a webhook and/or an MQTT northbound topic.

- `Notifier.enqueue(session, vin, event, payload)` runs inside the transaction that changed the alarm (the ingest
  commit, an operator's transition, a deadline escalation) and writes one `alarm_outbox` row per configured channel.
  A notification therefore exists exactly when its alarm change committed, and a restart loses none: delivery
  resumes from the table.
- One dispatcher thread per channel claims due rows with a lease (several processes may dispatch the same outbox;
  a conditional UPDATE decides who takes a row), delivers them oldest first and settles each: `delivered`; or,
  after a failure, retried with exponential backoff and jitter (`backoff_base_s` · 2^(attempt-1), at most
  `backoff_max_s`) until `max_attempts` → `failed`. A failing row does not hold back the rows behind it, so a
  receiver may see notifications of one alarm out of order: the payload's `alarm.version` orders them.
- Bounded: when more than `max_pending` rows of a channel wait, the oldest are marked `dropped` (counted, logged) —
  the outbox cannot grow without limit while a receiver is down for days.
- Webhook: HTTP POST of the stored JSON body, `Content-Type: application/json`, `X-Zhilian-Signature: <hex
  HMAC-SHA256(secret, body)>` over the exact bytes sent, `X-Zhilian-Delivery: <outbox id>` (the same on every retry,
  so a receiver can drop duplicates), `X-Zhilian-Event`. Any 2xx is success.
- MQTT: `MqttSink` publishes the same JSON body (no signature: the broker's TLS and ACL vouch for the sender, as
  only the cloud's identity may write `north/#`) through a PUBACK-confirmed publish function — the northbound
  publisher's (cloud_ingest/north_mqtt.py), or any caller's own connection; the topic is `north/alarms/{vin}` by
  default. At-least-once: a consumer drops repeats by (`alarm.id`, `alarm.version`, `event`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import BigInteger, CheckConstraint, Engine, Index, Integer, String, Text, func, or_, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud_ingest.db import SQLITE_BEGIN_OPTION, Base
from cloud_ingest.errors import IngestError, StorageError

log = logging.getLogger("zhilian.notify")

SIGNATURE_HEADER = "X-Zhilian-Signature"
DELIVERY_HEADER = "X-Zhilian-Delivery"
EVENT_HEADER = "X-Zhilian-Event"
WEBHOOK = "webhook"
MQTT = "mqtt"
DEFAULT_MQTT_TOPIC = "north/alarms/{vin}"
_MAX_ERROR = 200
_PENDING_KEY = "zhilian.notify.pending"  # Session.info: rows this transaction enqueued
_HOOKED_KEY = "zhilian.notify.hooked"


class NotifyConfigError(IngestError):
    """Notification settings that cannot work (no secret for a webhook, a non-positive bound ...)."""


class DeliveryError(IngestError):
    """One delivery attempt failed (the row is retried later)."""


class OutboxRow(Base):
    __tablename__ = "alarm_outbox"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'failed', 'dropped')", name="ck_alarm_outbox_state"),
        Index("ix_alarm_outbox_pending", "channel", "state", "next_attempt_ms"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(16))
    vin: Mapped[str] = mapped_column(String(32))
    event: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(12), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_ms: Mapped[int] = mapped_column(BigInteger)
    # Delivery lease: a dispatcher that claimed the row; another may take it over after this time.
    claimed_until_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    done_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    last_error: Mapped[str | None] = mapped_column(String(_MAX_ERROR), default=None)


def signature(secret: bytes, body: bytes) -> str:
    """The X-Zhilian-Signature value: hex HMAC-SHA256 of the exact body bytes."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


class Sink(Protocol):
    """A delivery channel: `deliver` returns when the receiver took the notification, raises DeliveryError if not."""

    @property
    def channel(self) -> str: ...

    def deliver(self, delivery_id: int, vin: str, event: str, body: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str
    secret: bytes
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise NotifyConfigError(f"webhook URL must be http(s): {self.url!r}")
        if not self.secret:
            raise NotifyConfigError("a webhook needs a non-empty secret (its receiver verifies the HMAC)")
        if not 0 < self.timeout_s <= 120:
            raise NotifyConfigError("webhook timeout must be in (0, 120] s")


class WebhookSink:
    channel = WEBHOOK

    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self._client = httpx.Client(timeout=config.timeout_s, follow_redirects=False)

    def deliver(self, delivery_id: int, vin: str, event: str, body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(self.config.secret, body),
            DELIVERY_HEADER: str(delivery_id),
            EVENT_HEADER: event,
        }
        try:
            response = self._client.post(self.config.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        if not 200 <= response.status_code < 300:
            raise DeliveryError(f"HTTP {response.status_code}")

    def close(self) -> None:
        self._client.close()


# (topic, payload, timeout_s): returns once the broker took the message (PUBACK), raises on failure or timeout.
MqttPublish = Callable[[str, bytes, float], None]


def check_topic_template(topic: str) -> str:
    """A northbound topic template: `{vin}` once or more, no other field, no wildcard, no empty level."""
    if "{vin}" not in topic:
        raise NotifyConfigError(f"the northbound topic must contain {{vin}}: {topic!r}")
    try:
        sample = topic.format(vin="LZHEB0A12P0000001")
    except (KeyError, IndexError, ValueError) as exc:
        raise NotifyConfigError(f"northbound topic {topic!r}: only {{vin}} may be substituted ({exc})") from None
    if any(c in sample for c in "+#\0") or sample.startswith("$") or "" in sample.split("/"):
        raise NotifyConfigError(f"northbound topic {topic!r}: no wildcards, no leading $, no empty levels")
    return topic


class MqttSink:
    channel = MQTT

    def __init__(self, publish: MqttPublish, topic: str = DEFAULT_MQTT_TOPIC, timeout_s: float = 10.0) -> None:
        check_topic_template(topic)
        self._publish = publish
        self.topic = topic
        self.timeout_s = timeout_s

    def deliver(self, delivery_id: int, vin: str, event: str, body: bytes) -> None:
        try:
            self._publish(self.topic.format(vin=vin), body, self.timeout_s)
        except DeliveryError:
            raise
        except Exception as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    max_attempts: int = 10
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    max_pending: int = 10_000  # per channel; beyond it the oldest pending rows are dropped
    batch: int = 50
    poll_interval_s: float = 1.0
    lease_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.max_pending < 1 or self.batch < 1:
            raise NotifyConfigError("max_attempts, max_pending and batch must be positive")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise NotifyConfigError("backoff must satisfy 0 < base <= max")
        if not 0.01 <= self.poll_interval_s <= 60:
            raise NotifyConfigError("poll_interval_s must be in [0.01, 60]")
        if self.lease_s <= 0:
            raise NotifyConfigError("lease_s must be positive")

    def backoff_ms(self, attempts: int) -> int:
        """Delay before the attempt after `attempts` failed ones: exponential, capped, with ±20 % jitter."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(attempts - 1, 30))
        return int(delay * random.uniform(0.8, 1.2) * 1000)


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: int
    vin: str
    event: str
    body: str
    attempts: int


def _now_ms() -> int:
    return int(time.time() * 1000)


class Notifier:
    """Owns the outbox: enqueue inside alarm transactions, dispatch from one supervised thread per sink."""

    def __init__(
        self,
        engine: Engine,
        sinks: Sequence[Sink] = (),
        config: NotifyConfig | None = None,
        metrics: CollectorRegistry | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        self.config = config or NotifyConfig()
        self.sinks: dict[str, Sink] = {}
        for sink in sinks:
            if sink.channel in self.sinks:
                raise NotifyConfigError(f"two sinks for channel {sink.channel}")
            self.sinks[sink.channel] = sink
        self.clock = clock if clock is not None else _now_ms
        reg = metrics if metrics is not None else CollectorRegistry()
        self._m = {
            outcome: Counter(f"zhilian_notify_{outcome}", f"alarm notifications {outcome}", ["channel"], registry=reg)
            for outcome in ("enqueued", "delivered", "retried", "failed", "dropped")
        }
        self._m_loop_errors = Counter(
            "zhilian_notify_dispatch_errors", "dispatcher rounds that failed (storage unavailable)", registry=reg
        )
        self._lock = threading.Lock()
        self.counts: dict[str, dict[str, int]] = {c: dict.fromkeys(self._m, 0) for c in self.sinks}
        self._wake = {c: threading.Event() for c in self.sinks}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.sinks)

    # -- producer side (inside the caller's transaction) ---------------------------------------------------------

    def enqueue(self, session: Session, vin: str, event: str, payload: Mapping[str, Any]) -> None:
        if not self.sinks:
            return
        now = self.clock()
        body = json.dumps({"event": event, "vin": vin, "at_ms": now, **payload}, sort_keys=True, allow_nan=False)
        for channel in self.sinks:
            session.add(
                OutboxRow(
                    channel=channel,
                    vin=vin,
                    event=event,
                    body=body,
                    created_ms=now,
                    state="pending",
                    attempts=0,
                    next_attempt_ms=now,
                )
            )
        if not session.info.get(_HOOKED_KEY):
            session.info[_HOOKED_KEY] = True
            # Counted, and the dispatchers woken, once the rows are visible to them. Not `once`: SQLAlchemy fires
            # after_commit for SAVEPOINTs too, and only the outermost commit counts.
            sa_event.listen(session, "after_commit", self._committed)
        session.info[_PENDING_KEY] = session.info.get(_PENDING_KEY, 0) + 1

    def _committed(self, session: Session) -> None:
        if session.in_nested_transaction():
            return
        n = session.info.pop(_PENDING_KEY, 0)
        for channel in self.sinks:
            self._count(channel, "enqueued", n)
            self._wake[channel].set()

    # -- dispatcher side -----------------------------------------------------------------------------------------

    def dispatch_once(self, channel: str) -> int:
        """Enforce the bound, then claim and deliver one batch of due rows; returns how many were attempted."""
        sink = self.sinks[channel]
        self._enforce_bound(channel)
        claimed = self._claim(channel)
        for row in claimed:
            try:
                sink.deliver(row.id, row.vin, row.event, row.body.encode("utf-8"))
            except DeliveryError as exc:
                self._settle_failure(channel, row, str(exc))
            else:
                self._settle(row.id, state="delivered", done_ms=self.clock(), claimed_until_ms=None, last_error=None)
                self._count(channel, "delivered")
        return len(claimed)

    def pending(self, channel: str) -> int:
        try:
            with Session(self.engine) as session:
                return (
                    session.scalar(
                        select(func.count())
                        .select_from(OutboxRow)
                        .where(OutboxRow.channel == channel, OutboxRow.state == "pending")
                    )
                    or 0
                )
        except SQLAlchemyError as exc:
            raise StorageError(f"notification outbox: {exc}") from exc

    def _claim(self, channel: str) -> list[_Claimed]:
        now = self.clock()
        due = (
            select(OutboxRow.id)
            .where(
                OutboxRow.channel == channel,
                OutboxRow.state == "pending",
                OutboxRow.next_attempt_ms <= now,
                or_(OutboxRow.claimed_until_ms.is_(None), OutboxRow.claimed_until_ms < now),
            )
            .order_by(OutboxRow.id)
            .limit(self.config.batch)
        )
        try:
            # Looked up outside a write transaction: an idle poll must not take SQLite's write lock.
            with Session(self.engine) as session:
                ids = list(session.scalars(due))
            if not ids:
                return []
            with Session(self._write_engine) as session, session.begin():
                # Conditional: of several dispatchers racing for a row, one wins (RETURNING says which).
                won = session.execute(
                    update(OutboxRow)
                    .where(
                        OutboxRow.id.in_(ids),
                        OutboxRow.state == "pending",
                        or_(OutboxRow.claimed_until_ms.is_(None), OutboxRow.claimed_until_ms < now),
                    )
                    .values(claimed_until_ms=now + int(self.config.lease_s * 1000), attempts=OutboxRow.attempts + 1)
                    .returning(OutboxRow.id, OutboxRow.vin, OutboxRow.event, OutboxRow.body, OutboxRow.attempts)
                ).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"notification outbox: {exc}") from exc
        return sorted((_Claimed(*r) for r in won), key=lambda c: c.id)

    def _settle_failure(self, channel: str, row: _Claimed, error: str) -> None:
        if row.attempts >= self.config.max_attempts:
            self._settle(row.id, state="failed", done_ms=self.clock(), claimed_until_ms=None, last_error=error)
            self._count(channel, "failed")
            log.error(
                "alarm notification failed for good",
                extra={"channel": channel, "delivery_id": row.id, "attempts": row.attempts, "error": error},
            )
            return
        delay = self.config.backoff_ms(row.attempts)
        self._settle(row.id, next_attempt_ms=self.clock() + delay, claimed_until_ms=None, last_error=error[:_MAX_ERROR])
        self._count(channel, "retried")
        log.warning(
            "alarm notification not delivered; retrying",
            extra={
                "channel": channel,
                "delivery_id": row.id,
                "attempt": row.attempts,
                "delay_ms": delay,
                "error": error,
            },
        )

    def _settle(self, row_id: int, **values: Any) -> None:
        if isinstance(values.get("last_error"), str):
            values["last_error"] = values["last_error"][:_MAX_ERROR]
        try:
            with Session(self._write_engine) as session, session.begin():
                session.execute(update(OutboxRow).where(OutboxRow.id == row_id).values(**values))
        except SQLAlchemyError as exc:
            raise StorageError(f"notification outbox: {exc}") from exc

    def _enforce_bound(self, channel: str) -> None:
        limit = self.config.max_pending
        if self.pending(channel) <= limit:
            return
        try:
            with Session(self._write_engine) as session, session.begin():
                waiting = (
                    session.scalar(
                        select(func.count())
                        .select_from(OutboxRow)
                        .where(OutboxRow.channel == channel, OutboxRow.state == "pending")
                    )
                    or 0
                )
                if waiting <= limit:
                    return
                oldest = list(
                    session.scalars(
                        select(OutboxRow.id)
                        .where(OutboxRow.channel == channel, OutboxRow.state == "pending")
                        .order_by(OutboxRow.id)
                        .limit(waiting - limit)
                    )
                )
                session.execute(
                    update(OutboxRow)
                    .where(OutboxRow.id.in_(oldest), OutboxRow.state == "pending")
                    .values(state="dropped", done_ms=self.clock(), claimed_until_ms=None)
                )
        except SQLAlchemyError as exc:
            raise StorageError(f"notification outbox: {exc}") from exc
        self._count(channel, "dropped", len(oldest))
        log.error(
            "alarm notification outbox over its bound; oldest dropped",
            extra={"channel": channel, "dropped": len(oldest), "max_pending": limit},
        )

    def _count(self, channel: str, outcome: str, n: int = 1) -> None:
        if n <= 0:
            return
        self._m[outcome].labels(channel=channel).inc(n)
        with self._lock:
            self.counts[channel][outcome] += n

    # -- threads -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """One dispatcher thread per sink; each survives storage and delivery errors (logged, counted)."""
        if self._threads:
            return
        self._stop.clear()
        for channel in self.sinks:
            t = threading.Thread(target=self._run, args=(channel,), name=f"zhilian-notify-{channel}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self, channel: str) -> None:
        wake = self._wake[channel]
        failures = 0
        while not self._stop.is_set():
            wake.clear()
            try:
                busy = self.dispatch_once(channel) >= self.config.batch
                failures = 0
            except Exception:
                # Supervision: a storage outage (or a bug) must not end delivery for good; back off and go on.
                failures += 1
                self._m_loop_errors.inc()
                log.exception("notification dispatcher round failed", extra={"channel": channel})
                busy = False
            if busy:
                continue
            timeout = self.config.poll_interval_s * min(2**failures, 30)
            wake.wait(timeout)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        for e in self._wake.values():
            e.set()
        for t in self._threads:
            t.join(timeout_s)
            if t.is_alive():
                log.error("notification dispatcher did not stop in time", extra={"thread": t.name})
        self._threads.clear()

    def close(self) -> None:
        self.stop()
        for sink in self.sinks.values():
            try:
                sink.close()
            except Exception:
                log.exception("closing a notification sink failed", extra={"channel": sink.channel})
