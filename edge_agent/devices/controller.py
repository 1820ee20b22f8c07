"""Sans-I/O codec for the motor controller UART protocol (firmware_specs/CONTROLLER_UART.md).

Pure code over bytes: frame encoding, a resynchronising frame decoder (one per direction), payload parsers and
builders, and the mapping of decoded values onto catalogue signal names. Raw units (0.1 km/h, 0.1 A, 0.1 °C,
0.1 inch) are converted to catalogue units here and nowhere else. The serial shell (`controller_uart`) and the
emulator (simulators/controller_uart.py) both build on this module.

Errors: the decoders' `feed` never raises — garbage, bad checksums and broken frames are counted and dropped; the
parsers and builders raise only `ControllerError`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from edge_agent.devices.framing import BAD_CHECKSUM, BAD_FRAMING, FrameScanner
from protocol.catalogue import Catalogue, SignalType, Value, load_catalogue

START: Final = 0x3A  # ':'
END: Final = b"\r\n"
TYPE_STATUS: Final = 0x10  # controller -> host, streamed unprompted
TYPE_CONFIG: Final = 0x20  # controller -> host, answer to TYPE_READ_CONFIG
TYPE_READ_CONFIG: Final = 0x21  # host -> controller
REQUEST_TYPES: Final = frozenset({TYPE_READ_CONFIG})

# The length byte could say 255, but no frame of ours needs more than 64: capping it lets the receiver reject a
# stray 0x3A in line noise at once instead of waiting for up to 255 bytes that would swallow real frames.
MAX_PAYLOAD: Final = 64
FRAME_OVERHEAD: Final = 6  # start, type, length, checksum, CR, LF
MAX_FRAME: Final = FRAME_OVERHEAD + MAX_PAYLOAD
STATUS_LEN: Final = 17
CONFIG_FIXED_LEN: Final = 6  # bytes before the firmware version text
MAX_VERSION_LEN: Final = MAX_PAYLOAD - CONFIG_FIXED_LEN
NO_SENSOR: Final = 0x7FFF  # motor temperature of a motor without a thermistor

FLAG_BRAKE: Final = 0x01

FAULT_BITS: Final[dict[int, str]] = {
    0: "hall sensor",
    1: "phase over-current",
    2: "over-voltage",
    3: "under-voltage",
    4: "motor stall",
    5: "throttle fault",
    6: "controller over-temperature",
    7: "motor over-temperature",
    8: "communication",
}


class ControllerError(Exception):
    """A controller payload or frame that cannot be parsed or built."""


def checksum(body: bytes | bytearray) -> int:
    """XOR of type, length and payload bytes (everything between the start byte and the checksum)."""
    x = 0
    for b in body:
        x ^= b
    return x


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    """3A <type> <len> <payload> <xor> 0D 0A."""
    if not 0 <= frame_type <= 0xFF:
        raise ControllerError("frame type must be in 0..255")
    if len(payload) > MAX_PAYLOAD:
        raise ControllerError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    body = bytes((frame_type, len(payload))) + bytes(payload)
    return bytes((START,)) + body + bytes((checksum(body),)) + END


def encode_config_request() -> bytes:
    """3A 21 00 21 0D 0A."""
    return encode_frame(TYPE_READ_CONFIG)


@dataclass(frozen=True, slots=True)
class ControllerFrame:
    """One checksummed frame, either direction."""

    type: int
    payload: bytes


class _FrameScanner(FrameScanner[ControllerFrame]):
    """Checksummed 3A ... 0D 0A frames, both directions (scanning and resync: `edge_agent.devices.framing`)."""

    start_byte = START

    def _check(self, buf: bytearray, pos: int) -> int:
        """Size of the valid frame at `pos`; 0 if incomplete; a negative code if it cannot be one."""
        avail = len(buf) - pos
        if avail < 3:
            return 0
        length = buf[pos + 2]
        if length > MAX_PAYLOAD:
            return BAD_FRAMING
        size = FRAME_OVERHEAD + length
        if avail < size:
            return 0
        if buf[pos + size - 2 : pos + size] != END:
            return BAD_FRAMING
        if buf[pos + size - 3] != checksum(buf[pos + 1 : pos + size - 3]):
            return BAD_CHECKSUM
        return size

    def _frame(self, buf: bytearray, pos: int, size: int) -> ControllerFrame:
        return ControllerFrame(type=buf[pos + 1], payload=bytes(buf[pos + 3 : pos + size - 3]))


class ControllerFrameDecoder(_FrameScanner):
    """Frames from bytes as they come off the controller's UART. Never raises; see `counters`."""

    def feed(self, data: bytes) -> list[ControllerFrame]:
        out: list[ControllerFrame] = []
        for frame in self._scan(data):
            if frame.type in REQUEST_TYPES:
                self.counters["unexpected"] += 1  # our own request echoed back (half-duplex adapters do that)
            else:
                out.append(frame)
        return out


