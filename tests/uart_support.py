"""What the UART device tests (tests/test_jbd.py, tests/test_controller_uart.py, tests/test_uart_emulators.py) share:
a vehicle model mid-ride, polling with a deadline, an emulator and its agent-side source connected over a real pty,
and the unplug / replug sequence behind a stable port name."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from protocol.catalogue import Value
from simulators.route import route_for
from simulators.uart_device import UartDeviceEmulator
from simulators.vehicle import VehicleModel


class DeviceSource(Protocol):
    """What these tests use of an agent-side serial device source (JbdBmsSource, ControllerSource)."""

    @property
    def connected(self) -> bool: ...

    @property
    def counters(self) -> dict[str, int]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def read(self, now: float) -> dict[str, Value]: ...


SourceT = TypeVar("SourceT", bound=DeviceSource)


def ride_model(seed: int) -> VehicleModel:
    """A vehicle fifteen minutes into the ride of `seed`'s route."""
    return VehicleModel(route_for(seed), seed=seed, start_time=time.time() - 900)


async def wait_for(condition: Callable[[], bool], within: float) -> None:
    """Poll `condition` until it holds; TimeoutError after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def connected(emulator: UartDeviceEmulator[Any], make_source: Callable[[str], SourceT]) -> AsyncIterator[SourceT]:
    """Start `emulator`, then the source `make_source` builds for its port; stop the source, then the emulator."""
    await emulator.start()
    try:
        source = make_source(emulator.port)
        await source.start()
        try:
            yield source
        finally:
            await source.stop()
    finally:
        await emulator.stop()


async def replug(
    link: Path,
    first: UartDeviceEmulator[Any],
    second: UartDeviceEmulator[Any],
    source: DeviceSource,
    first_seen: Callable[[dict[str, Value]], bool],
    second_seen: Callable[[dict[str, Value]], bool],
) -> dict[str, Value]:
    """Unplug one device and plug in another behind the stable name `link` (as udev's symlink would be), which
    `source` reads. Waits until the source reads `first` (`first_seen`), pulls its pty — the source must see the
    hang-up, drop its values and fail to reopen while the name is missing — then plugs `second` in behind `link`
    and returns what the source reads once `second_seen` holds. Stops the source and both devices."""
    await first.start()
    await asyncio.to_thread(link.symlink_to, first.port)
    await source.start()
    try:
        await wait_for(lambda: first_seen(source.read(time.time())), 5.0)
        await first.stop()  # pty gone: the source sees a hang-up
        await wait_for(lambda: source.counters["disconnects"] == 1, 5.0)
        assert source.read(time.time()) == {}  # nothing of a device that may not be there any more
        await asyncio.to_thread(link.unlink)
        await asyncio.sleep(0.3)  # a few failed reopens while the port is missing
        assert not source.connected
        await second.start()
        await asyncio.to_thread(link.symlink_to, second.port)
        await wait_for(lambda: second_seen(source.read(time.time())), 5.0)
        values = source.read(time.time())
    finally:
        await source.stop()
        await second.stop()
        await first.stop()
    assert source.counters["reconnects"] == 1
    return values
