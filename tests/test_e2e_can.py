"""The CAN configuration end to end: GNSS emulator on a pty + the BMS and controller on a CAN bus, reached through
an slcan USB-CAN adapter emulated on another pty (the cross-process path a board uses) → edge agent (python-can
slcan, cantools) → sign → real Mosquitto → bridge → store. What is stored must equal what the emulators sent,
within the DBC's stated resolution."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edge_agent.devices.can_codec import CanCodec
from simulators.bms_jbd import JbdBmsEmulator
from simulators.can_bus import CanVehicleEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.gnss import GnssEmulator
from simulators.route import route_for
from simulators.vehicle import VehicleModel
from tests.e2e_devices import PACK as B
from tests.e2e_devices import check_stored_configuration, check_stored_pack, collect_device_samples
from tests.test_can import assert_values_were_sent
from zhilian.broker import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_bms_and_controller_values_over_can_arrive_as_the_devices_sent_them(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    asyncio.run(_scenario(tmp_path, mosquitto))


async def _scenario(tmp_path: Path, broker: MosquittoProcess) -> None:
    model = VehicleModel(route_for(11), seed=11, start_time=time.time() - 900)
    gnss = GnssEmulator(model, rate_hz=4.0)
    bms = JbdBmsEmulator(model, cells=13, probes=4)
    controller = ControllerEmulator(model, tamper_speed_limit_kmh=45.0)
    can_bus = CanVehicleEmulator(model, transport="slcan", bms=bms, controller=controller)
    await gnss.start()
    await can_bus.start()
    try:
        # python-can waits 2 s after opening an slcan adapter before it talks to it.
        got = await collect_device_samples(
            tmp_path,
            broker,
            "LZHE2ECAN00000004",
            timeout=40,
            gnss_port=gnss.port,
            can_interface="slcan",
            can_channel=can_bus.port,
            can_variant="48v",
        )
    finally:
        await gnss.stop()
        await can_bus.stop()

    codec = CanCodec("48v")
    can_names = set(codec.mapped())
    truth = {t.time_ms: t for t in gnss.truth}
    cols = got.columns
    for i, ts in enumerate(got.timestamps):
        fix = truth[ts]  # every sample carries the exact GNSS time of an emulated epoch
        assert cols["CurrentLocation.Latitude"][i] == pytest.approx(fix.lat, abs=0.5e-7 + 1e-12)
        assert cols["CurrentLocation.Longitude"][i] == pytest.approx(fix.lon, abs=0.5e-7 + 1e-12)
    # Samples with BMS and controller values (not those taken before the first frames arrived): CAN carries the
    # cells in frames of their own, so a sample may hold some of them only.
    for i in check_stored_pack(got, 13, every_cell=False, also=["Speed"]):
        row = {name: cols[name][i] for name in can_names if cols[name][i] is not None}
        # Every frame's worth of CAN values in the sample is one the emulated devices sent, within resolution.
        assert assert_values_were_sent(codec, can_bus.log, row) >= 3
    # The cell count and the tampered speed limit arrive as the devices report them.
    check_stored_configuration(got, cells=13, speed_limit_kmh=45.0)
    assert {v for v in cols[B + "Temperature.Probe4"] if v is not None} and not any(cols[B + "Temperature.Probe5"])
