"""The edge agent's I/O shell: wires GNSS and value sources to the batcher, sealer, outbox and MQTT.

Three supervised tasks share one event loop: the GNSS reader (samples on every fix epoch), the flusher (seals a
batch every `batch_interval_s`), and the publisher (QoS 1, a message leaves the outbox only after its PUBACK).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiomqtt

from edge_agent.batcher import Batcher, Sealer
from edge_agent.bootcount import next_boot
from edge_agent.config import AgentConfig
from edge_agent.nmea import GnssFix
from edge_agent.outbox import Outbox
from edge_agent.sources import ValueSource
from protocol import Catalogue, DeviceKey, EncodeError, load_catalogue
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
        self.sealer = Sealer(config.vin, self.key, self.boot, self.catalogue)
        self.outbox = Outbox(config.outbox_capacity)
        self.stats = AgentStats()
        self._last_fix_monotonic = -1e9

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

    def flush(self) -> None:
        batch = self.batcher.drain()
        if batch is None:
            return
        try:
            sealed = self.sealer.seal(batch, int(self.clock() * 1000))
        except EncodeError as exc:
            self.stats.encode_errors += 1
            log.error("batch could not be encoded, dropped", extra={"error": str(exc), "samples": len(batch)})
            return
        self.outbox.put(sealed)
        self.stats.batches += 1

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
            self.flush()

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
                ) as client:
                    self.stats.connected = True
                    self.stats.connects += 1
                    backoff = 0.5
                    log.info("connected to broker", extra={"vin": cfg.vin, "boot": self.boot})
                    while not stop.is_set():
                        item = await self.outbox.peek(timeout=0.5)
                        if item is None:
                            continue
                        await client.publish(item.topic, item.payload, qos=1, timeout=cfg.publish_timeout_s)
                        self.outbox.ack(item)
                        self.stats.published += 1
            except aiomqtt.MqttError as exc:
                self.stats.publish_errors += 1
                log.warning("broker connection lost; retrying", extra={"error": str(exc), "backoff_s": backoff})
            finally:
                self.stats.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 30.0)

    async def drain_outbox(self, timeout: float) -> bool:
        """Wait (bounded) until everything sealed so far was acknowledged; True when the outbox is empty."""
        deadline = time.monotonic() + timeout
        # Only at shutdown, bounded: polling is simpler than an 'emptied' event on the outbox.
        while len(self.outbox) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return not len(self.outbox)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; on stop, flush the last batch and give the publisher a moment to send it."""
        gnss = None
        if self.config.gnss_port:
            from edge_agent.gnss import GnssReader

            gnss = GnssReader(self.config.gnss_port, self.config.gnss_baudrate, on_fix=self.on_fix)
            await gnss.start()
        pub_stop = asyncio.Event()
        tasks = {
            asyncio.create_task(self._sampler_task(stop), name="sampler"),
            asyncio.create_task(self._flusher_task(stop), name="flusher"),
            asyncio.create_task(self._publisher_task(pub_stop), name="publisher"),
        }
        try:
            await _supervise(tasks, stop.wait())
        finally:
            if gnss is not None:
                await gnss.stop()
            self.flush()
            await self.drain_outbox(timeout=2.0)
            pub_stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.info("agent stopped", extra={"vin": self.config.vin, "unsent": len(self.outbox)})


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
