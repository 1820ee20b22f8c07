"""Sans-I/O codec for the Zhilian CAN profile (firmware_specs/CAN.md, firmware_specs/can/*.dbc).

Pure code over `(arbitration_id, data)`: the DBC files describe the frames, a `ZhilianSignal` attribute on each DBC
signal names the catalogue signal it carries, and this module turns frames into catalogue-named values (and back,
for the emulator in simulators/can_bus.py). The DBC signals carry catalogue units, so factor and offset are the
one unit conversion, applied here and nowhere else. The bus shell (`can_source`) and the emulator build on this.

cantools is imported here, and this module is imported only when CAN is configured: a board without CAN never
loads cantools (tests/test_can.py checks it).

Errors: `decode` returns None for an id the profile does not define (counted in `unknown_id`) and raises only
`CanFrameError` for a frame of a known id it cannot read (wrong length, unknown multiplexer value; counted in
`bad_frames`); `encode` raises only `CanFrameError`. A DBC that does not fit the catalogue raises `CanSpecError`
when loaded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, cast

import cantools
from cantools.database import Database, Message
from cantools.database.errors import Error as CantoolsError

from protocol.catalogue import Catalogue, Signal, SignalType, Value, load_catalogue

VARIANTS: Final = ("48v", "72v")
DEVICES: Final = ("bms", "controller")
MAPPING_ATTRIBUTE: Final = "ZhilianSignal"


class CanFrameError(Exception):
    """A frame of a known id that cannot be decoded, or values that cannot be encoded into one."""


class CanSpecError(Exception):
    """A DBC file that does not fit the catalogue (unmapped signal, unit mismatch, missing cycle time ...)."""


def dbc_path(device: str, variant: str) -> Path:
    """The DBC file of `device` ("bms" | "controller") in `variant` ("48v" | "72v")."""
    if device not in DEVICES or variant not in VARIANTS:
        raise ValueError(f"no DBC for device {device!r} in variant {variant!r}; devices {DEVICES}, variants {VARIANTS}")
    return Path(str(resources.files("firmware_specs").joinpath("can", f"zhilian_{device}_{variant}.dbc")))


def load_database(variant: str, devices: Iterable[str] = DEVICES) -> Database:
    """One cantools database holding the frames of `devices` in `variant` (they share one bus)."""
    db = cantools.database.Database()
    for device in devices:
        path = dbc_path(device, variant)
        try:
            db.add_dbc_file(str(path))
        except (OSError, CantoolsError, ValueError) as exc:
            raise CanSpecError(f"cannot load {path}: {exc}") from None
    return db


@dataclass(frozen=True, slots=True)
class _Field:
    """One DBC signal and the catalogue signal it carries."""

    dbc_name: str
    signal: Signal
    scale: float
    offset: float
    lo: float  # DBC physical range, narrowed to the catalogue's
    hi: float
    decimals: int  # the catalogue resolution's, looked up once here rather than per frame
    raw_lo: int  # what the bit field can hold
    raw_hi: int
    not_available: int  # raw value that marks "not fitted" (all ones; 0x7F.. for signed fields)
    groups: frozenset[int] | None  # multiplexer values that carry this signal; None in plain frames


@dataclass(frozen=True, slots=True)
class _Frame:
    message: Message
    period_s: float
    multiplexer: str | None
    fields: dict[str, _Field]  # by DBC signal name

    @property
    def groups(self) -> list[int]:
        out: set[int] = set()
        for f in self.fields.values():
            if f.groups is not None:
                out |= f.groups
        return sorted(out)


@dataclass(frozen=True, slots=True)
class CanReading:
    """What one frame said, under catalogue names; `group` is the multiplexer value of multiplexed frames."""

    frame_id: int
    message: str
    group: int | None
    period_s: float
    values: dict[str, Value]


class CanCodec:
    """Decoder and encoder of one vehicle bus (BMS + controller frames of one variant)."""

    def __init__(
        self, variant: str = "48v", *, catalogue: Catalogue | None = None, database: Database | None = None
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown CAN variant {variant!r}; known: {VARIANTS}")
        self.variant = variant
        self.catalogue = catalogue or load_catalogue()
        self.database = database if database is not None else load_database(variant)
        self.counters: dict[str, int] = {"frames": 0, "unknown_id": 0, "bad_frames": 0, "out_of_range": 0}
        self._by_key: dict[tuple[int, bool], _Frame] = {}
        self._by_name: dict[str, _Frame] = {}
        for msg in self.database.messages:
            frame = _frame_of(msg, self.catalogue)
            self._by_key[(msg.frame_id, bool(msg.is_extended_frame))] = frame
            self._by_name[msg.name] = frame

    # -- what the profile holds -------------------------------------------------------------------------------

    @property
    def messages(self) -> list[str]:
        return list(self._by_name)

    def frame_id(self, message: str) -> int:
        return int(self._frame(message).message.frame_id)

    def period_s(self, message: str) -> float:
        return self._frame(message).period_s

    def groups(self, message: str) -> list[int]:
        """Multiplexer values of a multiplexed message; [] for a plain one."""
        return self._frame(message).groups

    def signals(self, message: str, group: int | None = None) -> list[str]:
        """Catalogue names a frame of `message` (multiplexer value `group`) carries."""
        frame = self._frame(message)
        return [f.signal.name for f in frame.fields.values() if f.groups is None or group in f.groups]

    def resolution(self, name: str) -> float:
        """The DBC factor that carries catalogue signal `name`: the stated resolution on this bus."""
        for frame in self._by_name.values():
            for f in frame.fields.values():
                if f.signal.name == name:
                    return f.scale
        raise KeyError(name)

    def mapped(self) -> dict[str, tuple[str, str]]:
        """Catalogue name -> (message, DBC signal name), for documentation and coverage checks."""
        return {f.signal.name: (n, f.dbc_name) for n, fr in self._by_name.items() for f in fr.fields.values()}

    # -- decoding ---------------------------------------------------------------------------------------------

    def decode(self, arbitration_id: int, data: bytes | bytearray, *, extended: bool = False) -> CanReading | None:
        """The values one frame carries; None for an id outside the profile. Raises only CanFrameError."""
        frame = self._by_key.get((arbitration_id, extended))
        if frame is None:
            self.counters["unknown_id"] += 1
            return None
        msg = frame.message
        if len(data) != msg.length:
            # Every frame of the profile is 8 bytes; a shorter one was cut or is another node's frame.
            self.counters["bad_frames"] += 1
            raise CanFrameError(f"{msg.name}: {len(data)} data bytes, expected {msg.length}")
        try:
            raw = cast(Mapping[str, Any], msg.decode(bytes(data), decode_choices=False, scaling=False))
        except (CantoolsError, ValueError, KeyError, IndexError) as exc:
            self.counters["bad_frames"] += 1
            raise CanFrameError(f"{msg.name}: {exc}") from None
        group = int(raw[frame.multiplexer]) if frame.multiplexer is not None else None
        values: dict[str, Value] = {}
        for dbc_name, raw_value in raw.items():
            field = frame.fields.get(dbc_name)
            if field is None:
                continue  # the multiplexer itself
            value = self._value(field, int(raw_value))
            if value is not None:
                values[field.signal.name] = value
        self.counters["frames"] += 1
        return CanReading(msg.frame_id, msg.name, group, frame.period_s, values)

    def _value(self, field: _Field, raw: int) -> Value | None:
        phys = raw * field.scale + field.offset
        if not field.lo - 1e-9 <= phys <= field.hi + 1e-9:
            # The sentinel outside the range says "not fitted" (a missing cell, a motor without thermistor);
            # anything else outside it is a reading the sender does not stand behind.
            if raw != field.not_available:
                self.counters["out_of_range"] += 1
            return None
        # Inside both ranges (they were intersected at load), so the catalogue accepts the converted value.
        kind = field.signal.type
        if kind is SignalType.BOOL:
            return bool(raw)
        if kind is SignalType.INT:
            return round(phys)
        # round() can land on -0.0; + 0.0 keeps it a plain zero (stable wire bytes and signatures).
        return round(phys, field.decimals) + 0.0

    # -- encoding (the emulator's side) -----------------------------------------------------------------------

    def encode(self, message: str, values: Mapping[str, Value], group: int | None = None) -> tuple[int, bytes]:
        """(frame id, 8 data bytes) of `message` carrying `values` (catalogue names, catalogue units).

        Signals missing from `values` are sent as "not available" where the field has room for that pattern
        (outside its range); flags and full-range bitfields must be given. Raises only CanFrameError.
        """
        frame = self._frame(message)
        msg = frame.message
        raw: dict[str, int] = {}
        if frame.multiplexer is not None:
            if group not in frame.groups:
                raise CanFrameError(f"{message}: multiplexer value {group!r} not in {frame.groups}")
            raw[frame.multiplexer] = group
        elif group is not None:
            raise CanFrameError(f"{message} is not multiplexed")
        for field in frame.fields.values():
            if field.groups is not None and group not in field.groups:
                continue
            value = values.get(field.signal.name)
            if value is not None:
                raw[field.dbc_name] = _raw(field, value)
            elif field.lo <= field.not_available * field.scale + field.offset <= field.hi:
                # A flag or full-range bitfield has no "not available" pattern: sending one would be a reading.
                raise CanFrameError(f"{message}: {field.signal.name} is required")
            else:
                raw[field.dbc_name] = field.not_available
        try:
            data = msg.encode(raw, scaling=False, strict=False)
        except (CantoolsError, ValueError, KeyError) as exc:
            raise CanFrameError(f"{message}: {exc}") from None
        return msg.frame_id, bytes(data)

    def _frame(self, message: str) -> _Frame:
        try:
            return self._by_name[message]
        except KeyError:
            raise CanFrameError(f"no message {message!r} in the {self.variant} profile") from None


def _raw(field: _Field, value: Value) -> int:
    if isinstance(value, str):
        raise CanFrameError(f"{field.dbc_name}: text cannot be sent on CAN")
    phys = float(value)
    if not math.isfinite(phys) or not field.lo - 1e-9 <= phys <= field.hi + 1e-9:
        raise CanFrameError(f"{field.dbc_name}: {value!r} outside [{field.lo:g}, {field.hi:g}]")
    raw = round((phys - field.offset) / field.scale)
    if not field.raw_lo <= raw <= field.raw_hi:
        raise CanFrameError(f"{field.dbc_name}: {value!r} does not fit the field")
    return raw


def _frame_of(msg: Message, catalogue: Catalogue) -> _Frame:
    period = msg.cycle_time
    if not period:
        raise CanSpecError(f"{msg.name}: no GenMsgCycleTime (every frame of the profile is cyclic)")
    multiplexer: str | None = None
    fields: dict[str, _Field] = {}
    for s in msg.signals:
        if s.is_multiplexer:
            multiplexer = s.name
            continue
        attr = s.dbc.attributes.get(MAPPING_ATTRIBUTE) if s.dbc is not None else None
        name = str(attr.value) if attr is not None else ""
        if not name:
            raise CanSpecError(f"{msg.name}.{s.name} names no catalogue signal ({MAPPING_ATTRIBUTE})")
        if name not in catalogue:
            continue  # a deployment's trimmed catalogue may not carry every detail signal
        sig = catalogue.by_name(name)
        unit = s.unit or ""
        if unit != sig.unit:
            raise CanSpecError(f"{msg.name}.{s.name}: unit {unit!r}, but {name} is in {sig.unit!r}")
        if sig.type is SignalType.STR:
            raise CanSpecError(f"{msg.name}.{s.name}: {name} is text, which the profile does not carry")
        if sig.type is SignalType.BOOL and s.length != 1:
            raise CanSpecError(f"{msg.name}.{s.name}: {name} is a flag and needs a 1-bit field")
        if s.minimum is None or s.maximum is None:
            raise CanSpecError(f"{msg.name}.{s.name}: needs a [min|max] range")
        lo = max(float(s.minimum), sig.min) if sig.min is not None else float(s.minimum)
        hi = min(float(s.maximum), sig.max) if sig.max is not None else float(s.maximum)
        if lo > hi:
            raise CanSpecError(f"{msg.name}.{s.name}: range does not overlap {name}'s")
        if s.is_signed:
            raw_lo, raw_hi = -(1 << (s.length - 1)), (1 << (s.length - 1)) - 1
            not_available = raw_hi
        else:
            raw_lo, raw_hi = 0, (1 << s.length) - 1
            not_available = raw_hi
        fields[s.name] = _Field(
            dbc_name=s.name,
            signal=sig,
            scale=float(s.scale),
            offset=float(s.offset),
            lo=lo,
            hi=hi,
            decimals=sig.decimals,
            raw_lo=raw_lo,
            raw_hi=raw_hi,
            not_available=not_available,
            groups=frozenset(s.multiplexer_ids) if s.multiplexer_ids else None,
        )
    return _Frame(msg, period / 1000.0, multiplexer, fields)
