"""A GNSS receiver on a real serial pty: the agent opens `emulator.port` with pyserial as it would /dev/ttyS1.

Every 1/rate seconds, on the wall-clock grid (as receivers align epochs to whole GNSS seconds), one epoch of
sentences for the vehicle's state at that instant is written to the pty master. The master is non-blocking: when
no one reads and the pty buffer fills, whole epochs are dropped and counted — never half a sentence, and never a
blocked event loop. `truth` keeps what each written epoch says, for tests to hold the agent's output against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import tty
from collections import deque
from datetime import UTC, datetime, timedelta

from simulators.nmea import SkyModel, TruthFix, encode_epoch
from simulators.vehicle import VehicleModel

__all__ = ["GnssEmulator", "TruthFix"]

log = logging.getLogger(__name__)


class GnssEmulator:
    def __init__(
        self,
        model: VehicleModel,
        rate_hz: float = 1.0,
        talker: str = "GN",
        *,
        beidou_talker: str = "GB",
        truth_maxlen: int = 3600,
    ) -> None:
        if not 0.0 < rate_hz <= 20.0:
            raise ValueError("rate_hz must be in (0, 20]")
        self.model = model
        self.rate_hz = rate_hz
        self.talker = talker
        self.beidou_talker = beidou_talker
        self.truth: deque[TruthFix] = deque(maxlen=truth_maxlen)
        self.epochs_written = 0
        self.dropped_epochs = 0
        self.port = ""
        self._sky = SkyModel(model.seed)
        self._master: int | None = None
        self._slave: int | None = None
        self._pending = bytearray()
        self._writer_registered = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("emulator already started")
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        # The slave fd stays open for our lifetime: with no slave open, the pty hangs up whenever the agent
        # closes it to reconnect.
        self.port = os.ttyname(slave)
        self._task = asyncio.create_task(self._run(), name=f"gnss-emulator:{self.port}")
        log.info("gnss emulator started", extra={"port": self.port, "rate_hz": self.rate_hz})

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        if self._writer_registered and self._master is not None:
            asyncio.get_running_loop().remove_writer(self._master)
            self._writer_registered = False
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        self._pending.clear()

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
        if self._master is None:
            return
        if self._pending:
            self.dropped_epochs += 1
            return
        when = datetime.fromtimestamp(epoch_ms // 1000, UTC) + timedelta(milliseconds=epoch_ms % 1000)
        state = self.model.state_at(epoch_ms / 1000.0)
        encoded = encode_epoch(state, when, self._sky.at(state.t), self.talker, self.beidou_talker)
        data = b"".join(encoded.sentences)
        try:
            n = os.write(self._master, data)
        except BlockingIOError:
            self.dropped_epochs += 1
            return
        except OSError as exc:
            log.warning("gnss emulator write failed", extra={"port": self.port, "error": str(exc)})
            self.dropped_epochs += 1
            return
        self.epochs_written += 1
        self.truth.append(encoded.truth)
        if n < len(data):
            # Finish this epoch when the pty drains rather than cutting a sentence in half. At most one epoch
            # ever waits here: the next tick drops its epoch while this one is pending.
            self._pending.extend(data[n:])
            asyncio.get_running_loop().add_writer(self._master, self._drain)
            self._writer_registered = True

    def _drain(self) -> None:
        if self._master is None:
            return
        try:
            n = os.write(self._master, self._pending)
        except BlockingIOError:
            return
        except OSError:
            n = len(self._pending)
        del self._pending[:n]
        if not self._pending:
            asyncio.get_running_loop().remove_writer(self._master)
            self._writer_registered = False
