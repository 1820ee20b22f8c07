"""Runs a paho-mqtt client on an asyncio event loop (no network thread).

paho offers socket callbacks for exactly this: the loop watches the socket and calls loop_read/loop_write when it
is ready, and a small task calls loop_misc for keepalives.  paho's blocking connect() runs in an executor so the
loop never waits on a TCP handshake; the socket callbacks it fires from that thread are therefore marshalled onto
the loop with call_soon_threadsafe.

Flow control is TCP's: `pause_reading()` stops watching the socket for input (writes, and so acknowledgements,
keep flowing), the kernel's receive buffer fills, the TCP window closes and the broker has to hold further
messages in our session.  That works whatever the broker makes of MQTT 5's Receive Maximum.  While paused nothing
is read, PINGRESP included: a pause longer than the keepalive makes paho's loop_misc send a PINGREQ and, one
keepalive later with still nothing read, drop the connection (MQTT_ERR_KEEPALIVE), which ends up in
`disconnected` like any lost connection.  An adapter serves one connection; its owner makes a new, unpaused one
for the next, so that connection's CONNACK is read.
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
        # The socket the loop watches, from paho's socket-open callback (once it has reached the loop) to its close.
        self._sock: socket.socket | Any | None = None
        self._paused = False
        self.disconnected: asyncio.Future[BaseException | None] = loop.create_future()
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    @property
    def reading_paused(self) -> bool:
        return self._paused

    def pause_reading(self) -> bool:
        """Stop reading the socket (now, or from its opening on if it is not open yet).

        Idempotent; True if this call paused.  Called during a loop_read (from an on_message callback) it takes
        effect when that loop_read returns: the packets paho decodes in one call are delivered regardless.
        """
        if self._paused:
            return False
        self._paused = True
        fd = self._fd()
        if fd is not None:
            self.loop.remove_reader(fd)
        return True

    def resume_reading(self) -> bool:
        """Read the socket again.  Idempotent; True if this call resumed."""
        if not self._paused:
            return False
        self._paused = False
        fd = self._fd()
        if fd is not None:
            self.loop.add_reader(fd, self._read)
            if self._tls_pending():
                # Bytes already decrypted into the TLS object make the socket look idle to the selector.
                self.loop.call_soon(self._read)
        return True

    def _fd(self) -> int | None:
        if self._sock is None:
            return None
        fd: int = self._sock.fileno()
        return fd if fd >= 0 else None

    def _tls_pending(self) -> bool:
        pending = getattr(self._sock, "pending", None)
        return pending is not None and int(pending()) > 0

    def _fail(self, exc: BaseException | None) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(exc)

    def _read(self) -> None:
        if self._paused or self._sock is None:
            return  # a read scheduled by resume_reading, overtaken by another pause or by the close
        try:
            rc = self.client.loop_read()
            # TLS sockets can hold decoded bytes that select() does not see; a pause stops this drain too (the
            # bytes wait in the TLS object and resume_reading schedules a read for them).
            while rc == mqtt.MQTT_ERR_SUCCESS and not self._paused and self._tls_pending():
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

    def _watch(self, sock: socket.socket | Any) -> None:
        """On the loop: start watching a socket paho opened (unless it was closed before this ran)."""
        if sock.fileno() < 0 or self.disconnected.done():
            return
        self._sock = sock
        if not self._paused:
            self.loop.add_reader(sock.fileno(), self._read)
        self._misc = self.loop.create_task(self._misc_loop(), name="mqtt-misc")

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any) -> None:
        self.loop.call_soon_threadsafe(self._watch, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: socket.socket | Any) -> None:
        if sock is self._sock:
            self._sock = None
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

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Send DISCONNECT and wait (bounded) until it is written, so acknowledgements queued before it reach the
        broker; then stop the keepalive task."""
        try:
            rc = self.client.disconnect()
        except Exception as exc:
            log.debug("MQTT disconnect failed", extra={"error": repr(exc)})
            rc = mqtt.MQTT_ERR_NO_CONN
        if rc == mqtt.MQTT_ERR_SUCCESS and not self.disconnected.done():
            # paho closes the socket once DISCONNECT (queued behind any PUBACKs) is written: that resolves this.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.disconnected), flush_timeout)
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
