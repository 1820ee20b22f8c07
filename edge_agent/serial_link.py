"""A serial port watched from the event loop, reopened after it vanishes: the lifecycle every device source shares.

pyserial opens and configures the port (raw, timeout=0, non-blocking fd); reads happen in a `loop.add_reader`
callback and writes are non-blocking `os.write`s, so no thread and nothing blocks the loop. A port that vanishes
(USB adapter unplugged, pty master closed, read or write error, a hang-up's empty read) is closed at once and
reopened with a doubling backoff bounded by `retry_max_s` until `stop()`. A port that is not there at `start()`
is retried the same way, never raised.

The protocol stays with the caller, through three callbacks run on the loop: `on_data(bytes)` for every read,
`on_open()` after each successful open (the first one included) and `on_lost(reason)` after an open port was lost
and closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

import serial

log = logging.getLogger(__name__)

READ_CHUNK = 4096


def _nothing() -> None:
    pass


def _ignore(_reason: str) -> None:
    pass


class SerialLink:
    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        *,
        on_data: Callable[[bytes], None],
        on_open: Callable[[], None] = _nothing,
        on_lost: Callable[[str], None] = _ignore,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        name: str = "serial",
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.on_data = on_data
        self.on_open = on_open
        self.on_lost = on_lost
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.name = name  # the device's name in log lines, e.g. "gnss", "bms"
        self.disconnects = 0  # times an open port was lost
        self.reconnects = 0  # times the port was opened again after having been open once
        self._serial: serial.Serial | None = None
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry_task: asyncio.Task[None] | None = None
        self._opened_before = False
        self._running = False

    @property
    def connected(self) -> bool:
        return self._fd is not None

    async def start(self) -> None:
        """Open the port and start reading. A port that is not there yet is retried in the background."""
        if self._running:
            raise RuntimeError(f"{self.name} link already started")
        self._loop = asyncio.get_running_loop()
        self._running = True
        try:
            self._open()
        except (OSError, serial.SerialException) as exc:
            log.warning(f"{self.name} port unavailable, retrying", extra={"port": self.port, "error": str(exc)})
            self._schedule_retry()
            return
        self._opened()

    async def stop(self) -> None:
        self._running = False
        task, self._retry_task = self._retry_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        self._close()

    def write(self, data: bytes) -> bool:
        """Queue `data` without blocking; False when it was not (OS buffer full, or the port is gone).

        A write error means the port is lost: it is handled as such (`on_lost` has run when this returns), so a
        caller tells "buffer full" from "lost" by `connected`. A short write is not retried: the sources write
        requests of a few bytes, which a tty takes whole or not at all.
        """
        if self._fd is None:
            return False
        try:
            os.write(self._fd, data)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._lost(str(exc))
            return False
        return True

    # -- port lifecycle ------------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._loop is None:
            raise RuntimeError(f"{self.name} link not started")
        # Opening a tty is a quick local syscall sequence (no network, no wait on the device) — fine on the loop.
        ser = serial.Serial(self.port, self.baudrate, timeout=0, write_timeout=0)
        self._serial = ser
        self._fd = ser.fileno()
        os.set_blocking(self._fd, False)  # os.write must never wait for a full output queue to drain
        self._loop.add_reader(self._fd, self._on_readable)

    def _opened(self) -> None:
        if self._opened_before:
            self.reconnects += 1
        self._opened_before = True
        log.info(f"{self.name} port open", extra={"port": self.port, "baudrate": self.baudrate})
        self.on_open()

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
        log.warning(f"{self.name} port lost", extra={"port": self.port, "error": reason})
        # Closed at once: a dead fd stays readable and would spin the loop until someone else got round to it.
        self._close()
        self.on_lost(reason)
        if self._running:
            self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._loop is not None and (self._retry_task is None or self._retry_task.done()):
            self._retry_task = self._loop.create_task(self._retry(), name=f"{self.name}-reopen:{self.port}")

    async def _retry(self) -> None:
        delay = self.retry_initial_s
        while self._running:
            # Wait first, also after a loss: a port that just vanished is rarely back within the same instant.
            await asyncio.sleep(delay)
            if not self._running:
                return
            try:
                self._open()
            except (OSError, serial.SerialException) as exc:
                log.debug(f"{self.name} port reopen failed", extra={"port": self.port, "error": str(exc)})
                delay = min(self.retry_max_s, delay * 2)
                continue
            # This task ends here; forgotten first, so a loss reported during on_open can schedule a fresh one.
            self._retry_task = None
            self._opened()
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
        self.on_data(data)
