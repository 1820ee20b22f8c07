"""SerialLink on real ptys: data delivered, loss detected, reopened when the port returns, stop() never hangs."""

from __future__ import annotations

import asyncio
import os
import time
import tty
from collections.abc import Callable
from pathlib import Path

from edge_agent.serial_link import SerialLink


def _pty() -> tuple[int, str]:
    """A raw pty: the master fd (the device's side) and the slave's path (what the link opens)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)  # the link opens it by name, as it would a real port
    return master, path


async def _wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class _Recorder:
    def __init__(self) -> None:
        self.data = bytearray()
        self.opens = 0
        self.losses: list[str] = []

    def link(self, port: str, retry_initial_s: float = 0.5, retry_max_s: float = 10.0) -> SerialLink:
        return SerialLink(
            port,
            on_data=self.data.extend,
            on_open=self.on_open,
            on_lost=self.losses.append,
            retry_initial_s=retry_initial_s,
            retry_max_s=retry_max_s,
            name="test",
        )

    def on_open(self) -> None:
        self.opens += 1


def test_data_is_delivered_and_writes_reach_the_device() -> None:
    async def run() -> None:
        master, path = _pty()
        rec = _Recorder()
        link = rec.link(path)
        await link.start()
        try:
            assert link.connected and rec.opens == 1
            os.write(master, b"hello ")
            os.write(master, b"world")
            await _wait_for(lambda: bytes(rec.data) == b"hello world", 2.0)
            assert link.write(b"ping")
            await asyncio.sleep(0.05)
            assert os.read(master, 16) == b"ping"
        finally:
            await link.stop()
            os.close(master)
        assert not link.connected
        assert not link.write(b"after stop")  # a closed link refuses writes instead of raising
        assert link.disconnects == 0 and rec.losses == []  # stop() is not a loss

    asyncio.run(run())


def test_loss_is_detected_and_the_port_reopened_when_it_returns(tmp_path: Path) -> None:
    # A stable name (as udev's symlink would be); the pty behind it goes and a new one comes back.
    link_path = tmp_path / "dev0"

    async def run() -> None:
        first, first_path = _pty()
        link_path.symlink_to(first_path)
        rec = _Recorder()
        link = rec.link(str(link_path), retry_initial_s=0.05, retry_max_s=0.2)
        await link.start()
        try:
            os.write(first, b"a")
            await _wait_for(lambda: bytes(rec.data) == b"a", 2.0)
            link_path.unlink()
            os.close(first)  # the device side goes: the link sees EIO or a hang-up
            await _wait_for(lambda: link.disconnects == 1, 2.0)
            assert not link.connected and len(rec.losses) == 1
            await asyncio.sleep(0.3)  # a few failed reopens while the port is missing
            assert not link.connected and link.reconnects == 0
            second, second_path = _pty()
            link_path.symlink_to(second_path)
            await _wait_for(lambda: link.connected, 2.0)
            assert link.reconnects == 1 and rec.opens == 2
            os.write(second, b"b")
            await _wait_for(lambda: bytes(rec.data) == b"ab", 2.0)
        finally:
            await link.stop()
        os.close(second)
        assert link.disconnects == 1 and link.reconnects == 1

    asyncio.run(run())


def test_missing_port_is_retried_and_stop_during_backoff_ends_promptly(tmp_path: Path) -> None:
    async def run() -> None:
        rec = _Recorder()
        link = rec.link(str(tmp_path / "absent"), retry_initial_s=30.0, retry_max_s=60.0)
        await link.start()  # never raises for a missing port
        assert not link.connected
        started = time.monotonic()
        await link.stop()
        assert time.monotonic() - started < 0.5  # the 30 s backoff sleep was cancelled, not waited out
        assert rec.opens == 0 and link.reconnects == 0 and link.disconnects == 0

    asyncio.run(run())


def test_first_open_after_a_missing_port_is_not_a_reconnect(tmp_path: Path) -> None:
    link_path = tmp_path / "dev0"

    async def run() -> None:
        rec = _Recorder()
        link = rec.link(str(link_path), retry_initial_s=0.05, retry_max_s=0.1)
        await link.start()
        master, path = _pty()
        link_path.symlink_to(path)
        try:
            await _wait_for(lambda: link.connected, 2.0)
        finally:
            await link.stop()
            os.close(master)
        assert rec.opens == 1 and link.reconnects == 0

    asyncio.run(run())
