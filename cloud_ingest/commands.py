"""The cloud half of the control plane: issuing signed commands, and recording acks and vehicle status.

- `CommandService.issue` validates a command (protocol.commands.check_args), signs it with the cloud key and puts
  the exact bytes in the outbox table `command_outbox` (state "pending"). A transport (the MQTT bridge) claims
  pending commands with a lease (`claim_pending` — several bridge workers never publish the same command at the same
  time), publishes them and reports the broker's answer: `mark_sent` after a successful PUBACK, `release` when the
  broker had no subscriber for it (the vehicle never connected, or its session expired) so it is retried until it
  expires.
- `ingest_control_many` takes what vehicles publish on ev/{vin}/cmd/ack and ev/{vin}/status: device envelopes,
  verified with the registry's key for (vin, key_id) like telemetry. An ack is recorded once, on the command it
  names, if that command was issued to the same vehicle. A status report replaces the stored one only if it is
  newer by `protocol.commands.status_order` — (boot, conn, offline, seq) — so an LWT sealed at connect time still
  supersedes the online reports of its connection, a redelivered or reordered report never rolls the state back,
  and status messages stay out of the (vin, boot, seq) replay ledger: they are state, not data, and their order
  is decided here.
- The cloud key lives in the data dir (`cloud_command.key`, 0600, created on first use); its public half is what
  vehicles install as their `cloud_key_file`.

Command states, derived when read: acked (an ack arrived, whatever its status) → expired (past expires_ms without
an ack) → sent (the broker took it for the vehicle's session) → pending.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter as TallyCounter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import (
    BigInteger,
    Boolean,
    Engine,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud_ingest.db import Base
from cloud_ingest.errors import IngestError, StorageError
from cloud_ingest.registry import KeyState, Registry
from protocol import DeviceKey, Kind, parse_envelope
from protocol.commands import (
    ArgValue,
    Command,
    CommandAck,
    StatusReport,
    check_args,
    decode_ack,
    decode_status,
    new_command_id,
    seal_command,
    status_order,
)
from protocol.errors import DecodeError, EncodeError, ProtocolError, SignatureError
from protocol.topics import Channel, validate_vin

log = logging.getLogger("zhilian.commands")

CLOUD_KEY_FILE = "cloud_command.key"
DEFAULT_TTL_S = 600
MAX_TTL_S = 7 * 86_400  # the agent's default horizon: a longer-lived command would be refused there
MAX_LIST = 1000
_MAX_IDENTITY = 2**63

CommandState = Literal["pending", "sent", "acked", "expired"]


class CommandError(IngestError):
    """A command that cannot be issued as asked (unknown vehicle, bad name or args, bad lifetime)."""


class UnknownVehicleError(CommandError):
    pass


class InvalidCommandError(CommandError):
    pass


# --- tables --------------------------------------------------------------------------------------------------


class CommandRow(Base):
    """The outbox: every issued command with its exact signed bytes, its delivery and its ack."""

    __tablename__ = "command_outbox"
    __table_args__ = (
        Index("ix_command_outbox_vin_issued", "vin", "issued_ms"),
        Index("ix_command_outbox_unsent", "sent_ms", "expires_ms"),
    )

    command_id: Mapped[str] = mapped_column(String(32), primary_key=True)  # hex of the 16-byte id
    vin: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(32))
    args_json: Mapped[str] = mapped_column(Text)
    issued_ms: Mapped[int] = mapped_column(BigInteger)
    expires_ms: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[str] = mapped_column(String(16))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    # Publishing lease: a transport that claimed the command; another may take it over after this time.
    claimed_until_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    sent_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    ack_status: Mapped[str | None] = mapped_column(String(16), default=None)
    ack_detail: Mapped[str | None] = mapped_column(String(200), default=None)
    acted_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    acked_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)


class VehicleStatusRow(Base):
    """The newest status report per vehicle, with its order key (boot, conn, offline, seq)."""

    __tablename__ = "vehicle_status"

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean)
    boot: Mapped[int] = mapped_column(BigInteger)
    conn: Mapped[int] = mapped_column(BigInteger)
    offline: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    received_ms: Mapped[int] = mapped_column(BigInteger)
    agent: Mapped[str] = mapped_column(String(64))
    metrics_json: Mapped[str] = mapped_column(Text)


# --- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandRecord:
    command_id: str
    vin: str
    name: str
    args: dict[str, ArgValue]
    issued_ms: int
    expires_ms: int
    state: CommandState
    attempts: int
    sent_ms: int | None
    ack_status: str | None
    ack_detail: str | None
    acted_ms: int | None
    acked_ms: int | None

    @classmethod
    def of(cls, row: CommandRow, now_ms: int) -> CommandRecord:
        state: CommandState
        if row.ack_status is not None:
            state = "acked"
        elif now_ms > row.expires_ms:
            state = "expired"
        elif row.sent_ms is not None:
            state = "sent"
        else:
            state = "pending"
        return cls(
            command_id=row.command_id,
            vin=row.vin,
            name=row.name,
            args=json.loads(row.args_json),
            issued_ms=row.issued_ms,
            expires_ms=row.expires_ms,
            state=state,
            attempts=row.attempts,
            sent_ms=row.sent_ms,
            ack_status=row.ack_status,
            ack_detail=row.ack_detail,
            acted_ms=row.acted_ms,
            acked_ms=row.acked_ms,
        )


@dataclass(frozen=True, slots=True)
class StatusRecord:
    vin: str
    online: bool
    boot: int
    conn: int
    seq: int
    created_ms: int
    received_ms: int
    agent: str
    metrics: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutgoingCommand:
    command_id: str
    vin: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class ControlResult:
    """What became of one status/ack message (the bridge's IngestResultLike)."""

    outcome: Literal["stored", "duplicate", "stale", "rejected"]
    reason: str | None


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


# --- cloud key -----------------------------------------------------------------------------------------------


def load_or_create_cloud_key(data_dir: str | Path) -> DeviceKey:
    """The cloud's command-signing key, created (0600) on first use; never replaced once it exists.

    Created under a temporary name and hard-linked into place, so two services starting together cannot end up
    holding different keys: the second link fails and that service loads the first one's key.
    """
    path = Path(data_dir) / CLOUD_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{CLOUD_KEY_FILE}.{os.getpid()}.{threading.get_ident()}")
        DeviceKey.generate().save(tmp)
        try:
            os.link(tmp, path)
            log.info("cloud command key created", extra={"path": str(path)})
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return DeviceKey.load(path)


# --- the service ---------------------------------------------------------------------------------------------


class CommandService:
    """Thread-safe: every call opens its own session (the API's threadpool and the bridge's threads share it)."""

    def __init__(
        self,
        engine: Engine,
        registry: Registry,
        key: DeviceKey,
        metrics: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.key = key
        self.clock = clock
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._tally: TallyCounter[str] = TallyCounter()
        reg = metrics if metrics is not None else CollectorRegistry()
        self._m_control = Counter(
            "zhilian_control_messages",
            "Status and command-ack messages from vehicles, by channel, outcome and rejection reason",
            ["channel", "outcome", "reason"],
            registry=reg,
        )
        self._m_issued = Counter("zhilian_commands_issued", "Commands issued", ["name"], registry=reg)

    @property
    def public_key(self) -> bytes:
        return self.key.public_raw

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Called (from whichever thread issued) after every new command: a transport's cue to publish now."""
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

    # -- issuing --------------------------------------------------------------------------------------------

    def issue(self, vin: str, name: str, args: Mapping[str, ArgValue], ttl_s: float = DEFAULT_TTL_S) -> CommandRecord:
        try:
            validate_vin(vin)
        except ProtocolError:
            raise UnknownVehicleError(f"unknown vehicle {vin!r}"[:200]) from None
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise InvalidCommandError(f"ttl_s must be 1..{MAX_TTL_S}")
        try:
            check_args(name, args)
        except ProtocolError as exc:
            raise InvalidCommandError(str(exc)) from None
        if self.registry.get_device(vin) is None:
            raise UnknownVehicleError(f"unknown vehicle {vin!r}")
        now = self._now_ms()
        cmd = Command(vin, new_command_id(), now, now + int(ttl_s * 1000), name, dict(args), self.key.key_id)
        try:
            payload = seal_command(cmd, self.key)
        except EncodeError as exc:
            raise InvalidCommandError(str(exc)) from None
        row = CommandRow(
            command_id=cmd.command_id.hex(),
            vin=vin,
            name=name,
            args_json=json.dumps(dict(args), sort_keys=True),
            issued_ms=cmd.issued_ms,
            expires_ms=cmd.expires_ms,
            key_id=self.key.key_id.hex(),
            payload=payload,
            attempts=0,
        )
        try:
            with self._session() as session, session.begin():
                session.add(row)
        except SQLAlchemyError as exc:
            raise StorageError(f"command outbox: {exc}") from exc
        self._m_issued.labels(name=name).inc()
        log.info("command issued", extra={"vin": vin, "command": name, "command_id": row.command_id})
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            try:
                callback()
            except Exception:
                log.exception("command listener failed")
        return CommandRecord.of(row, now)

    def list_commands(self, vin: str, limit: int = 100) -> list[CommandRecord]:
        """Newest first."""
        stmt = (
            select(CommandRow)
            .where(CommandRow.vin == vin)
            .order_by(CommandRow.issued_ms.desc(), CommandRow.command_id)
            .limit(max(1, min(limit, MAX_LIST)))
        )
        try:
            with self._session() as session:
                rows = list(session.scalars(stmt))
        except SQLAlchemyError as exc:
            raise StorageError(f"command outbox: {exc}") from exc
        now = self._now_ms()
        return [CommandRecord.of(r, now) for r in rows]

    def get(self, command_id: str) -> CommandRecord | None:
        try:
            with self._session() as session:
                row = session.get(CommandRow, command_id)
        except SQLAlchemyError as exc:
            raise StorageError(f"command outbox: {exc}") from exc
        return None if row is None else CommandRecord.of(row, self._now_ms())

    # -- transport ------------------------------------------------------------------------------------------

    def claim_pending(self, limit: int, lease_s: float) -> list[OutgoingCommand]:
        """Unsent, unexpired commands no other transport holds, oldest first; each now leased to the caller."""
        now = self._now_ms()
        candidates = (
            select(CommandRow.command_id, CommandRow.vin, CommandRow.payload)
            .where(
                CommandRow.sent_ms.is_(None),
                CommandRow.ack_status.is_(None),
                CommandRow.expires_ms > now,
                or_(CommandRow.claimed_until_ms.is_(None), CommandRow.claimed_until_ms < now),
            )
            .order_by(CommandRow.issued_ms)
            .limit(limit)
        )
        claimed: list[OutgoingCommand] = []
        try:
            with self._session() as session:
                found = session.execute(candidates).all()
            for command_id, vin, payload in found:
                # One conditional UPDATE per command: of several workers racing for it, exactly one wins.
                with self._session() as session, session.begin():
                    won = session.execute(
                        update(CommandRow)
                        .where(
                            CommandRow.command_id == command_id,
                            CommandRow.sent_ms.is_(None),
                            or_(CommandRow.claimed_until_ms.is_(None), CommandRow.claimed_until_ms < now),
                        )
                        .values(claimed_until_ms=now + int(lease_s * 1000), attempts=CommandRow.attempts + 1)
                    ).rowcount  # type: ignore[attr-defined]
                if won == 1:
                    claimed.append(OutgoingCommand(command_id, vin, payload))
        except SQLAlchemyError as exc:
            raise StorageError(f"command outbox: {exc}") from exc
        return claimed

    def mark_sent(self, command_id: str) -> None:
        self._update(command_id, sent_ms=self._now_ms(), claimed_until_ms=None)

    def release(self, command_id: str, retry_in_s: float) -> None:
        """Not delivered (no subscriber, refused): eligible again after `retry_in_s`."""
        self._update(command_id, claimed_until_ms=self._now_ms() + int(retry_in_s * 1000))

    def _update(self, command_id: str, **values: Any) -> None:
        try:
            with self._session() as session, session.begin():
                session.execute(update(CommandRow).where(CommandRow.command_id == command_id).values(**values))
        except SQLAlchemyError as exc:
            raise StorageError(f"command outbox: {exc}") from exc

    # -- from vehicles --------------------------------------------------------------------------------------

    def ingest_control_many(self, items: Sequence[tuple[str | None, Channel, bytes]]) -> list[ControlResult]:
        """Status reports and acks as received on their topics; one result per item, in order.

        Raises StorageError when the database failed: then nothing of `items` may be acknowledged to the broker.
        """
        return [self._ingest_one(claimed_vin, channel, raw) for claimed_vin, channel, raw in items]

    def _ingest_one(self, claimed_vin: str | None, channel: Channel, raw: bytes) -> ControlResult:
        try:
            env, body = self._authenticate(claimed_vin, channel, raw)
            if channel is Channel.STATUS:
                try:
                    report = decode_status(body)
                except DecodeError as exc:
                    raise _Rejected("bad_body", str(exc)) from None
                result = self._store_status(env.vin, env.boot, env.seq, env.created_ms, report)
            else:
                try:
                    ack = decode_ack(body)
                except DecodeError as exc:
                    raise _Rejected("bad_body", str(exc)) from None
                result = self._store_ack(env.vin, ack)
        except _Rejected as rej:
            log.warning(
                "control message rejected",
                extra={"channel": channel.value, "reason": rej.reason, "vin": claimed_vin, "detail": str(rej)[:200]},
            )
            result = ControlResult("rejected", rej.reason)
        self._m_control.labels(channel=channel.value, outcome=result.outcome, reason=result.reason or "").inc()
        with self._lock:
            self._tally[f"{channel.value}:{result.outcome}" + (f":{result.reason}" if result.reason else "")] += 1
        return result

    def _authenticate(self, claimed_vin: str | None, channel: Channel, raw: bytes) -> tuple[Any, bytes]:
        if channel not in (Channel.STATUS, Channel.CMD_ACK):
            raise _Rejected("wrong_channel", channel.value)
        try:
            signed = parse_envelope(bytes(raw))
        except DecodeError as exc:
            raise _Rejected(exc.reason, str(exc)) from None
        env = signed.envelope
        if env.boot >= _MAX_IDENTITY or env.seq >= _MAX_IDENTITY:
            raise _Rejected("malformed", "boot/seq beyond 2^63")
        if claimed_vin is not None and claimed_vin != env.vin:
            raise _Rejected("vin_mismatch", f"topic says {claimed_vin!r}, envelope says {env.vin!r}")
        found = self.registry.lookup_key(env.vin, env.key_id)
        if found.state is not KeyState.ACTIVE or found.public_key is None:
            raise _Rejected(found.state.value, f"{env.vin} key {env.key_id.hex()}")
        try:
            signed.verify(found.public_key)
        except SignatureError as exc:
            raise _Rejected("bad_signature", str(exc)) from None
        expected = Kind.STATUS if channel is Channel.STATUS else Kind.COMMAND_ACK
        if env.kind is not expected:
            raise _Rejected("wrong_kind", f"{env.kind.name} on {channel.value}")
        return env, env.body

    def _store_status(self, vin: str, boot: int, seq: int, created_ms: int, report: StatusReport) -> ControlResult:
        order = status_order(boot, seq, report)
        values = {
            "online": report.online,
            "boot": order[0],
            "conn": order[1],
            "offline": order[2],
            "seq": order[3],
            "created_ms": created_ms,
            "received_ms": self._now_ms(),
            "agent": report.agent,
            "metrics_json": json.dumps(dict(report.metrics), sort_keys=True),
        }
        key = tuple_(VehicleStatusRow.boot, VehicleStatusRow.conn, VehicleStatusRow.offline, VehicleStatusRow.seq)
        for _ in range(3):
            try:
                with self._session() as session, session.begin():
                    # Write first (a conditional UPDATE takes SQLite's write lock before anything is read).
                    moved = session.execute(
                        update(VehicleStatusRow)
                        .where(VehicleStatusRow.vin == vin, key < tuple_(*order))
                        .values(**values)
                    ).rowcount  # type: ignore[attr-defined]
                    if moved:
                        return ControlResult("stored", None)
                    current = session.get(VehicleStatusRow, vin)
                    if current is None:
                        session.add(VehicleStatusRow(vin=vin, **values))
                        return ControlResult("stored", None)
                stored = (current.boot, current.conn, current.offline, current.seq)
                return ControlResult("duplicate" if stored == order else "stale", None)
            except IntegrityError:
                continue  # another worker stored this vehicle's first status meanwhile: compare again
            except SQLAlchemyError as exc:
                raise StorageError(f"vehicle status: {exc}") from exc
        raise StorageError("vehicle status update did not converge")

    def _store_ack(self, vin: str, ack: CommandAck) -> ControlResult:
        command_id = ack.command_id.hex()
        try:
            with self._session() as session, session.begin():
                moved = session.execute(
                    update(CommandRow)
                    .where(CommandRow.command_id == command_id, CommandRow.vin == vin, CommandRow.ack_status.is_(None))
                    .values(
                        ack_status=ack.status.value,
                        ack_detail=ack.detail[:200],
                        acted_ms=min(ack.acted_ms, _MAX_IDENTITY - 1),
                        acked_ms=self._now_ms(),
                        claimed_until_ms=None,
                    )
                ).rowcount  # type: ignore[attr-defined]
                if moved:
                    log.info("command acked", extra={"vin": vin, "command_id": command_id, "status": ack.status.value})
                    return ControlResult("stored", None)
                row = session.get(CommandRow, command_id)
        except SQLAlchemyError as exc:
            raise StorageError(f"command outbox: {exc}") from exc
        if row is None:
            raise _Rejected("unknown_command", command_id)
        if row.vin != vin:
            raise _Rejected("misaddressed_ack", f"command {command_id} was issued to {row.vin}")
        return ControlResult("duplicate", None)

    def latest_status(self, vin: str) -> StatusRecord | None:
        try:
            with self._session() as session:
                row = session.get(VehicleStatusRow, vin)
        except SQLAlchemyError as exc:
            raise StorageError(f"vehicle status: {exc}") from exc
        if row is None:
            return None
        return StatusRecord(
            vin=row.vin,
            online=row.online,
            boot=row.boot,
            conn=row.conn,
            seq=row.seq,
            created_ms=row.created_ms,
            received_ms=row.received_ms,
            agent=row.agent,
            metrics=json.loads(row.metrics_json),
        )

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._tally)
