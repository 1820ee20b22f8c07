"""What the JBD BMS and motor controller emulators share (simulators/uart_device.py) and what their agent-side
sources share, tested once for both: line faults on the wire, sensors that may get stuck, a port that is not there."""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from edge_agent.devices.controller import (
    TYPE_STATUS,
    ControllerFrame,
    ControllerFrameDecoder,
    ControllerStatus,
    build_status,
    encode_frame,
)
from edge_agent.devices.controller_uart import ControllerSource
from edge_agent.devices.jbd import REG_CELL_VOLTAGES, JbdFrame, JbdFrameDecoder, encode_response
from edge_agent.devices.jbd_uart import JbdBmsSource
from simulators.bms_jbd import JbdBmsEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.uart_device import UartDeviceEmulator
from simulators.vehicle import VehicleModel
from tests.uart_support import DeviceSource, ride_model


@dataclass(frozen=True)
class Device:
    kind: type[UartDeviceEmulator[Any]]
    options: dict[str, Any]  # for every emulator of this kind in these tests
    source: Callable[[str], DeviceSource]  # for a port path
    frame: bytes  # one well-formed frame the device sends
    decoded: object  # what the agent's decoder makes of it
    decoder: Callable[[], JbdFrameDecoder | ControllerFrameDecoder]
    unmeasured: tuple[str, str]  # VehicleState quantities the device has no sensor for
    noun: str  # how its errors name it

    def emulator(self, model: VehicleModel, **options: Any) -> UartDeviceEmulator[Any]:
        return self.kind(model, **self.options, **options)


_CELLS = bytes.fromhex("0d050d060d04")
_STATUS = build_status(ControllerStatus(23.4, 243, 18.6, 10.3, 38.5, 52.1, 0, False, 62, 3))
DEVICES = [
    pytest.param(
        Device(
            JbdBmsEmulator,
            {},
            partial(JbdBmsSource, retry_initial_s=0.05, retry_max_s=0.1),
            encode_response(REG_CELL_VOLTAGES, _CELLS),
            JbdFrame(REG_CELL_VOLTAGES, 0, _CELLS),
            JbdFrameDecoder,
            ("speed_kmh", "lat"),
            "a BMS",
        ),
        id="jbd",
    ),
    pytest.param(
        Device(
            ControllerEmulator,
            {"period_s": 3600.0},  # its own status stream: started by start(), which these tests do not call
            partial(ControllerSource, retry_initial_s=0.05, retry_max_s=0.1),
            encode_frame(TYPE_STATUS, _STATUS),
            ControllerFrame(TYPE_STATUS, _STATUS),
            ControllerFrameDecoder,
            ("soc_pct", "heading_deg"),
            "a controller",
        ),
        id="controller",
    ),
]


def _received(fd: int) -> bytes:
    """What the client end of the pty has to read now (the emulator writes whole frames at once)."""
    ready, _, _ = select.select([fd], [], [], 2.0)
    assert ready, "the emulator wrote nothing"
    return os.read(fd, 4096)


async def _sent_on_the_wire(device: Device, frames: int, **faults: Any) -> tuple[list[str], list[bytes]]:
    """Faults and wire bytes of `frames` frames the device's emulator sends (its pty served, its own traffic not
    started: only these frames travel)."""
    emulator = device.emulator(ride_model(6), **faults)
    emulator.port = emulator._pty.open()
    fd = emulator._pty.slave_fd
    assert fd is not None
    try:
        faults_seen, wire = [], []
        for nth in range(1, frames + 1):
            faults_seen.append(emulator._transmit(device.frame, nth))
            wire.append(await asyncio.to_thread(_received, fd))
    finally:
        await emulator.stop()
    assert emulator.write_failures == 0
    # Nothing sent any more once stopped: the frame is refused and counted, not waited for.
    assert emulator._transmit(device.frame, frames + 1) == "write_failed" and emulator.write_failures == 1
    return faults_seen, wire


@pytest.mark.parametrize("device", DEVICES)
def test_every_nth_frame_is_garbled_as_configured(device: Device) -> None:
    faults, wire = asyncio.run(_sent_on_the_wire(device, 12, bad_checksum_every=2, truncate_every=3))
    expected = ["bad_checksum" if n % 2 == 0 else "truncated" if n % 3 == 0 else "" for n in range(1, 13)]
    assert faults == expected
    cls = device.kind
    for fault, got in zip(faults, wire, strict=True):
        if fault == "bad_checksum":  # one checksum byte flipped, the rest intact
            assert len(got) == len(device.frame)
            assert [i - len(got) for i in range(len(got)) if got[i] != device.frame[i]] == [cls.CHECKSUM_OFFSET]
        elif fault == "truncated":  # cut off before its end, header kept
            assert got == device.frame[: max(cls.MIN_TRUNCATED_LEN, len(device.frame) // 2)]
        else:
            assert got == device.frame
    # The agent's decoder, reading the whole line, gets exactly the intact frames and counts the corrupt ones.
    decoder = device.decoder()
    assert decoder.feed(b"".join(wire)) == [device.decoded] * expected.count("")
    assert decoder.counters["bad_checksum"] == expected.count("bad_checksum")


@pytest.mark.parametrize("device", DEVICES)
def test_line_noise_goes_before_frames_and_is_the_models_own(device: Device) -> None:
    faults, wire = asyncio.run(_sent_on_the_wire(device, 20, noise=8))
    assert faults == [""] * 20
    assert all(got.endswith(device.frame) and len(got) - len(device.frame) <= 8 for got in wire)
    assert any(len(got) > len(device.frame) for got in wire)
    _, again = asyncio.run(_sent_on_the_wire(device, 20, noise=8))
    assert again == wire  # seeded by the vehicle model: the same ride, the same noise


@pytest.mark.parametrize("device", DEVICES)
def test_only_what_the_device_measures_can_be_stuck(device: Device) -> None:
    on_construction, while_running = device.unmeasured
    with pytest.raises(ValueError, match=f"{device.noun} cannot have.*{on_construction}"):
        device.emulator(ride_model(1), stuck={on_construction: 0.0})
    emulator = device.emulator(ride_model(1))
    with pytest.raises(ValueError, match=while_running):
        emulator.stuck = {while_running: 0.0}
    assert emulator.stuck == {}


@pytest.mark.parametrize("device", DEVICES)
def test_source_start_tolerates_a_missing_port(tmp_path: Path, device: Device) -> None:
    async def run() -> None:
        source = device.source(str(tmp_path / "absent"))
        await source.start()
        await asyncio.sleep(0.3)
        assert not source.connected and source.read(time.time()) == {}
        await source.stop()
        assert source.counters["reconnects"] == 0

    asyncio.run(run())
