"""The motor controller on a serial port, read from the event loop: a thin shell around `devices.controller`.

The controller streams a status frame every ~200 ms unprompted; those are decoded as they arrive in a
`loop.add_reader` callback. Its config (speed limit, wheel size, pole pairs, firmware) is asked for with a
6-byte request once per connection, again when the controller resumes streaming after going silent (it may have
rebooted or been swapped), and every `config_poll_s`; an unanswered request (`timeout_s`) is retried after
`CONFIG_RETRY_S` rather than a whole poll interval.

`SerialLink` owns the port: writes are non-blocking `os.write`s, so nothing blocks the loop; a port that vanishes
(USB adapter unplugged, pty closed, read error, hang-up) is closed and reopened with a bounded exponential backoff
until `stop()`. Each open starts one config-polling task for that connection; a loss cancels it.

`read(now)` implements the agent's ValueSource protocol: status values younger than `stale_after_s`, plus the
config values while status is fresh on the same connection; a lost port drops them all at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from edge_agent.devices.controller import (
    TYPE_CONFIG,
    TYPE_STATUS,
    ControllerError,
    ControllerFrame,
    ControllerFrameDecoder,
    encode_config_request,
    parse_config,
    parse_status,
)
from edge_agent.devices.serial_source import SerialDeviceSource
from protocol.catalogue import Catalogue, Value, load_catalogue

log = logging.getLogger(__name__)

CONFIG_RETRY_S = 2.0  # an unanswered config read is asked again this soon (capped by config_poll_s)
_COUNTERS = (
    "status_frames",
    "config_requests",
    "config_responses",
    "config_timeouts",
    "parse_errors",
    "unexpected_frames",
    "write_blocked",
)


class ControllerSource(SerialDeviceSource):
    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        config_poll_s: float = 30.0,
        timeout_s: float = 0.5,
        *,
        stale_after_s: float = 2.0,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        catalogue: Catalogue | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config_poll_s <= 0 or timeout_s <= 0 or stale_after_s <= 0:
            raise ValueError("config_poll_s, timeout_s and stale_after_s must be positive")
        super().__init__(
            port,
            baudrate,
            ControllerFrameDecoder(),
            _COUNTERS,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            name="controller",
        )
        self.decoder: ControllerFrameDecoder
        self.config_poll_s = config_poll_s
        self.timeout_s = timeout_s
        self.stale_after_s = stale_after_s
        self.catalogue = catalogue or load_catalogue()
        self.clock = clock
        self._status: tuple[float, dict[str, Value]] | None = None  # (wall-clock time received, signals)
        self._config: dict[str, Value] | None = None
        self._config_waiter: asyncio.Future[ControllerFrame] | None = None
        self._wake = asyncio.Event()  # the config is wanted again
        self._config_wanted = False

    # -- public -------------------------------------------------------------------------------------------

    def read(self, now: float) -> dict[str, Value]:
        status = self._status
        if status is None or now - status[0] > self.stale_after_s:
            return {}  # a silent controller yields nothing, its config included: it may be another one next
        out = dict(self._config or {})
        out.update(status[1])
        return out

    # -- connection ---------------------------------------------------------------------------------------

    def _on_open(self) -> None:
        self._wake.clear()
        super()._on_open()

    def _forget(self) -> None:
        # Whatever comes back on this port may be another controller: no values of this one may mix in.
        self._status = None
        self._config = None

    async def _per_connection(self) -> None:
        """Asks the connected controller for its config, again on wake-ups and every `config_poll_s`."""
        while True:
            self._config_wanted = False
            answered = await self._request_config()
            wait = self.config_poll_s if answered else min(self.config_poll_s, CONFIG_RETRY_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # not wait_for: see _request_config
                    await self._wake.wait()
            self._wake.clear()

    async def _request_config(self) -> bool:
        """Ask for the config and wait up to `timeout_s`; True when it was answered.

        A lost port cancels the task this runs in, so a lost port ends this with CancelledError.
        """
        assert self._loop is not None
        future: asyncio.Future[ControllerFrame] = self._loop.create_future()
        self._config_waiter = future
        try:
            self._counts["config_requests"] += 1
            # A failed write has lost the port and cancelled this task: the wait below ends it at once.
            if not self.link.write(encode_config_request()) and self.link.connected:
                self._counts["write_blocked"] += 1  # output queue full: treat like a lost request
            try:
                # asyncio.timeout, not wait_for: CPython 3.11's wait_for loses a cancellation that arrives as the
                # answer does, and stop() then waits out its timeout on a task that polls on.
                async with asyncio.timeout(self.timeout_s):
                    await future
            except TimeoutError:
                self._counts["config_timeouts"] += 1
                return False
        finally:
            self._config_waiter = None
        return True

    # -- frames -------------------------------------------------------------------------------------------

    def _take(self, frame: ControllerFrame) -> None:
        if frame.type == TYPE_STATUS:
            try:
                values = parse_status(frame.payload).signals(self.catalogue)
            except ControllerError as exc:
                self._counts["parse_errors"] += 1
                log.warning("controller status rejected", extra={"port": self.port, "error": str(exc)})
                return
            now = self.clock()
            previous = self._status
            if previous is not None and now - previous[0] > self.stale_after_s:
                # Streaming again after silence: a rebooted or swapped controller may carry another config.
                self._config = None
                self._want_config()
            self._counts["status_frames"] += 1
            self._status = (now, values)
        elif frame.type == TYPE_CONFIG:
            waiter = self._config_waiter
            try:
                self._config = parse_config(frame.payload).signals(self.catalogue)
            except ControllerError as exc:
                self._counts["parse_errors"] += 1
                log.warning("controller config rejected", extra={"port": self.port, "error": str(exc)})
                return  # the request times out and is asked again soon
            self._counts["config_responses"] += 1
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
        else:
            self._counts["unexpected_frames"] += 1

    def _want_config(self) -> None:
        if not self._config_wanted and self._config_waiter is None:
            self._config_wanted = True
            self._wake.set()

    def _on_data(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            self._take(frame)
