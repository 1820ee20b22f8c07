"""The agent's own footprint for the status report: resident memory and CPU time, read cheaply from the kernel.

RSS comes from /proc/self/statm (current, not peak); where there is no /proc, `resource`'s peak RSS stands in.
CPU is user + system time from `os.times()`; the percentage is of one core over the interval since the previous
reading, so a status every minute reports the last minute's load.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass(frozen=True, slots=True)
class Footprint:
    rss_kb: int
    cpu_s: float
    cpu_pct: float  # of one core, since the previous reading (since start for the first one)
    uptime_s: float


class ProcessMeter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._last_wall = self._start
        self._last_cpu = cpu_seconds()

    def read(self) -> Footprint:
        wall, cpu = self._clock(), cpu_seconds()
        elapsed = wall - self._last_wall
        pct = 100.0 * (cpu - self._last_cpu) / elapsed if elapsed > 0 else 0.0
        self._last_wall, self._last_cpu = wall, cpu
        return Footprint(rss_bytes() // 1024, round(cpu, 3), round(max(pct, 0.0), 2), round(wall - self._start, 1))
