"""The vehicle's CAN bus through python-can: a thin shell around `devices.can_codec`.

One reader thread per source opens the bus (`socketcan` `can0` on boards with a CAN controller, `slcan` over the
serial port of a USB-CAN adapter, `virtual` in tests), calls `bus.recv()` with a timeout, decodes each frame and
keeps the latest values per frame (per multiplexer value for the cell and probe frames). The event loop never
waits on the bus: `read(now)` only copies a dict under a lock, and `start()`/`stop()` hand the blocking parts
(slcan's open sleeps, a thread join) to the thread or to `asyncio.to_thread`.

Why not `can.Notifier`: with a loop it calls `bus.recv()` in the loop's reader callback for buses with a file
descriptor (slcan), where a garbled line raises with nobody to handle it and a vanished adapter leaves a readable
descriptor that raises on every turn; without a loop its thread ends at the first unhandled error. The reader here
tells the two apart:
  - a garbled slcan line (python-can raises ValueError/IndexError while parsing it, or CanOperationError wrapping
    UnicodeDecodeError for non-ASCII noise — after which its line buffer must be flushed or every later line fails
    too) is counted in `garbled_lines` and reading goes on;
  - any other error (serial port gone, socket error) loses the bus: it is shut down, the values are forgotten (as
    the UART sources do: whatever comes back may be another vehicle's devices), and it is reopened with a bounded
    exponential backoff until `stop()`. A bus that is not there at start is retried the same way, never raised.
Frames of ids the profile does not define, of the wrong length or with an unknown multiplexer value are counted
by the codec and dropped. Memory is bounded: values are kept per frame of the profile, python-can's virtual bus
gets a bounded receive queue, and slcan/socketcan buffer in the kernel.

`read(now)` implements the agent's ValueSource protocol: the values of every frame received within
`stale_periods` of its own DBC period (and at least `min_stale_s`), so a silent device yields nothing rather than
frozen numbers, like the UART sources' staleness.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import can

from edge_agent.devices.can_codec import CanCodec, CanFrameError
from protocol.catalogue import Catalogue, Value

log = logging.getLogger("zhilian.can")

VIRTUAL_RX_QUEUE = 1024  # frames the virtual bus holds for a reader that fell behind; older ones are refused
SLCAN_SERIAL_TIMEOUT_S = 0.05  # slcan reads byte by byte; 1 ms (python-can's default) would wake 1000 times/s idle
_COUNTERS = ("garbled_lines", "ignored_frames", "disconnects", "reconnects", "open_failures")


class CanSource:
    def __init__(
        self,
        interface: str,
        channel: str,
        bitrate: int = 250_000,
        variant: str = "48v",
        *,
        stale_periods: float = 5.0,
        min_stale_s: float = 1.0,
        recv_timeout_s: float = 0.2,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 10.0,
        bus_options: Mapping[str, Any] | None = None,
        catalogue: Catalogue | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interface not in can.VALID_INTERFACES:
            raise ValueError(f"unknown CAN interface {interface!r}; python-can knows {sorted(can.VALID_INTERFACES)}")
        if stale_periods <= 0 or recv_timeout_s <= 0 or retry_initial_s <= 0 or retry_max_s < retry_initial_s:
            raise ValueError("stale_periods, recv_timeout_s and retry_initial_s must be positive, retry_max_s larger")
        self.interface = interface
        self.channel = channel
        self.bitrate = bitrate
        self.codec = CanCodec(variant, catalogue=catalogue)
        self.stale_periods = stale_periods
        self.min_stale_s = min_stale_s
        self.recv_timeout_s = recv_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.clock = clock
        self._options = self._bus_options(bus_options or {})
        self._counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._lock = threading.Lock()
        # (frame id, multiplexer value) -> (wall-clock time received, how long it stays fresh, its values)
        self._groups: dict[tuple[int, int | None], tuple[float, float, dict[str, Value]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = False

    def _bus_options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.interface == "virtual":
            options["rx_queue_size"] = VIRTUAL_RX_QUEUE
        elif self.interface == "slcan":
            # The board only listens: it must not acknowledge, let alone send, on the vehicle's bus.
            options["listen_only"] = True
            options["timeout"] = SLCAN_SERIAL_TIMEOUT_S
        options.update(given)
        return options

    # -- public -------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def counters(self) -> dict[str, int]:
        """Own counters plus the codec's: frames (decoded), unknown_id, bad_frames, out_of_range."""
        return {**self._counts, **self.codec.counters}

    def read(self, now: float) -> dict[str, Value]:
        out: dict[str, Value] = {}
        with self._lock:
            for received_at, fresh_s, values in self._groups.values():
                if now - received_at <= fresh_s:
                    out.update(values)
        return out

    async def start(self) -> None:
        """Start reading in the background; a bus that is not there yet is retried, never raised."""
        if self._thread is not None:
            raise RuntimeError("CAN source already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"can:{self.channel}", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        # Bounded: a recv returns within recv_timeout_s, an slcan open within its settle time.
        await asyncio.to_thread(thread.join, timeout)
        if thread.is_alive():
            log.error("CAN reader did not stop", extra={"channel": self.channel, "timeout_s": timeout})

    # -- the reader thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.retry_initial_s
        opened_before = False
        failures_in_row = 0
        while not self._stop.is_set():
            try:
                bus = can.Bus(interface=self.interface, channel=self.channel, bitrate=self.bitrate, **self._options)
            except Exception as exc:  # python-can raises many kinds here: CanError, OSError, ValueError, ...
                self._counts["open_failures"] += 1
                failures_in_row += 1
                # One warning per outage; the retries of a long one would otherwise fill the board's log.
                level = logging.WARNING if failures_in_row == 1 else logging.DEBUG
                log.log(level, "CAN bus unavailable, retrying", extra={"channel": self.channel, "error": str(exc)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            if opened_before:
                self._counts["reconnects"] += 1
            opened_before = True
            failures_in_row = 0
            self._connected = True
            backoff = self.retry_initial_s
            log.info("CAN bus open", extra={"interface": self.interface, "channel": self.channel})
            try:
                lost = self._pump(bus)
            finally:
                self._connected = False
                _close(bus)
            if lost:
                self._counts["disconnects"] += 1
                self._forget()
                self._stop.wait(backoff)

    def _pump(self, bus: can.BusABC) -> bool:
        """Read until stop (False) or until the bus is lost (True)."""
        while not self._stop.is_set():
            try:
                msg = bus.recv(self.recv_timeout_s)
            except (ValueError, IndexError):
                self._counts["garbled_lines"] += 1  # python-can could not parse one slcan line; the next is fine
                continue
            except can.CanOperationError as exc:
                if isinstance(exc.__cause__, UnicodeDecodeError):
                    self._counts["garbled_lines"] += 1
                    _flush_line_buffer(bus)
                    continue
                log.warning("CAN bus lost", extra={"channel": self.channel, "error": str(exc)})
                return True
            except Exception:
                log.exception("CAN bus failed", extra={"channel": self.channel})
                return True
            if msg is None:
                continue
            if msg.is_error_frame or msg.is_remote_frame:
                self._counts["ignored_frames"] += 1
                continue
            self._take(msg.arbitration_id, msg.data, msg.is_extended_id)
        return False

    def _take(self, arbitration_id: int, data: bytes | bytearray, extended: bool) -> None:
        try:
            reading = self.codec.decode(arbitration_id, data, extended=extended)
        except CanFrameError as exc:
            log.debug("CAN frame rejected", extra={"id": arbitration_id, "error": str(exc)})
            return
        if reading is None:
            return  # another node's frame: counted by the codec
        fresh_s = max(self.stale_periods * reading.period_s, self.min_stale_s)
        with self._lock:
            self._groups[(reading.frame_id, reading.group)] = (self.clock(), fresh_s, reading.values)

    def _forget(self) -> None:
        # Whatever comes back on this channel may be another vehicle's devices: no values of these may mix in.
        with self._lock:
            self._groups.clear()


def _flush_line_buffer(bus: can.BusABC) -> None:
    """slcan keeps an undecodable line in its buffer and fails on every later line until flushed."""
    flush = getattr(bus, "flush", None)
    if callable(flush):
        try:
            flush()
        except Exception as exc:  # the port is going away; the next recv reports that
            log.debug("CAN line buffer flush failed", extra={"error": str(exc)})


def _close(bus: can.BusABC) -> None:
    try:
        bus.shutdown()
    except Exception as exc:
        # slcan's shutdown writes "C" first; on a vanished port that raises before the port is closed, so the
        # descriptor is closed here or it would leak once per reconnect.
        log.debug("CAN bus shutdown failed", extra={"error": str(exc)})
        port = getattr(bus, "serialPortOrig", None)
        if port is not None:
            try:
                port.close()
            except Exception as close_exc:
                log.debug("CAN serial port close failed", extra={"error": str(close_exc)})
