"""The GNSS receiver's serial port, read from the event loop: a thin shell around `NmeaDecoder`.

pyserial opens and configures the port (non-blocking, raw); the fd is then watched with `loop.add_reader`, so no
thread and no blocking read. A port that vanishes — USB receiver unplugged, pty master closed, read error or a
hang-up's empty read — is closed and reopened with a bounded backoff until `stop()`; the decoder keeps its
counters across reconnects, and its half-line is dropped since the bytes that would complete it are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import serial

from edge_agent.nmea import GnssFix, NmeaDecoder

log = logging.getLogger(__name__)

READ_CHUNK = 4096


class GnssReader:
    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        on_fix: Callable[[GnssFix], None] | None = None,
        *,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 10.0,
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.on_fix = on_fix
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.decoder = NmeaDecoder()
        self.latest: GnssFix | None = None
        self.fixes = 0
        self.disconnects = 0  # times an open port was lost
        self.reconnects = 0  # times the port was opened again after being lost
        self.callback_errors = 0
        self._serial: serial.Serial | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._running = False

    @property
    def connected(self) -> bool:
        return self._fd is not None

    async def start(self) -> None:
        """Open the port and start reading. A port that is not there yet is retried in the background."""
        if self._running:
            raise RuntimeError("reader already started")
        self._loop = asyncio.get_running_loop()
        self._running = True
        try:
            self._open()
        except (OSError, serial.SerialException) as exc:
            log.warning("gnss port unavailable, retrying", extra={"port": self.port, "error": str(exc)})
            self._schedule_retry(reconnect=False)

    async def stop(self) -> None:
        self._running = False
        task, self._retry_task = self._retry_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        self._close()

    # -- port lifecycle ------------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._loop is None:
            raise RuntimeError("reader not started")
        # Opening a tty is a quick local syscall sequence (no network, no wait on the device) — fine on the loop.
        ser = serial.Serial(self.port, self.baudrate, timeout=0)
        self._serial = ser
        self._fd = ser.fileno()
        self._loop.add_reader(self._fd, self._on_readable)
        log.info("gnss port open", extra={"port": self.port, "baudrate": self.baudrate})

    def _close(self) -> None:
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
        self._fd = None
        ser, self._serial = self._serial, None
        if ser is not None:
            with contextlib.suppress(OSError, serial.SerialException):
                ser.close()

    def _lost(self, reason: str) -> None:
        self.disconnects += 1
        log.warning("gnss port lost", extra={"port": self.port, "error": reason})
        self._close()
        # The bytes that would finish the buffered half-line went with the old port.
        self.decoder.discard_partial()
        if self._running:
            self._schedule_retry(reconnect=True)

    def _schedule_retry(self, *, reconnect: bool) -> None:
        if self._loop is not None and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = self._loop.create_task(self._retry(reconnect), name=f"gnss-reopen:{self.port}")

    async def _retry(self, reconnect: bool) -> None:
        delay = self.retry_initial_s
        while self._running:
            await asyncio.sleep(delay)
            if not self._running:
                return
            try:
                self._open()
            except (OSError, serial.SerialException) as exc:
                log.debug("gnss port reopen failed", extra={"port": self.port, "error": str(exc)})
                delay = min(self.retry_max_s, delay * 2)
                continue
            if reconnect:
                self.reconnects += 1
            return

    # -- reading -------------------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return  # spurious wake-up
        except OSError as exc:  # EIO once the other side of a pty is gone, ENXIO/ENODEV for unplugged USB
            self._lost(str(exc))
            return
        if not data:
            self._lost("end of file (hang-up)")
            return
        for fix in self.decoder.feed(data):
            self.latest = fix
            self.fixes += 1
            if self.on_fix is None:
                continue
            try:
                self.on_fix(fix)
            except Exception:
                # A consumer's bug must not stop the receiver; it is logged with its traceback and counted.
                self.callback_errors += 1
                log.exception("gnss on_fix callback failed", extra={"port": self.port})
