"""The agent footprint benchmark's measuring parts (the benchmark itself runs for minutes: `zhilian bench-agent`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zhilian.bench_agent import AgentBenchError, ProcReading, read_proc, summarise


def test_read_proc_sees_a_live_process_and_notices_a_dead_one() -> None:
    busy = sum(i * i for i in range(200_000))  # some CPU time of our own to see
    r = read_proc(os.getpid(), 1.5)
    assert busy > 0 and r.t == 1.5
    assert 0 < r.rss_kb <= r.hwm_kb and r.anon_kb + r.file_kb <= r.rss_kb and r.anon_kb > 0 and r.file_kb > 0
    assert r.cpu_s > 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(30)
    with pytest.raises(ProcessLookupError):
        read_proc(child.pid, 0.0)


def test_summary_leaves_out_the_warm_up() -> None:
    def at(t: float, rss_mb: float, cpu_s: float) -> ProcReading:
        kb = int(rss_mb * 1024)
        return ProcReading(t, kb, 60 * 1024, kb - 10 * 1024, 10 * 1024, cpu_s)

    # Start-up burns 3 s of CPU and 60 MB peak in the first 10 s; then 0.5 s CPU per 50 s at 40 or 42 MB.
    readings = [at(5, 60, 3.0), at(10, 40, 3.0), at(35, 42, 3.25), at(60, 40, 3.5)]
    s = summarise(readings, warmup_s=10)
    assert s["rss_mean_mb"] == pytest.approx(122 / 3, abs=0.01) and s["rss_max_mb"] == 42
    assert s["rss_hwm_mb"] == 60 and s["rss_file_mb"] == 10
    assert s["cpu_pct_one_core"] == pytest.approx(1.0) and s["measured_s"] == 50
    with pytest.raises(AgentBenchError):
        summarise(readings, warmup_s=50)
