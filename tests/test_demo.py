"""`zhilian demo` as a user runs it: whole stack in child processes, every vehicle reports, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
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
