"""Sans-I/O codec for the JBD / Xiaoxiang BMS UART protocol (firmware_specs/BMS_UART.md).

Pure code over bytes: frame encoding, a resynchronising frame decoder, payload parsers and builders, and the
mapping of decoded values onto catalogue signal names. Raw register units (10 mV, 10 mA, 10 mAh, 0.1 K) are
converted to catalogue units (V, A, Ah, degC) here and nowhere else. The serial shell (`jbd_uart`) and the BMS
emulator (simulators/bms_jbd.py) both build on this module.

Errors: `JbdFrameDecoder.feed` never raises — garbage, bad checksums and broken frames are counted and dropped;
the parsers and builders raise only `JbdError`.
"""

from __future__ import annotations

import datetime as dt
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from edge_agent.devices.framing import BAD_CHECKSUM, BAD_FRAMING, FrameScanner
from protocol.catalogue import Catalogue, SignalType, Value, load_catalogue

START: Final = 0xDD
END: Final = 0x77
OP_READ: Final = 0xA5
OP_WRITE: Final = 0x5A
STATUS_OK: Final = 0x00
STATUS_ERROR: Final = 0x80

REG_BASIC_INFO: Final = 0x03
REG_CELL_VOLTAGES: Final = 0x04
REG_BARCODE: Final = 0xA2

MAX_DATA: Final = 255  # the length field is one byte
FRAME_OVERHEAD: Final = 7  # start, op/register, register/status, length, checksum (2), end
MAX_FRAME: Final = FRAME_OVERHEAD + MAX_DATA
BASIC_INFO_FIXED_LEN: Final = 23  # bytes before the NTC readings
DECIKELVIN_AT_0C: Final = 2731  # JBD's own offset: 0.1 K units with 0 °C = 2731, not 2731.5

_PREFIX = "Powertrain.TractionBattery."
CATALOGUE_CELLS: Final = 24  # per-cell signals the catalogue names (CellVoltage.Cell1..Cell24)
CATALOGUE_PROBES: Final = 8  # per-probe signals the catalogue names (Temperature.Probe1..Probe8)


class JbdError(Exception):
    """A JBD payload or frame that cannot be parsed or built."""


def checksum(body: bytes | bytearray) -> int:
    """0x10000 minus the byte sum of everything after the start byte and the op/register byte, up to the checksum.

    That is register+length+data in a request and status+length+data in a response: the byte right after 0xDD
    is never summed (verified against the vendor's example frames, see BMS_UART.md).
    """
    return (0x10000 - sum(body)) & 0xFFFF


def _frame(first: int, second: int, payload: bytes) -> bytes:
    if not (0 <= first <= 0xFF and 0 <= second <= 0xFF):
        raise JbdError("frame header bytes must be in 0..255")
    if len(payload) > MAX_DATA:
        raise JbdError(f"payload of {len(payload)} bytes exceeds {MAX_DATA}")
    body = bytes((second, len(payload))) + payload
    return bytes((START, first)) + body + checksum(body).to_bytes(2, "big") + bytes((END,))


def encode_read_request(register: int) -> bytes:
    """DD A5 <register> 00 <checksum> 77."""
    return _frame(OP_READ, register, b"")


def encode_response(register: int, payload: bytes, status: int = STATUS_OK) -> bytes:
    """DD <register> <status> <length> <payload> <checksum> 77 (what the BMS sends)."""
    return _frame(register, status, bytes(payload))


@dataclass(frozen=True, slots=True)
class JbdFrame:
    """One response from the BMS."""

    register: int
    status: int
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass(frozen=True, slots=True)
class JbdRequest:
    """One request to the BMS (what the emulator decodes)."""

    operation: int  # OP_READ or OP_WRITE
    register: int
    payload: bytes


class _FrameScanner(FrameScanner[tuple[int, int, bytes]]):
    """Checksummed DD ... 77 frames, both directions (scanning and resync: `edge_agent.devices.framing`)."""

    start_byte = START

    def _check(self, buf: bytearray, pos: int) -> int:
        """Size of the valid frame at `pos`; 0 if incomplete; a negative code if it cannot be one."""
        avail = len(buf) - pos
        if avail < 4:
            return 0
        size = FRAME_OVERHEAD + buf[pos + 3]
        if avail < size:
            return 0
        if buf[pos + size - 1] != END:
            return BAD_FRAMING
        if int.from_bytes(buf[pos + size - 3 : pos + size - 1], "big") != checksum(buf[pos + 2 : pos + size - 3]):
            return BAD_CHECKSUM
        return size

    def _frame(self, buf: bytearray, pos: int, size: int) -> tuple[int, int, bytes]:
        return buf[pos + 1], buf[pos + 2], bytes(buf[pos + 4 : pos + size - 3])


