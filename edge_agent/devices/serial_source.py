"""The shell shared by device sources that run their protocol in one task per serial connection.

`SerialLink` owns the port (open, read on the loop, loss, reopen with backoff). On top of it, every such source
needs the same bookkeeping: start one protocol task per connection, cancel it and forget the device's values when
the port is lost (whatever answers next may be another device), log the task's crash instead of losing it, and
report its own counters together with the link's and the decoder's. Subclasses supply only the protocol:
`_per_connection()`, `_on_data()`, `_forget()` and `read()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Protocol

from edge_agent.serial_link import SerialLink

log = logging.getLogger(__name__)


class FrameDecoder(Protocol):
    """What the shell needs of a sans-I/O frame decoder (counters include bad_checksum, bad_framing, garbage)."""

    counters: dict[str, int]

    def discard_partial(self) -> None: ...


class SerialDeviceSource:
    def __init__(
        self,
        port: str,
        baudrate: int,
        decoder: FrameDecoder,
        counter_names: Iterable[str],
        *,
        retry_initial_s: float,
        retry_max_s: float,
        name: str,
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.decoder = decoder
        self._counts: dict[str, int] = dict.fromkeys(counter_names, 0)
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None  # the current connection's protocol task; None while none
        self.link = SerialLink(
            port,
            baudrate,
            on_data=self._on_data,
            on_open=self._on_open,
            on_lost=self._on_lost,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            name=name,
        )

    # -- what subclasses implement ---------------------------------------------------------------------------

    async def _per_connection(self) -> None:
        raise NotImplementedError

    def _on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop every cached value of the device that was behind the lost port."""
        raise NotImplementedError

    # -- public -----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def counters(self) -> dict[str, int]:
        """Own counters plus the link's and the decoder's line-quality ones; bad_frames = checksum or framing."""
        dec = self.decoder.counters
        return {
            **self._counts,
            "disconnects": self.link.disconnects,
            "reconnects": self.link.reconnects,
            "bad_frames": dec["bad_checksum"] + dec["bad_framing"],
            "bad_checksum": dec["bad_checksum"],
            "garbage_bytes": dec["garbage"],
        }

    async def start(self) -> None:
        """Start in the background; a port that is not there yet is retried, never raised."""
        self._loop = asyncio.get_running_loop()
        await self.link.start()  # a second start raises RuntimeError here

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        await self.link.stop()

    # -- link callbacks ---------------------------------------------------------------------------------------

    def _on_open(self) -> None:
        assert self._loop is not None
        self.decoder.discard_partial()
        self._task = self._loop.create_task(self._per_connection(), name=f"{self._name}:{self.port}")
        self._task.add_done_callback(self._log_failure)

    def _on_lost(self, _reason: str) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Cancelled, not awaited: this runs in the loop's reader callback. A pending request ends with it.
            task.cancel()
        self._forget()

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        # The protocol task is never awaited while it runs; a bug in it must still leave a traceback in the log.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s protocol task failed", self._name, exc_info=exc, extra={"task": task.get_name()})