class ControllerRequestDecoder(_FrameScanner):
    """Request frames from bytes a host sent (the emulator's side). Never raises; see `counters`."""

    def feed(self, data: bytes) -> list[ControllerFrame]:
        out: list[ControllerFrame] = []
        for frame in self._scan(data):
            if frame.type in REQUEST_TYPES:
                out.append(frame)
            else:
                self.counters["unexpected"] += 1
        return out


# -- status frame ---------------------------------------------------------------------------------------------

_STATUS = struct.Struct(">HhhhhhHBBB")
assert _STATUS.size == STATUS_LEN


@dataclass(frozen=True, slots=True)
class ControllerStatus:
    """A status frame in catalogue units."""

    speed_kmh: float
    motor_rpm: int
    phase_current_a: float  # negative while regenerating
    supply_current_a: float  # drawn from the battery: positive motoring, negative regen
    controller_temp_c: float
    motor_temp_c: float | None  # None: the motor has no thermistor
    faults: int  # FAULT_BITS
    brake: bool
    throttle_pct: int
    assist_level: int
    flags: int = 0  # the raw flags byte; bits other than FLAG_BRAKE are reserved

    @property
    def fault_names(self) -> list[str]:
        """Names of the active faults (unknown bits as 'bit N')."""
        return [FAULT_BITS.get(b, f"bit {b}") for b in range(16) if self.faults >> b & 1]

    def signals(self, catalogue: Catalogue | None = None) -> dict[str, Value]:
        """This status under catalogue names, at catalogue resolution; out-of-range values are left out."""
        raw: list[tuple[str, Value]] = [
            ("Speed", self.speed_kmh),
            ("Powertrain.ElectricMotor.Speed", self.motor_rpm),
            ("Powertrain.ElectricMotor.PhaseCurrent", self.phase_current_a),
            ("Powertrain.ElectricMotor.SupplyCurrent", self.supply_current_a),
            ("Powertrain.ElectricMotor.ControllerTemperature", self.controller_temp_c),
            ("Powertrain.ElectricMotor.FaultCode", self.faults),
            ("Chassis.Brake.IsEngaged", self.brake),
            ("Chassis.Accelerator.PedalPosition", self.throttle_pct),
            ("Powertrain.ElectricMotor.AssistLevel", self.assist_level),
        ]
        if self.motor_temp_c is not None:
            raw.append(("Powertrain.ElectricMotor.Temperature", self.motor_temp_c))
        return _catalogued(raw, catalogue)


def parse_status(payload: bytes) -> ControllerStatus:
    """Decode a status payload; bytes after the 17 defined ones (later firmware may append fields) are ignored."""
    if len(payload) < STATUS_LEN:
        raise ControllerError(f"status needs {STATUS_LEN} bytes, got {len(payload)}")
    speed, rpm, phase, supply, ctemp, mtemp, faults, flags, throttle, assist = _STATUS.unpack_from(payload)
    if throttle > 100:
        raise ControllerError(f"throttle {throttle} % is beyond 100 %")
    return ControllerStatus(
        speed_kmh=speed / 10,
        motor_rpm=rpm,
        phase_current_a=phase / 10,
        supply_current_a=supply / 10,
        controller_temp_c=ctemp / 10,
        motor_temp_c=None if mtemp == NO_SENSOR else mtemp / 10,
        faults=faults,
        brake=bool(flags & FLAG_BRAKE),
        throttle_pct=throttle,
        assist_level=assist,
        flags=flags,
    )


