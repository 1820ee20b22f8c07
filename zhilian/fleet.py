"""A fleet of virtual vehicles: each one a GNSS receiver, a JBD BMS and a motor controller emulated on their own
real ptys, all driven by one vehicle model, and a real edge agent reading those ptys and publishing to the broker —
all multiplexed on one event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from protocol import DeviceKey
from simulators.bms_jbd import JbdBmsEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.faults import Fault, FaultedModel
from simulators.gnss import GnssEmulator
from simulators.roads import graph_route_for
from simulators.vehicle import VARIANTS, VehicleModel

log = logging.getLogger("zhilian.fleet")


def demo_vin(index: int) -> str:
    return f"LZHDEMO{index:010d}"


def fleet_variant(index: int) -> str:
    """Every fourth vehicle of a fleet is a 72 V e-motorcycle, the rest 48 V e-bikes (deterministic by index)."""
    return "emoto72" if index % 4 == 3 else "ebike48"


@dataclass
class VirtualVehicle:
    vin: str
    model: VehicleModel
    emulator: GnssEmulator
    bms: JbdBmsEmulator
    controller: ControllerEmulator
    agent: EdgeAgent


async def register_device(api: str, admin_key: str, vin: str, public_raw: bytes, timeout: float = 10.0) -> None:
    async with httpx.AsyncClient(base_url=api, timeout=timeout) as client:
        resp = await client.post(
            "/v1/devices",
            headers={"Authorization": f"Bearer {admin_key}"},
            json={"vin": vin, "public_key": base64.b64encode(public_raw).decode(), "label": "virtual vehicle"},
        )
        if resp.status_code not in (200, 201):
            raise RuntimeError(f"registering {vin} failed: {resp.status_code} {resp.text[:200]}")


async def register_devices(
    api: str, admin_key: str, devices: list[tuple[str, bytes]], concurrency: int = 16, timeout: float = 10.0
) -> None:
    """Register many (vin, public key) pairs, `concurrency` requests at a time over one connection pool; a VIN
    already registered with the same key is fine (the API answers 200)."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=api, timeout=timeout, headers={"Authorization": f"Bearer {admin_key}"}
    ) as client:

        async def one(vin: str, public_raw: bytes) -> None:
            async with sem:
                body = {"vin": vin, "public_key": base64.b64encode(public_raw).decode(), "label": "virtual vehicle"}
                resp = await client.post("/v1/devices", json=body)
            if resp.status_code not in (200, 201):
                raise RuntimeError(f"registering {vin} failed: {resp.status_code} {resp.text[:200]}")

        await asyncio.gather(*(one(vin, key) for vin, key in devices))


async def build_vehicle(
    index: int, state_dir: Path, broker_host: str, broker_port: int, batch_interval_s: float, gnss_rate_hz: float
) -> VirtualVehicle:
    vin = demo_vin(index)
    vdir = state_dir / vin
    vdir.mkdir(parents=True, exist_ok=True)
    key_file = vdir / "device.key"
    if not key_file.exists():
        DeviceKey.generate().save(key_file)
    start = time.time()
    # Every few vehicles has had its speed limiter raised (and rides like it), as the hazard rules must find; the
    # others are legal. The tampering is an injected fault with its ground truth (simulators/faults.py).
    limit = VARIANTS[fleet_variant(index)].speed_limit_kmh + 20.0  # 45 km/h on a 25 km/h e-bike
    tampered: list[Fault] = []
    if index % 7 == 6:
        derestricted = {"limit_kmh": limit, "wish_kmh": (limit - 12.0, limit - 3.0)}
        tampered = [Fault("speed_limiter_tampering", start, start + 86_400.0, derestricted)]
    model = FaultedModel(graph_route_for(index), index, start, fleet_variant(index), faults=tampered)
    emulator = GnssEmulator(model, rate_hz=gnss_rate_hz, talker="GN" if index % 3 else "GB")
    await emulator.start()
    # Cell count, probes and capacity follow the variant (13S e-bike, 20S e-motorcycle).
    bms = JbdBmsEmulator(model, barcode=f"{model.variant.barcode_prefix}-{index:06d}")
    await bms.start()
    controller = ControllerEmulator(model)
    await controller.start()
    config = AgentConfig(
        vin=vin,
        key_file=key_file,
        state_dir=vdir,
        broker_host=broker_host,
        broker_port=broker_port,
        gnss_port=emulator.port,
        bms_port=bms.port,
        controller_port=controller.port,
        batch_interval_s=batch_interval_s,
    )
    agent = EdgeAgent(config)
    return VirtualVehicle(vin, model, emulator, bms, controller, agent)


async def run_fleet(
    vehicles: int,
    state_dir: Path,
    broker_host: str,
    broker_port: int,
    api: str | None,
    admin_key: str | None,
    stop: asyncio.Event,
    batch_interval_s: float = 5.0,
    gnss_rate_hz: float = 1.0,
) -> list[VirtualVehicle]:
    fleet: list[VirtualVehicle] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(vehicles):
            v = await build_vehicle(i, state_dir, broker_host, broker_port, batch_interval_s, gnss_rate_hz)
            fleet.append(v)
            if api and admin_key:
                await register_device(api, admin_key, v.vin, v.agent.key.public_raw)
            tasks.append(asyncio.create_task(v.agent.run(stop), name=f"agent-{v.vin}"))
        log.info("fleet running", extra={"vehicles": len(fleet)})
        stop_wait = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({*tasks, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stop_wait:
                raise RuntimeError(f"{t.get_name()} ended unexpectedly") from t.exception()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for v in fleet:
            await v.emulator.stop()
            await v.bms.stop()
            await v.controller.stop()
    return fleet