class JbdFrameDecoder(_FrameScanner):
    """Response frames from bytes as they come off the BMS's UART. Never raises; see `counters`."""

    def feed(self, data: bytes) -> list[JbdFrame]:
        return [JbdFrame(register=a, status=b, payload=p) for a, b, p in self._scan(data)]


class JbdRequestDecoder(_FrameScanner):
    """Request frames from bytes a host sent (the emulator's side). Never raises; see `counters`."""

    def feed(self, data: bytes) -> list[JbdRequest]:
        out: list[JbdRequest] = []
        for op, register, payload in self._scan(data):
            if op in (OP_READ, OP_WRITE):
                out.append(JbdRequest(operation=op, register=register, payload=payload))
            else:
                self.counters["unexpected"] += 1  # a response-shaped frame: echo or a second master on the line
        return out


# -- register 0x03: basic info -------------------------------------------------------------------------------

PROTECTION_BITS: Final[dict[int, str]] = {
    0: "cell overvoltage",
    1: "cell undervoltage",
    2: "pack overvoltage",
    3: "pack undervoltage",
    4: "charge overtemperature",
    5: "charge undertemperature",
    6: "discharge overtemperature",
    7: "discharge undertemperature",
    8: "charge overcurrent",
    9: "discharge overcurrent",
    10: "short circuit",
    11: "front-end IC error",
    12: "MOSFET software lock",
}

_BASIC_HEAD = struct.Struct(">HhHHHHHHHBBBBB")
assert _BASIC_HEAD.size == BASIC_INFO_FIXED_LEN


@dataclass(frozen=True, slots=True)
class BasicInfo:
    """Register 0x03 in catalogue units. Current is positive into the pack (charging), as the BMS sends it."""

    voltage_v: float
    current_a: float
    remaining_ah: float
    nominal_ah: float
    cycles: int
    production_date_raw: int  # bits 15..9 year-2000, 8..5 month, 4..0 day; see `production_date`
    balance_bits: int  # bit i set: cell i+1 is being balanced (32 cells)
    protection: int  # PROTECTION_BITS
    version: int  # firmware version, 0x10 = 1.0
    soc_pct: int
    fet_status: int  # bit 0 charge FET on, bit 1 discharge FET on
    cell_count: int
    temperatures_c: tuple[float, ...]  # one per NTC probe

    @property
    def production_date(self) -> dt.date | None:
        raw = self.production_date_raw
        try:
            return dt.date(2000 + (raw >> 9), (raw >> 5) & 0x0F, raw & 0x1F)
        except ValueError:
            return None  # unset (0) or garbage dates are common on cheap boards

    @property
    def protections(self) -> list[str]:
        """Names of the active protections (unknown bits as 'bit N')."""
        return [PROTECTION_BITS.get(b, f"bit {b}") for b in range(16) if self.protection >> b & 1]

    def signals(self, catalogue: Catalogue | None = None) -> dict[str, Value]:
        """This reading under catalogue names, at catalogue resolution; out-of-range values are left out."""
        raw: dict[str, Value] = {
            "CurrentVoltage": self.voltage_v,
            "CurrentCurrent": self.current_a,
            "StateOfCharge": float(self.soc_pct),
            "RemainingCapacity": self.remaining_ah,
            "NominalCapacity": self.nominal_ah,
            "CycleCount": self.cycles,
            "ProtectionStatus": self.protection,
            "CellCount": self.cell_count,
        }
        temps = self.temperatures_c
        if temps:
            raw["Temperature.Max"] = max(temps)
            raw["Temperature.Min"] = min(temps)
        for i, t in enumerate(temps[:CATALOGUE_PROBES], start=1):
            raw[f"Temperature.Probe{i}"] = t
        return _catalogued(raw.items(), catalogue)


def parse_basic_info(payload: bytes) -> BasicInfo:
    """Decode a register 0x03 payload. Bytes after the NTC readings (newer firmware appends fields) are ignored."""
    if len(payload) < BASIC_INFO_FIXED_LEN:
        raise JbdError(f"basic info needs {BASIC_INFO_FIXED_LEN} bytes, got {len(payload)}")
    (volt, curr, remaining, nominal, cycles, date, bal_lo, bal_hi, prot, version, rsoc, fet, cells, ntcs) = (
        _BASIC_HEAD.unpack_from(payload)
    )
    end = BASIC_INFO_FIXED_LEN + 2 * ntcs
    if len(payload) < end:
        raise JbdError(f"basic info announces {ntcs} NTCs but carries {len(payload) - BASIC_INFO_FIXED_LEN} bytes")
    ntc_raw = struct.unpack_from(f">{ntcs}H", payload, BASIC_INFO_FIXED_LEN)
    return BasicInfo(
        voltage_v=volt / 100,
        current_a=curr / 100,
        remaining_ah=remaining / 100,
        nominal_ah=nominal / 100,
        cycles=cycles,
        production_date_raw=date,
        balance_bits=bal_lo | bal_hi << 16,
        protection=prot,
        version=version,
        soc_pct=rsoc,
        fet_status=fet,
        cell_count=cells,
        temperatures_c=tuple((r - DECIKELVIN_AT_0C) / 10 for r in ntc_raw),
    )


