"""The edge agent's I/O shell: wires GNSS and value sources to the batcher, the durable spool, sealer and MQTT.

Three supervised tasks share one event loop: the GNSS reader (samples on every fix epoch), the flusher (moves a
batch into the spool every `batch_interval_s`; it counts as taken once committed there), and the publisher (takes
the next spooled row, seals it at its first send, publishes with QoS 1 and deletes it only after the PUBACK).
Spool calls run on the spool's own thread (`SpoolWorker`), so its fsyncs never stall the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt

from edge_agent.batcher import Batcher, Sealer, topic_for
from edge_agent.bootcount import next_boot
from edge_agent.config import AgentConfig
from edge_agent.nmea import GnssFix
from edge_agent.sources import ValueSource
from edge_agent.spool import SPOOL_FILE, Spool, SpoolError, SpoolWorker, backfill_flags
from protocol import Catalogue, DeviceKey, EncodeError, Kind, encode_batch, load_catalogue
from protocol.tls import optional_client_context
from protocol.topics import validate_vin

log = logging.getLogger("zhilian.agent")


@dataclass(slots=True)
class AgentStats:
    samples: int = 0
    batches: int = 0
    published: int = 0
    publish_errors: int = 0
    connects: int = 0
    connected: bool = False
    encode_errors: int = 0
    spool_errors: int = 0


class EdgeAgent:
    def __init__(
        self,
        config: AgentConfig,
        sources: Sequence[ValueSource] = (),
        catalogue: Catalogue | None = None,
        key: DeviceKey | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        validate_vin(config.vin)
        self.config = config
        self.catalogue = catalogue or load_catalogue()
        self.key = key or DeviceKey.load(config.key_file)
        self.sources = list(sources)
        self.clock = clock
        self.boot = next_boot(config.state_dir)
        self.batcher = Batcher(self.catalogue)
        self.sealer = Sealer(config.vin, self.key, self.boot)
        self.spool = SpoolWorker(
            Spool(config.state_dir / SPOOL_FILE, max_rows=config.spool_max_rows, max_bytes=config.spool_max_bytes)
        )
        self.stats = AgentStats()
        # Built once: a bad or too-readable TLS file fails the start (TlsConfigError), not every reconnect.
        self._tls = optional_client_context(config.tls_ca, config.tls_cert, config.tls_key)
        self._last_fix_monotonic = -1e9
        # True once a connection attempt failed or the connection was lost, until the next successful connect:
        # rows spooled meanwhile are backfill (see edge_agent/spool.py). Unknown (False) before the first attempt.
        self._broker_down = False
        self._spooled = asyncio.Event()

    # --- sampling ---------------------------------------------------------------------------------------------

    def _source_values(self, now: float) -> dict[str, float | int | bool | str]:
        values: dict[str, float | int | bool | str] = {}
        for src in self.sources:
            try:
                values.update(src.read(now))
            except Exception:
                # A failing source must not stop the others or the GNSS stream; it is logged with its traceback.
                log.exception("value source %r failed", src)
        return values

    def on_fix(self, fix: GnssFix) -> None:
        """Called by the GNSS reader for every completed epoch: one sample, timestamped with GNSS time."""
        # Without a date (some receivers' first epochs) the board clock stands in for GNSS time.
        ts_ms = fix.time_ms if fix.time_ms is not None else int(self.clock() * 1000)
        values: dict[str, float | int | bool | str] = dict(fix.signals(self.catalogue))
        # Sources are read at the sample's own time so every value of a sample describes the same instant.
        values.update(self._source_values(ts_ms / 1000))
        self.batcher.add(ts_ms, values)
        self.stats.samples += 1
        self._last_fix_monotonic = time.monotonic()

    def sample_without_gnss(self) -> None:
        now = self.clock()
        self.batcher.add(int(now * 1000), self._source_values(now))
        self.stats.samples += 1

    async def flush(self) -> None:
        """Move the pending samples into the spool as one batch; they count as taken once this returned."""
        batch = self.batcher.drain()
        if batch is None:
            return
        try:
            body = encode_batch(batch, self.catalogue)
        except EncodeError as exc:
            self.stats.encode_errors += 1
            log.error("batch could not be encoded, dropped", extra={"error": str(exc), "samples": len(batch)})
            return
        try:
            row = await self.spool.put(Kind.TELEMETRY, int(self.clock() * 1000), len(batch), body, self._broker_down)
        except SpoolError as exc:
            # Nothing better is left to do with the batch than to count it: the disk refused it.
            self.stats.spool_errors += 1
            log.error("batch could not be spooled, dropped", extra={"error": str(exc), "samples": len(batch)})
            return
        self.stats.batches += 1
        self._spooled.set()
        # What was taken, for tracing a sample from the board to the store (the kill -9 test relies on it).
        log.debug(
            "batch spooled",
            extra={"row": row, "samples": len(batch), "first_ms": batch.timestamps[0], "last_ms": batch.timestamps[-1]},
        )

    # --- tasks ------------------------------------------------------------------------------------------------

    async def _sampler_task(self, stop: asyncio.Event) -> None:
        """Samples from the board clock while GNSS is absent or silent, so BMS/controller data still flows."""
        period = self.config.sample_interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
            if time.monotonic() - self._last_fix_monotonic > 3 * period and self.sources:
                self.sample_without_gnss()

    async def _flusher_task(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.batch_interval_s)
            await self.flush()

    async def _publisher_task(self, stop: asyncio.Event) -> None:
        cfg = self.config
        backoff = 0.5
        while not stop.is_set():
            try:
                async with aiomqtt.Client(
                    cfg.broker_host,
                    cfg.broker_port,
                    identifier=f"zl-agent-{cfg.vin}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=cfg.keepalive_s,
                    timeout=cfg.publish_timeout_s,
                    tls_context=self._tls,
                ) as client:
                    self.stats.connected = True
                    self.stats.connects += 1
                    self._broker_down = False
                    backoff = 0.5
                    log.info("connected to broker", extra={"vin": cfg.vin, "boot": self.boot})
                    while not stop.is_set():
                        await self._publish_next(client)
            except aiomqtt.MqttError as exc:
                self.stats.publish_errors += 1
                self._broker_down = True
                log.warning("broker unreachable; retrying", extra={"error": str(exc), "backoff_s": backoff})
            except SpoolError as exc:
                # The disk failed, not the broker: the row stays (or was never taken) and is retried after backoff.
                self.stats.spool_errors += 1
                log.error("spool failed while publishing; retrying", extra={"error": str(exc), "backoff_s": backoff})
            finally:
                self.stats.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)

    async def _publish_next(self, client: aiomqtt.Client) -> None:
        """Send the first spooled row (waiting up to 0.5 s for one); it leaves the spool only after its PUBACK."""
        # Cleared before looking, so a put that lands after the look still wakes us.
        self._spooled.clear()
        row = await self.spool.next()
        if row is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._spooled.wait(), 0.5)
            return
        payload = row.sealed
        if payload is None:
            now_ms = int(self.clock() * 1000)
            flags = backfill_flags(row, now_ms, max_live_wait_ms=int(2000 * self.config.batch_interval_s))
            try:
                sealed = self.sealer.seal_body(row.body, row.n_samples, now_ms, row.kind, flags)
            except EncodeError as exc:
                # Cannot happen for bodies the flusher encoded; dropping it keeps one bad row from blocking all.
                self.stats.encode_errors += 1
                log.error("spooled batch could not be sealed, dropped", extra={"error": str(exc), "row": row.id})
                await self.spool.ack(row.id)
                return
            # Durable before it is sent: every retry, in this boot or a later one, sends these very bytes.
            if not await self.spool.seal(row.id, sealed.payload, self.boot, sealed.seq):
                return  # evicted meanwhile; its sequence number stays unused, which the cloud tolerates
            payload = sealed.payload
        await client.publish(
            topic_for(self.config.vin, row.kind), payload, qos=1, timeout=self.config.publish_timeout_s
        )
        await self.spool.ack(row.id)
        self.stats.published += 1

    async def drain_spool(self, timeout: float) -> bool:
        """Wait (bounded) until everything spooled so far was acknowledged; True when the spool is empty."""
        deadline = time.monotonic() + timeout
        # Only at shutdown, bounded: polling is simpler than an 'emptied' event on the spool.
        while self.spool.depth and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return not self.spool.depth

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; on stop, spool the last batch and give the publisher a moment to send it.

        Whatever is still unsent then stays in the spool for the next start.
        """
        bms = None
        if self.config.bms_port:
            from edge_agent.devices.jbd_uart import JbdBmsSource

            bms = JbdBmsSource(
                self.config.bms_port,
                self.config.bms_baudrate,
                poll_interval_s=self.config.bms_poll_interval_s,
                catalogue=self.catalogue,
            )
            await bms.start()
            self.sources.append(bms)
        controller = None
        if self.config.controller_port:
            from edge_agent.devices.controller_uart import ControllerSource

            controller = ControllerSource(
                self.config.controller_port, self.config.controller_baudrate, catalogue=self.catalogue
            )
            await controller.start()
            self.sources.append(controller)
        gnss = None
        if self.config.gnss_port:
            from edge_agent.gnss import GnssReader

            gnss = GnssReader(self.config.gnss_port, self.config.gnss_baudrate, on_fix=self.on_fix)
            await gnss.start()
        halt = asyncio.Event()  # ends sampler and flusher; the publisher keeps going until the drain is over
        pub_stop = asyncio.Event()
        producers = {
            asyncio.create_task(self._sampler_task(halt), name="sampler"),
            asyncio.create_task(self._flusher_task(halt), name="flusher"),
        }
        tasks = {*producers, asyncio.create_task(self._publisher_task(pub_stop), name="publisher")}
        try:
            await _supervise(tasks, stop.wait())
        finally:
            halt.set()
            if gnss is not None:
                await gnss.stop()
            for device in (bms, controller):
                if device is not None:
                    await device.stop()
                    self.sources.remove(device)
            # Awaited, not cancelled: a cancelled flusher would abandon a spool put that still commits on the
            # spool's thread after the drain below has already found the spool empty.
            await asyncio.wait(producers, timeout=5.0)
            await self.flush()
            await self.drain_spool(timeout=2.0)
            pub_stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.spool.close()
            log.info("agent stopped", extra={"vin": self.config.vin, "unsent": self.spool.depth})


async def _supervise(tasks: set[asyncio.Task[None]], until: Awaitable[object]) -> None:
    """Return when `until` completes; if any task dies first, re-raise its exception (a crash is never silent)."""
    waiter = asyncio.ensure_future(until)
    try:
        done, _ = await asyncio.wait({*tasks, waiter}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not waiter:
                exc = t.exception()
                raise RuntimeError(f"agent task {t.get_name()} ended unexpectedly") from exc
    finally:
        waiter.cancel()
