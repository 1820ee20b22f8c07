"""The walking skeleton end to end: GNSS emulator on a real pty → edge agent (pyserial, pynmea2) + synthetic
BMS/controller → sign → real Mosquitto → bridge → verify/dedupe/store → operator API.  What the API returns must
equal what the emulator wrote, sample by sample."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import httpx
import pytest

from protocol import load_catalogue
from simulators.gnss import GnssEmulator
from simulators.route import route_for
from simulators.vehicle import SyntheticPowertrain, VehicleModel
from tests.conftest import running_stack, wait_until
from tests.e2e_devices import PACK, check_stored_configuration, check_stored_pack, collect_device_samples, new_agent
from zhilian.broker import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
CAT = load_catalogue()
GNSS_FIELDS = {
    "CurrentLocation.Latitude": ("lat", 1e-7),
    "CurrentLocation.Longitude": ("lon", 1e-7),
    "CurrentLocation.Altitude": ("altitude_m", 0.1),
    "CurrentLocation.GNSSReceiver.GroundSpeed": ("speed_kmh", 0.01),
    "CurrentLocation.GNSSReceiver.HDOP": ("hdop", 0.01),
    "CurrentLocation.GNSSReceiver.SatellitesUsed": ("satellites_used", 0),
}


@pytest.mark.parametrize("talker", ["GN", "GB"])
def test_emulated_samples_arrive_unchanged_at_the_operator_api(
    tmp_path: Path, mosquitto: MosquittoProcess, talker: str
) -> None:
    asyncio.run(_scenario(tmp_path, mosquitto, talker))


async def _scenario(tmp_path: Path, broker: MosquittoProcess, talker: str) -> None:
    vin = "LZHE2E0000000000" + ("1" if talker == "GN" else "2")
    model = VehicleModel(route_for(3), seed=3, start_time=time.time() - 600)  # ten minutes into a ride
    emulator = GnssEmulator(model, rate_hz=4.0, talker=talker)
    await emulator.start()
    agent = new_agent(tmp_path, broker, vin, [SyntheticPowertrain(model)], gnss_port=emulator.port)
    powertrain = SyntheticPowertrain(model)
    stop_agent = asyncio.Event()
    try:
        async with running_stack(tmp_path / "ingest", broker) as stack:
            headers = {"Authorization": f"Bearer {stack.viewer_key}"}
            admin = {"Authorization": f"Bearer {stack.admin_key}"}
            async with httpx.AsyncClient(base_url=stack.api, timeout=10) as http:
                r = await http.post(
                    "/v1/devices",
                    headers=admin,
                    json={"vin": vin, "public_key": base64.b64encode(agent.key.public_raw).decode()},
                )
                assert r.status_code == 201, r.text
                agent_task = asyncio.create_task(agent.run(stop_agent))

                async def enough() -> bool:
                    vs = (await http.get("/v1/vehicles", headers=headers)).json()
                    return any(v["vin"] == vin and v["samples"] >= 12 for v in vs)

                await wait_until(enough, timeout=30)
                stop_agent.set()
                await asyncio.wait_for(agent_task, 15)
                await wait_until(lambda: stack.service.pipeline.stats()["stored"] == agent.stats.published, 10)

                r = await http.get(
                    f"/v1/vehicles/{vin}/telemetry",
                    headers=headers,
                    params={"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z", "limit": 10000},
                )
                assert r.status_code == 200, r.text
                got = r.json()
                latest = (await http.get(f"/v1/vehicles/{vin}/latest", headers=headers)).json()
                vehicles = (await http.get("/v1/vehicles", headers=headers)).json()

        truth = {t.time_ms: t for t in emulator.truth}
        stamps = got["timestamps_ms"]
        assert len(stamps) == agent.stats.samples >= 12
        assert agent.stats.published == agent.stats.batches and agent.spool.depth == 0
        for i, ts in enumerate(stamps):
            fix = truth[ts]  # every stored sample carries the exact GNSS time of an emulated epoch
            for signal, (attr, tol) in GNSS_FIELDS.items():
                assert got["columns"][signal][i] == pytest.approx(getattr(fix, attr), abs=tol / 2 + 1e-12), signal
            assert got["columns"]["CurrentLocation.GNSSReceiver.FixMode"][i] == 3
            if i > 0:  # the decoder learns the BeiDou satellites from the previous epoch's GSA
                assert got["columns"]["CurrentLocation.GNSSReceiver.BeiDouInUse"][i] is True
            for signal, value in powertrain.read(ts / 1000).items():
                assert got["columns"][signal][i] == value, signal
            assert 29.4 < got["columns"]["CurrentLocation.Latitude"][i] < 29.7
            assert 106.4 < got["columns"]["CurrentLocation.Longitude"][i] < 106.7
        assert latest["ts_ms"] == stamps[-1]
        assert latest["values"]["CurrentLocation.Latitude"] == got["columns"]["CurrentLocation.Latitude"][-1]
        (summary,) = [v for v in vehicles if v["vin"] == vin]
        assert summary["position"]["lat"] == pytest.approx(truth[stamps[-1]].lat, abs=1e-7)
    finally:
        stop_agent.set()
        await emulator.stop()


def test_bms_and_controller_values_over_uart_arrive_as_the_devices_sent_them(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    asyncio.run(_bms_scenario(tmp_path, mosquitto))


async def _bms_scenario(tmp_path: Path, broker: MosquittoProcess) -> None:
    from edge_agent.devices.controller import TYPE_STATUS, parse_status
    from edge_agent.devices.jbd import REG_BASIC_INFO
    from simulators.bms_jbd import JbdBmsEmulator
    from simulators.controller_uart import ControllerEmulator

    model = VehicleModel(route_for(5), seed=5, start_time=time.time() - 900)
    gnss = GnssEmulator(model, rate_hz=4.0)
    bms = JbdBmsEmulator(model, cells=13, probes=2, barcode="ZL48V24AH-E2E001", noise=3)
    controller = ControllerEmulator(model, tamper_speed_limit_kmh=45.0)
    await gnss.start()
    await bms.start()
    await controller.start()
    try:
        got = await collect_device_samples(
            tmp_path,
            broker,
            "LZHE2EBMS00000003",
            timeout=30,
            gnss_port=gnss.port,
            bms_port=bms.port,
            bms_poll_interval_s=0.25,
            controller_port=controller.port,
        )
    finally:
        await gnss.stop()
        await bms.stop()
        await controller.stop()

    answers = [a.state for a in bms.log if a.register == REG_BASIC_INFO and a.fault == "" and a.status == 0]
    assert answers, "the BMS emulator never answered"
    cols = got.columns
    # Samples with a pack voltage (not those taken before the first BMS poll completed) carry every cell.
    for i in check_stored_pack(got, 13, every_cell=True):
        volt = cols[PACK + "CurrentVoltage"][i]
        soc, cur = cols[PACK + "StateOfCharge"][i], cols[PACK + "CurrentCurrent"][i]
        # JBD resolutions: 10 mV, 10 mA, 1 % SOC — the value must be one the BMS actually reported.
        assert any(
            abs(s.pack_voltage_v - volt) <= 0.0051
            and abs(s.pack_current_a - cur) <= 0.0051
            and abs(s.soc_pct - soc) <= 0.51
            for s in answers
        ), (volt, cur, soc)
        assert cols[PACK + "CellCount"][i] == 13
        assert cols[PACK + "Barcode"][i] in (None, "ZL48V24AH-E2E001")
    assert "ZL48V24AH-E2E001" in cols[PACK + "Barcode"]
    # Controller values are ones a status frame carried; the tampered speed limit arrives as configured.
    sent = [parse_status(f.payload) for f in controller.log if f.type == TYPE_STATUS and f.fault == ""]
    frames = {(st.speed_kmh, st.motor_rpm) for st in sent}
    speeds = [(cols["Speed"][i], cols["Powertrain.ElectricMotor.Speed"][i]) for i in range(len(got.timestamps))]
    with_controller = [sp for sp in speeds if sp[0] is not None]
    assert len(with_controller) >= 8
    assert all(sp in frames for sp in with_controller), set(with_controller) - frames
    check_stored_configuration(got, cells=13, speed_limit_kmh=45.0)
