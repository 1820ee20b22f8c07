"""Envelope v1: the signed msgpack frame every message travels in.

Wire form (see firmware_specs/ENVELOPE.md):

    outer  = [signed: bin, signature: bin]
    signed = msgpack [version, vin, key_id: bin(8), boot, seq, created_ms, kind, flags, body: bin]

The signature (Ed25519) covers `signed` exactly as it was sent: the verifier checks the received bytes, never a
re-serialisation.  Parsing is split from verifying because the verifier must read vin and key_id (untrusted) to
find the key; nothing of a parsed envelope is to be trusted before `SignedEnvelope.verify` returned.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol import signing
from protocol.errors import DecodeError, EncodeError, SignatureError
from protocol.signed_frame import SignedFrame
from protocol.topics import validate_vin

PROTOCOL_VERSION = 1
MAX_ENVELOPE_BYTES = 512 * 1024
_UINT64 = 2**64
_FRAME = SignedFrame("envelope", MAX_ENVELOPE_BYTES, DecodeError, max_str_len=64, max_bin_len=MAX_ENVELOPE_BYTES)


class Kind(enum.IntEnum):
    TELEMETRY = 1
    ALERT = 2
    STATUS = 3
    COMMAND = 4
    COMMAND_ACK = 5


class Flags(enum.IntFlag):
    NONE = 0
    BACKFILL = 1  # sent after an outage from the spool, not live


@dataclass(frozen=True, slots=True)
class Envelope:
    vin: str
    key_id: bytes
    boot: int
    seq: int
    created_ms: int
    kind: Kind
    flags: Flags
    body: bytes
    version: int = PROTOCOL_VERSION

    @property
    def identity(self) -> tuple[str, int, int]:
        """(vin, boot, seq): what identifies a message for replay and duplicate detection."""
        return (self.vin, self.boot, self.seq)


@dataclass(frozen=True, slots=True)
class SignedEnvelope:
    """A parsed but not yet verified envelope, holding the exact signed bytes it arrived with."""

    envelope: Envelope
    signed: bytes
    signature: bytes

    def verify(self, public_raw: bytes) -> Envelope:
        if self.envelope.key_id != signing.key_id_for(public_raw):
            raise SignatureError("envelope key id does not match the device's registered key")
        signing.verify(public_raw, self.signature, self.signed)
        return self.envelope


def _check_uint(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _UINT64:
        raise EncodeError(f"{name} must be an unsigned 64-bit integer")
    return value


def seal_envelope(envelope: Envelope, key: signing.DeviceKey) -> bytes:
    """Serialise and sign; returns the exact bytes to publish."""
    validate_vin(envelope.vin)
    if envelope.key_id != key.key_id:
        raise EncodeError("envelope key_id differs from the signing key's id")
    for name in ("boot", "seq", "created_ms"):
        _check_uint(name, getattr(envelope, name))
    signed: bytes = msgpack.packb(
        [
            envelope.version,
            envelope.vin,
            envelope.key_id,
            envelope.boot,
            envelope.seq,
            envelope.created_ms,
            int(envelope.kind),
            int(envelope.flags),
            envelope.body,
        ],
        use_bin_type=True,
    )
    return _FRAME.seal(signed, key)


def parse_envelope(data: bytes) -> SignedEnvelope:
    """Parse wire bytes into a SignedEnvelope; raises only DecodeError (or its subclasses)."""
    signed, signature = _FRAME.split(data)
    inner = _FRAME.unpack(signed, "signed part")
    if not isinstance(inner, list) or not inner:
        raise DecodeError("signed part must be a non-empty array")
    version = inner[0]
    _FRAME.check_version(version, PROTOCOL_VERSION)
    if len(inner) != 9:
        raise DecodeError("a v1 signed part has 9 fields")
    _, vin, key_id, boot, seq, created_ms, kind, flags, body = inner
    _FRAME.check_vin(vin)
    _FRAME.check_key_id(key_id)
    for name, value in (("boot", boot), ("seq", seq), ("created_ms", created_ms), ("flags", flags)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _UINT64:
            raise DecodeError(f"{name} must be an unsigned integer")
    try:
        kind_e = Kind(kind)
    except ValueError:
        raise DecodeError(f"unknown envelope kind {kind!r}") from None
    if not isinstance(body, bytes):
        raise DecodeError("body must be binary")
    env = Envelope(
        vin=vin,
        key_id=key_id,
        boot=boot,
        seq=seq,
        created_ms=created_ms,
        kind=kind_e,
        flags=Flags(flags),
        body=body,
        version=version,
    )
    return SignedEnvelope(envelope=env, signed=signed, signature=signature)
