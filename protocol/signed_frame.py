"""The outer frame that envelopes and commands share: msgpack `[signed: bin, signature: bin]`.

Both are signed the same way — the signature covers the inner `signed` bytes exactly as sent — so sealing the pair
and splitting it apart again is written once, here, with the checks of what both signed parts carry (a version,
the VIN, the signing key's id). What differs between them (the name in error messages, the
size cap, msgpack's limits and the error type raised) is a `SignedFrame`'s configuration; the wire format is that
of firmware_specs/ENVELOPE.md and firmware_specs/COMMANDS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import DecodeError, EncodeError, ProtocolError, UnsupportedVersionError
from protocol.signing import KEY_ID_LEN, DeviceKey
from protocol.topics import validate_vin

MAX_ARRAY_LEN = 16  # no structure of the protocol has more fields


@dataclass(frozen=True, slots=True)
class SignedFrame:
    """How one kind of signed message is framed and bounded.

    `what` names it in errors ("envelope", "command"); `max_bytes` caps the whole frame; `max_str_len` and
    `max_bin_len` bound what msgpack will unpack in it; `error` is the DecodeError subclass its decoder raises.
    """

    what: str
    max_bytes: int
    error: type[DecodeError]
    max_str_len: int
    max_bin_len: int

    def unpack(self, data: bytes, what: str, max_map_len: int = 0) -> Any:
        """msgpack-decode `data` (the frame or a part of it, named `what` in errors) within this frame's limits."""
        try:
            return msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_array_len=MAX_ARRAY_LEN,
                max_map_len=max_map_len,
                max_str_len=self.max_str_len,
                max_bin_len=self.max_bin_len,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises many unrelated types for bad input
            raise self.error(f"{what} is not valid msgpack: {type(exc).__name__}") from None

    def seal(self, signed: bytes, key: DeviceKey) -> bytes:
        """The frame carrying `signed` and `key`'s signature over it; EncodeError if it exceeds `max_bytes`."""
        out: bytes = msgpack.packb([signed, key.sign(signed)], use_bin_type=True)
        if len(out) > self.max_bytes:
            raise EncodeError(f"{self.what} of {len(out)} bytes exceeds {self.max_bytes}")
        return out

    def split(self, data: bytes) -> tuple[bytes, bytes]:
        """(signed, signature) of a received frame, neither checked further; raises only `error`."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self.error(f"{self.what} must be bytes")
        if len(data) > self.max_bytes:
            raise self.error(f"{self.what} of {len(data)} bytes exceeds {self.max_bytes}")
        outer = self.unpack(bytes(data), self.what)
        if not isinstance(outer, list) or len(outer) != 2:
            raise self.error(f"{self.what} must be an array of 2: [signed, signature]")
        signed, signature = outer
        if not isinstance(signed, bytes) or not isinstance(signature, bytes):
            raise self.error(f"{self.what} parts must be binary")
        return signed, signature

    # -- fields every signed part carries ----------------------------------------------------------------------

    def check_version(self, version: Any, supported: int) -> None:
        """UnsupportedVersionError unless `version` is `supported` (a bool is no version)."""
        if version != supported or isinstance(version, bool):
            raise UnsupportedVersionError(f"unsupported {self.what} version {version!r}")

    def check_vin(self, vin: Any) -> None:
        if not isinstance(vin, str):
            raise self.error("vin must be a string")
        try:
            validate_vin(vin)
        except ProtocolError as exc:
            raise self.error(str(exc)) from None

    def check_key_id(self, key_id: Any) -> None:
        if not isinstance(key_id, bytes) or len(key_id) != KEY_ID_LEN:
            raise self.error(f"key_id must be {KEY_ID_LEN} bytes")
