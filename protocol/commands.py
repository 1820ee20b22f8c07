"""Control plane v1: signed commands (cloud → vehicle), command acks and status reports (vehicle → cloud).

Wire forms (see firmware_specs/COMMANDS.md):

    command = [signed: bin, signature: bin(64)]
    signed  = msgpack ["cmd", version, vin, command_id: bin(16), issued_ms, expires_ms, name, args: map, key_id: bin(8)]

The signature is the cloud key's Ed25519 signature over `signed` exactly as sent (no re-serialisation), like the
envelope's. The leading "cmd" tag separates the domain: no envelope or other structure signed by some key can be
mistaken for a command. Acks and status reports travel in ordinary device envelopes (kinds COMMAND_ACK and STATUS);
this module only defines their bodies.

Parsing is split from checking: `parse_command` knows the wire layout only, `SignedCommand.verify` the keys, and
`check_args` the command vocabulary — a newer cloud may send names an older agent does not know, and the agent
must tell "unknown command" from "garbage".
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol import ed25519, signing
from protocol.errors import DecodeError, EncodeError, ProtocolError, SignatureError
from protocol.signed_frame import SignedFrame
from protocol.topics import validate_vin

COMMAND_TAG = "cmd"
COMMAND_VERSION = 1
COMMAND_ID_LEN = 16
MAX_COMMAND_BYTES = 2048
MAX_ARGS = 16
MAX_NAME_LEN = 32
MAX_ARG_STR = 64
MAX_DETAIL_LEN = 200
MAX_STATUS_BYTES = 8192
_UINT64 = 2**64
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
PROFILE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# speed_limit_report: 0 switches the report off; otherwise a period in this range (the floor keeps a typo from
# turning a configuration report into a second telemetry stream).
SPEED_LIMIT_REPORT_MIN_S = 10
SPEED_LIMIT_REPORT_MAX_S = 86_400

ArgValue = bool | int | float | str


class CommandName(enum.StrEnum):
    LOCK = "lock"
    UNLOCK = "unlock"
    SET_PROFILE = "set_profile"
    SNAPSHOT = "snapshot"
    SPEED_LIMIT_REPORT = "speed_limit_report"


class AckStatus(enum.StrEnum):
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"


class CommandDecodeError(DecodeError):
    """Bytes that are not a well-formed v1 command (or ack, or status body)."""

    reason = "malformed"


class UnknownCommandError(ProtocolError):
    """A well-formed, correctly signed command whose name this code does not know."""

    reason = "unknown_command"


class CommandArgsError(ProtocolError):
    """A known command with missing, extra or out-of-range arguments."""

    reason = "bad_args"


# The signed pair [signed, signature]; its limits also bound the ack and status bodies this module decodes.
_FRAME = SignedFrame(
    "command", MAX_COMMAND_BYTES, CommandDecodeError, max_str_len=MAX_DETAIL_LEN, max_bin_len=MAX_STATUS_BYTES
)


@dataclass(frozen=True, slots=True)
class Command:
    vin: str
    command_id: bytes
    issued_ms: int
    expires_ms: int
    name: str
    args: Mapping[str, ArgValue]
    key_id: bytes
    version: int = COMMAND_VERSION


@dataclass(frozen=True, slots=True)
class SignedCommand:
    """A parsed but not yet verified command, with the exact signed bytes it arrived with."""

    command: Command
    signed: bytes
    signature: bytes

    def verify(self, trusted: Mapping[bytes, bytes], backend: ed25519.Ed25519Backend | None = None) -> Command:
        """Verify against the trusted cloud keys (key id → raw public key); raises SignatureError otherwise.
        `backend`: the Ed25519 implementation to verify with (default: `ed25519.default_backend()`)."""
        public_raw = trusted.get(self.command.key_id)
        if public_raw is None:
            raise SignatureError(f"command signed by untrusted key id {self.command.key_id.hex()}")
        if signing.key_id_for(public_raw) != self.command.key_id:
            raise SignatureError("trusted key table maps a key id to another key")
        signing.verify(public_raw, self.signature, self.signed, backend)
        return self.command


def new_command_id() -> bytes:
    """16 random bytes: the command's identity and the nonce the agent's replay cache remembers."""
    return os.urandom(COMMAND_ID_LEN)


def _uint(name: str, value: Any, error: type[ProtocolError]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _UINT64:
        raise error(f"{name} must be an unsigned 64-bit integer")
    return value


def _check_args_shape(args: Any, error: type[ProtocolError]) -> dict[str, ArgValue]:
    if not isinstance(args, Mapping):
        raise error("args must be a map")
    if len(args) > MAX_ARGS:
        raise error(f"more than {MAX_ARGS} args")
    out: dict[str, ArgValue] = {}
    for key, value in args.items():
        if not isinstance(key, str) or not _NAME_RE.match(key):
            raise error(f"arg name {key!r} is not a short lowercase identifier")
        if isinstance(value, bool | str):
            if isinstance(value, str) and len(value) > MAX_ARG_STR:
                raise error(f"arg {key} is longer than {MAX_ARG_STR} characters")
        elif isinstance(value, int):
            if not -(2**63) <= value < _UINT64:
                raise error(f"arg {key} does not fit in 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise error(f"arg {key} is not finite")
        else:
            raise error(f"arg {key} has type {type(value).__name__}; only bool, int, float, str are allowed")
        out[key] = value
    return out


def seal_command(command: Command, key: signing.DeviceKey) -> bytes:
    """Serialise and sign with the cloud key; returns the exact bytes to publish on ev/{vin}/cmd.

    Checks the wire layout only; the vocabulary (`check_args`) is the issuer's business.
    """
    validate_vin(command.vin)
    if command.version != COMMAND_VERSION:
        raise EncodeError(f"cannot encode command version {command.version}")
    if command.key_id != key.key_id:
        raise EncodeError("command key_id differs from the signing key's id")
    if not isinstance(command.command_id, bytes) or len(command.command_id) != COMMAND_ID_LEN:
        raise EncodeError(f"command_id must be {COMMAND_ID_LEN} bytes")
    issued = _uint("issued_ms", command.issued_ms, EncodeError)
    expires = _uint("expires_ms", command.expires_ms, EncodeError)
    if not isinstance(command.name, str) or not _NAME_RE.match(command.name):
        raise EncodeError(f"command name {command.name!r} is not a short lowercase identifier")
    # Keys in ascending order: one canonical encoding, so firmware can reproduce the test vectors byte for byte.
    args = dict(sorted(_check_args_shape(command.args, EncodeError).items()))
    signed: bytes = msgpack.packb(
        [
            COMMAND_TAG,
            command.version,
            command.vin,
            command.command_id,
            issued,
            expires,
            command.name,
            args,
            key.key_id,
        ],
        use_bin_type=True,
    )
    return _FRAME.seal(signed, key)


def parse_command(data: bytes) -> SignedCommand:
    """Parse wire bytes into a SignedCommand; raises only DecodeError (or its subclasses)."""
    signed, signature = _FRAME.split(data)
    inner = _FRAME.unpack(signed, "signed part", max_map_len=MAX_ARGS)
    if not isinstance(inner, list) or len(inner) < 2 or inner[0] != COMMAND_TAG:
        raise CommandDecodeError('signed part must be an array starting with "cmd"')
    version = inner[1]
    _FRAME.check_version(version, COMMAND_VERSION)
    if len(inner) != 9:
        raise CommandDecodeError("a v1 command has 9 fields")
    _, _, vin, command_id, issued_ms, expires_ms, name, args, key_id = inner
    _FRAME.check_vin(vin)
    if not isinstance(command_id, bytes) or len(command_id) != COMMAND_ID_LEN:
        raise CommandDecodeError(f"command_id must be {COMMAND_ID_LEN} bytes")
    issued = _uint("issued_ms", issued_ms, CommandDecodeError)
    expires = _uint("expires_ms", expires_ms, CommandDecodeError)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CommandDecodeError("name must be a short lowercase identifier")
    clean_args = _check_args_shape(args, CommandDecodeError)
    _FRAME.check_key_id(key_id)
    cmd = Command(vin, command_id, issued, expires, name, clean_args, key_id, version)
    return SignedCommand(cmd, signed, signature)


def check_args(name: str, args: Mapping[str, ArgValue]) -> CommandName:
    """The vocabulary: raises UnknownCommandError for names this code does not know, CommandArgsError for bad args."""
    try:
        known = CommandName(name)
    except ValueError:
        raise UnknownCommandError(f"unknown command {name!r}") from None
    expected = {
        CommandName.LOCK: set(),
        CommandName.UNLOCK: set(),
        CommandName.SNAPSHOT: set(),
        CommandName.SET_PROFILE: {"profile"},
        CommandName.SPEED_LIMIT_REPORT: {"interval_s"},
    }[known]
    if set(args) != expected:
        raise CommandArgsError(f"{name} takes args {sorted(expected)}, got {sorted(args)}")
    if known is CommandName.SET_PROFILE:
        profile = args["profile"]
        if not isinstance(profile, str) or not PROFILE_RE.match(profile):
            raise CommandArgsError("profile must match [a-z][a-z0-9_-]{0,31}")
    elif known is CommandName.SPEED_LIMIT_REPORT:
        interval = args["interval_s"]
        if (
            isinstance(interval, bool)
            or not isinstance(interval, int)
            or not (interval == 0 or SPEED_LIMIT_REPORT_MIN_S <= interval <= SPEED_LIMIT_REPORT_MAX_S)
        ):
            raise CommandArgsError(
                f"interval_s must be 0 (off) or an integer {SPEED_LIMIT_REPORT_MIN_S}..{SPEED_LIMIT_REPORT_MAX_S}"
            )
    return known


# --- acks ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandAck:
    """Body of a COMMAND_ACK envelope: msgpack [command_id: bin(16), status: str, detail: str, acted_ms: uint]."""

    command_id: bytes
    status: AckStatus
    detail: str
    acted_ms: int


def encode_ack(ack: CommandAck) -> bytes:
    if not isinstance(ack.command_id, bytes) or len(ack.command_id) != COMMAND_ID_LEN:
        raise EncodeError(f"command_id must be {COMMAND_ID_LEN} bytes")
    acted = _uint("acted_ms", ack.acted_ms, EncodeError)
    # At most MAX_DETAIL_LEN bytes of UTF-8 (what decoders enforce), cut at a character boundary.
    detail = ack.detail.encode("utf-8")[:MAX_DETAIL_LEN].decode("utf-8", "ignore")
    out: bytes = msgpack.packb([ack.command_id, AckStatus(ack.status).value, detail, acted], use_bin_type=True)
    return out


def decode_ack(body: bytes) -> CommandAck:
    """Raises only CommandDecodeError."""
    if not isinstance(body, bytes) or len(body) > 512:
        raise CommandDecodeError("ack body must be at most 512 bytes")
    doc = _FRAME.unpack(body, "ack body")
    if not isinstance(doc, list) or len(doc) != 4:
        raise CommandDecodeError("ack body must be an array of 4")
    command_id, status, detail, acted_ms = doc
    if not isinstance(command_id, bytes) or len(command_id) != COMMAND_ID_LEN:
        raise CommandDecodeError(f"ack command_id must be {COMMAND_ID_LEN} bytes")
    try:
        st = AckStatus(status)
    except ValueError:
        raise CommandDecodeError(f"unknown ack status {status!r}") from None
    if not isinstance(detail, str):
        raise CommandDecodeError("ack detail must be a string")
    return CommandAck(command_id, st, detail, _uint("acted_ms", acted_ms, CommandDecodeError))


# --- status --------------------------------------------------------------------------------------------------

MetricValue = int | float | bool | str | None
_METRIC_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
MAX_METRICS = 48


@dataclass(frozen=True, slots=True)
class StatusReport:
    """Body of a STATUS envelope (retained on ev/{vin}/status; the LWT is one with online = false).

    msgpack map {"online": bool, "conn": uint, "agent": str, "metrics": map str → int|float|bool|str|nil}.
    `conn` numbers the agent's connection attempts within its boot (see `status_order`).
    """

    online: bool
    conn: int
    agent: str
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)


def _check_metrics(metrics: Any, error: type[ProtocolError]) -> dict[str, MetricValue]:
    if not isinstance(metrics, Mapping) or len(metrics) > MAX_METRICS:
        raise error(f"metrics must be a map of at most {MAX_METRICS} entries")
    out: dict[str, MetricValue] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not _METRIC_KEY_RE.match(key):
            raise error(f"metric name {key!r} is not a short lowercase identifier")
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"metric {key} is not finite")
        if isinstance(value, str) and len(value) > MAX_ARG_STR:
            raise error(f"metric {key} is longer than {MAX_ARG_STR} characters")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < _UINT64:
            raise error(f"metric {key} does not fit in 64 bits")
        if value is not None and not isinstance(value, bool | int | float | str):
            raise error(f"metric {key} has type {type(value).__name__}")
        out[key] = value
    return out


def encode_status(report: StatusReport) -> bytes:
    if not isinstance(report.agent, str) or len(report.agent) > MAX_ARG_STR:
        raise EncodeError(f"agent version must be a string of at most {MAX_ARG_STR} characters")
    doc = {
        "online": bool(report.online),
        "conn": _uint("conn", report.conn, EncodeError),
        "agent": report.agent,
        "metrics": dict(sorted(_check_metrics(report.metrics, EncodeError).items())),
    }
    out: bytes = msgpack.packb(doc, use_bin_type=True)
    return out


def decode_status(body: bytes) -> StatusReport:
    """Raises only CommandDecodeError."""
    if not isinstance(body, bytes) or len(body) > MAX_STATUS_BYTES:
        raise CommandDecodeError(f"status body must be at most {MAX_STATUS_BYTES} bytes")
    doc = _FRAME.unpack(body, "status body", max_map_len=MAX_METRICS)
    if not isinstance(doc, dict) or set(doc) != {"online", "conn", "agent", "metrics"}:
        raise CommandDecodeError("status body must be a map of online, conn, agent, metrics")
    online, agent = doc["online"], doc["agent"]
    if not isinstance(online, bool):
        raise CommandDecodeError("online must be a boolean")
    if not isinstance(agent, str) or len(agent) > MAX_ARG_STR:
        raise CommandDecodeError("agent must be a short string")
    conn = _uint("conn", doc["conn"], CommandDecodeError)
    return StatusReport(online, conn, agent, _check_metrics(doc["metrics"], CommandDecodeError))


StatusOrder = tuple[int, int, int, int]


def status_order(boot: int, seq: int, report: StatusReport) -> StatusOrder:
    """Which of two status reports of a vehicle is newer: compare these tuples (boot and seq: their envelope's).

    (boot, conn, offline, seq). A later boot wins; within a boot a later connection wins; within a connection an
    offline report (the LWT, sealed when that connection was opened, or the clean-shutdown report) wins over every
    online report of the same connection, whatever their sequence numbers — the LWT is signed before the online
    reports it supersedes; ties fall to the sequence number.
    """
    return (boot, report.conn, 0 if report.online else 1, seq)


__all__ = [
    "COMMAND_ID_LEN",
    "COMMAND_VERSION",
    "MAX_COMMAND_BYTES",
    "PROFILE_RE",
    "SPEED_LIMIT_REPORT_MAX_S",
    "SPEED_LIMIT_REPORT_MIN_S",
    "AckStatus",
    "ArgValue",
    "Command",
    "CommandAck",
    "CommandArgsError",
    "CommandDecodeError",
    "CommandName",
    "MetricValue",
    "SignedCommand",
    "StatusOrder",
    "StatusReport",
    "UnknownCommandError",
    "check_args",
    "decode_ack",
    "decode_status",
    "encode_ack",
    "encode_status",
    "new_command_id",
    "parse_command",
    "seal_command",
    "status_order",
]
