"""The wire contract: test vectors, round-trips, and hostile input."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import (
    Batch,
    DecodeError,
    DeviceKey,
    Envelope,
    Flags,
    Kind,
    ProtocolError,
    SignatureError,
    decode_batch,
    encode_batch,
    load_catalogue,
    parse_envelope,
    seal_envelope,
)
from protocol.catalogue import SignalType, parse_catalogue
from protocol.errors import CatalogueError, EncodeError, TopicError
from protocol.signing import KeyFileError
from protocol.topics import Channel, parse_topic, subscription, topic

CAT = load_catalogue()
KEY = DeviceKey.from_seed(b"\x07" * 32)
VECTORS = Path(__file__).resolve().parents[1] / "firmware_specs" / "test_vectors" / "envelope_v1.json"


def _envelope(body: bytes, seq: int = 1, vin: str = "LZHEB0A12P0000001", key: DeviceKey = KEY) -> Envelope:
    return Envelope(vin, key.key_id, 3, seq, 1_700_000_000_000, Kind.TELEMETRY, Flags.NONE, body)


# --- test vectors ---------------------------------------------------------------------------------------------


def test_code_reproduces_every_test_vector_byte_for_byte() -> None:
    doc = json.loads(VECTORS.read_text())
    assert doc["vectors"], "vector file is empty"
    for vec in doc["vectors"]:
        inp, exp = vec["input"], vec["expected"]
        key = DeviceKey.from_seed(bytes.fromhex(inp["seed_hex"]))
        assert key.public_raw.hex() == exp["public_key_hex"]
        assert key.key_id.hex() == exp["key_id_hex"]
        body = encode_batch(Batch(inp["timestamps"], inp["columns"]), CAT)
        assert body.hex() == exp["body_hex"], inp["name"]
        env = Envelope(
            inp["vin"],
            key.key_id,
            inp["boot"],
            inp["seq"],
            inp["created_ms"],
            Kind[inp["kind"]],
            Flags(inp["flags"]),
            body,
        )
        assert seal_envelope(env, key).hex() == exp["envelope_hex"], inp["name"]


def test_test_vectors_verify_and_decode_independently_of_the_encoder() -> None:
    doc = json.loads(VECTORS.read_text())
    for vec in doc["vectors"]:
        inp, exp = vec["input"], vec["expected"]
        wire = bytes.fromhex(exp["envelope_hex"])
        # Layout promised in ENVELOPE.md: outer fixarray(2) of bin, inner fixarray(9) starting with version 1.
        outer = msgpack.unpackb(wire, raw=False)
        assert wire[0] == 0x92 and len(outer) == 2 and len(outer[1]) == 64
        assert outer[0][0] == 0x99 and outer[0][1] == 0x01
        env = parse_envelope(wire).verify(bytes.fromhex(exp["public_key_hex"]))
        assert (env.vin, env.boot, env.seq, env.kind.name) == (inp["vin"], inp["boot"], inp["seq"], inp["kind"])
        decoded = decode_batch(env.body, CAT).batch
        assert decoded.timestamps == inp["timestamps"]
        for name, values in inp["columns"].items():
            assert decoded.columns[name] == values


# --- envelope -------------------------------------------------------------------------------------------------


def test_flipping_any_byte_of_a_sealed_envelope_is_detected() -> None:
    body = encode_batch(Batch([1, 2], {"Speed": [1.0, 2.0]}), CAT)
    wire = seal_envelope(_envelope(body), KEY)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        with pytest.raises(ProtocolError):
            parse_envelope(bytes(bad)).verify(KEY.public_raw)


def test_signature_from_another_key_is_rejected() -> None:
    other = DeviceKey.from_seed(b"\x09" * 32)
    body = encode_batch(Batch([1], {"Speed": [1.0]}), CAT)
    wire = seal_envelope(_envelope(body, key=other), other)
    with pytest.raises(SignatureError):
        parse_envelope(wire).verify(KEY.public_raw)


def test_verification_uses_received_bytes_not_a_reserialisation() -> None:
    # A non-canonical but valid msgpack encoding of the signed part (uint 1 as 0xcc 0x01) must still verify,
    # because the signature covers the bytes as sent.
    signed = bytearray(msgpack.packb([1, "LZHEB0A12P0000001", KEY.key_id, 1, 2, 3, 1, 0, b""], use_bin_type=True))
    assert signed[1] == 0x01
    signed[1:2] = b"\xcc\x01"
    wire = msgpack.packb([bytes(signed), KEY.sign(bytes(signed))], use_bin_type=True)
    assert parse_envelope(wire).verify(KEY.public_raw).seq == 2


def test_unsupported_version_has_its_own_reason() -> None:
    signed = msgpack.packb([2, "LZHEB0A12P0000001"], use_bin_type=True)
    with pytest.raises(DecodeError) as err:
        parse_envelope(msgpack.packb([signed, b"x" * 64], use_bin_type=True))
    assert err.value.reason == "unsupported_version"


def test_oversized_envelope_is_refused_before_parsing() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        parse_envelope(b"\x00" * (protocol.MAX_ENVELOPE_BYTES + 1))


envelopes = st.builds(
    Envelope,
    vin=st.from_regex(r"\A[A-Z0-9]{8,32}\Z"),
    key_id=st.just(KEY.key_id),
    boot=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    created_ms=st.integers(0, 2**64 - 1),
    kind=st.sampled_from(Kind),
    flags=st.sampled_from([Flags.NONE, Flags.BACKFILL]),
    body=st.binary(max_size=2048),
)


@given(envelopes)
def test_envelope_round_trip(env: Envelope) -> None:
    assert parse_envelope(seal_envelope(env, KEY)).verify(KEY.public_raw) == env


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        parse_envelope(data)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=40),
        lambda inner: st.lists(inner, max_size=10),
        max_leaves=30,
    )
)
def test_arbitrary_msgpack_structures_raise_only_decode_error(obj: object) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    for wire in (data, msgpack.packb([data, b"s" * 64], use_bin_type=True)):
        with contextlib.suppress(DecodeError):
            parse_envelope(wire)
        with contextlib.suppress(DecodeError):
            decode_batch(wire, CAT)


# --- batch ----------------------------------------------------------------------------------------------------


def _value_strategy(sig: protocol.Signal) -> st.SearchStrategy[object]:
    if sig.type is SignalType.BOOL:
        return st.booleans()
    if sig.type is SignalType.STR:
        return st.text(max_size=20)
    if sig.type is SignalType.INT:
        return st.integers(int(sig.min or 0), int(sig.max or 0))
    assert sig.resolution is not None
    lo, hi = round(sig.min / sig.resolution), round(sig.max / sig.resolution)  # type: ignore[operator]
    return st.integers(lo, hi).map(lambda k, s=sig: round(k * s.resolution, s.decimals))


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    n = draw(st.integers(1, 30))
    t0 = draw(st.integers(0, 2**50))
    deltas = draw(st.lists(st.integers(0, 10**7), min_size=n - 1, max_size=n - 1))
    ts = [t0]
    for d in deltas:
        ts.append(ts[-1] + d)
    sigs = draw(st.lists(st.sampled_from(list(CAT)), unique_by=lambda s: s.id, max_size=len(CAT)))
    cols = {s.name: draw(st.lists(st.none() | _value_strategy(s), min_size=n, max_size=n)) for s in sigs}
    return Batch(ts, cols)  # type: ignore[arg-type]


@given(batches())
@settings(max_examples=200)
def test_batch_round_trip(batch: Batch) -> None:
    decoded = decode_batch(encode_batch(batch, CAT), CAT)
    assert decoded.unknown_ids == ()
    assert decoded.batch.timestamps == batch.timestamps
    assert decoded.batch.columns == batch.columns


@given(st.binary(max_size=2048))
def test_arbitrary_bytes_into_batch_decoder_raise_only_decode_error(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_batch(data, CAT)


def test_float_signals_travel_as_scaled_integers() -> None:
    body = encode_batch(Batch([0], {"CurrentLocation.Latitude": [29.5577123]}), CAT)
    assert msgpack.unpackb(body, strict_map_key=False) == [0, [], {1: [295577123]}]


def test_unknown_column_ids_are_skipped_and_reported() -> None:
    body = msgpack.packb([5, [], {20: [123], 9999: [1]}])
    decoded = decode_batch(body, CAT)
    assert decoded.unknown_ids == (9999,)
    assert decoded.batch.columns == {"Speed": [12.3]}


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (Batch([], {}), "at least one"),
        (Batch([2, 1], {}), "order"),
        (Batch([1], {"No.Such.Signal": [1]}), "unknown"),
        (Batch([1], {"Speed": [1.0, 2.0]}), "values for"),
        (Batch([1], {"Speed": ["fast"]}), "number"),
        (Batch([1], {"CurrentLocation.GNSSReceiver.FixMode": [1.5]}), "int"),
        (Batch([1], {"Speed": [math.inf]}), "cannot be encoded"),
    ],
)
def test_unencodable_batches_raise_encode_error(batch: Batch, match: str) -> None:
    with pytest.raises(EncodeError, match=match):
        encode_batch(batch, CAT)


# --- catalogue and topics -------------------------------------------------------------------------------------


def test_shipped_catalogue_is_consistent() -> None:
    assert len({s.id for s in CAT}) == len(CAT) == len(set(CAT.names()))
    for sig in CAT:
        if sig.type is SignalType.FLOAT:
            assert sig.resolution and sig.min is not None and sig.max is not None
    assert CAT.by_name("Powertrain.TractionBattery.StateOfCharge").unit == "%"


def test_catalogue_rejects_duplicates_and_bad_entries() -> None:
    entry = 'name = "Speed"\nid = 1\ntype = "int"\nmin = 0\nmax = 1\nsource = "controller"\n'
    with pytest.raises(CatalogueError, match="duplicate"):
        parse_catalogue(f"[[signal]]\n{entry}[[signal]]\n{entry}")
    with pytest.raises(CatalogueError, match="resolution"):
        parse_catalogue('[[signal]]\nname = "A"\nid = 1\ntype = "float"\nmin = 0\nmax = 1\nsource = "bms"\n')
    with pytest.raises(CatalogueError):
        parse_catalogue("not toml [")


def test_range_check() -> None:
    soc = CAT.by_name("Powertrain.TractionBattery.StateOfCharge")
    assert soc.in_range(50.0) and soc.in_range(0) and not soc.in_range(100.1)
    assert not soc.in_range(float("nan")) and not soc.in_range(True)


def test_topics() -> None:
    assert topic("LZHEB0A12P0000001", Channel.TELEMETRY) == "ev/LZHEB0A12P0000001/telemetry"
    assert parse_topic("ev/LZHEB0A12P0000001/cmd/ack") == ("LZHEB0A12P0000001", Channel.CMD_ACK)
    assert subscription(Channel.ALERT) == "ev/+/alert"
    for bad in ("ev/+/telemetry", "ev/lower0000/telemetry", "xx/LZHEB0A12P0000001/telemetry", "ev/LZHEB0A12P0000001/x"):
        with pytest.raises(TopicError):
            parse_topic(bad)


def test_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    KEY.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert DeviceKey.load(path).public_raw == KEY.public_raw
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        DeviceKey.load(path)


_ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([s.name for s in CAT]), values=st.lists(_ANY_VALUE, max_size=12))
def test_the_range_fast_path_refuses_exactly_what_in_range_refuses(name: str, values: list[object]) -> None:
    sig = CAT.by_name(name)
    expected = [i for i, v in enumerate(values) if v is not None and not sig.in_range(v)]  # type: ignore[arg-type]
    assert sig.invalid_indices(values) == expected  # type: ignore[arg-type]
