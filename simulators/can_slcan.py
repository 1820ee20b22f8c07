"""The adapter end of an slcan (LAWICEL serial-line CAN) link, on a pty: what a USB-CAN dongle shows its host.

Common USB-CAN adapters (CANable, CANtact, USBtin, Lawicel CANUSB) speak slcan: ASCII lines ending in CR. The host
sends commands (`S5` 250 kbit/s, `O` open, `L` open listen-only, `C` close, `V` version, `N` serial number, `F`
status flags, `t`/`T` transmit a standard/extended frame); the adapter answers CR (ok) or BEL (error) and, while
the channel is open, sends every frame it sees on the bus as `tIIILDD..` / `TIIIIIIIILDD..`. python-can's
`interface="slcan"` opens the pty's slave path like /dev/ttyACM0, so the agent's CAN source runs unmodified.

`SlcanLineDecoder` and `SlcanAdapter` are sans-I/O (lines in, replies out); `SlcanPtyAdapter` puts them on a
`PtyPort`. Like a real adapter, it forwards bus frames only while the host has the channel open.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Final

from simulators.pty_port import PtyPort

log = logging.getLogger("zhilian.sim.can")

OK: Final = b"\r"
ERROR: Final = b"\x07"
# The longest line either side sends is an extended frame with 8 data bytes and a timestamp: 1+8+1+16+4 = 30.
MAX_LINE: Final = 40
BITRATES: Final[dict[str, int]] = {
    "S0": 10_000,
    "S1": 20_000,
    "S2": 50_000,
    "S3": 100_000,
    "S4": 125_000,
    "S5": 250_000,
    "S6": 500_000,
    "S7": 750_000,
    "S8": 1_000_000,
}
HW_VERSION: Final = "10"
SW_VERSION: Final = "13"
SERIAL: Final = "ZL01"
_HEX = frozenset("0123456789ABCDEFabcdef")


class SlcanError(Exception):
    """A frame line that cannot be built or parsed."""


@dataclass(frozen=True, slots=True)
class SlcanFrame:
    arbitration_id: int
    data: bytes
    extended: bool = False


def encode_frame_line(frame: SlcanFrame) -> bytes:
    """`tIIILDD..\\r` (standard) or `TIIIIIIIILDD..\\r` (extended) for a data frame of up to 8 bytes."""
    if len(frame.data) > 8:
        raise SlcanError("classic CAN frames carry at most 8 bytes")
    if frame.extended:
        if not 0 <= frame.arbitration_id < 1 << 29:
            raise SlcanError("extended ids are 29 bits")
        head = f"T{frame.arbitration_id:08X}"
    else:
        if not 0 <= frame.arbitration_id < 1 << 11:
            raise SlcanError("standard ids are 11 bits")
        head = f"t{frame.arbitration_id:03X}"
    return f"{head}{len(frame.data)}{frame.data.hex().upper()}".encode("ascii") + OK


def parse_frame_line(line: str) -> SlcanFrame:
    """The frame of a `t`/`T` line (without its CR); a trailing 4-digit timestamp is allowed and ignored."""
    if not line or line[0] not in "tT":
        raise SlcanError(f"not a frame line: {line[:MAX_LINE]!r}")
    extended = line[0] == "T"
    id_len = 8 if extended else 3
    head = line[1 : 2 + id_len]
    if len(head) != id_len + 1 or not set(head) <= _HEX or not head[-1].isdigit():
        raise SlcanError(f"malformed frame header: {line[:MAX_LINE]!r}")
    arbitration_id, dlc = int(head[:-1], 16), int(head[-1])
    body = line[2 + id_len :]
    if dlc > 8 or len(body) not in (2 * dlc, 2 * dlc + 4) or not set(body) <= _HEX:
        raise SlcanError(f"malformed frame data: {line[:MAX_LINE]!r}")
    if arbitration_id >= (1 << 29 if extended else 1 << 11):
        raise SlcanError(f"id out of range: {line[:MAX_LINE]!r}")
    return SlcanFrame(arbitration_id, bytes.fromhex(body[: 2 * dlc]), extended)


class SlcanLineDecoder:
    """CR-terminated ASCII lines from bytes as the host writes them. Never raises; see `counters`.

    The buffer never holds more than MAX_LINE bytes: a longer run without CR is dropped (`overflow`); a line with
    bytes outside printable ASCII is dropped (`garbage`).
    """

    def __init__(self) -> None:
        self.counters: dict[str, int] = {"lines": 0, "overflow": 0, "garbage": 0}
        self._buf = bytearray()
        self._overflowed = False

    def feed(self, data: bytes) -> list[str]:
        out: list[str] = []
        start = 0
        while True:
            end = data.find(b"\r", start)
            piece = data[start:] if end < 0 else data[start:end]
            self._append(piece)
            if end < 0:
                break
            line = self._take()
            if line is not None:
                out.append(line)
            start = end + 1
        return out

    def _append(self, piece: bytes) -> None:
        if self._overflowed:
            return
        if len(self._buf) + len(piece) > MAX_LINE:
            self.counters["overflow"] += 1
            self._buf.clear()
            self._overflowed = True  # the rest of this run up to its CR is the same over-long line
            return
        self._buf.extend(piece)

    def _take(self) -> str | None:
        raw, overflowed = bytes(self._buf), self._overflowed
        self._buf.clear()
        self._overflowed = False
        if overflowed:
            return None
        if any(not 0x20 <= b <= 0x7E for b in raw):
            self.counters["garbage"] += 1
            return None
        self.counters["lines"] += 1
        return raw.decode("ascii")


class SlcanAdapter:
    """The command state machine of an slcan adapter: `handle(line)` returns the bytes it answers with."""

    def __init__(self, host_frames_maxlen: int = 100) -> None:
        self.is_open = False
        self.listen_only = False
        self.bitrate = 250_000
        self.counters: dict[str, int] = {"commands": 0, "errors": 0, "host_frames": 0}
        self.host_frames: deque[SlcanFrame] = deque(maxlen=host_frames_maxlen)

    def handle(self, line: str) -> bytes:
        self.counters["commands"] += 1
        reply = self._reply(line)
        if reply == ERROR:
            self.counters["errors"] += 1
        return reply

    def _reply(self, line: str) -> bytes:
        cmd = line[:1]
        if line == "":
            return OK  # python-can sends an empty command when no data bitrate is asked for
        if line in BITRATES:
            if self.is_open:
                return ERROR  # bitrate changes only while the channel is closed
            self.bitrate = BITRATES[line]
            return OK
        if cmd in ("O", "L") and len(line) == 1:
            if self.is_open:
                return ERROR
            self.is_open, self.listen_only = True, cmd == "L"
            return OK
        if line == "C":
            self.is_open = False
            return OK
        if line == "V":
            return f"V{HW_VERSION}{SW_VERSION}".encode("ascii") + OK
        if line == "N":
            return f"N{SERIAL}".encode("ascii") + OK
        if line == "F":
            return b"F00" + OK if self.is_open else ERROR
        if line in ("Z0", "Z1"):
            return OK
        if cmd in ("t", "T"):
            if not self.is_open or self.listen_only:
                return ERROR
            try:
                frame = parse_frame_line(line)
            except SlcanError:
                return ERROR
            self.host_frames.append(frame)
            self.counters["host_frames"] += 1
            return b"z" + OK if cmd == "t" else b"Z" + OK
        return ERROR


class SlcanPtyAdapter:
    """An slcan adapter on a fresh pty; `port` is the path the host opens. Bus frames go out only while open."""

    def __init__(self) -> None:
        self.decoder = SlcanLineDecoder()
        self.adapter = SlcanAdapter()
        self.port = ""
        self.frames_sent = 0
        self.frames_dropped = 0  # the pty was full: nobody drains it
        self._pty: PtyPort | None = None

    @property
    def plugged(self) -> bool:
        return self._pty is not None

    def open(self) -> str:
        """Plug in: a new pty (a new path, as a re-enumerated USB device would get); the channel starts closed."""
        if self._pty is not None:
            raise RuntimeError("adapter already plugged in")
        self.adapter.is_open = False
        pty = PtyPort(on_data=self._on_data)
        self.port = pty.open()
        self._pty = pty
        log.info("slcan adapter plugged in", extra={"port": self.port})
        return self.port

    def close(self) -> None:
        """Unplug: the pty goes away under the host."""
        pty, self._pty = self._pty, None
        if pty is not None:
            pty.close()
        self.adapter.is_open = False

    def send_frame(self, frame: SlcanFrame) -> bool:
        """Hand a bus frame to the host; False when the channel is closed or the line is full."""
        if self._pty is None or not self.adapter.is_open:
            return False
        if not self._pty.write(encode_frame_line(frame)):
            self.frames_dropped += 1
            return False
        self.frames_sent += 1
        return True

    def write_raw(self, data: bytes) -> bool:
        """Put arbitrary bytes on the line (fault injection); False when nobody listens."""
        if self._pty is None or not self.adapter.is_open:
            return False
        return self._pty.write(data)

    def _on_data(self, data: bytes) -> None:
        pty = self._pty
        for line in self.decoder.feed(data):
            reply = self.adapter.handle(line)
            if pty is not None and not pty.write(reply):
                log.warning("slcan reply dropped: pty full", extra={"port": self.port, "command": line[:8]})
