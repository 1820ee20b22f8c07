"""The edge agent's I/O shell: wires GNSS and value sources to the batcher, the durable spool, sealer and MQTT.

Three supervised tasks share one event loop: the GNSS reader (samples on every fix epoch), the flusher (moves a
batch into the spool every `batch_interval_s`; it counts as taken once committed there), and the publisher (takes
the next spooled row, seals it at its first send, publishes with QoS 1 and deletes it only after the PUBACK).
Spool calls run on the spool's own thread (`SpoolWorker`), so its fsyncs never stall the loop.

While connected, the publisher also runs the control plane (firmware_specs/COMMANDS.md): it subscribes to
ev/{vin}/cmd, hands each command to the `CommandExecutor` (edge_agent/commands.py: verify, act, ack through the
spool), and keeps a retained, signed status report with self-metrics on ev/{vin}/status — refreshed every
`status_interval_s`, replaced by the LWT (offline) if the connection dies, and by an offline report at a clean stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent import AGENT_VERSION
from edge_agent.batcher import Batcher, Sealer, topic_for
from edge_agent.bootcount import next_boot
from edge_agent.commands import (
    AUTO_PROFILE,
    CommandExecutor,
    CommandGate,
    ControlState,
    ControlStateFile,
    load_cloud_keys,
)
from edge_agent.config import AgentConfig, ConfigError
from edge_agent.nmea import GnssFix
from edge_agent.precheck import AlertState, Precheck, alert_rows
from edge_agent.sampling import Sampler, UnknownProfileError, VehicleMode
from edge_agent.selfmetrics import ProcessMeter
from edge_agent.sources import ValueSource
from edge_agent.spool import SPOOL_FILE, Spool, SpoolError, SpoolWorker, backfill_flags
from protocol import Catalogue, DeviceKey, EncodeError, Kind, ed25519, encode_batch, load_catalogue
from protocol.batch import batch_from_rows
from protocol.commands import ArgValue, CommandAck, CommandName, StatusReport, encode_ack, encode_status
from protocol.tls import optional_client_context
from protocol.topics import Channel, topic, validate_vin

if TYPE_CHECKING:
    from edge_agent.gnss import GnssReader

log = logging.getLogger("zhilian.agent")
# What speed_limit_report samples (edge_agent/commands.py): the controller's configured limit and wheel size.
SPEED_LIMIT_SIGNALS = ("Powertrain.ElectricMotor.ConfiguredSpeedLimit", "Chassis.Wheel.Size")
# A connection that lasted this long resets the reconnect backoff.
STABLE_CONNECTION_S = 10.0
# Alert and pre-trigger batches waiting for the spool; far more than a healthy spool ever lets pile up.
MAX_URGENT = 256


@dataclass(slots=True)
class AgentStats:
    samples: int = 0
    batches: int = 0
    published: int = 0
    publish_errors: int = 0
    connects: int = 0
    connected: bool = False
    statuses: int = 0  # retained status reports published
    encode_errors: int = 0
    spool_errors: int = 0
    alerts: int = 0  # pre-check alerts spooled (ALERT envelopes)
    urgent_dropped: int = 0  # alert / pre-trigger batches dropped because the spool fell far behind


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
        # Ed25519 from the libcrypto `ssl` already maps, not a second OpenSSL inside `cryptography` (≈ 10 MB RSS):
        # signing, the key file and command verification all go through it (protocol/ed25519.py).
        self.ed25519 = ed25519.select_backend(ed25519.AGENT_PREFERENCE, on_skip=_backend_skipped)
        log.info(
            "ed25519 backend", extra={"vin": config.vin, "backend": self.ed25519.name, "library": self.ed25519.library}
        )
        self.key = key or DeviceKey.load(config.key_file, self.ed25519)
        self.sources = list(sources)
        self.clock = clock
        self.boot = next_boot(config.state_dir)
        self.batcher = Batcher(self.catalogue)
        # Every raw sample goes through the pre-check, then the sampling policy, then the batcher (see _take).
        self.precheck = Precheck(config.precheck, self.catalogue)
        self.sampler = Sampler(config.sampling, self.catalogue)
        # Alert and pre-trigger batches on their way to the spool, taken by a short task at once (_spool_urgent).
        self._urgent: list[tuple[Kind, list[tuple[int, dict[str, float | int | bool | str]]]]] = []
        self._urgent_task: asyncio.Task[None] | None = None
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
        self._init_control_plane()

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
        self._take(ts_ms, values)
        self.stats.samples += 1
        self._last_fix_monotonic = time.monotonic()

    def sample_without_gnss(self) -> None:
        now = self.clock()
        self._take(int(now * 1000), self._source_values(now))
        self.stats.samples += 1

    def _take(self, ts_ms: int, values: dict[str, float | int | bool | str]) -> None:
        """One raw sample: the pre-check first (its alerts leave at once), then the sampling policy, then the batch."""
        alerts = self.precheck.update(ts_ms, values)
        level = self.sampler.config.capture.trigger_level
        trigger = any(a.state is not AlertState.CLEARED and a.level >= level for a in alerts)
        out = self.sampler.offer(ts_ms, values, trigger=trigger)
        if alerts:
            self._queue_urgent(Kind.ALERT, alert_rows(alerts))
        if out.pre_trigger:
            # The seconds before a fault, in a batch of their own: the batcher only appends in time order.
            self._queue_urgent(Kind.TELEMETRY, out.pre_trigger)
        if out.values:
            self.batcher.add(ts_ms, out.values)

    def _queue_urgent(self, kind: Kind, rows: list[tuple[int, dict[str, float | int | bool | str]]]) -> None:
        if len(self._urgent) >= MAX_URGENT:
            self.stats.urgent_dropped += 1
            log.error("urgent queue full, batch dropped", extra={"kind": kind.name, "samples": len(rows)})
            return
        self._urgent.append((kind, rows))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # driven outside the event loop (tests of the core): the next flush() spools it
        if self._urgent_task is None or self._urgent_task.done():
            self._urgent_task = loop.create_task(self._spool_urgent(), name="urgent-spool")
            self._urgent_task.add_done_callback(_log_crash)

    async def _spool_urgent(self) -> None:
        """Spool queued alert / pre-trigger batches now and wake the publisher: alerts never wait for a flush."""
        while self._urgent:
            kind, rows = self._urgent.pop(0)
            try:
                body = encode_batch(batch_from_rows(rows), self.catalogue)
                await self.spool.put(kind, int(self.clock() * 1000), len(rows), body, self._broker_down)
            except (EncodeError, SpoolError) as exc:
                if isinstance(exc, EncodeError):
                    self.stats.encode_errors += 1
                else:
                    self.stats.spool_errors += 1
                log.error("urgent batch dropped", extra={"kind": kind.name, "error": str(exc), "samples": len(rows)})
                continue
            if kind is Kind.ALERT:
                self.stats.alerts += 1
            else:
                self.stats.batches += 1
            self._spooled.set()

    async def flush(self) -> None:
        """Move the pending samples into the spool as one batch; they count as taken once this returned."""
        if self._urgent_task is not None and not self._urgent_task.done():
            await asyncio.wait({self._urgent_task}, timeout=10.0)
        await self._spool_urgent()  # whatever was queued without a running loop, or is still queued
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

    # --- control plane: signed commands and the retained status ------------------------------------------------

    def _init_control_plane(self) -> None:
        cfg = self.config
        if cfg.status_interval_s <= 0 or cfg.reconnect_initial_s <= 0 or cfg.reconnect_max_s < cfg.reconnect_initial_s:
            raise ConfigError("status_interval_s and reconnect_initial_s must be > 0, reconnect_max_s >= the latter")
        if cfg.command_clock_skew_s < 0 or cfg.command_max_horizon_s <= 0 or cfg.session_expiry_s < 0:
            raise ConfigError("command_clock_skew_s and session_expiry_s must be >= 0, command_max_horizon_s > 0")
        trusted = load_cloud_keys(cfg.cloud_key_file, self.ed25519) if cfg.cloud_key_file is not None else {}
        if not trusted:
            log.warning("no cloud key configured: every command will be rejected as forged", extra={"vin": cfg.vin})
        store = ControlStateFile(cfg.state_dir)
        state = store.load()
        gate = CommandGate(
            cfg.vin,
            trusted,
            state.seen,
            skew_ms=int(cfg.command_clock_skew_s * 1000),
            horizon_ms=int(cfg.command_max_horizon_s * 1000),
            backend=self.ed25519,
        )
        self.commands = CommandExecutor(
            gate,
            state,
            store,
            clock=self.clock,
            snapshot=self.snapshot,
            send_ack=self._send_ack,
            on_change=self._on_control_change,
            check=self._check_command,
        )
        # Told the commanded profile (None: chosen from the vehicle's state again) after each set_profile.
        self.on_profile_change: Callable[[str | None], None] | None = None
        self._meter = ProcessMeter()
        self._conn = 0  # connection attempts in this boot: the `conn` of status reports (see status_order)
        self._rng = random.Random()
        self._gnss: GnssReader | None = None
        self._speed_limit_changed = asyncio.Event()
        self._speed_limit_values: dict[str, float | int | bool | str] = {}
        self._version = AGENT_VERSION
        if state.profile is not None:
            self._apply_profile(state.profile)

    @property
    def locked(self) -> bool:
        """Set by the lock command, cleared by unlock; persisted across restarts."""
        return self.commands.state.locked

    @property
    def active_profile(self) -> str | None:
        """The sampling profile commanded by set_profile, or None while the profile follows the vehicle's state."""
        return self.commands.state.profile

    def _known_profiles(self) -> set[str]:
        return set(self.sampler.config.profiles) | {m.value for m in VehicleMode}

    def _check_command(self, name: CommandName, args: Mapping[str, ArgValue]) -> str | None:
        """Refuse (before anything is persisted) what this vehicle cannot do although the command is well-formed."""
        profile = args.get("profile")
        if name is CommandName.SET_PROFILE and profile != AUTO_PROFILE and profile not in self._known_profiles():
            return f"unknown profile {profile!r}; known: {sorted(self._known_profiles())}"
        return None

    def _apply_profile(self, profile: str | None) -> None:
        try:
            self.sampler.set_override(profile)
        except UnknownProfileError:
            # Persisted under an earlier configuration that had this profile: follow the vehicle's state instead.
            log.warning("commanded profile no longer configured; ignored", extra={"profile": profile})

    def _on_control_change(self, old: ControlState, new: ControlState) -> None:
        if new.profile != old.profile:
            self._apply_profile(new.profile)
            if self.on_profile_change is not None:
                self.on_profile_change(new.profile)
        if new.speed_limit_report_s != old.speed_limit_report_s:
            self._speed_limit_changed.set()
        if new.locked != old.locked:
            log.info("vehicle lock state changed", extra={"vin": self.config.vin, "locked": new.locked})

    async def snapshot(self) -> str:
        """The snapshot command: one sample of everything known now, spooled at once (bypassing sampling rates)."""
        now = self.clock()
        values: dict[str, float | int | bool | str] = {}
        if self._gnss is not None and self._gnss.latest is not None:
            values.update(self._gnss.latest.signals(self.catalogue))
        values.update(self._source_values(now))
        if not values:
            raise RuntimeError("nothing to sample: no GNSS fix and no value source")
        self.batcher.add(int(now * 1000), values)
        self.stats.samples += 1
        await self.flush()
        return f"snapshot of {len(values)} signals spooled"

    async def _send_ack(self, ack: CommandAck) -> None:
        await self.spool.put(Kind.COMMAND_ACK, int(self.clock() * 1000), 0, encode_ack(ack), self._broker_down)
        self._spooled.set()

    def _report_speed_limit(self) -> None:
        now = self.clock()
        found = self._source_values(now)
        values = {name: found[name] for name in SPEED_LIMIT_SIGNALS if name in found}
        if values:
            self._speed_limit_values = values
            self.batcher.add(int(now * 1000), values)
        else:
            log.info("speed limit report: the controller has not reported its configuration yet")

    async def _speed_limit_task(self, stop: asyncio.Event) -> None:
        """speed_limit_report: one sample of the controller's configured limit and wheel size every interval."""
        while not stop.is_set():
            self._speed_limit_changed.clear()
            interval = self.commands.state.speed_limit_report_s
            if interval > 0:
                self._report_speed_limit()
            waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._speed_limit_changed.wait())}
            try:
                # Off, it only waits for a change (bounded anyway, like every wait here).
                await asyncio.wait(waiters, timeout=interval or 3600, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()

    def _status_report(self, conn: int, online: bool) -> StatusReport:
        fp = self._meter.read()
        spool = self.spool.spool
        fix_age = time.monotonic() - self._last_fix_monotonic
        latest_fix = self._gnss.latest if self._gnss is not None else None
        state = self.commands.state
        metrics: dict[str, int | float | bool | str | None] = {
            "rss_kb": fp.rss_kb,
            "cpu_s": fp.cpu_s,
            "cpu_pct": fp.cpu_pct,
            "uptime_s": fp.uptime_s,
            "spool_depth": spool.depth,
            "spool_bytes": spool.bytes,
            "evicted": spool.evicted,
            "evicted_alerts": spool.evicted_alerts,
            "connects": self.stats.connects,
            "reconnects": max(0, self.stats.connects - 1),
            "samples": self.stats.samples,
            "published": self.stats.published,
            # Seconds since the last GNSS epoch; None before the first one.
            "fix_age_s": round(fix_age, 1) if fix_age < 1e8 else None,
            "fix_mode": latest_fix.mode if latest_fix is not None else None,
            "locked": state.locked,
            "profile": state.profile,
            "sampling_profile": self.sampler.active_profile,
            "speed_limit_report_s": state.speed_limit_report_s,
            "speed_limit_kmh": self._speed_limit_values.get(SPEED_LIMIT_SIGNALS[0]),
            "wheel_in": self._speed_limit_values.get(SPEED_LIMIT_SIGNALS[1]),
        }
        metrics.update({f"cmd_{k}": v for k, v in self.commands.metrics().items()})
        return StatusReport(online=online, conn=conn, agent=self._version, metrics=metrics)

    def _seal_status(self, conn: int, online: bool) -> bytes:
        # Sealed like any message of this boot (the sealer's next seq); never spooled: only the newest counts.
        body = encode_status(self._status_report(conn, online))
        return self.sealer.seal_body(body, 0, int(self.clock() * 1000), Kind.STATUS).payload

    async def _publish_status(self, client: aiomqtt.Client, conn: int, online: bool) -> None:
        await client.publish(
            topic(self.config.vin, Channel.STATUS),
            self._seal_status(conn, online),
            qos=1,
            retain=True,
            timeout=self.config.publish_timeout_s,
        )
        self.stats.statuses += 1

    async def _command_loop(self, client: aiomqtt.Client) -> None:
        cmd_topic = topic(self.config.vin, Channel.CMD)
        async for message in client.messages:
            if not message.topic.matches(cmd_topic) or not isinstance(message.payload, bytes | bytearray):
                log.warning("unexpected message ignored", extra={"topic": str(message.topic)[:200]})
                continue
            await self.commands.handle(bytes(message.payload))
        raise aiomqtt.MqttError("message stream ended")

    async def _status_loop(self, client: aiomqtt.Client, conn: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.status_interval_s)
            if not stop.is_set():
                await self._publish_status(client, conn, online=True)

    async def _connected(self, client: aiomqtt.Client, conn: int, stop: asyncio.Event) -> None:
        """One connection's life: subscribe, announce online, then publish the spool while commands and status
        run alongside; on stop, announce offline (a clean disconnect discards the LWT)."""
        await client.subscribe(topic(self.config.vin, Channel.CMD), qos=1, timeout=self.config.publish_timeout_s)
        await self._publish_status(client, conn, online=True)
        aux = {
            asyncio.create_task(self._command_loop(client), name="commands"),
            asyncio.create_task(self._status_loop(client, conn, stop), name="status"),
        }
        try:
            while not stop.is_set():
                for t in aux:
                    if t.done():
                        # MqttError → reconnect; anything else is a bug and ends the agent loudly.
                        t.result()
                        raise aiomqtt.MqttError(f"{t.get_name()} task ended")
                await self._publish_next(client)
            await self._publish_status(client, conn, online=False)
        finally:
            for t in aux:
                t.cancel()
            await asyncio.gather(*aux, return_exceptions=True)

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
        status_topic = topic(cfg.vin, Channel.STATUS)
        attempt = 0
        while not stop.is_set():
            self._conn += 1
            conn = self._conn
            connected_at: float | None = None
            # The broker keeps the session (the command subscription, commands sent while we are away).
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = cfg.session_expiry_s
            try:
                async with aiomqtt.Client(
                    cfg.broker_host,
                    cfg.broker_port,
                    identifier=f"zl-agent-{cfg.vin}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    keepalive=cfg.keepalive_s,
                    timeout=cfg.publish_timeout_s,
                    tls_context=self._tls,
                    clean_start=False,
                    properties=props,
                    # Sealed now, published by the broker if this connection dies: retained "offline".
                    will=aiomqtt.Will(status_topic, self._seal_status(conn, online=False), qos=1, retain=True),
                    # Commands are rare; a flood beyond this is dropped (already PUBACKed, so it is not redelivered).
                    max_queued_incoming_messages=64,
                ) as client:
                    self.stats.connected = True
                    self.stats.connects += 1
                    self._broker_down = False
                    connected_at = time.monotonic()
                    log.info("connected to broker", extra={"vin": cfg.vin, "boot": self.boot, "conn": conn})
                    await self._connected(client, conn, stop)
            except aiomqtt.MqttError as exc:
                self.stats.publish_errors += 1
                self._broker_down = True
                log.warning("broker unreachable; retrying", extra={"error": str(exc), "attempt": attempt})
            except SpoolError as exc:
                # The disk failed, not the broker: the row stays (or was never taken) and is retried after backoff.
                self.stats.spool_errors += 1
                log.error("spool failed while publishing; retrying", extra={"error": str(exc), "attempt": attempt})
            finally:
                self.stats.connected = False
            if connected_at is not None and time.monotonic() - connected_at >= STABLE_CONNECTION_S:
                attempt = 0  # a connection that held resets the backoff; one that drops at once does not
            delay = full_jitter_backoff(attempt, cfg.reconnect_initial_s, cfg.reconnect_max_s, self._rng)
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

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
            _topic_of(self.config.vin, row.kind), payload, qos=1, timeout=self.config.publish_timeout_s
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
        can_bus = None
        if self.config.can_interface:
            # Imported only here: a board without CAN never loads python-can or cantools.
            from edge_agent.devices.can_source import CanSource

            can_bus = CanSource(
                self.config.can_interface,
                self.config.can_channel,
                self.config.can_bitrate,
                self.config.can_variant,
                catalogue=self.catalogue,
            )
            await can_bus.start()
            self.sources.append(can_bus)
        gnss = None
        if self.config.gnss_port:
            from edge_agent.gnss import GnssReader

            gnss = GnssReader(self.config.gnss_port, self.config.gnss_baudrate, on_fix=self.on_fix)
            await gnss.start()
            self._gnss = gnss
        halt = asyncio.Event()  # ends sampler and flusher; the publisher keeps going until the drain is over
        pub_stop = asyncio.Event()
        producers = {
            asyncio.create_task(self._sampler_task(halt), name="sampler"),
            asyncio.create_task(self._flusher_task(halt), name="flusher"),
            asyncio.create_task(self._speed_limit_task(halt), name="speed-limit-report"),
        }
        tasks = {*producers, asyncio.create_task(self._publisher_task(pub_stop), name="publisher")}
        try:
            await _supervise(tasks, stop.wait())
        finally:
            halt.set()
            if gnss is not None:
                await gnss.stop()
            for device in (bms, controller, can_bus):
                if device is not None:
                    await device.stop()
                    self.sources.remove(device)
            # Awaited, not cancelled: a cancelled flusher would abandon a spool put that still commits on the
            # spool's thread after the drain below has already found the spool empty.
            await asyncio.wait(producers, timeout=5.0)
            await self.flush()
            await self.drain_spool(timeout=2.0)
            pub_stop.set()
            # Not cancelled at once: a connected publisher says goodbye with a retained offline status first.
            await asyncio.wait(tasks, timeout=5.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.spool.close()
            log.info("agent stopped", extra={"vin": self.config.vin, "unsent": self.spool.depth})


def _log_crash(task: asyncio.Task[None]) -> None:
    """Done-callback of short-lived helper tasks: their failure is logged, never lost."""
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


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


def full_jitter_backoff(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Reconnect delay: uniform in [0, min(max_s, initial_s * 2^attempt)] ("full jitter"), so a fleet that lost
    its broker together does not come back in lockstep."""
    return rng.uniform(0.0, min(max_s, initial_s * 2 ** min(attempt, 32)))


def _topic_of(vin: str, kind: Kind) -> str:
    return topic(vin, Channel.CMD_ACK) if kind is Kind.COMMAND_ACK else topic_for(vin, kind)


def _backend_skipped(name: str, error: ed25519.Ed25519Unavailable) -> None:
    log.warning("ed25519 backend unavailable, trying the next", extra={"backend": name, "error": str(error)})
