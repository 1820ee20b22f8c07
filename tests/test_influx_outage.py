"""Acceptance (issue 6): InfluxDB goes away while ingest runs through the real chain — Mosquitto, bridge, pipeline,
InfluxDB store — and comes back on the same data directory and port: every sample lands exactly once, the service
keeps running, and /healthz reports the degraded state meanwhile."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiomqtt
import httpx
import pytest

from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope
from protocol.topics import Channel, topic
from tests.conftest import running_stack, wait_until
from tests.influx_server import own_influxd
from zhilian.broker import MosquittoProcess

pytestmark = pytest.mark.integration
CAT = load_catalogue()
VINS = ("LZHOUTAGE00000001", "LZHOUTAGE00000002")
SAMPLES_PER_MESSAGE = 10
T0 = 1_767_225_600_000
DB = "outage"


def _message(key: DeviceKey, vin: str, seq: int) -> tuple[bytes, list[int]]:
    stamps = [T0 + (seq * SAMPLES_PER_MESSAGE + i) * 100 for i in range(SAMPLES_PER_MESSAGE)]
    n = len(stamps)
    batch = Batch(
        stamps,
        {
            "Speed": [float(seq % 50)] * n,
            "Powertrain.TractionBattery.StateOfCharge": [80.0 - seq * 0.01] * n,
            "CurrentLocation.Latitude": [29.5 + i * 1e-5 for i in range(n)],
            "CurrentLocation.Longitude": [106.5] * n,
            "CurrentLocation.GNSSReceiver.SatellitesUsed": [12] * n,
            "Chassis.Brake.IsEngaged": [i % 2 == 0 for i in range(n)],
        },
    )
    env = Envelope(vin, key.key_id, 1, seq, stamps[0], Kind.TELEMETRY, Flags.NONE, encode_batch(batch, CAT))
    return seal_envelope(env, key), stamps


def test_influx_outage_during_ingest_loses_and_doubles_nothing(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    influx = own_influxd(tmp_path / "influxd")
    try:
        asyncio.run(_scenario(tmp_path, mosquitto, influx))
    finally:
        influx.stop()


async def _scenario(tmp_path: Path, broker: MosquittoProcess, influx) -> None:  # type: ignore[no-untyped-def]
    options = {"influx_url": influx.url, "influx_db": DB, "influx_write_deadline_s": 1.0}
    sent: dict[str, list[int]] = {vin: [] for vin in VINS}
    async with running_stack(tmp_path / "ingest", broker, service_options=options) as stack:
        keys = {vin: DeviceKey.generate() for vin in VINS}
        for vin, key in keys.items():
            stack.service.registry.register_device(vin, key.public_raw)
        publishing = asyncio.Event()
        publishing.set()

        async def publisher(vin: str) -> None:
            async with aiomqtt.Client(broker.host, broker.port) as pub:
                seq = 0
                while publishing.is_set():
                    payload, stamps = _message(keys[vin], vin, seq)
                    await pub.publish(topic(vin, Channel.TELEMETRY), payload, qos=1)
                    sent[vin].extend(stamps)
                    seq += 1
                    await asyncio.sleep(0.05)

        async def health() -> tuple[int, dict[str, object]]:
            async with httpx.AsyncClient() as client:
                r = await client.get(f"{stack.api}/healthz", timeout=10)
                return r.status_code, r.json()

        assert await health() == (200, {"status": "ok"})
        publishers = [asyncio.create_task(publisher(vin)) for vin in VINS]
        await wait_until(lambda: stack.service.pipeline.stats()["stored"] >= 20, timeout=30)

        await asyncio.to_thread(influx.stop)
        outage_started = time.monotonic()
        # The bridge keeps the batch unacknowledged and retries it; the broker holds what arrives meanwhile.
        await wait_until(lambda: stack.bridge.stats.store_failures >= 2, timeout=30)
        assert await health() == (503, {"status": "degraded", "down": {"timeseries": "unreachable"}})
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - outage_started)))
        assert all(not p.done() for p in publishers)
        stored_before_restart = stack.service.pipeline.stats()["stored"]
        await asyncio.to_thread(influx.start)

        await asyncio.sleep(1.0)
        publishing.clear()
        await asyncio.gather(*publishers)
        messages = sum(len(v) for v in sent.values()) // SAMPLES_PER_MESSAGE
        await wait_until(lambda: stack.service.pipeline.stats()["stored"] == messages, timeout=60)
        assert stack.service.pipeline.stats()["stored"] > stored_before_restart
        assert await health() == (200, {"status": "ok"})

        for vin in VINS:
            got = stack.service.store.query(vin, 0, 2**62, ["Speed", "Chassis.Brake.IsEngaged"], 100_000)
            assert got.timestamps == sorted(sent[vin])  # none missing, none twice, in order
            assert got.columns["Chassis.Brake.IsEngaged"] == [((ts - T0) // 100) % 2 == 0 for ts in got.timestamps]
            # Counted by the server itself: one point per (vin, ts).
            q = f"SELECT count(\"sample\") FROM telemetry WHERE vin = '{vin}' AND time >= 0 AND time <= {2**62}"
            [[_, counted]] = influx.query(q, db=DB).json()["results"][0]["series"][0]["values"]
            assert counted == len(sent[vin])
        stats = stack.service.pipeline.stats()
        assert stats["duplicate"] == 0 and not stats["rejected"]
        assert stack.bridge.stats.store_failures >= 2
        assert stack.service.store.stats()["quarantined_lines"] == 0  # type: ignore[attr-defined]
