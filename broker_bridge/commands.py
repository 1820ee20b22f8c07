"""The bridge's half of the control plane: publishes the command outbox to ev/{vin}/cmd.

Per connection, `CommandPublisher.run` claims pending commands from the outbox (a lease, so several bridge workers
never publish the same command at once), publishes them at QoS 1 and settles each on its PUBACK: reason Success
means the broker took it for the vehicle's session (its agent keeps a persistent one) → `mark_sent`; "No matching
subscribers" means the vehicle has no session yet (or it expired) → `release`, retried after `retry_s` until the
command expires. A command whose PUBACK never comes (the connection died) is taken again once its lease ran out;
the agent's replay cache turns such a second delivery into a counted `replayed`, never a second action.

It polls the outbox every `poll_interval_s` (several API processes may issue commands) and is woken at once by the
in-process command service. Everything it keeps is bounded by `max_inflight`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from cloud_ingest.errors import StorageError
from protocol.topics import Channel, topic

log = logging.getLogger("zhilian.bridge.commands")

NO_MATCHING_SUBSCRIBERS = 16


class OutgoingLike(Protocol):
    @property
    def command_id(self) -> str: ...

    @property
    def vin(self) -> str: ...

    @property
    def payload(self) -> bytes: ...


class CommandOutbox(Protocol):
    """What the publisher needs of cloud_ingest.commands.CommandService."""

    def claim_pending(self, limit: int, lease_s: float) -> Sequence[OutgoingLike]: ...

    def mark_sent(self, command_id: str) -> None: ...

    def release(self, command_id: str, retry_in_s: float) -> None: ...

    def add_listener(self, callback: Callable[[], None]) -> None: ...

    def remove_listener(self, callback: Callable[[], None]) -> None: ...


class CommandPublisher:
    def __init__(
        self,
        outbox: CommandOutbox,
        poll_interval_s: float = 2.0,
        lease_s: float = 30.0,
        retry_s: float = 5.0,
        max_inflight: int = 64,
    ) -> None:
        self.outbox = outbox
        self.poll_interval_s = poll_interval_s
        self.lease_s = lease_s
        self.retry_s = retry_s
        self.max_inflight = max_inflight
        self.published = 0
        self.sent = 0
        self.released = 0
        self.errors = 0
        self._inflight: dict[int, str] = {}  # MQTT message id → command id, for this connection
        self._results: list[tuple[str, int]] = []  # (command id, PUBACK reason code) waiting to be recorded
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_issued(self) -> None:
        # Called on the API's thread.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    def on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        """paho's on_publish (on the event loop): the PUBACK of one of our commands."""
        command_id = self._inflight.pop(mid, None)
        if command_id is None:
            return  # a message of an earlier connection; its lease runs out and it is retried
        self._results.append((command_id, int(getattr(reason_code, "value", reason_code))))
        self._wake.set()

    async def run(self, client: mqtt.Client, stop: asyncio.Event) -> None:
        """Publish for one connection until `stop` (the bridge cancels it when the connection ends)."""
        self._loop = asyncio.get_running_loop()
        self._inflight.clear()
        self.outbox.add_listener(self._on_issued)
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self._settle()
                    await self._publish_pending(client)
                except StorageError as exc:
                    self.errors += 1
                    log.error("command outbox unavailable; retrying", extra={"error": str(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
        finally:
            self.outbox.remove_listener(self._on_issued)

    async def _publish_pending(self, client: mqtt.Client) -> None:
        room = self.max_inflight - len(self._inflight)
        if room <= 0:
            return
        claimed = await asyncio.to_thread(self.outbox.claim_pending, room, self.lease_s)
        for cmd in claimed:
            info = client.publish(topic(cmd.vin, Channel.CMD), cmd.payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                # Not even queued (connection going down): the lease runs out and another attempt takes it.
                log.warning("command not queued for publishing", extra={"command_id": cmd.command_id, "rc": info.rc})
                continue
            self._inflight[info.mid] = cmd.command_id
            self.published += 1

    async def _settle(self) -> None:
        if not self._results:
            return
        results, self._results = self._results, []

        def record() -> None:
            for command_id, code in results:
                if code == 0:
                    self.outbox.mark_sent(command_id)
                else:
                    self.outbox.release(command_id, self.retry_s)

        try:
            await asyncio.to_thread(record)
        except StorageError:
            self._results[:0] = results  # recorded again on the next round; mark_sent and release are idempotent
            raise
        for command_id, code in results:
            if code == 0:
                self.sent += 1
                log.info("command sent", extra={"command_id": command_id})
            else:
                self.released += 1
                level = logging.INFO if code == NO_MATCHING_SUBSCRIBERS else logging.WARNING
                log.log(
                    level,
                    "command not taken by the broker; retried later",
                    extra={"command_id": command_id, "reason_code": code},
                )
