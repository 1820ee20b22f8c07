"""The CAN configuration end to end: GNSS emulator on a pty + the BMS and controller on a CAN bus, reached through
an slcan USB-CAN adapter emulated on another pty (the cross-process path a board uses) → edge agent (python-can
slcan, cantools) → sign → real Mosquitto → bridge → store. What is stored must equal what the emulators sent,
within the DBC's stated resolution."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.devices.can_codec import CanCodec
from protocol import DeviceKey
from simulators.bms_jbd import JbdBmsEmulator
from simulators.can_bus import CanVehicleEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.gnss import GnssEmulator
from simulators.route import route_for
from simulators.vehicle import VehicleModel
from tests.conftest import running_stack, wait_until
from tests.test_can import assert_values_were_sent
from zhilian.broker import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
B = "Powertrain.TractionBattery."


def test_bms_and_controller_values_over_can_arrive_as_the_devices_sent_them(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    asyncio.run(_scenario(tmp_path, mosquitto))


async def _scenario(tmp_path: Path, broker: MosquittoProcess) -> None:
    vin = "LZHE2ECAN00000004"
    key_file = tmp_path / "device.key"
    DeviceKey.generate().save(key_file)
    model = VehicleModel(route_for(11), seed=11, start_time=time.time() - 900)
    gnss = GnssEmulator(model, rate_hz=4.0)
    bms = JbdBmsEmulator(model, cells=13, probes=4)
    controller = ControllerEmulator(model, tamper_speed_limit_kmh=45.0)
    can_bus = CanVehicleEmulator(model, transport="slcan", bms=bms, controller=controller)
    await gnss.start()
    await can_bus.start()
    agent = EdgeAgent(
        AgentConfig(
            vin=vin,
            key_file=key_file,
            state_dir=tmp_path / "agent",
            broker_host=broker.host,
            broker_port=broker.port,
            gnss_port=gnss.port,
            can_interface="slcan",
            can_channel=can_bus.port,
            can_variant="48v",
            batch_interval_s=0.5,
        )
    )
    stop_agent = asyncio.Event()
    try:
        async with running_stack(tmp_path / "ingest", broker) as stack:
            stack.service.registry.register_device(vin, agent.key.public_raw)
            task = asyncio.create_task(agent.run(stop_agent))

            def device_rows() -> int:
                """Samples that carry both a BMS and a controller value."""
                got = stack.service.store.query(vin, 0, 2**62, [B + "CurrentVoltage", "Speed"], 10000)
                both = zip(got.columns[B + "CurrentVoltage"], got.columns["Speed"], strict=True)
                return sum(v is not None and s is not None for v, s in both)

            # python-can waits 2 s after opening an slcan adapter before it talks to it.
            await wait_until(lambda: device_rows() >= 8, timeout=40)
            stop_agent.set()
            await asyncio.wait_for(task, 15)
            got = stack.service.store.query(vin, 0, 2**62, None, 10000)
    finally:
        stop_agent.set()
        await gnss.stop()
        await can_bus.stop()

    codec = CanCodec("48v")
    can_names = set(codec.mapped())
    truth = {t.time_ms: t for t in gnss.truth}
    cols = got.columns
    checked = 0
    for i, ts in enumerate(got.timestamps):
        fix = truth[ts]  # every sample carries the exact GNSS time of an emulated epoch ...
        assert cols["CurrentLocation.Latitude"][i] == pytest.approx(fix.lat, abs=0.5e-7 + 1e-12)
        assert cols["CurrentLocation.Longitude"][i] == pytest.approx(fix.lon, abs=0.5e-7 + 1e-12)
        row = {name: cols[name][i] for name in can_names if cols[name][i] is not None}
        if B + "CurrentVoltage" not in row or "Speed" not in row:
            continue  # samples taken before the first frames arrived
        # ... and every frame's worth of CAN values in it is one the emulated devices sent, within resolution.
        assert assert_values_were_sent(codec, can_bus.log, row) >= 3
        cells = [cols[f"{B}CellVoltage.Cell{k}"][i] for k in range(1, 14)]
        if None not in cells:
            assert cols[f"{B}CellVoltage.Cell14"][i] is None
            assert sum(cells) == pytest.approx(row[B + "CurrentVoltage"], abs=0.011)  # the cells make up the pack
        checked += 1
    assert checked >= 8
    assert {v for v in cols[B + "CellCount"] if v is not None} == {13}
    assert {v for v in cols[B + "Temperature.Probe4"] if v is not None} and not any(cols[B + "Temperature.Probe5"])
    # The tampered speed limit arrives as the controller reports it.
    assert {v for v in cols["Powertrain.ElectricMotor.ConfiguredSpeedLimit"] if v is not None} == {45.0}