def build_basic_info(info: BasicInfo) -> bytes:
    """The register 0x03 payload for `info` (inverse of `parse_basic_info`)."""
    try:
        head = _BASIC_HEAD.pack(
            round(info.voltage_v * 100),
            round(info.current_a * 100),
            round(info.remaining_ah * 100),
            round(info.nominal_ah * 100),
            info.cycles,
            info.production_date_raw,
            info.balance_bits & 0xFFFF,
            info.balance_bits >> 16,
            info.protection,
            info.version,
            info.soc_pct,
            info.fet_status,
            info.cell_count,
            len(info.temperatures_c),
        )
        temps = b"".join(struct.pack(">H", round(t * 10) + DECIKELVIN_AT_0C) for t in info.temperatures_c)
    except (struct.error, ValueError, OverflowError) as exc:
        raise JbdError(f"basic info not encodable: {exc}") from None
    payload = head + temps
    if len(payload) > MAX_DATA:
        raise JbdError("too many NTCs for one frame")
    return payload


def production_date_raw(date: dt.date) -> int:
    """Pack a date the way register 0x03 carries it."""
    if not 2000 <= date.year <= 2127:
        raise JbdError("production year must be in 2000..2127")
    return (date.year - 2000) << 9 | date.month << 5 | date.day


# -- register 0x04: cell voltages -----------------------------------------------------------------------------


def parse_cell_voltages(payload: bytes) -> list[float]:
    """Cell voltages in V from a register 0x04 payload (big-endian u16 mV per cell)."""
    if len(payload) % 2:
        raise JbdError(f"cell voltage payload has an odd length ({len(payload)})")
    return [mv / 1000 for (mv,) in struct.iter_unpack(">H", payload)]


def build_cell_voltages(volts: Sequence[float]) -> bytes:
    try:
        payload = b"".join(struct.pack(">H", round(v * 1000)) for v in volts)
    except (struct.error, ValueError, OverflowError) as exc:
        raise JbdError(f"cell voltages not encodable: {exc}") from None
    if len(payload) > MAX_DATA:
        raise JbdError("too many cells for one frame")
    return payload


def cell_voltage_signals(volts: Sequence[float], catalogue: Catalogue | None = None) -> dict[str, Value]:
    """Per-cell (first 24), highest and lowest cell voltage under catalogue names."""
    raw: dict[str, Value] = {}
    if volts:
        raw["CellVoltage.Max"] = max(volts)
        raw["CellVoltage.Min"] = min(volts)
    for i, v in enumerate(volts[:CATALOGUE_CELLS], start=1):
        raw[f"CellVoltage.Cell{i}"] = v
    return _catalogued(raw.items(), catalogue)


# -- register 0xA2: barcode -----------------------------------------------------------------------------------


def parse_barcode(payload: bytes) -> str:
    """The barcode from a register 0xA2 payload: JBD string registers carry a length byte, then ASCII."""
    if not payload:
        raise JbdError("barcode payload is empty")
    n = payload[0]
    if n > len(payload) - 1:
        raise JbdError(f"barcode announces {n} bytes but carries {len(payload) - 1}")
    # Boards pad the field with NULs or spaces; neither belongs to the code.
    text = payload[1 : 1 + n].rstrip(b"\x00 ")
    if any(not 0x20 <= c <= 0x7E for c in text):
        raise JbdError("barcode is not printable ASCII")
    return text.decode("ascii")


def build_barcode(text: str) -> bytes:
    try:
        data = text.encode("ascii")
    except UnicodeEncodeError:
        raise JbdError("barcode must be ASCII") from None
    if len(data) >= MAX_DATA:
        raise JbdError("barcode too long for one frame")
    return bytes((len(data),)) + data


def barcode_signals(barcode: str, catalogue: Catalogue | None = None) -> dict[str, Value]:
    return _catalogued([("Barcode", barcode)] if barcode else [], catalogue)


# -- catalogue mapping ----------------------------------------------------------------------------------------


def _catalogued(items: Iterable[tuple[str, Value]], catalogue: Catalogue | None) -> dict[str, Value]:
    cat = catalogue or load_catalogue()
    out: dict[str, Value] = {}
    for suffix, value in items:
        name = _PREFIX + suffix
        if name not in cat:
            continue  # a deployment's trimmed catalogue may not carry every detail signal
        sig = cat.by_name(name)
        if sig.type is SignalType.FLOAT and isinstance(value, int | float) and not isinstance(value, bool):
            # round() can land on -0.0; + 0.0 keeps it a plain zero (stable wire bytes and signatures).
            value = round(float(value), sig.decimals) + 0.0
        if sig.in_range(value):
            out[name] = value
    return out
