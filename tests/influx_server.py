"""InfluxDB fixtures: one private `influxd` per test session on free loopback ports, a fresh database per test.

Tests that stop and restart the server (outages) start their own `InfluxProcess` instead of the shared one.
Without an `influxd` binary the InfluxDB cases fail under CI=true and skip (saying why) elsewhere.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prerequisites import missing
from zhilian.influx import InfluxError, InfluxProcess, find_influxd

_names = itertools.count()


def require_influxd() -> None:
    try:
        find_influxd()
    except InfluxError as exc:
        missing("InfluxDB", str(exc))


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxProcess]:
    require_influxd()
    workdir = tmp_path_factory.mktemp("influxd")
    # Retention checked every second, so tests see expired shard groups go (tests/test_retention.py).
    server = InfluxProcess(workdir, retention_check_interval="1s").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def influx_database(influxd: InfluxProcess) -> Iterator[str]:
    """A database name no other test uses; dropped afterwards (stores create it on open)."""
    name = f"test_{os.getpid()}_{next(_names)}"
    try:
        yield name
    finally:
        if influxd.running:
            influxd.query(f'DROP DATABASE "{name}"')


def own_influxd(workdir: Path, auth: tuple[str, str] | None = None) -> InfluxProcess:
    """A private server for a test that stops it, restarts it or needs authentication."""
    require_influxd()
    return InfluxProcess(workdir, auth=auth).start()
