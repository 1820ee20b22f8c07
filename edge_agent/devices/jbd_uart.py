"""A JBD / Xiaoxiang BMS on a serial port, polled from the event loop: a thin shell around `devices.jbd`.

Each poll reads register 0x03 (basic info) and 0x04 (cell voltages); 0xA2 (barcode) is read once per connection
and again after the BMS went silent for a whole poll (a swapped pack answers with another barcode). Every request
waits at most `timeout_s` and is retried `retries` times: a BMS that slept drops the first request after waking up,
and a frame lost to line noise costs one retry, not a poll.

`SerialLink` owns the port: reads happen in a `loop.add_reader` callback and writes are 7-byte non-blocking
`os.write`s, so nothing blocks the loop; a port that vanishes (USB adapter unplugged, pty closed, read error,
hang-up) is closed and reopened with a bounded exponential backoff until `stop()`. Each open starts one polling
task for that connection; a loss cancels it.

`read(now)` implements the agent's ValueSource protocol: the latest values, minus anything older than
`stale_after_s` (5 poll intervals by default), so a dead BMS yields nothing rather than frozen numbers; a lost
port drops them at once, since whatever answers on it next may be another pack.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from edge_agent.devices.jbd import (
    REG_BARCODE,
    REG_BASIC_INFO,
    REG_CELL_VOLTAGES,
    JbdError,
    JbdFrame,
    JbdFrameDecoder,
    barcode_signals,
    cell_voltage_signals,
    encode_read_request,
    parse_barcode,
    parse_basic_info,
    parse_cell_voltages,
)
from edge_agent.devices.serial_source import SerialDeviceSource
from protocol.catalogue import Catalogue, Value, load_catalogue

log = logging.getLogger(__name__)

_COUNTERS = (
    "polls",
    "requests",
    "responses",
    "timeouts",
    "retries",
    "failed_requests",
    "status_errors",
    "parse_errors",
    "unexpected_frames",
    "write_blocked",
)


class JbdBmsSource(SerialDeviceSource):
    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        poll_interval_s: float = 1.0,
        timeout_s: float = 0.5,
        retries: int = 2,
        *,
        stale_after_s: float | None = None,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        catalogue: Catalogue | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if poll_interval_s <= 0 or timeout_s <= 0 or retries < 0:
            raise ValueError("poll_interval_s and timeout_s must be positive, retries non-negative")
        super().__init__(
            port,
            baudrate,
            JbdFrameDecoder(),
            _COUNTERS,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            name="bms",
        )
        self.decoder: JbdFrameDecoder
        self.poll_interval_s = poll_interval_s
        self.timeout_s = timeout_s
        self.retries = retries
        self.stale_after_s = 5 * poll_interval_s if stale_after_s is None else stale_after_s
        self.catalogue = catalogue or load_catalogue()
        self.clock = clock
        # register -> (wall-clock time received, its signals); each answer replaces its register's whole group,
        # so a pack with fewer cells or probes than the last one leaves no orphaned per-cell values behind.
        self._groups: dict[int, tuple[float, dict[str, Value]]] = {}
        self._waiting: tuple[int, asyncio.Future[JbdFrame]] | None = None

    # -- public -------------------------------------------------------------------------------------------

    def read(self, now: float) -> dict[str, Value]:
        out: dict[str, Value] = {}
        for received_at, values in self._groups.values():
            if now - received_at <= self.stale_after_s:
                out.update(values)
        return out

    # -- polling ------------------------------------------------------------------------------------------

    def _forget(self) -> None:
        # Whatever comes back on this port may be another pack: its predecessor's values must not mix in.
        self._groups.clear()

    async def _per_connection(self) -> None:
        """Polls the connected BMS: the barcode once, then basic info and cell voltages every poll interval."""
        assert self._loop is not None
        need_barcode = True  # once per connection: the pack behind the port may be another one now
        self._groups.pop(REG_BARCODE, None)
        next_poll = self._loop.time()
        while True:
            self._counts["polls"] += 1
            answered = False
            if need_barcode:
                frame = await self._request(REG_BARCODE)
                if frame is not None:
                    answered = True
                    # Asked and answered: even a BMS that refuses 0xA2 will not change its mind on this connection.
                    need_barcode = False
                    self._take(REG_BARCODE, frame, lambda p: barcode_signals(parse_barcode(p), self.catalogue))
            frame = await self._request(REG_BASIC_INFO)
            if frame is not None:
                answered = True
                self._take(REG_BASIC_INFO, frame, lambda p: parse_basic_info(p).signals(self.catalogue))
            frame = await self._request(REG_CELL_VOLTAGES)
            if frame is not None:
                answered = True
                self._take(
                    REG_CELL_VOLTAGES, frame, lambda p: cell_voltage_signals(parse_cell_voltages(p), self.catalogue)
                )
            if not answered:
                # Silent for a whole poll: the pack may have been swapped; its barcode is no longer known.
                need_barcode = True
                self._groups.pop(REG_BARCODE, None)
            next_poll += self.poll_interval_s
            now = self._loop.time()
            if next_poll < now:
                next_poll = now  # a slow poll is not caught up with a burst of requests
            # A loss while waiting cancels this task, so a plain sleep suffices.
            await asyncio.sleep(next_poll - now)

    def _take(self, register: int, frame: JbdFrame, decode: Callable[[bytes], dict[str, Value]]) -> None:
        if not frame.ok:
            self._counts["status_errors"] += 1
            return
        try:
            values = decode(frame.payload)
        except JbdError as exc:
            self._counts["parse_errors"] += 1
            log.warning("bms payload rejected", extra={"port": self.port, "register": register, "error": str(exc)})
            return
        now = self.clock()
        self._groups[register] = (now, values)
        if register != REG_BARCODE and REG_BARCODE in self._groups:
            # The barcode is read once but stays true while the same BMS keeps answering.
            self._groups[REG_BARCODE] = (now, self._groups[REG_BARCODE][1])

    async def _request(self, register: int) -> JbdFrame | None:
        """The BMS's answer to a read of `register`, or None after `retries` retries.

        A lost port cancels the polling task, so a lost port ends this with CancelledError, never with None.
        """
        assert self._loop is not None
        request = encode_read_request(register)
        for attempt in range(1 + self.retries):
            if attempt:
                self._counts["retries"] += 1
            # Strict request/response: whatever is buffered now belongs to an exchange that is already over.
            self.decoder.discard_partial()
            future: asyncio.Future[JbdFrame] = self._loop.create_future()
            self._waiting = (register, future)
            try:
                self._counts["requests"] += 1
                # A failed write has lost the port and cancelled this task: the wait below ends it at once.
                if not self.link.write(request) and self.link.connected:
                    self._counts["write_blocked"] += 1  # output queue full: treat like a lost request
                try:
                    # asyncio.timeout, not wait_for: CPython 3.11's wait_for loses a cancellation that arrives
                    # as the answer does, and stop() then waits out its timeout on a task that polls on.
                    async with asyncio.timeout(self.timeout_s):
                        frame = await future
                except TimeoutError:
                    self._counts["timeouts"] += 1
                    continue
            finally:
                self._waiting = None
            self._counts["responses"] += 1
            return frame
        self._counts["failed_requests"] += 1
        return None

    def _on_data(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            waiting = self._waiting
            if waiting is not None and waiting[0] == frame.register and not waiting[1].done():
                waiting[1].set_result(frame)
            else:
                self._counts["unexpected_frames"] += 1  # a late answer to a request already given up on
