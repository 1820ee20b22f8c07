"""Runs a paho-mqtt client on an asyncio event loop (no network thread).

paho offers socket callbacks for exactly this: the loop watches the socket and calls loop_read/loop_write when it
is ready, and a small task calls loop_misc for keepalives.  paho's blocking connect() runs in an executor so the
loop never waits on a TCP handshake; the socket callbacks it fires from that thread are therefore marshalled onto
the loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger("zhilian.bridge.mqtt")


class PahoOnAsyncio:
    def __init__(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self._misc: asyncio.Task[None] | None = None
        self.disconnected: asyncio.Future[BaseException | None] = loop.create_future()
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def _fail(self, exc: BaseException | None) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(exc)

    def _read(self) -> None:
        try:
            rc = self.client.loop_read()
            # TLS sockets can hold decoded bytes that select() does not see.
            sock = self.client.socket()
            while rc == mqtt.MQTT_ERR_SUCCESS and hasattr(sock, "pending") and sock.pending() > 0:  # type: ignore[union-attr]
                rc = self.client.loop_read()
        except Exception as exc:
            self._fail(exc)
            return
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._fail(ConnectionError(f"MQTT read failed: {mqtt.error_string(rc)}"))

    def _write(self) -> None:
        try:
            rc = self.client.loop_write()
        except Exception as exc:
            self._fail(exc)
            return
        if rc != mqtt.MQTT_ERR_SUCCESS:
            self._fail(ConnectionError(f"MQTT write failed: {mqtt.error_string(rc)}"))

    async def _misc_loop(self) -> None:
        # paho wants loop_misc about once a second (keepalive pings): a timer, not a wait for a condition.
        while self.client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:  # noqa: ASYNC110
            await asyncio.sleep(1.0)
        self._fail(ConnectionError("MQTT keepalive failed"))

    def _start_misc(self) -> None:
        self._misc = self.loop.create_task(self._misc_loop(), name="mqtt-misc")

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.add_reader, sock.fileno(), self._read)
        self.loop.call_soon_threadsafe(self._start_misc)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        if self._misc is not None:
            self._misc.cancel()
        self._fail(None)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.add_writer, sock.fileno(), self._write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any) -> None:
        self.loop.remove_writer(sock.fileno())

    async def connect(
        self, host: str, port: int, keepalive: int, properties: Any = None, timeout: float = 10.0
    ) -> None:
        await asyncio.wait_for(
            self.loop.run_in_executor(
                None,
                lambda: self.client.connect(host, port, keepalive, clean_start=False, properties=properties),
            ),
            timeout,
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
