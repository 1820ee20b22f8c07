"""Retention and downsampling: what is kept how long, and the supervised loop that enforces it.

Raw telemetry is kept `raw_s` (30 days by default); before it goes, every `rollup_interval_s` (1 minute) of it is
summarised into a rollup row per vehicle — the mean of every numeric signal and the number of samples — which is
kept `rollup_s` (2 years). Each backend enforces this its own way (docs/STORAGE.md): InfluxDB with two retention
policies and a continuous query the store creates at start, the SQLite store with a rollup table and purges that
`maintain()` runs. `MaintenanceLoop` calls `maintain()` periodically on either.

Late data: a rollup bucket is recomputed on every run for `lateness_s` after it closed (InfluxDB's `RESAMPLE FOR`),
so samples arriving up to that late (a vehicle's spool draining after a short outage) are counted; later ones stay
in the raw data (and the track and daily queries) but not in the rollups.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cloud_ingest.errors import StorageError

log = logging.getLogger("zhilian.retention")

DAY_S = 86_400
# InfluxDB refuses retention policies shorter than an hour.
MIN_RETENTION_S = 3_600


@dataclass(frozen=True)
class RetentionConfig:
    raw_s: int = 30 * DAY_S
    rollup_s: int = 730 * DAY_S
    rollup_interval_s: int = 60
    # Rollups are recomputed this far back on each run (InfluxDB: RESAMPLE EVERY every_s FOR lateness_s).
    lateness_s: int = 900
    every_s: int = 300
    # InfluxDB retention policies the store creates (the raw one becomes the database's default).
    raw_policy: str = "raw"
    rollup_policy: str = "rollup"

    def __post_init__(self) -> None:
        if self.raw_s < MIN_RETENTION_S or self.rollup_s < MIN_RETENTION_S:
            raise ValueError(f"retention must be at least {MIN_RETENTION_S} s (InfluxDB's minimum)")
        if self.rollup_interval_s < 1 or self.every_s < 1:
            raise ValueError("rollup_interval_s and every_s must be positive")
        if self.lateness_s < max(self.every_s, self.rollup_interval_s):
            # Otherwise some buckets would never be computed at all between two runs.
            raise ValueError("lateness_s must be at least every_s and rollup_interval_s")
        if not self.raw_policy or not self.rollup_policy or self.raw_policy == self.rollup_policy:
            raise ValueError("raw_policy and rollup_policy must be two different names")

    @property
    def rollup_interval_ms(self) -> int:
        return self.rollup_interval_s * 1000

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RetentionConfig | None:
        """`ZHILIAN_RAW_RETENTION_DAYS` (default 30; 0 keeps raw data forever and turns rollups off) and
        `ZHILIAN_ROLLUP_RETENTION_DAYS` (default 730)."""
        try:
            raw_days = float(env.get("ZHILIAN_RAW_RETENTION_DAYS", "30"))
            rollup_days = float(env.get("ZHILIAN_ROLLUP_RETENTION_DAYS", "730"))
        except ValueError as exc:
            raise ValueError(f"retention days must be numbers: {exc}") from None
        if raw_days == 0:
            return None
        return cls(raw_s=round(raw_days * DAY_S), rollup_s=round(rollup_days * DAY_S))


@dataclass(frozen=True)
class MaintenanceReport:
    rollup_from_ms: int | None = None
    rollup_to_ms: int | None = None
    rollup_rows: int = 0
    raw_purged: int = 0
    rollups_purged: int = 0


class Maintainable(Protocol):
    def maintain(self, now_ms: int | None = None) -> MaintenanceReport: ...


class MaintenanceLoop:
    """Runs `store.maintain()` every `every_s` on one daemon thread, first right at start (to catch up after
    downtime). A failing run is logged and retried at the next period; the loop itself only ends with stop()."""

    def __init__(
        self, store: Maintainable, every_s: float, clock_ms: Callable[[], int] | None = None, name: str = "store"
    ) -> None:
        if every_s <= 0:
            raise ValueError("every_s must be positive")
        self.store = store
        self.every_s = every_s
        self._clock_ms = clock_ms or (lambda: int(time.time() * 1000))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"maintenance-{name}", daemon=True)
        self.runs = 0
        self.failures = 0
        self.last_report: MaintenanceReport | None = None

    def start(self) -> MaintenanceLoop:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.last_report = self.store.maintain(self._clock_ms())
                log.info("maintenance done", extra={"report": self.last_report, "s": time.monotonic() - started})
            except StorageError as exc:
                self.failures += 1
                log.warning("maintenance failed; retrying next period", extra={"error": str(exc)})
            except Exception:
                self.failures += 1
                log.exception("maintenance failed unexpectedly; retrying next period")
            self.runs += 1
            if self._stop.wait(self.every_s):
                return

    def stop(self, timeout: float = 30.0) -> None:
        """Asks the loop to end and waits up to `timeout` for a run in progress (each purge step is short)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("maintenance thread did not stop in time", extra={"timeout_s": timeout})
