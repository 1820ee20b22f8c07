"""What the end-to-end tests of tests/test_e2e_vehicle.py and tests/test_e2e_can.py share: an edge agent set up
for the real stack, run until enough stored samples carry values of the BMS and the controller (reached over UART
or over CAN), and the checks every such stored sample must pass whichever bus carried it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.sources import ValueSource
from protocol import Batch, DeviceKey
from tests.conftest import running_stack, wait_until
from zhilian.broker import MosquittoProcess

PACK = "Powertrain.TractionBattery."
SPEED_LIMIT = "Powertrain.ElectricMotor.ConfiguredSpeedLimit"


def new_agent(
    tmp_path: Path, broker: MosquittoProcess, vin: str, sources: Sequence[ValueSource] = (), **options: Any
) -> EdgeAgent:
    """An edge agent for `vin` with a new key (saved under `tmp_path`) and its state under `tmp_path`, publishing
    to `broker` every 0.5 s; `options`: further AgentConfig fields (the device ports)."""
    key_file = tmp_path / "device.key"
    DeviceKey.generate().save(key_file)
    config = AgentConfig(
        vin=vin,
        key_file=key_file,
        state_dir=tmp_path / "agent",
        broker_host=broker.host,
        broker_port=broker.port,
        batch_interval_s=0.5,
        **options,
    )
    return EdgeAgent(config, sources=sources)


async def collect_device_samples(
    tmp_path: Path, broker: MosquittoProcess, vin: str, *, timeout: float, **agent_options: Any
) -> Batch:
    """Run an edge agent (`new_agent`) through Mosquitto, the bridge and the ingest service until at least 8 stored
    samples carry both a BMS and a controller value (within `timeout` s); returns every stored sample of `vin`.
    The emulated devices are the caller's to start and stop."""
    agent = new_agent(tmp_path, broker, vin, **agent_options)
    stop_agent = asyncio.Event()
    try:
        async with running_stack(tmp_path / "ingest", broker) as stack:
            stack.service.registry.register_device(vin, agent.key.public_raw)
            task = asyncio.create_task(agent.run(stop_agent))

            def device_rows() -> int:
                """Samples that carry both a BMS and a controller value."""
                got = stack.service.store.query(vin, 0, 2**62, [PACK + "CurrentVoltage", "Speed"], 10000)
                both = zip(got.columns[PACK + "CurrentVoltage"], got.columns["Speed"], strict=True)
                return sum(v is not None and s is not None for v, s in both)

            await wait_until(lambda: device_rows() >= 8, timeout=timeout)
            stop_agent.set()
            await asyncio.wait_for(task, 15)
            return stack.service.store.query(vin, 0, 2**62, None, 10000)
    finally:
        stop_agent.set()


def check_stored_pack(got: Batch, cells: int, *, every_cell: bool, also: Sequence[str] = ()) -> list[int]:
    """Check every stored sample that carries the BMS's pack voltage (and each signal of `also`): the cell
    voltages it carries (`every_cell`: it must carry all of them) number `cells`, no more, and add up to the pack.
    There must be at least 8 such samples; returns their indexes for the caller's own checks."""
    cols = got.columns
    rows = []
    for i in range(len(got.timestamps)):
        volt = cols[PACK + "CurrentVoltage"][i]
        if volt is None or any(cols[name][i] is None for name in also):
            continue  # samples taken before the first device values arrived
        cell_volts = [cols[f"{PACK}CellVoltage.Cell{k}"][i] for k in range(1, cells + 1)]
        if every_cell:
            assert None not in cell_volts, i
        if None not in cell_volts:
            assert cols[f"{PACK}CellVoltage.Cell{cells + 1}"][i] is None
            total = sum(float(v) for v in cell_volts if v is not None)
            assert total == pytest.approx(volt, abs=0.011)  # the cells make up the pack
        rows.append(i)
    assert len(rows) >= 8
    return rows


def check_stored_configuration(got: Batch, cells: int, speed_limit_kmh: float) -> None:
    """The pack's cell count and the controller's configured speed limit arrive as the devices report them."""
    assert {v for v in got.columns[PACK + "CellCount"] if v is not None} == {cells}
    assert {v for v in got.columns[SPEED_LIMIT] if v is not None} == {speed_limit_kmh}
