"""`zhilian serve`: the ingest API and the MQTT bridge in one event loop over one data directory.

Either half can also run alone (`zhilian ingest`, `zhilian bridge`), several bridges sharing the databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from broker_bridge.bridge import MqttBridge
from cloud_ingest.service import IngestService

log = logging.getLogger("zhilian.serve")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the composing command owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def freeze_startup_heap() -> None:
    """Takes what start-up built (modules, catalogue, rules, app: ≈ 170,000 objects that live as long as the process)
    out of the cyclic collector's generations (`gc.freeze`). A full collection then walks only what was made since:
    a 10,000-vehicle snapshot answer, 50,000 fresh objects, set one off that took 105–135 ms walking the whole heap,
    and 6–12 ms after the freeze; in the ingest pipeline the collector's share of CPU went from ≈ 10 % to ≈ 4.5 %
    (BENCHMARKS.md). Frozen objects are still freed by reference counting; only cycles among them would stay."""
    gc.collect()
    gc.freeze()


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def serve(
    data_dir: Path,
    http_host: str = "127.0.0.1",
    http_port: int = 8080,
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int = 1883,
    with_api: bool = True,
    with_bridge: bool = True,
    share_group: str | None = None,
    client_id: str = "zhilian-bridge",
    stop: asyncio.Event | None = None,
    tls_ca: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    database_url: str | None = None,
    store_options: dict[str, Any] | None = None,
    freeze_heap: bool = False,
) -> None:
    """`store_options`: more IngestService.open arguments (influx_url, influx_db, ..., rules_path, webhook).
    `freeze_heap`: this process is ours alone (the CLI's): `freeze_startup_heap` once everything is built."""
    stop = stop or asyncio.Event()
    service = IngestService.open(data_dir, database_url=database_url, **(store_options or {}))
    tasks: list[asyncio.Task[None]] = []
    server: _Server | None = None
    try:
        service.start_background()  # the alarm service's periodic task, notification delivery
        if with_api:
            server = _Server(uvicorn.Config(service.app, host=http_host, port=http_port, log_level="warning"))
            tasks.append(asyncio.create_task(server.serve(), name="http"))
        if with_bridge:
            bridge = MqttBridge(
                service.pipeline.ingest_many,
                host=mqtt_host,
                port=mqtt_port,
                client_id=client_id,
                share_group=share_group,
                metrics=service.pipeline.metrics,
                control=service.commands,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
            )
            tasks.append(asyncio.create_task(bridge.run(stop), name="bridge"))
        if freeze_heap:
            freeze_startup_heap()
        log.info("serving", extra={"http": f"{http_host}:{http_port}", "mqtt": f"{mqtt_host}:{mqtt_port}"})
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop_wait and t.exception() is not None:
                raise RuntimeError(f"{t.get_name()} failed") from t.exception()
            if t is not stop_wait:
                raise RuntimeError(f"{t.get_name()} stopped unexpectedly")
    finally:
        stop.set()
        if server is not None:
            server.should_exit = True
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=15)
        service.close()