def build_status(status: ControllerStatus) -> bytes:
    """The status payload for `status` (inverse of `parse_status`)."""
    if not 0 <= status.throttle_pct <= 100:
        raise ControllerError("throttle must be in 0..100 %")
    mtemp = NO_SENSOR if status.motor_temp_c is None else round(status.motor_temp_c * 10)
    if mtemp == NO_SENSOR and status.motor_temp_c is not None:
        raise ControllerError("motor temperature collides with the no-sensor marker")
    flags = (status.flags & ~FLAG_BRAKE) | (FLAG_BRAKE if status.brake else 0)
    try:
        return _STATUS.pack(
            round(status.speed_kmh * 10),
            status.motor_rpm,
            round(status.phase_current_a * 10),
            round(status.supply_current_a * 10),
            round(status.controller_temp_c * 10),
            mtemp,
            status.faults,
            flags,
            status.throttle_pct,
            status.assist_level,
        )
    except (struct.error, ValueError, OverflowError) as exc:
        raise ControllerError(f"status not encodable: {exc}") from None


# -- config frame ---------------------------------------------------------------------------------------------

_CONFIG = struct.Struct(">HHBB")
assert _CONFIG.size == CONFIG_FIXED_LEN


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """A config frame in catalogue units."""

    speed_limit_kmh: float
    wheel_inch: float
    pole_pairs: int
    firmware: str

    def signals(self, catalogue: Catalogue | None = None) -> dict[str, Value]:
        raw: list[tuple[str, Value]] = [
            ("Powertrain.ElectricMotor.ConfiguredSpeedLimit", self.speed_limit_kmh),
            ("Chassis.Wheel.Size", self.wheel_inch),
            ("Powertrain.ElectricMotor.PolePairs", self.pole_pairs),
        ]
        if self.firmware:
            raw.append(("Powertrain.ElectricMotor.FirmwareVersion", self.firmware))
        return _catalogued(raw, catalogue)


def parse_config(payload: bytes) -> ControllerConfig:
    if len(payload) < CONFIG_FIXED_LEN:
        raise ControllerError(f"config needs at least {CONFIG_FIXED_LEN} bytes, got {len(payload)}")
    limit, wheel, poles, n = _CONFIG.unpack_from(payload)
    if n > len(payload) - CONFIG_FIXED_LEN:
        raise ControllerError(f"config announces a {n}-byte version but carries {len(payload) - CONFIG_FIXED_LEN}")
    text = payload[CONFIG_FIXED_LEN : CONFIG_FIXED_LEN + n]
    if any(not 0x20 <= c <= 0x7E for c in text):
        raise ControllerError("firmware version is not printable ASCII")
    return ControllerConfig(
        speed_limit_kmh=limit / 10, wheel_inch=wheel / 10, pole_pairs=poles, firmware=text.decode("ascii")
    )


def build_config(config: ControllerConfig) -> bytes:
    try:
        text = config.firmware.encode("ascii")
    except UnicodeEncodeError:
        raise ControllerError("firmware version must be ASCII") from None
    if len(text) > MAX_VERSION_LEN or any(not 0x20 <= c <= 0x7E for c in text):
        raise ControllerError(f"firmware version must be at most {MAX_VERSION_LEN} printable characters")
    try:
        head = _CONFIG.pack(
            round(config.speed_limit_kmh * 10), round(config.wheel_inch * 10), config.pole_pairs, len(text)
        )
    except (struct.error, ValueError, OverflowError) as exc:
        raise ControllerError(f"config not encodable: {exc}") from None
    return head + text


# -- catalogue mapping ----------------------------------------------------------------------------------------


def _catalogued(items: Iterable[tuple[str, Value]], catalogue: Catalogue | None) -> dict[str, Value]:
    cat = catalogue or load_catalogue()
    out: dict[str, Value] = {}
    for name, value in items:
        if name not in cat:
            continue  # a deployment's trimmed catalogue may not carry every detail signal
        sig = cat.by_name(name)
        if sig.type is SignalType.FLOAT and isinstance(value, int | float) and not isinstance(value, bool):
            # round() can land on -0.0; + 0.0 keeps it a plain zero (stable wire bytes and signatures).
            value = round(float(value), sig.decimals) + 0.0
        if sig.in_range(value):
            out[name] = value
    return out
