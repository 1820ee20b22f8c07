"""A GNSS receiver on a real serial pty: the agent opens `emulator.port` with pyserial as it would /dev/ttyS1.

Every 1/rate seconds, on the wall-clock grid (as receivers align epochs to whole GNSS seconds), one epoch of
sentences for the vehicle's state at that instant is written to the pty master. The master is non-blocking: when
no one reads and the pty buffer fills, whole epochs are dropped and counted — never half a sentence, and never a
blocked event loop. `truth` keeps what each written epoch says, for tests to hold the agent's output against.

What the receiver writes is a `simulators.nmea.Receiver`, given as such or by its name in `RECEIVERS`
("gn-multi", "bd-only", "quectel-pq", ...); without one, `talker`/`beidou_talker` pick the original GN (GPS +
BeiDou) or BeiDou-only receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from datetime import UTC, datetime, timedelta

from simulators.nmea import RECEIVERS, Receiver, SkyModel, TruthFix, encode_epoch, legacy_receiver, sentence
from simulators.pty_port import PtyPort
from simulators.vehicle import VehicleModel

__all__ = ["GnssEmulator", "TruthFix", "no_fix_epoch"]

log = logging.getLogger(__name__)


class GnssEmulator:
    def __init__(
        self,
        model: VehicleModel,
        rate_hz: float = 1.0,
        talker: str = "GN",
        *,
        beidou_talker: str = "GB",
        receiver: Receiver | str | None = None,
        truth_maxlen: int = 3600,
    ) -> None:
        if not 0.0 < rate_hz <= 20.0:
            raise ValueError("rate_hz must be in (0, 20]")
        if isinstance(receiver, str):
            if receiver not in RECEIVERS:
                raise ValueError(f"unknown receiver {receiver!r}; known: {', '.join(sorted(RECEIVERS))}")
            receiver = RECEIVERS[receiver]
        self.receiver = receiver if receiver is not None else legacy_receiver(talker, beidou_talker)
        self.model = model
        self.rate_hz = rate_hz
        self.talker = self.receiver.talker
        self.truth: deque[TruthFix] = deque(maxlen=truth_maxlen)
        self.epochs_written = 0
        self.dropped_epochs = 0
        self.no_fix_epochs = 0  # written while the model's receiver had no fix (not in `truth`)
        self.port = ""
        self._sky = SkyModel(model.seed)
        self._pty = PtyPort()  # write-only: a receiver streams and ignores what it is sent
        self._task: asyncio.Task[None] | None = None

    # Tests reach into the line itself (read the slave directly, wait for a pending tail to drain).
    @property
    def _slave(self) -> int | None:
        return self._pty.slave_fd

    @property
    def _pending(self) -> int:
        return self._pty.pending

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("emulator already started")
        self.port = self._pty.open()
        self._task = asyncio.create_task(self._run(), name=f"gnss-emulator:{self.port}")
        log.info("gnss emulator started", extra={"port": self.port, "rate_hz": self.rate_hz})

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        self._pty.close()

    async def _run(self) -> None:
        period = 1.0 / self.rate_hz
        tick = math.floor(time.time() * self.rate_hz)
        while True:
            tick += 1
            now = time.time()
            if now >= (tick + 1) * period:
                # The loop stalled past whole epochs; a receiver does not replay the past either.
                tick = math.floor(now * self.rate_hz)
            await asyncio.sleep(max(0.0, tick * period - now))
            self._write_epoch(round(tick * 1000 / self.rate_hz))

    def _write_epoch(self, epoch_ms: int) -> None:
        if not self._pty.is_open:
            return
        if self._pty.pending:
            # Checked before encoding: the epoch would be dropped anyway, and encoding it is the costly part.
            self.dropped_epochs += 1
            return
        when = datetime.fromtimestamp(epoch_ms // 1000, UTC) + timedelta(milliseconds=epoch_ms % 1000)
        state = self.model.state_at(epoch_ms / 1000.0)
        if not state.gnss_fix:
            # Jammed or antenna cut: the receiver still keeps time, but reports no position.
            if self._pty.write(no_fix_epoch(when, self.receiver.talker)):
                self.no_fix_epochs += 1
            else:
                self.dropped_epochs += 1
            return
        encoded = encode_epoch(state, when, self._sky.at(state.t), receiver=self.receiver)
        # One write per epoch: the port either takes it whole (perhaps finishing it later) or drops it whole.
        if not self._pty.write(b"".join(encoded.sentences)):
            self.dropped_epochs += 1
            return
        self.epochs_written += 1
        self.truth.append(encoded.truth)


def no_fix_epoch(when: datetime, talker: str = "GN") -> bytes:
    """What a receiver without a fix writes each epoch: RMC void (status V, mode N) and GGA with quality 0 and
    no satellites — time and date, no position."""
    hms = f"{when.hour:02d}{when.minute:02d}{when.second:02d}.{when.microsecond // 10_000:02d}"
    dmy = f"{when.day:02d}{when.month:02d}{when.year % 100:02d}"
    return sentence(f"{talker}RMC,{hms},V,,,,,,,{dmy},,,N,V") + sentence(f"{talker}GGA,{hms},,,,,0,00,99.99,,,,,,")
