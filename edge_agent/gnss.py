"""The GNSS receiver's serial port, read from the event loop: a thin shell around `NmeaDecoder`.

`SerialLink` owns the port: opened non-blocking, watched with `loop.add_reader` (no thread, no blocking read),
closed and reopened with a bounded backoff until `stop()` when it vanishes — USB receiver unplugged, pty master
closed, read error or a hang-up's empty read. The decoder keeps its counters across reconnects, and its half-line
is dropped since the bytes that would complete it are gone.

The baud rate is one a GNSS module can be set to (firmware_specs/NMEA_PROFILE.md); 9600 is what most leave the
factory with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from edge_agent.nmea import GnssFix, NmeaDecoder
from edge_agent.serial_link import SerialLink

log = logging.getLogger("zhilian.gnss")

# NMEA 0183's own 4800 and the rates u-blox, Quectel, Unicore and CASIC modules can be configured to.
SUPPORTED_BAUDRATES = (4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


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
        if baudrate not in SUPPORTED_BAUDRATES:
            raise ValueError(f"GNSS baud rate {baudrate} is not one of {SUPPORTED_BAUDRATES}")
        self.port = port
        self.baudrate = baudrate
        self.on_fix = on_fix
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.decoder = NmeaDecoder()
        self.latest: GnssFix | None = None
        self.fixes = 0
        self.callback_errors = 0
        self.link = SerialLink(
            port,
            baudrate,
            on_data=self._on_data,
            on_lost=self._on_lost,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            name="gnss",
        )

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def disconnects(self) -> int:
        """Times an open port was lost."""
        return self.link.disconnects

    @property
    def reconnects(self) -> int:
        """Times the port was opened again after being lost."""
        return self.link.reconnects

    async def start(self) -> None:
        """Open the port and start reading. A port that is not there yet is retried in the background."""
        await self.link.start()

    async def stop(self) -> None:
        await self.link.stop()

    def _on_lost(self, _reason: str) -> None:
        # The bytes that would finish the buffered half-line went with the old port.
        self.decoder.discard_partial()

    def _on_data(self, data: bytes) -> None:
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
