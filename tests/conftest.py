"""Fixtures that start real components: a private Mosquitto on a free loopback port, the ingest service with
its HTTP API under uvicorn, and the MQTT bridge — each stopped afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import uvicorn

from broker_bridge.bridge import MqttBridge
from cloud_ingest.service import IngestService
from tests.influx_server import influx_database, influxd  # noqa: F401  (fixtures: the time-series suite)
from tests.relational import database_url, postgres_admin, private_postgres  # noqa: F401  (fixtures: the relational suite)
from zhilian.broker import MosquittoProcess, free_port
from zhilian.serve import _Server


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    broker = MosquittoProcess(tmp_path / "mosquitto").start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass(frozen=True)
class ClientTls:
    """One MQTT client's mutual-TLS files."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class Stack:
    service: IngestService
    bridge: MqttBridge
    api: str
    admin_key: str
    viewer_key: str
    broker: MosquittoProcess


@contextlib.asynccontextmanager
async def running_stack(
    data_dir: Path,
    broker: MosquittoProcess,
    tls: ClientTls | None = None,
    db_url: str | None = None,
    service_options: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """Ingest service + bridge + HTTP API on one loop, as `zhilian serve` runs them; `tls`: the bridge's mTLS files;
    `service_options`: more IngestService.open arguments (e.g. influx_url)."""
    service = IngestService.open(data_dir, database_url=db_url, **(service_options or {}))
    admin = service.registry.create_api_key("admin", "test-admin")
    viewer = service.registry.create_api_key("viewer", "test-viewer")
    stop = asyncio.Event()
    bridge = MqttBridge(
        service.pipeline.ingest_many,
        host=broker.host,
        port=broker.port,
        metrics=service.pipeline.metrics,
        control=service.commands,
        tls_ca=tls.ca if tls else None,
        tls_cert=tls.cert if tls else None,
        tls_key=tls.key if tls else None,
    )
    port = free_port()
    server = _Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, log_level="warning"))
    tasks = [asyncio.create_task(bridge.run(stop)), asyncio.create_task(server.serve())]
    try:
        await bridge.wait_subscribed(timeout=10)
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield Stack(service, bridge, f"http://127.0.0.1:{port}", admin, viewer, broker)
    finally:
        stop.set()
        server.should_exit = True
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=20)
        service.close()
        for r in results:
            if isinstance(r, BaseException):
                raise r


async def wait_until(predicate, timeout: float, interval: float = 0.1) -> None:  # type: ignore[no-untyped-def]
    """Poll `predicate` (sync or async) until true; fail the test with a clear message on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def resubscribing(
    broker: MosquittoProcess,
    identifier: str,
    topics: list[tuple[str, int]],
    on_subscribed: Callable[[], None],
    on_message: Callable[[aiomqtt.Message], None],
    clean_session: bool | None = None,
) -> AsyncIterator[None]:
    """A subscriber in the background that reconnects and subscribes again whenever the broker comes back (a broker
    restart is part of the scenario): `on_subscribed` after each subscription, `on_message` for every message.
    Entered once the first subscription is in place."""
    subscriptions = 0

    async def run() -> None:
        nonlocal subscriptions
        while True:
            try:
                async with aiomqtt.Client(
                    broker.host, broker.port, identifier=identifier, clean_session=clean_session
                ) as client:
                    await client.subscribe(topics)
                    subscriptions += 1
                    on_subscribed()
                    async for message in client.messages:
                        on_message(message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.02)

    task = asyncio.create_task(run())
    try:
        await wait_until(lambda: subscriptions >= 1, timeout=10, interval=0.02)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
