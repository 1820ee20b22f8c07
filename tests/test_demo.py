"""`zhilian demo` as a user runs it: whole stack in child processes, every vehicle reports, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def _descendants_alive(marker: str) -> list[str]:
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            alive.append(cmd)
    return alive


def test_demo_runs_whole_stack_and_leaves_no_processes(tmp_path: Path) -> None:
    data = tmp_path / "demo-data"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "zhilian",
            "demo",
            "--vehicles",
            "4",
            "--duration",
            "14",
            "--batch-interval",
            "2",
            "--data-dir",
            str(data),
            "--require-all",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 4 vehicles reported positions and tracks" in proc.stdout
    assert "zk_" in proc.stdout  # the operator key is printed
    assert (data / "ingest" / "telemetry.db").stat().st_size > 0
    assert _descendants_alive(str(data)) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_stops_cleanly_on_ctrl_c_or_sigterm(tmp_path: Path, sig: signal.Signals) -> None:
    data = tmp_path / "demo-data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "zhilian", "demo", "--vehicles", "2", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (data / "logs" / "fleet.log").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        assert _descendants_alive(str(data)), "the demo's children never started"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert "interrupted:" in out
    assert _descendants_alive(str(data)) == []
