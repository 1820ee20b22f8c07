"""PtyPort, the serial line the device emulators speak over: both directions, a full buffer, closing."""

from __future__ import annotations

import asyncio
import os
import time

from simulators.pty_port import PtyPort


def _open_client(path: str) -> int:
    """The client's end, as pyserial would open it: the slave's path, non-blocking, not our controlling tty."""
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


async def _read_exactly(fd: int, size: int, within: float) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + within
    while len(got) < size:
        try:
            got += os.read(fd, size - len(got))
        except BlockingIOError:
            assert time.monotonic() < deadline, f"only {len(got)} of {size} bytes arrived"
            await asyncio.sleep(0.005)  # lets the port's writer callback drain a pending tail
    return bytes(got)


def test_written_bytes_reach_a_reader_of_the_slave_path() -> None:
    async def run() -> None:
        pty = PtyPort()
        path = pty.open()
        assert path == pty.port and path.startswith("/dev/")
        client = _open_client(path)
        try:
            assert pty.write(b"$GNGGA,hello*00\r\n")
            assert await _read_exactly(client, 17, 2.0) == b"$GNGGA,hello*00\r\n"
            assert (pty.writes, pty.dropped, pty.bytes_out) == (1, 0, 17)
        finally:
            os.close(client)
            pty.close()

    asyncio.run(run())


def test_bytes_written_to_the_slave_arrive_via_on_data() -> None:
    async def run() -> None:
        received = bytearray()
        pty = PtyPort(on_data=received.extend)
        client = _open_client(pty.open())
        try:
            os.write(client, b"\xdd\xa5\x03\x00\xff\xfd\x77")  # ^C (0x03), 0xff: raw passes all
            os.write(client, bytes(range(256)))
            deadline = time.monotonic() + 2.0
            while len(received) < 263:
                assert time.monotonic() < deadline, f"only {len(received)} bytes arrived"
                await asyncio.sleep(0.01)
            assert bytes(received) == b"\xdd\xa5\x03\x00\xff\xfd\x77" + bytes(range(256))
            assert pty.bytes_in == 263
        finally:
            os.close(client)
            pty.close()

    asyncio.run(run())


def test_a_full_buffer_with_no_reader_drops_and_counts_without_blocking() -> None:
    async def run() -> None:
        pty = PtyPort()
        pty.open()
        try:
            message = b"x" * 1000
            started = time.monotonic()
            accepted = 0
            while pty.dropped < 3:
                accepted += pty.write(message)
                assert time.monotonic() - started < 5.0, "pty never filled up"
            assert accepted == pty.writes > 0
            # Every accepted message goes out whole: what the pty took plus the pending tail, nothing cut.
            assert pty.bytes_out + pty.pending == accepted * len(message)
            slave = pty.slave_fd
            assert slave is not None
            os.set_blocking(slave, False)
            assert len(await _read_exactly(slave, accepted * len(message), 5.0)) == accepted * len(message)
            assert pty.pending == 0
            assert pty.write(message)  # drained: the line takes messages again
        finally:
            pty.close()

    asyncio.run(run())


def test_close_is_idempotent_and_frees_the_fds() -> None:
    async def run() -> None:
        pty = PtyPort(on_data=lambda _data: None)
        pty.close()  # never opened
        pty.open()
        master, slave = pty.master_fd, pty.slave_fd
        assert master is not None and slave is not None
        pty.close()
        pty.close()
        assert not pty.is_open and pty.master_fd is None and pty.slave_fd is None
        assert not pty.write(b"late")
        for fd in (master, slave):
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} still open")  # pragma: no cover - only when close leaks

    asyncio.run(run())
