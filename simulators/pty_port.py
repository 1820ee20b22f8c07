"""The device end of a serial line, on a pty: what every emulator needs before it can speak its protocol.

The client (the agent) opens `port` — the slave's path — with pyserial as it would a real /dev/ttyS*; the emulator
reads and writes the master. The master is non-blocking and all I/O goes through the event loop, so a client
that stops reading can fill the pty buffer but never stall the loop: a message that does not fit is dropped and
counted, never written half. A message that only partly fits keeps its tail pending until the pty drains, and
while a tail is pending further messages are dropped — so the line only ever carries whole messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tty
from collections.abc import Callable

__all__ = ["READ_CHUNK", "PtyPort"]

log = logging.getLogger(__name__)

READ_CHUNK = 1024  # requests to emulated devices are a few bytes; this just bounds one read


class PtyPort:
    """A raw pty pair whose master is driven from the running event loop.

    `on_data`, if given, is called on the loop with each chunk the client writes to the slave.
    Counters: `writes` (messages accepted whole, a pending tail included), `dropped` (messages refused),
    `bytes_out` (bytes actually written to the master), `bytes_in` (bytes read from it).
    """

    def __init__(self, *, on_data: Callable[[bytes], None] | None = None, read_chunk: int = READ_CHUNK) -> None:
        self.on_data = on_data
        self.read_chunk = read_chunk
        self.port = ""
        self.writes = 0
        self.dropped = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self._master: int | None = None
        self._slave: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = bytearray()
        self._writer_registered = False

    @property
    def is_open(self) -> bool:
        return self._master is not None

    @property
    def master_fd(self) -> int | None:
        return self._master

    @property
    def slave_fd(self) -> int | None:
        return self._slave

    @property
    def pending(self) -> int:
        """How many bytes of the last message still wait for the pty to drain (0 when none)."""
        return len(self._pending)

    def open(self) -> str:
        """Create the pty and start serving it on the running loop; returns the slave's path."""
        if self._master is not None:
            raise RuntimeError("pty already open")
        loop = asyncio.get_running_loop()
        master, slave = os.openpty()
        try:
            # Raw on both ends: the line discipline would otherwise echo, translate CR/LF and eat ^C/^S bytes
            # of binary frames.
            tty.setraw(master)
            tty.setraw(slave)
            os.set_blocking(master, False)
            port = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        # The slave fd stays open for our lifetime: with no slave open, the pty hangs up whenever the client
        # closes it to reconnect.
        self._master, self._slave, self._loop = master, slave, loop
        self.port = port
        if self.on_data is not None:
            loop.add_reader(master, self._on_readable)
        return port

    def close(self) -> None:
        """Stop serving and close both ends; safe to call more than once, or without open()."""
        master, slave, loop = self._master, self._slave, self._loop
        self._master = self._slave = self._loop = None
        if master is not None and loop is not None and not loop.is_closed():
            loop.remove_reader(master)
            if self._writer_registered:
                loop.remove_writer(master)
        self._writer_registered = False
        self._pending.clear()
        for fd in (master, slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def write(self, data: bytes) -> bool:
        """Send one whole message; False (and counted in `dropped`) if it cannot go out whole."""
        if self._master is None or self._loop is None:
            return False
        if self._pending:
            # Appending behind the pending tail would let the client's backlog grow without bound; a real device
            # with a full transmit buffer loses messages too.
            self.dropped += 1
            return False
        try:
            n = os.write(self._master, data)
        except BlockingIOError:  # nobody drains the pty
            self.dropped += 1
            return False
        except OSError as exc:
            log.warning("pty write failed", extra={"port": self.port, "error": str(exc)})
            self.dropped += 1
            return False
        self.writes += 1
        self.bytes_out += n
        if n < len(data):
            # Finish this message when the pty drains rather than cutting it in half.
            self._pending.extend(data[n:])
            self._loop.add_writer(self._master, self._drain)
            self._writer_registered = True
        return True

    def _drain(self) -> None:
        if self._master is None:
            return
        try:
            n = os.write(self._master, self._pending)
        except BlockingIOError:
            return
        except OSError:
            # The tail cannot go out any more; give it up rather than spin on a writable-but-failing fd.
            n = len(self._pending)
        else:
            self.bytes_out += n
        del self._pending[:n]
        if not self._pending and self._loop is not None:
            self._loop.remove_writer(self._master)
            self._writer_registered = False

    def _on_readable(self) -> None:
        if self._master is None:
            return
        try:
            data = os.read(self._master, self.read_chunk)
        except OSError:  # BlockingIOError included; otherwise no slave open (we hold one, so transient)
            return
        if data and self.on_data is not None:
            self.bytes_in += len(data)
            self.on_data(data)
