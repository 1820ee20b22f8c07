"""Finding checksummed frames in a serial byte stream: the resynchronising scanner every binary device codec shares.

A protocol says how a frame starts (`start_byte`), how to judge the bytes at a candidate start (`_check`) and
what a valid frame holds (`_frame`); the scanner does the rest. The buffer only ever holds the start of one
candidate frame, so it stays below the protocol's maximum frame size. A candidate that waits for more bytes is
abandoned as soon as a complete valid frame starts later in the buffer: a start byte in line noise followed by a
large "length" must not swallow the real frame behind it. Never raises; everything is counted.
"""

from __future__ import annotations

from typing import Final, Generic, TypeVar

BAD_FRAMING: Final = -1  # `_check` verdicts below zero
BAD_CHECKSUM: Final = -2
DECODER_COUNTERS: Final = ("bytes", "frames", "garbage", "bad_checksum", "bad_framing", "unexpected")

F = TypeVar("F")


class FrameScanner(Generic[F]):
    start_byte: int

    def __init__(self) -> None:
        self.counters: dict[str, int] = dict.fromkeys(DECODER_COUNTERS, 0)
        self._buf = bytearray()

    # -- what a protocol implements ---------------------------------------------------------------------------

    def _check(self, buf: bytearray, pos: int) -> int:
        """Size of the valid frame at `pos`; 0 if incomplete; BAD_FRAMING or BAD_CHECKSUM if it cannot be one."""
        raise NotImplementedError

    def _frame(self, buf: bytearray, pos: int, size: int) -> F:
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def discard_partial(self) -> None:
        """Forget a buffered partial frame, e.g. before a new request or after the port was lost."""
        self.counters["garbage"] += len(self._buf)
        self._buf.clear()

    def _scan(self, data: bytes) -> list[F]:
        self.counters["bytes"] += len(data)
        buf = self._buf
        buf.extend(data)
        found: list[F] = []
        pos = 0
        n = len(buf)
        while pos < n:
            start = buf.find(self.start_byte, pos)
            if start < 0:
                self.counters["garbage"] += n - pos
                pos = n
                break
            self.counters["garbage"] += start - pos
            pos = start
            verdict = self._check(buf, pos)
            if verdict > 0:
                found.append(self._frame(buf, pos, verdict))
                self.counters["frames"] += 1
                pos += verdict
            elif verdict < 0:
                self.counters["bad_checksum" if verdict == BAD_CHECKSUM else "bad_framing"] += 1
                self.counters["garbage"] += 1
                pos += 1  # that start byte did not begin a frame; what follows may hold one
            else:
                later = self._next_valid_start(pos + 1)
                if later is None:
                    break  # wait for the rest of the candidate
                self.counters["garbage"] += later - pos
                pos = later
        del buf[:pos]
        return found

    def _next_valid_start(self, pos: int) -> int | None:
        buf = self._buf
        while True:
            pos = buf.find(self.start_byte, pos)
            if pos < 0:
                return None
            if self._check(buf, pos) > 0:
                return pos
            pos += 1
