"""PostgreSQL going away while ingest runs: nothing crashes, nothing is acknowledged or lost, health says degraded.

The registry lives in a private PostgreSQL cluster (tests/relational.py) that the test crashes (`pg_ctl stop -m
immediate`) and restarts on the same port, with the whole stack running: Mosquitto, the MQTT bridge, the pipeline,
the HTTP API.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import httpx
import psycopg
import pytest

from cloud_ingest.errors import StorageError
from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope
from protocol.topics import Channel, topic
from tests.conftest import running_stack, wait_until
from tests.relational import PrivatePostgres
from zhilian.broker import MosquittoProcess

pytestmark = pytest.mark.integration
CAT = load_catalogue()
VIN = "LZHPGOUTAGE000001"
KEY = DeviceKey.from_seed(b"\x41" * 32)
T0 = 1_700_000_000_000


def envelope(seq: int) -> bytes:
    body = encode_batch(Batch([T0 + seq * 1000], {"Speed": [float(seq)]}), CAT)
    return seal_envelope(Envelope(VIN, KEY.key_id, 1, seq, T0, Kind.TELEMETRY, Flags.NONE, body), KEY)


def test_registry_outage_is_survived_reported_and_loses_nothing(
    tmp_path: Path, mosquitto: MosquittoProcess, private_postgres: PrivatePostgres
) -> None:
    pg = private_postgres
    with psycopg.connect(pg.admin_conninfo, autocommit=True, connect_timeout=5) as conn:
        conn.execute("CREATE DATABASE zhilian")
    url = f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/zhilian"

    async def go() -> None:
        async with running_stack(tmp_path / "ingest", mosquitto, db_url=url) as stack:
            stack.service.registry.register_device(VIN, KEY.public_raw)
            pipeline = stack.service.pipeline
            tel = topic(VIN, Channel.TELEMETRY)
            async with httpx.AsyncClient(base_url=stack.api, timeout=30) as http:
                assert (await http.get("/healthz")).json() == {"status": "ok"}
                async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="outage-publisher") as pub:
                    for seq in range(5):
                        await pub.publish(tel, envelope(seq), qos=1)
                    await wait_until(lambda: pipeline.stats()["stored"] == 5, timeout=20)

                    await asyncio.to_thread(pg.stop, "immediate")
                    r = await http.get("/healthz")
                    assert (r.status_code, r.json()) == (
                        503,
                        {"status": "degraded", "down": {"registry": "unreachable"}},
                    )
                    r = await http.get("/v1/vehicles", headers={"Authorization": f"Bearer {stack.viewer_key}"})
                    assert r.status_code == 503  # the API answers, it does not hang or crash
                    with pytest.raises(StorageError):
                        await asyncio.to_thread(pipeline.ingest_one, VIN, envelope(99))

                    for seq in range(5, 12):
                        await pub.publish(tel, envelope(seq), qos=1)
                    await wait_until(lambda: stack.bridge.stats.store_failures >= 2, timeout=30)
                    assert pipeline.stats()["stored"] == 5
                    assert stack.bridge.stats.acked == 5  # nothing of the outage was acknowledged

                    await asyncio.to_thread(pg.start)
                    await wait_until(lambda: pipeline.stats()["stored"] == 12, timeout=60)
                    await wait_until(lambda: stack.bridge.stats.acked >= 12, timeout=20)
                assert (await http.get("/healthz")).status_code == 200
            rows = stack.service.store.query(VIN, 0, 2**62, ["Speed"], 1000)
            assert rows.columns["Speed"] == [float(s) for s in range(12)]
            summary = stack.service.registry.vehicle_summary(VIN)
            assert summary is not None and (summary.messages, summary.samples) == (12, 12)

    asyncio.run(go())
