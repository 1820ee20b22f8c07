"""The columnar batch codec: the body of a telemetry envelope.

Wire form (msgpack), see firmware_specs/ENVELOPE.md:

    [t0_ms, [delta_ms, ...], {wire_id: [value | nil, ...], ...}]

`t0_ms` is the first sample's time (ms since the Unix epoch, UTC); `delta_ms` has one entry per further sample,
each >= 0 (samples are in time order).  Each column holds exactly one entry per sample; nil means "not sampled".
Float signals travel as integers, round(value / resolution); int, bool and str signals as themselves.
Columns are written in ascending wire id so the bytes are canonical (test vectors depend on it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.catalogue import Catalogue, Signal, SignalType, Value
from protocol.errors import DecodeError, EncodeError

MAX_SAMPLES = 10_000
MAX_COLUMNS = 1_024
MAX_BODY_BYTES = 256 * 1024
_INT64 = 2**63


@dataclass(slots=True)
class Batch:
    """Samples in columns: `timestamps[i]` is the time of `columns[name][i]` for every column."""

    timestamps: list[int]
    columns: dict[str, list[Value | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.timestamps)

    def rows(self) -> list[tuple[int, dict[str, Value]]]:
        """Row view: (timestamp, {signal: value}) with unsampled (None) entries left out."""
        out: list[tuple[int, dict[str, Value]]] = []
        for i, ts in enumerate(self.timestamps):
            row = {name: col[i] for name, col in self.columns.items() if col[i] is not None}
            out.append((ts, row))  # type: ignore[arg-type]
        return out


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    batch: Batch
    unknown_ids: tuple[int, ...] = ()


def _column_to_wire(sig: Signal, values: Sequence[Value | None]) -> list[Any]:
    """Encode one column; like decoding, dispatched once per column rather than once per value."""
    out: list[Any] = []
    append = out.append
    if sig.type is SignalType.FLOAT:
        assert sig.resolution is not None
        res = sig.resolution
        for v in values:
            if v is None:
                append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise EncodeError(f"{sig.name}: expected a number, got {type(v).__name__}")
            try:
                scaled = round(v / res)
            except (OverflowError, ValueError):
                raise EncodeError(f"{sig.name}: {v!r} cannot be encoded") from None
            if not -_INT64 <= scaled < _INT64:
                raise EncodeError(f"{sig.name}: {v!r} overflows the wire integer")
            append(scaled)
        return out
    # isinstance, not type(): sources may hand over int/float subclasses (IntEnum, numpy scalars); only bool,
    # itself an int, is refused for numeric signals.
    for v in values:
        if v is None:
            continue
        if sig.type is SignalType.INT:
            if isinstance(v, bool) or not isinstance(v, int):
                raise EncodeError(f"{sig.name}: expected an int, got {type(v).__name__}")
            if not -_INT64 <= v < _INT64:
                raise EncodeError(f"{sig.name}: {v!r} overflows the wire integer")
        elif not isinstance(v, bool if sig.type is SignalType.BOOL else str):
            raise EncodeError(f"{sig.name}: expected a {sig.type.value}, got {type(v).__name__}")
    return list(values)


def _column_from_wire(sig: Signal, raw: list[Any]) -> list[Value | None]:
    """Decode one column; per-column dispatch keeps the per-value work to a type check and one conversion."""
    out: list[Value | None] = []
    append = out.append
    if sig.type is SignalType.FLOAT:
        assert sig.resolution is not None
        res, ndigits = sig.resolution, sig.decimals
        for v in raw:
            if v is None:
                append(None)
            elif type(v) is int:  # bool is not int here, by design
                append(round(v * res, ndigits))
            else:
                raise DecodeError(f"signal id {sig.id}: float signals travel as scaled integers")
        return out
    expected: type = {SignalType.INT: int, SignalType.BOOL: bool, SignalType.STR: str}[sig.type]
    for v in raw:
        if v is not None and type(v) is not expected:
            raise DecodeError(f"signal id {sig.id}: expected {sig.type.value}, got {type(v).__name__}")
    return list(raw)


def encode_batch(batch: Batch, catalogue: Catalogue) -> bytes:
    n = len(batch.timestamps)
    if n == 0:
        raise EncodeError("a batch needs at least one sample")
    if n > MAX_SAMPLES:
        raise EncodeError(f"a batch holds at most {MAX_SAMPLES} samples")
    ts = batch.timestamps
    for t in ts:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < _INT64:
            raise EncodeError(f"timestamp {t!r} is not a non-negative integer of milliseconds")
    deltas = [ts[i] - ts[i - 1] for i in range(1, n)]
    if any(d < 0 for d in deltas):
        raise EncodeError("timestamps must be in non-decreasing order")
    columns: dict[int, list[Any]] = {}
    for name, values in batch.columns.items():
        try:
            sig = catalogue.by_name(name)
        except Exception:
            raise EncodeError(f"unknown signal {name!r}") from None
        if len(values) != n:
            raise EncodeError(f"{name}: {len(values)} values for {n} timestamps")
        columns[sig.id] = _column_to_wire(sig, values)
    body = [ts[0], deltas, {k: columns[k] for k in sorted(columns)}]
    out: bytes = msgpack.packb(body, use_bin_type=True)
    if len(out) > MAX_BODY_BYTES:
        raise EncodeError(f"encoded batch is {len(out)} bytes, more than {MAX_BODY_BYTES}")
    return out


def decode_batch(data: bytes, catalogue: Catalogue) -> DecodedBatch:
    """Decode a batch body; raises only DecodeError. Columns with ids the catalogue lacks are skipped and listed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError("batch body must be bytes")
    if len(data) > MAX_BODY_BYTES:
        raise DecodeError(f"batch body of {len(data)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_array_len=MAX_SAMPLES,
            max_map_len=MAX_COLUMNS,
            max_str_len=4096,
            max_bin_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ValueError, ExtraData, FormatError, ...)
        raise DecodeError(f"batch body is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(obj, list) or len(obj) != 3:
        raise DecodeError("batch body must be an array of 3: [t0, deltas, columns]")
    t0, deltas, cols = obj
    if isinstance(t0, bool) or not isinstance(t0, int) or not 0 <= t0 < _INT64:
        raise DecodeError("t0 must be a non-negative integer")
    if not isinstance(deltas, list):
        raise DecodeError("deltas must be an array")
    if not isinstance(cols, dict):
        raise DecodeError("columns must be a map")
    timestamps = [t0]
    for d in deltas:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise DecodeError("every delta must be a non-negative integer")
        timestamps.append(timestamps[-1] + d)
    if timestamps[-1] >= _INT64:
        raise DecodeError("timestamps overflow")
    n = len(timestamps)
    columns: dict[str, list[Value | None]] = {}
    unknown: list[int] = []
    for wire_id, values in cols.items():
        if isinstance(wire_id, bool) or not isinstance(wire_id, int):
            raise DecodeError("column keys must be integer wire ids")
        if not isinstance(values, list) or len(values) != n:
            raise DecodeError(f"column {wire_id} must hold exactly {n} values")
        sig = catalogue.by_id(wire_id)
        if sig is None:
            unknown.append(wire_id)
            continue
        columns[sig.name] = _column_from_wire(sig, values)
    return DecodedBatch(Batch(timestamps, columns), tuple(sorted(unknown)))


def batch_from_rows(rows: Sequence[tuple[int, Mapping[str, Value]]]) -> Batch:
    """Build a columnar batch from (timestamp, {signal: value}) rows; absent signals become None."""
    names: list[str] = []
    seen: set[str] = set()
    for _, row in rows:
        for name in row:
            if name not in seen:
                seen.add(name)
                names.append(name)
    return Batch(
        timestamps=[ts for ts, _ in rows],
        columns={name: [row.get(name) for _, row in rows] for name in names},
    )
