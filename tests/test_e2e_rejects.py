"""End to end through a real Mosquitto: bad envelopes are rejected, counted and never stored, while the good
stream around them is stored complete."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiomqtt
import httpx
import pytest

from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope
from protocol.topics import Channel, topic
from tests.conftest import running_stack, wait_until
from zhilian.broker import MosquittoProcess

pytestmark = pytest.mark.integration

CAT = load_catalogue()
VIN_A = "LZHTESTA000000001"
VIN_B = "LZHTESTB000000002"
VIN_UNREGISTERED = "LZHROGUE000000003"
T0 = 1_767_225_600_000


def _message(key: DeviceKey, vin: str, seq: int, boot: int = 1) -> tuple[bytes, Batch]:
    ts = [T0 + seq * 10_000 + i * 1000 for i in range(3)]
    batch = Batch(
        ts,
        {
            "CurrentLocation.Latitude": [29.55 + seq * 1e-4 + i * 1e-6 for i in range(3)],
            "CurrentLocation.Longitude": [106.57 + seq * 1e-4 for _ in range(3)],
            "Powertrain.TractionBattery.StateOfCharge": [90.0 - seq * 0.1 for _ in range(3)],
        },
    )
    env = Envelope(vin, key.key_id, boot, seq, ts[-1], Kind.TELEMETRY, Flags.NONE, encode_batch(batch, CAT))
    return seal_envelope(env, key), batch


def test_bad_envelopes_are_rejected_counted_and_never_stored(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    asyncio.run(_scenario(tmp_path, mosquitto))


async def _scenario(tmp_path: Path, broker: MosquittoProcess) -> None:
    key_a, key_b, rogue = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    async with running_stack(tmp_path / "ingest", broker) as stack:
        admin = {"Authorization": f"Bearer {stack.admin_key}"}
        async with httpx.AsyncClient(base_url=stack.api, timeout=10) as http:
            for vin, key in ((VIN_A, key_a), (VIN_B, key_b)):
                r = await http.post(
                    "/v1/devices",
                    headers=admin,
                    json={"vin": vin, "public_key": base64.b64encode(key.public_raw).decode()},
                )
                assert r.status_code == 201, r.text

            good = [_message(key_a, VIN_A, seq) for seq in range(10)]
            flipped = bytearray(_message(key_a, VIN_A, 100)[0])
            flipped[-5] ^= 0x40  # inside the signature
            body_flipped = bytearray(_message(key_a, VIN_A, 101)[0])
            body_flipped[40] ^= 0x01  # inside the signed part
            unregistered = _message(rogue, VIN_UNREGISTERED, 0)[0]
            b_on_a_topic = _message(key_b, VIN_B, 0)[0]

            async with aiomqtt.Client(broker.host, broker.port, identifier="test-publisher") as pub:
                tel_a = topic(VIN_A, Channel.TELEMETRY)
                for seq, (payload, _) in enumerate(good):
                    await pub.publish(tel_a, payload, qos=1)
                    if seq == 2:
                        await pub.publish(tel_a, bytes(flipped), qos=1)
                    if seq == 4:
                        await pub.publish(tel_a, good[1][0], qos=1)  # replay of an earlier envelope
                    if seq == 5:
                        await pub.publish(topic(VIN_UNREGISTERED, Channel.TELEMETRY), unregistered, qos=1)
                    if seq == 6:
                        await pub.publish(tel_a, b_on_a_topic, qos=1)  # B's envelope on A's topic
                    if seq == 7:
                        await pub.publish(tel_a, bytes(body_flipped), qos=1)
                        await pub.publish(tel_a, b"\x93not an envelope", qos=1)

            async def settled() -> bool:
                st = (await http.get("/v1/ingest/stats", headers=admin)).json()
                return st["stored"] == 10 and sum(st["rejected"].values()) >= 5 and st["duplicate"] >= 1

            await wait_until(settled, timeout=20)
            stats = (await http.get("/v1/ingest/stats", headers=admin)).json()
            assert stats["stored"] == 10
            assert stats["duplicate"] == 1
            rejected = stats["rejected"]
            assert rejected.get("bad_signature", 0) >= 1
            assert rejected.get("unknown_device") == 1
            assert rejected.get("vin_mismatch") == 1
            # The byte flipped inside the signed part breaks either the msgpack structure or the signature.
            assert rejected.get("bad_signature", 0) + rejected.get("malformed", 0) == 3
            assert sum(rejected.values()) == 5

            # The good stream is stored complete, with its exact values, and nothing else.
            r = await http.get(
                f"/v1/vehicles/{VIN_A}/telemetry",
                headers=admin,
                params={"start": "2025-12-31T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
            )
            assert r.status_code == 200, r.text
            got = r.json()
            expected_ts = [t for _, b in good for t in b.timestamps]
            assert got["timestamps_ms"] == expected_ts
            lat = [v for _, b in good for v in b.columns["CurrentLocation.Latitude"]]
            assert got["columns"]["CurrentLocation.Latitude"] == pytest.approx(lat, abs=1e-7)
            for vin in (VIN_B, VIN_UNREGISTERED):
                r = await http.get(f"/v1/vehicles/{vin}/latest", headers=admin)
                assert r.status_code == 404

            metrics = (await http.get("/metrics")).text
            assert "zhilian_bridge_acked_total 16.0" in metrics
        assert stack.bridge.stats.acked == 16
