"""The outer [signed, signature] frame envelopes and commands share (protocol.signed_frame): each keeps its own
error type, reason and wording, and nothing but that error comes out of hostile input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import DecodeError, DeviceKey, EncodeError
from protocol.commands import MAX_COMMAND_BYTES, CommandDecodeError, parse_command
from protocol.envelope import MAX_ENVELOPE_BYTES, parse_envelope
from protocol.signed_frame import SignedFrame
from protocol.signing import verify

KEY = DeviceKey.from_seed(b"\x05" * 32)
# (what, cap, error type, its parser): the two users of the shared frame.
KINDS = [
    pytest.param("envelope", MAX_ENVELOPE_BYTES, DecodeError, parse_envelope, id="envelope"),
    pytest.param("command", MAX_COMMAND_BYTES, CommandDecodeError, parse_command, id="command"),
]
Parser = Callable[[Any], object]  # Any: fed a str on purpose


def _pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


@pytest.mark.parametrize(("what", "cap", "error", "parse"), KINDS)
def test_outer_frame_errors_keep_their_type_reason_and_wording(
    what: str, cap: int, error: type[DecodeError], parse: Parser
) -> None:
    cases: list[tuple[object, str]] = [
        ("not bytes", f"{what} must be bytes"),
        (b"\x00" * (cap + 1), f"{what} of {cap + 1} bytes exceeds {cap}"),
        (b"\xc1", f"{what} is not valid msgpack: "),
        (_pack([b"a", b"b", b"c"]), f"{what} must be an array of 2: [signed, signature]"),
        (_pack([b"signed", b"signature"])[:-1], f"{what} is not valid msgpack: "),  # cut short
        (_pack([b"signed", "signature"]), f"{what} parts must be binary"),
    ]
    for data, message in cases:
        with pytest.raises(error) as caught:
            parse(data)
        assert type(caught.value) is error
        assert str(caught.value).startswith(message), (data, str(caught.value))
        assert caught.value.reason == "malformed"


@pytest.mark.parametrize(("what", "cap", "error", "parse"), KINDS)
def test_sealed_frames_split_back_into_what_was_signed(
    what: str, cap: int, error: type[DecodeError], parse: Parser
) -> None:
    frame = SignedFrame(what, cap, error, max_str_len=64, max_bin_len=cap)
    signed = _pack(["cmd", 1, "x" * 20])
    out = frame.seal(signed, KEY)
    got_signed, signature = frame.split(out)
    assert got_signed == signed and len(signature) == 64
    verify(KEY.public_raw, signature, signed)
    with pytest.raises(EncodeError, match=f"{what} of .* bytes exceeds {cap}"):
        frame.seal(b"\x00" * cap, KEY)


frames = st.sampled_from(
    [
        SignedFrame("envelope", MAX_ENVELOPE_BYTES, DecodeError, max_str_len=64, max_bin_len=MAX_ENVELOPE_BYTES),
        SignedFrame("command", MAX_COMMAND_BYTES, CommandDecodeError, max_str_len=200, max_bin_len=8192),
    ]
)
leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=80) | st.text(max_size=80)


@given(frames, st.recursive(leaves, lambda inner: st.lists(inner, max_size=4), max_leaves=12))
def test_any_msgpack_splits_or_raises_only_the_frames_error(frame: SignedFrame, obj: object) -> None:
    data = _pack(obj)
    try:
        signed, signature = frame.split(data)
    except DecodeError as exc:
        assert type(exc) is frame.error
    else:
        assert _pack([signed, signature]) == data


@given(frames, st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_the_frames_error(frame: SignedFrame, data: bytes) -> None:
    try:
        frame.split(data)
    except DecodeError as exc:
        assert type(exc) is frame.error
