"""End-to-end load benchmark (`zhilian bench`): the whole chain on this machine, side by side with Node-RED.

Set-up: a private Mosquitto (file-descriptor limit raised for 10,000 connections), a private `influxd` (or the
SQLite store), the ingest service as its own processes (`ingest_workers` × `zhilian serve`: bridge + pipeline +
API, exactly as deployed, on one MQTT 5 shared subscription; their CPU, RSS, latency histograms and stats added
up) and the protocol-level virtual fleet (simulators/virtual_fleet.py) in a child process with one MQTT
connection per vehicle. The fleet's keys are derived from its seed and registered in the ingest's registry first.

Phases, one after the other on the same broker and InfluxDB, fed by the same fleet generator with the same samples
(10 per message):

1. **zhilian** — signed envelopes to `ev/{vin}/telemetry` → bridge → verify, dedupe, decode, validate, rules → store.
2. **alarm probe** — when the build serves GET /v1/alarms: at 80 % of the highest sustained rate, probe vehicles
   report an over-temperature from a known instant; alarm latency = alarm visible through the API − the vehicle
   time the rule raised it (`opened_ms`).
3. **nodered_standard** / **nodered_tuned** — the same samples as unsigned JSON to `nr/{vin}/telemetry` → Node-RED
   (zhilian/nodered.py) → the same InfluxDB, another measurement.

Each phase ramps the offered load (messages/s across the fleet) geometrically from `start_rate` until a step is
not sustained, then bisects between the best sustained and the first failed rate. A step sends for `step_s`
seconds; it is **sustained** when every sample sent has landed in the store `grace_s` after the step's last
message was due (counted by a query on the store: InfluxDB `count(sample)` over the step's time range, which no
other step's samples share). After that the bench waits until the count stops moving, so a late sample is told
apart from a lost one. Per step: offered and landed samples/s, late and lost samples, latency percentiles, CPU
seconds of every component over [first message due, deadline] (utime + stime from /proc) and their peak RSS
(VmRSS sampled every 0.25 s), and the fleet's own CPU and send lag.

Latency "sample taken → stored": the newest sample of each message is taken when the message is due, so
  - ours: the pipeline's `zhilian_ingest_sample_age_seconds` histogram (observed when a message's commit
    returned), read from /metrics before and after the step — exact per message, bucket-interpolated percentiles;
  - both (the same method for Node-RED, which has no such hook): a probe polling the store every 0.1 s for the
    newest sample of 20 vehicles; a newly seen sample's latency is the poll's time minus its timestamp (upper
    bound, resolution ≈ the poll interval).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from simulators.virtual_fleet import (
    SAMPLES_PER_MESSAGE,
    FleetGenerator,
    fleet_key,
    fleet_variant,
    fleet_vin,
    raise_nofile_limit,
    split_publish,
)
from zhilian.broker import MosquittoProcess, free_port
from zhilian.influx import InfluxProcess
from zhilian.procs import _die_with_parent, spawn_zhilian, stop_process

log = logging.getLogger("zhilian.bench.load")

StoreKind = Literal["influx", "sqlite"]
INFLUX_DB = "zhilian"
OUR_MEASUREMENT = "telemetry"  # InfluxSettings' default measurement
SAMPLE_AGE_METRIC = "zhilian_ingest_sample_age_seconds"
PROBE_VEHICLES = 20
LATE_PLAN_S = 0.25
ALARM_PROBE_VEHICLES = 40
ALARM_REPORT_INTERVAL_S = 5.0
ALARM_TEMPERATURE_C = 72.0
ALARM_SIGNAL = "Powertrain.TractionBattery.Temperature.Max"
# The default rules file's battery-temperature rules (cloud_ingest/rules/default_rules.toml): what the injected
# over-temperature raises first.
ALARM_RULES = frozenset({"battery_over_temperature", "thermal_runaway", "thermal_runaway_precursor"})

# Targets of issue 7 (benchmark targets, never asserted in tests).
TARGET_VS_STANDARD = 2.0
TARGET_VS_TUNED = 1.3
TARGET_CPU_SHARE = 1 / 3
TARGET_ALARM_P99_S = 1.0
TARGET_CONNECTIONS = 10_000


class LoadBenchError(RuntimeError):
    """A component did not start or the fleet failed: the benchmark cannot produce numbers."""


@dataclass
class LoadBenchConfig:
    vehicles: int = 10_000
    seed: int = 7
    store: StoreKind = "influx"
    step_s: float = 10.0
    grace_s: float = 1.0
    # Ramps start low and grow: an overloaded step leaves a backlog that must drain before the next, so a step
    # should overshoot the capacity by at most `growth`.
    start_rate: float = 200.0  # messages/s of the first step (10 samples each)
    nodered_start_rate: float = 200.0
    growth: float = 1.6
    refine_steps: int = 2
    max_steps: int = 8
    max_rate: float = 20_000.0
    drain_timeout_s: float = 60.0
    settle_s: float = 10.0  # a count that did not move for this long has stopped (a slow batch can take seconds)
    nodered: bool = True
    nodered_group: int = 100
    nodered_prefix: Path | None = None
    alarm_probe: bool = True
    # `zhilian serve` processes on one shared subscription: a Python process ingests on one core at a time (GIL).
    ingest_workers: int = 2
    profile_messages: int = 1000  # messages run through the pipeline under cProfile (0: skip)
    workdir: Path | None = None
    keep_workdir: bool = False


# --- /proc readers -----------------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the process (all its threads), seconds; 0.0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# A component's processes by its name: one each, but the ingest may run as several workers (one group).
Pids = dict[str, tuple[int, ...]]


def group_cpu_s(pids: tuple[int, ...]) -> float:
    return sum(proc_cpu_s(pid) for pid in pids)


class RssSampler:
    """Samples VmRSS of named process groups every `interval_s` in a thread (a group's processes added up);
    `peaks()` since the last `reset()`."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._pids: Pids = {}
        self._peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def watch(self, pids: Pids) -> None:
        with self._lock:
            self._pids = dict(pids)
            self._peak = {}

    def reset(self) -> None:
        with self._lock:
            self._peak = {}

    def peaks_mb(self) -> dict[str, float]:
        with self._lock:
            return {name: kb / 1024 for name, kb in self._peak.items()}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                pids = dict(self._pids)
            for name, group in pids.items():
                sizes = [kb for kb in (proc_status_kb(pid, "VmRSS") for pid in group) if kb is not None]
                if sizes:
                    with self._lock:
                        self._peak[name] = max(self._peak.get(name, 0), sum(sizes))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- where samples land ------------------------------------------------------------------------------------------


class InfluxLanding:
    """Counts and probes samples in InfluxDB over its HTTP API (the same query for both pipelines)."""

    def __init__(self, influx: InfluxProcess, database: str = INFLUX_DB) -> None:
        self.influx = influx
        self.database = database
        self._client = httpx.Client(base_url=influx.url, timeout=30.0)

    def _select(self, q: str) -> list[dict[str, Any]]:
        r = self._client.post("/query", data={"q": q, "db": self.database, "epoch": "ms"})
        r.raise_for_status()
        doc = r.json()
        results = doc.get("results", [])
        if "error" in doc or any("error" in res for res in results):
            raise LoadBenchError(f"influx query {q[:80]!r} failed: {doc}")
        return [s for res in results for s in res.get("series", [])]

    def count(self, measurement: str, first_ms: int, last_ms: int) -> int:
        series = self._select(
            f'SELECT count("sample") FROM "{measurement}" WHERE time >= {first_ms}ms AND time <= {last_ms}ms'
        )
        return int(series[0]["values"][0][1]) if series else 0

    def newest(self, measurement: str, vins: list[str], since_ms: int) -> dict[str, int]:
        pattern = "|".join(vins)
        series = self._select(
            f'SELECT last("sample") FROM "{measurement}" WHERE time >= {since_ms}ms AND vin =~ /^({pattern})$/ '
            "GROUP BY vin"
        )
        return {s["tags"]["vin"]: int(s["values"][0][0]) for s in series if s.get("values")}

    def close(self) -> None:
        self._client.close()


class SqliteLanding:
    """The SQLite store's telemetry table, read-only (its own connection per calling thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
            self._local.conn = conn
        return conn

    def count(self, measurement: str, first_ms: int, last_ms: int) -> int:
        try:
            (n,) = (
                self._conn()
                .execute("SELECT count(*) FROM telemetry WHERE ts >= ? AND ts <= ?", (first_ms, last_ms))
                .fetchone()
            )
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise
        return int(n)

    def newest(self, measurement: str, vins: list[str], since_ms: int) -> dict[str, int]:
        marks = ",".join("?" * len(vins))
        rows = self._conn().execute(
            f"SELECT vin, max(ts) FROM telemetry WHERE ts >= ? AND vin IN ({marks}) GROUP BY vin",
            (since_ms, *vins),
        )
        return {vin: int(ts) for vin, ts in rows if ts is not None}

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


Landing = InfluxLanding | SqliteLanding


class LatencyProbe:
    """Polls the store for the newest sample of a few vehicles; each newly seen sample gives one latency."""

    def __init__(self, landing: Landing, measurement: str, vins: list[str], since_ms: int, interval_s: float) -> None:
        self.landing = landing
        self.measurement = measurement
        self.vins = vins
        self.since_ms = since_ms
        self.interval_s = interval_s
        self.latencies_s: list[float] = []
        self.errors = 0
        self._seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="latency-probe", daemon=True)

    def start(self) -> LatencyProbe:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                newest = self.landing.newest(self.measurement, self.vins, self.since_ms)
            except Exception as exc:  # a slow or failed poll loses one observation, not the benchmark
                self.errors += 1
                log.warning("latency probe query failed", extra={"error": repr(exc)})
                continue
            now_ms = time.time() * 1000
            for vin, ts in newest.items():
                # Only this step's samples match (time >= since_ms): every new newest sample is an observation.
                if ts > self._seen.get(vin, self.since_ms - 1):
                    self.latencies_s.append((now_ms - ts) / 1000)
                    self._seen[vin] = ts

    def stop(self) -> dict[str, float | int]:
        self._stop.set()
        self._thread.join(timeout=10)
        return percentiles_ms(self.latencies_s) | {"observations": len(self.latencies_s), "errors": self.errors}


def percentiles_ms(values_s: list[float]) -> dict[str, float | int]:
    if not values_s:
        return {}
    ordered = sorted(values_s)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1] * 1000}


# --- the pipeline's latency histogram ------------------------------------------------------------------------------


def histogram_buckets(metrics_text: str | list[str], name: str = SAMPLE_AGE_METRIC) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a Prometheus histogram in exposition text, by bound; given several
    processes' texts (ingest workers, the same buckets), their counts added up."""
    total: dict[float, float] = {}
    for text in [metrics_text] if isinstance(metrics_text, str) else metrics_text:
        for family in text_string_to_metric_families(text):
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name == name + "_bucket":
                    le = float(sample.labels["le"])
                    total[le] = total.get(le, 0.0) + float(sample.value)
    return sorted(total.items())


def added_up(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' counters (numbers, and dicts of them, as /v1/ingest/stats answers) added up by key."""
    out: dict[str, Any] = {}
    for doc in docs:
        for key, value in doc.items():
            if isinstance(value, dict):
                out[key] = added_up([out.get(key, {}), value])
            elif isinstance(value, int | float) and not isinstance(value, bool):
                out[key] = out.get(key, 0) + value
            else:
                out.setdefault(key, value)
    return out


def histogram_percentiles(
    before: list[tuple[float, float]], after: list[tuple[float, float]], qs: tuple[float, ...] = (0.5, 0.95, 0.99)
) -> dict[str, float | int]:
    """Percentiles (ms) of the observations between two snapshots, linearly interpolated within a bucket."""
    base = dict(before)
    delta = [(le, count - base.get(le, 0.0)) for le, count in after]
    if not delta or delta[-1][1] <= 0:
        return {}
    total = delta[-1][1]
    out: dict[str, float | int] = {"count": int(total)}
    for q in qs:
        rank = q * total
        lo_bound, lo_count = 0.0, 0.0
        for le, count in delta:
            if count >= rank:
                if math.isinf(le):
                    value = lo_bound  # beyond the last finite bucket: report its bound (a lower bound)
                else:
                    span = count - lo_count
                    value = lo_bound + (le - lo_bound) * ((rank - lo_count) / span if span > 0 else 1.0)
                out[f"p{round(q * 100)}"] = value * 1000
                break
            lo_bound, lo_count = le, count
    return out


# --- the ramp ----------------------------------------------------------------------------------------------------


class RampPlanner:
    """Which offered rate to try next (sans-I/O): up by `growth` while steps are sustained, halving while the first
    steps fail (at most `max_steps` steps to find a bracket), then `refine_steps` geometric bisections between the
    best sustained and the lowest failed rate (skipped once they are within 5 %)."""

    def __init__(
        self, start: float, growth: float, max_steps: int, refine_steps: int, max_rate: float, min_rate: float = 5.0
    ) -> None:
        if start <= 0 or growth <= 1 or max_steps < 1 or refine_steps < 0 or max_rate < start or min_rate <= 0:
            raise ValueError("ramp: start > 0, growth > 1, max_steps >= 1, refine_steps >= 0, max_rate >= start")
        self.start, self.growth, self.max_rate, self.min_rate = start, growth, max_rate, min_rate
        self.max_steps, self.refine_steps = max_steps, refine_steps
        self.best: float | None = None
        self.worst: float | None = None
        self.steps = 0
        self._refined = 0
        self._searching = True
        self._next: float | None = start

    def next_rate(self) -> float | None:
        if self._searching and self.steps < self.max_steps and self._next is not None:
            return self._next
        self._searching = False
        if (
            self._refined < self.refine_steps
            and self.best is not None
            and self.worst is not None
            and self.worst / self.best > 1.05
        ):
            return math.sqrt(self.best * self.worst)
        return None

    def record(self, rate: float, sustained: bool) -> None:
        self.steps += 1
        if not self._searching:
            self._refined += 1
        if sustained:
            self.best = rate if self.best is None else max(self.best, rate)
        else:
            self.worst = rate if self.worst is None else min(self.worst, rate)
        if not self._searching:
            return
        if sustained and self.worst is None and rate < self.max_rate:
            self._next = min(self.max_rate, rate * self.growth)
        elif not sustained and self.best is None and rate / 2 >= self.min_rate:
            self._next = rate / 2
        else:
            self._next = None


# --- children: the fleet process and the ingest process -------------------------------------------------------


class FleetControl:
    """The protocol fleet in a child process (`python -m simulators.virtual_fleet`), driven by JSON lines over its
    stdin/stdout (see virtual_fleet._worker); a reader thread queues its events."""

    def __init__(self, vehicles: int, seed: int, boot: int, host: str, port: int, log_path: Path) -> None:
        args = ["--vehicles", str(vehicles), "--seed", str(seed), "--boot", str(boot), "--host", host]
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "simulators.virtual_fleet", *args, "--port", str(port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # an aborted bench leaves no fleet behind
            )
        self.log_path = log_path
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="fleet-events", daemon=True)
        self._reader.start()
        self.setup: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 180.0) -> None:
        """The fleet built its keys and generator (its start overlaps the bench registering those keys)."""
        self.setup = self.expect("ready", timeout=timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self._events.put(json.loads(line))
            except ValueError:
                log.error("unreadable fleet event", extra={"line": line[:200]})
        self._events.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, op: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoadBenchError(f"fleet did not answer {op!r} within {timeout:.0f}s")
            try:
                msg = self._events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if msg is None:
                tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-800:].strip()
                raise LoadBenchError(f"fleet process ended while waiting for {op!r}: {tail}")
            if msg["op"] == "error":
                raise LoadBenchError(f"fleet failed: {msg['error']}")
            if msg["op"] == op:
                return msg
            log.warning("unexpected fleet message", extra={"op": msg["op"], "want": op})

    def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise LoadBenchError(f"fleet process is gone: {exc}") from None

    def close(self, timeout: float = 30.0) -> dict[str, Any]:
        counters: dict[str, Any] = {}
        with contextlib.suppress(LoadBenchError):
            self.send({"op": "close"})
            counters = self.expect("closed", timeout).get("counters", {})
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_process(self.proc, timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return counters


class IngestChild:
    """`zhilian serve` (bridge + pipeline + API) as its own process, as deployed."""

    def __init__(
        self,
        data_dir: Path,
        broker: MosquittoProcess,
        influx_url: str | None,
        log_path: Path,
        worker: int = 1,
        share_group: str | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.http_port = free_port()
        self.api = f"http://127.0.0.1:{self.http_port}"
        args = [
            "serve",
            "--data-dir",
            str(data_dir),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--mqtt-host",
            broker.host,
            "--mqtt-port",
            str(broker.port),
            "--log-level",
            "warning",
        ]
        if influx_url:
            args += ["--influx-url", influx_url, "--influx-db", INFLUX_DB]
        if share_group is not None:
            args += ["--share-group", share_group, "--client-id", f"zhilian-bench-{worker}"]
        self.log_path = log_path
        # The registry and data dir come from the bench; the environment must not point elsewhere.
        env = {k: "" for k in ("ZHILIAN_DATABASE_URL", "ZHILIAN_INFLUX_URL") if k in os.environ}
        self.proc = spawn_zhilian(args, log_path, env=env or None)
        self.client = httpx.Client(base_url=self.api, timeout=10.0)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LoadBenchError(f"ingest exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if self.client.get("/healthz").status_code == 200 and re.search(
                    r"^zhilian_bridge_connected 1\.0$", self.metrics(), re.MULTILINE
                ):
                    return
            time.sleep(0.2)
        raise LoadBenchError(f"ingest not ready within {timeout}s: {self.log_tail()}")

    def metrics(self) -> str:
        r = self.client.get("/metrics")
        r.raise_for_status()
        return r.text

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        self.client.close()
        stop_process(self.proc, timeout=20)


BENCH_REPORTING_S = 600.0  # the profile's reporting interval for bench vehicles (offline after 3x)


def register_fleet(data_dir: Path, vehicles: int, seed: int) -> str:
    """Registers the fleet's derived keys in the data dir's registry; returns an admin API key for the bench.

    One transaction with the rows `Registry.register_device` writes per vehicle (device, its counters, its key):
    that method commits and fsyncs per vehicle, 1.5–12 ms each here, minutes for 10,000. A sample of the
    vehicles is then looked up through the registry, as the pipeline will, to prove the rows are what it expects.
    Each vehicle also gets a profile with the reporting interval the bench fleet really has (`BENCH_REPORTING_S`:
    10,000 vehicles in round robin report every 5–400 s across the ramp), as an operator would register it —
    with the default 5 s every bench vehicle would be "offline" and the bench would measure 10,000 offline alarms.
    """
    from sqlalchemy.orm import Session

    from cloud_ingest.db import Device, DeviceKeyRow, DeviceState, VehicleProfile
    from cloud_ingest.registry import KeyState
    from cloud_ingest.service import IngestService
    from protocol import key_id_for

    keys = [(fleet_vin(i), fleet_key(seed, fleet_vin(i)).public_raw) for i in range(vehicles)]
    service = IngestService.open(data_dir)
    try:
        with Session(service.engine) as session, session.begin():
            session.add_all(Device(vin=vin, label="bench virtual vehicle") for vin, _ in keys)
            session.flush()
            session.add_all(DeviceState(vin=vin, messages=0, samples=0) for vin, _ in keys)
            session.add_all(DeviceKeyRow(vin=vin, key_id=key_id_for(raw).hex(), public_key=raw) for vin, raw in keys)
            now_ms = int(time.time() * 1000)
            session.add_all(
                VehicleProfile(vin=vin, reporting_interval_s=BENCH_REPORTING_S, updated_ms=now_ms) for vin, _ in keys
            )
        for vin, raw in keys[:: max(1, vehicles // 50)]:
            found = service.registry.lookup_key(vin, key_id_for(raw))
            if found.state is not KeyState.ACTIVE or found.public_key != raw:
                raise LoadBenchError(f"bulk registration of {vin} is not seen by the registry: {found.state}")
        return service.registry.create_api_key("admin", "load-bench")
    finally:
        service.close()


def profile_pipeline(store_options: dict[str, Any], seed: int, messages: int, vehicles: int = 500) -> dict[str, Any]:
    """Where the pipeline's time goes: `messages` of the bench fleet's envelopes through `IngestPipeline.ingest_many`
    (100 per call, as the bridge batches under load) under cProfile, in this process, into a fresh data dir with
    the bench's store. Threads the store starts (InfluxDB writers) are not profiled: their share shows as the
    caller waiting in `write_many`."""
    import cProfile
    import pstats

    from cloud_ingest.service import IngestService

    generator = FleetGenerator(max(1, min(vehicles, messages)), seed=seed + 1)
    plan = generator.plan(time.time(), messages / 1000.0, 1000.0, isolate=True)
    items = [split_publish(packet) for packet in plan.packets]
    with tempfile.TemporaryDirectory(prefix="zhilian-profile-") as tmp:
        service = IngestService.open(Path(tmp), **store_options)
        try:
            for vin, public_raw in generator.public_keys:
                service.registry.register_device(vin, public_raw)
            profiler = cProfile.Profile()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            profiler.enable()
            outcomes: dict[str, int] = {}
            for i in range(0, len(items), 100):
                for r in service.pipeline.ingest_many(items[i : i + 100]):
                    outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
            profiler.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        finally:
            service.close()
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, _nc, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((f"{_short_path(filename)}:{line}({func})", tottime, cumtime))
    ours = [r for r in rows if r[0].startswith(("cloud_ingest/", "protocol/"))]
    samples = max(1, outcomes.get("stored", 0) * SAMPLES_PER_MESSAGE)
    return {
        "messages": len(items),
        "outcomes": outcomes,
        "cpu_us_per_sample_profiled": cpu / samples * 1e6,
        "wall_s": wall,
        "top_cumulative": [
            {"function": f, "cumulative_s": round(c, 3), "share": round(c / wall, 3)}
            for f, _t, c in sorted(ours, key=lambda r: -r[2])[:15]
        ],
        "top_self": [
            {"function": f, "self_s": round(t, 3), "share": round(t / wall, 3)}
            for f, t, _c in sorted(rows, key=lambda r: -r[1])[:10]
        ],
    }


def codec_micro(min_time_s: float = 0.3) -> dict[str, dict[str, float]]:
    """The bench message's own costs (10 samples × 13 signals): encode, sign, parse + verify, decode, and the JSON
    the Node-RED flow parses — CPU per message, best of three rounds of at least `min_time_s` (the full
    micro-benchmarks are `zhilian bench --micro`, several minutes with the store and geofence cases)."""
    from protocol import decode_batch, encode_batch, load_catalogue, parse_envelope
    from protocol.batch import batch_from_rows

    catalogue = load_catalogue()
    generator = FleetGenerator(1, seed=0)
    vehicle = generator.vehicles[0]
    packet = generator.plan(1_790_000_000.0, 1.0, 1.0).packets[0]
    payload = split_publish(packet)[1]
    envelope = parse_envelope(payload).envelope
    batch = decode_batch(envelope.body, catalogue).batch
    rows = [(ts, generator.bank.row(0, i * 0.5)) for i, ts in enumerate(batch.timestamps)]
    json_payload = split_publish(generator.plan(1_790_000_010.0, 1.0, 1.0, kind="json").packets[0])[1]
    public = generator.keys[0].public_raw
    cases: dict[str, Callable[[], object]] = {
        "batch encode (agent path: batch_from_rows + encode_batch)": lambda: encode_batch(
            batch_from_rows(rows), catalogue
        ),
        "envelope seal (Ed25519 sign)": lambda: vehicle.sealer.seal_body(envelope.body, 10, envelope.created_ms),
        "envelope parse + verify": lambda: parse_envelope(payload).verify(public),
        "batch decode": lambda: decode_batch(envelope.body, catalogue),
        "JSON parse (the Node-RED feed)": lambda: json.loads(json_payload),
    }
    out: dict[str, dict[str, float]] = {}
    for name, fn in cases.items():
        best = math.inf
        for _ in range(3):
            n, t0 = 0, time.process_time()
            while (elapsed := time.process_time() - t0) < min_time_s:
                fn()
                n += 1
            best = min(best, elapsed / n)
        out[name] = {"us_per_message": best * 1e6, "us_per_sample": best * 1e6 / SAMPLES_PER_MESSAGE}
    out["sizes"] = {"signed_envelope_bytes": float(len(payload)), "json_bytes": float(len(json_payload))}
    return out


def _short_path(filename: str) -> str:
    for marker in ("/site-packages/", "/main/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --- machine ------------------------------------------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str | None:
    exe = shutil.which(cmd[0]) or next((p for p in (f"/usr/sbin/{cmd[0]}",) if os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, *cmd[1:]], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gib = round(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024, 1)
    load = os.getloadavg()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "influxd": _first_line(["influxd", "version"]),
        "node": _first_line(["node", "--version"]),
        "load_average_at_start": [round(x, 2) for x in load],
    }


# --- the benchmark ------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    kind: Literal["signed", "json"]
    measurement: str
    pids: Pids
    pipeline_component: str  # whose CPU counts as "the pipeline" (the store excluded)
    metrics: Callable[[], list[str]] | None = None  # our workers' /metrics, for the latency histogram
    steps: list[dict[str, Any]] = field(default_factory=list)


class LoadBench:
    def __init__(self, config: LoadBenchConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console()
        self.results: dict[str, Any] = {}
        self.fleet: FleetControl | None = None
        self.landing: Landing | None = None
        self.rss = RssSampler()
        self._progress: Progress | None = None
        self._task: Any = None
        self._steps_done = 0
        self._steps_total = 1
        self.probe_vins = [
            fleet_vin(i * max(1, config.vehicles // PROBE_VEHICLES) % config.vehicles)
            for i in range(min(PROBE_VEHICLES, config.vehicles))
        ]

    # -- progress ----------------------------------------------------------------------------------------------

    def _say(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)
        log.info(text)

    def _advance(self) -> None:
        self._steps_done += 1
        if self._progress is not None and self._task is not None:
            # The ramp decides its length as it goes: the bar's total follows when the estimate was short.
            self._steps_total = max(self._steps_total, self._steps_done + 1)
            self._progress.update(self._task, completed=self._steps_done, total=self._steps_total)

    # -- steps -------------------------------------------------------------------------------------------------

    def _cpu(self, pids: Pids) -> dict[str, float]:
        return {name: group_cpu_s(group) for name, group in pids.items()}

    def _run_step(
        self,
        phase: Phase,
        rate: float,
        inject: dict[str, Any] | None = None,
        duration_s: float | None = None,
        on_planned: Callable[[dict[str, Any]], None] | None = None,
        active: int | None = None,
    ) -> dict[str, Any]:
        cfg = self.config
        assert self.fleet is not None and self.landing is not None
        duration = duration_s or cfg.step_s
        self._say(f"{phase.name}: {rate * SAMPLES_PER_MESSAGE:,.0f} samples/s offered")
        self.fleet.send(
            {
                "op": "step",
                "rate": rate,
                "duration_s": duration,
                "kind": phase.kind,
                "inject": inject or None,
                "vehicles": active,
            }
        )
        planned = self.fleet.expect("planned", timeout=600)
        if on_planned is not None:
            on_planned(planned)
        start = float(planned["start_s"])
        time.sleep(max(0.0, start - time.time()))
        cpu0 = self._cpu(phase.pids)
        hist0 = histogram_buckets(phase.metrics()) if phase.metrics else []
        self.rss.reset()
        probe = LatencyProbe(self.landing, phase.measurement, self.probe_vins, int(planned["first_ms"]), 0.1).start()
        done = self.fleet.expect("step_done", timeout=duration + 120)
        fleet_res: dict[str, Any] = done["result"]
        deadline = start + duration + cfg.grace_s
        time.sleep(max(0.0, deadline - time.time()))
        first_ms, last_ms = int(planned["first_ms"]), int(planned["last_ms"])
        landed_at_deadline = self.landing.count(phase.measurement, first_ms, last_ms)
        cpu1 = self._cpu(phase.pids)
        window_s = time.time() - start
        peaks = self.rss.peaks_mb()
        sent_samples = int(fleet_res["sent"]) * SAMPLES_PER_MESSAGE
        landed = self._drain(phase.measurement, first_ms, last_ms, sent_samples, landed_at_deadline)
        latency = histogram_percentiles(hist0, histogram_buckets(phase.metrics())) if phase.metrics else {}
        probe_latency = probe.stop()
        cpu = {name: cpu1[name] - cpu0[name] for name in phase.pids}
        pipeline_cpu = cpu.get(phase.pipeline_component, 0.0)
        step = {
            "offered_msgs_per_s": rate,
            "offered_samples_per_s": rate * SAMPLES_PER_MESSAGE,
            "duration_s": duration,
            "messages_planned": int(planned["messages"]),
            "first_ms": first_ms,
            "last_ms": last_ms,
            "sent_samples": sent_samples,
            "landed_samples_at_deadline": landed_at_deadline,
            "landed_samples_final": landed,
            "landed_samples_per_s": landed_at_deadline / duration,
            "late_samples": max(0, landed - landed_at_deadline),
            "lost_samples": max(0, sent_samples - landed),
            "sustained": landed_at_deadline >= sent_samples > 0 and fleet_res["unacked"] == 0,
            "latency_ms": latency,
            "probe_latency_ms": probe_latency,
            "cpu_s": cpu,
            "cpu_window_s": window_s,
            "pipeline_cpu_us_per_sample": (pipeline_cpu / landed_at_deadline * 1e6) if landed_at_deadline else None,
            "peak_rss_mb": peaks,
            "fleet": fleet_res | {"plan_late_s": planned["late_s"], "generate_cpu_s": planned["generate_cpu_s"]},
        }
        verdict = "sustained" if step["sustained"] else f"NOT sustained ({sent_samples - landed_at_deadline} behind)"
        self.console.log(
            f"{phase.name}: offered {step['offered_samples_per_s']:,.0f} samples/s → landed "
            f"{step['landed_samples_per_s']:,.0f}/s, {verdict}; lost {step['lost_samples']}; "
            f"{phase.pipeline_component} CPU {pipeline_cpu:.1f}s"
        )
        self._advance()
        return step

    def _drain(self, measurement: str, first_ms: int, last_ms: int, expected: int, count: int) -> int:
        """Waits until every sent sample landed, or the count stopped moving for `settle_s`, or `drain_timeout_s`
        passed; the count then. A backlog left behind would slow the next step (its samples are counted apart)."""
        assert self.landing is not None
        deadline = time.monotonic() + self.config.drain_timeout_s
        last_change = time.monotonic()
        while (
            count < expected and time.monotonic() < deadline and time.monotonic() - last_change < self.config.settle_s
        ):
            time.sleep(0.5)
            now = self.landing.count(measurement, first_ms, last_ms)
            if now != count:
                count, last_change = now, time.monotonic()
        return count

    def _ramp(self, phase: Phase, start_rate: float) -> None:
        cfg = self.config
        ramp = RampPlanner(start_rate, cfg.growth, cfg.max_steps, cfg.refine_steps, cfg.max_rate)
        while (rate := ramp.next_rate()) is not None:
            step = self._run_step(phase, rate)
            phase.steps.append(step)
            if not step["sustained"] and step["fleet"]["plan_late_s"] > LATE_PLAN_S:
                # The fleet finished signing after the step was due (a busy machine) and sent its first messages in
                # a burst: not the offered rate. Kept in the record, measured again.
                step["invalid"] = "plan signed late; step repeated"
                step = self._run_step(phase, rate)
                phase.steps.append(step)
            ramp.record(rate, bool(step["sustained"]))
        self._recount(phase)

    def _recount(self, phase: Phase) -> None:
        """Counts every step's samples again at the end of the phase: a sample that landed after its step's drain
        gave up is late, not lost; what is still missing now (the pipeline is still up) is lost."""
        assert self.landing is not None
        for step in phase.steps:
            final = self.landing.count(phase.measurement, step["first_ms"], step["last_ms"])
            step["landed_samples_final"] = final
            step["late_samples"] = max(0, final - step["landed_samples_at_deadline"])
            step["lost_samples"] = max(0, step["sent_samples"] - final)

    # -- phases ------------------------------------------------------------------------------------------------

    @staticmethod
    def summarize(phase: Phase) -> dict[str, Any]:
        sustained = [s for s in phase.steps if s["sustained"] and s["lost_samples"] == 0 and "invalid" not in s]
        best = max(sustained, key=lambda s: s["offered_samples_per_s"]) if sustained else None
        return {
            "steps": phase.steps,
            "max_sustained_samples_per_s": best["offered_samples_per_s"] if best else 0.0,
            "max_landed_samples_per_s": max((s["landed_samples_per_s"] for s in phase.steps), default=0.0),
            "at_max": None
            if best is None
            else {
                "pipeline_cpu_us_per_sample": best["pipeline_cpu_us_per_sample"],
                "cpu_s": best["cpu_s"],
                "peak_rss_mb": best["peak_rss_mb"],
                "latency_ms": best["latency_ms"],
                "probe_latency_ms": best["probe_latency_ms"],
                "fleet_cpu_share": best["cpu_s"].get("fleet", 0.0) / best["cpu_window_s"],
            },
            "pipeline_component": phase.pipeline_component,
            "lost_samples_total": sum(s["lost_samples"] for s in phase.steps),
        }

    def _alarm_probe(self, ingest: IngestChild, admin_key: str, phase: Phase, rate: float) -> dict[str, Any]:
        """Probe vehicles report an over-temperature from a known instant at `rate` (80 % of the maximum)."""
        headers = {"Authorization": f"Bearer {admin_key}"}
        paths = ingest.client.get("/openapi.json").json().get("paths", {})
        if "/v1/alarms" not in paths:
            return {"measured": False, "reason": "this build serves no GET /v1/alarms (hazard rules not wired in)"}
        cfg = self.config
        # The step's load comes from just enough vehicles to report every ALARM_REPORT_INTERVAL_S (as a deployed
        # agent would): spread over the whole fleet, each would report once in minutes and a rule's hold time would
        # span messages minutes apart.
        active = min(cfg.vehicles, max(ALARM_PROBE_VEHICLES, round(rate * ALARM_REPORT_INTERVAL_S)))
        count = min(ALARM_PROBE_VEHICLES, active)
        probes = sorted({(i * active) // count for i in range(count)})
        if "/v1/vehicles/{vin}/profile" in paths:
            for i in probes:
                body = {"model": fleet_variant(i), "chemistry": "NMC"}
                r = ingest.client.put(f"/v1/vehicles/{fleet_vin(i)}/profile", json=body, headers=headers)
                if r.status_code >= 400:
                    log.warning("probe profile refused", extra={"status": r.status_code, "body": r.text[:200]})
        probe_vins = {fleet_vin(i) for i in probes}
        since_ms = int(time.time() * 1000)
        onset: list[int] = []
        sightings: dict[tuple[str, int], tuple[float, int]] = {}  # (vin, alarm id) → (first seen, opened_ms)
        rule_of: dict[tuple[str, int], str] = {}
        created: dict[tuple[str, int], int] = {}  # the service clock when the alarm's row was inserted
        poll_s: list[float] = []  # how long each GET /v1/alarms took to answer
        stop = threading.Event()
        errors = [0]

        def poll() -> None:
            with httpx.Client(base_url=ingest.api, headers=headers, timeout=5.0) as client:
                while not stop.wait(0.05):
                    asked = time.perf_counter()
                    try:
                        r = client.get("/v1/alarms", params={"from_ms": since_ms, "limit": 500})
                        r.raise_for_status()
                    except httpx.HTTPError:
                        errors[0] += 1
                        continue
                    now = time.time()
                    poll_s.append(time.perf_counter() - asked)
                    for alarm in r.json():
                        key = (alarm.get("vin"), int(alarm.get("id", 0)))
                        if key[0] in probe_vins and key not in sightings:
                            sightings[key] = (now, int(alarm["opened_ms"]))
                            rule_of[key] = str(alarm.get("rule"))
                            created[key] = int(alarm.get("created_ms", 0))

        poller = threading.Thread(target=poll, name="alarm-probe", daemon=True)
        poller.start()
        sends: dict[str, list[int]] = {}

        def planned(p: dict[str, Any]) -> None:
            onset.append(int(p["inject_from_ms"]))
            sends.update(p["injected_sends"])

        after_s = 2.0
        # Long enough for the rule's hold time (5 s at level 3) plus a message interval after the onset.
        duration = max(cfg.step_s, 20.0)
        inject = {"after_s": after_s, "vehicles": probes, "values": {ALARM_SIGNAL: ALARM_TEMPERATURE_C}}
        try:
            step = self._run_step(phase, rate, inject=inject, duration_s=duration, on_planned=planned, active=active)
            deadline = time.monotonic() + 10.0
            while len({v for v, _ in sightings}) < len(probes) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            poller.join(timeout=10)
        first: dict[str, tuple[float, int, int]] = {}
        for (vin, _id), (seen, opened_ms) in sorted(sightings.items(), key=lambda kv: kv[1][1]):
            # The probe's own alarms: a battery-temperature rule, raised at or after the injected onset (rides and
            # sparse reporting raise others: offline, speed limiter, ...).
            if onset and opened_ms >= onset[0] and vin not in first and rule_of.get((vin, _id)) in ALARM_RULES:
                first[vin] = (seen, opened_ms, created[(vin, _id)])
        # The rule raises the alarm when the message carrying the sample at `opened_ms` arrives: the vehicle's first
        # message whose newest sample (its send time) is not older than that sample. Latency counts from its sending.
        # Split at the alarm row's insertion (the ingest's clock, the same machine's): before it the broker, the
        # bridge's queue and the ingest call up to the rule; after it the rest of that call, its commit and the poll.
        latencies, to_insert, after_insert = [], [], []
        for vin, (seen, opened_ms, created_ms) in first.items():
            carrier = min((ms for ms in sends.get(vin, []) if ms >= opened_ms), default=None)
            if carrier is not None:
                latencies.append(seen - carrier / 1000)
                to_insert.append((created_ms - carrier) / 1000)
                after_insert.append(seen - created_ms / 1000)
        rules = sorted(set(rule_of.values()))
        return {
            "measured": bool(latencies),
            "reason": None if latencies else f"no probe alarm of {sorted(ALARM_RULES)} became visible",
            "offered_samples_per_s": rate * SAMPLES_PER_MESSAGE,
            "probe_vehicles": len(probes),
            "reporting_vehicles": active,
            "alarms_seen": len(first),
            "rules": rules,
            "onset_ms": onset[0] if onset else None,
            "latency_ms": percentiles_ms(latencies),
            "send_to_insert_ms": percentiles_ms(to_insert),
            "insert_to_seen_ms": percentiles_ms(after_insert),
            "poll_answer_ms": percentiles_ms(poll_s),
            "poll_errors": errors[0],
            "step": step,
        }

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.config
        tmp = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="zhilian-loadbench-"))
        tmp.mkdir(parents=True, exist_ok=True)
        self.results = results = {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_description(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "samples_per_message": SAMPLES_PER_MESSAGE,
            "runs": {},
        }
        # Every connection is a descriptor in the fleet and in the broker (which inherits this limit).
        results["nofile_limit"] = raise_nofile_limit(cfg.vehicles + 1024)
        steps = cfg.max_steps + cfg.refine_steps
        try:
            with contextlib.ExitStack() as stack:
                self._progress = stack.enter_context(
                    Progress(
                        TextColumn("[bold]{task.description}"),
                        BarColumn(),
                        TextColumn("{task.completed}/{task.total} steps"),
                        TimeElapsedColumn(),
                        console=self.console,
                    )
                )
                self._steps_total = steps * (3 if cfg.nodered else 1)
                self._task = self._progress.add_task("starting", total=self._steps_total)
                stack.callback(self.rss.close)
                broker = stack.enter_context(MosquittoProcess(tmp / "mosquitto"))
                influx: InfluxProcess | None = None
                if cfg.store == "influx":
                    influx = stack.enter_context(InfluxProcess(tmp / "influxd"))
                    influx.query(f'CREATE DATABASE "{INFLUX_DB}"')
                    self.landing = InfluxLanding(influx)
                else:
                    self.landing = SqliteLanding(tmp / "ingest" / "telemetry.db")
                stack.callback(self.landing.close)
                installer = _NodeRedInstaller(cfg.nodered_prefix) if cfg.nodered and influx is not None else None
                admin_key = self._start_fleet(stack, tmp, broker)
                self._phase_ours(tmp, broker, influx, admin_key)
                if installer is not None and influx is not None:
                    self._phases_nodered(tmp, broker, influx, installer)
                else:
                    why = "disabled" if not cfg.nodered else "the Node-RED baseline writes to InfluxDB; store is SQLite"
                    results["nodered"] = {"skipped": why}
                self._progress.update(self._task, total=self._steps_done)
                self._say("done")
        finally:
            if not cfg.keep_workdir and cfg.workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
        results["comparison"] = compare(results)
        results["workdir"] = str(tmp) if cfg.keep_workdir or cfg.workdir else None
        return results

    def _start_fleet(self, stack: contextlib.ExitStack, tmp: Path, broker: MosquittoProcess) -> str:
        """Fleet child up and connected, its keys registered (meanwhile); returns the bench's admin API key."""
        cfg = self.config
        self._say(f"starting a fleet of {cfg.vehicles:,} and registering its keys")
        fleet = self.fleet = FleetControl(cfg.vehicles, cfg.seed, 1, broker.host, broker.port, tmp / "fleet.log")
        stack.callback(lambda: self.results.__setitem__("fleet_counters", fleet.close()))
        t_reg = time.monotonic()
        admin_key = register_fleet(tmp / "ingest", cfg.vehicles, cfg.seed)
        registration_s = time.monotonic() - t_reg
        fleet.wait_ready()
        fleet.send({"op": "connect", "wave": 500})
        connected = fleet.expect("connected", timeout=600)
        self.results["fleet"] = info = {
            "vehicles": cfg.vehicles,
            "connections": connected["vehicles"],
            "connect_s": connected["seconds"],
            "setup_cpu_s": fleet.setup["setup_cpu_s"],
            "rss_mb_connected": (proc_status_kb(fleet.pid, "VmRSS") or 0) / 1024,
            "registration_s": registration_s,
        }
        self.console.log(
            f"{info['connections']:,} vehicles connected in {info['connect_s']:.1f}s (fleet RSS "
            f"{info['rss_mb_connected']:.0f} MB); keys registered in {registration_s:.1f}s"
        )
        return admin_key

    def _base_pids(self, broker: MosquittoProcess, influx: InfluxProcess | None) -> Pids:
        assert broker.proc is not None and self.fleet is not None
        pids = {"mosquitto": (broker.proc.pid,), "fleet": (self.fleet.pid,)}
        if influx is not None and influx.proc is not None:
            pids["influxd"] = (influx.proc.pid,)
        return pids

    def _phase_ours(self, tmp: Path, broker: MosquittoProcess, influx: InfluxProcess | None, admin_key: str) -> None:
        cfg, results = self.config, self.results
        n = cfg.ingest_workers
        self._say(f"starting ingest (zhilian serve × {n})")
        # Several workers: the same data dir (registry, ledger, rule state; SQLite serialises their writes), each
        # with its own MQTT session in one shared subscription, as the scale path deploys them (DESIGN.md).
        # Started one after the other: the first migrates the database.
        group = "zhilian-bench" if n > 1 else None
        workers: list[IngestChild] = []
        try:
            for k in range(1, n + 1):
                log_path = tmp / ("ingest.log" if k == 1 else f"ingest-{k}.log")
                workers.append(IngestChild(tmp / "ingest", broker, influx.url if influx else None, log_path, k, group))
                workers[-1].wait_ready()
            ingest = workers[0]
            pids = self._base_pids(broker, influx) | {"ingest": tuple(w.pid for w in workers)}
            self.rss.watch(pids)

            def metrics() -> list[str]:
                return [w.metrics() for w in workers]

            ours = Phase("zhilian", "signed", OUR_MEASUREMENT, pids, "ingest", metrics=metrics)
            self._ramp(ours, cfg.start_rate)
            run = results["runs"]["zhilian"] = self.summarize(ours)
            run["ingest_workers"] = n
            stats = [
                w.client.get("/v1/ingest/stats", headers={"Authorization": f"Bearer {admin_key}"}).json()
                for w in workers
            ]
            run["ingest_stats"] = added_up(stats)
            run["stored_per_worker"] = [s.get("stored", 0) for s in stats]
            best = run["max_sustained_samples_per_s"] / SAMPLES_PER_MESSAGE
            if cfg.alarm_probe and best > 0:
                self._say("alarm probe at 80 % of the maximum")
                results["alarm_latency"] = self._alarm_probe(ingest, admin_key, ours, 0.8 * best)
            else:
                results["alarm_latency"] = {"measured": False, "reason": "alarm probe disabled or no sustained rate"}
            results["components_total"] = {
                name: {
                    "cpu_s": group_cpu_s(group),
                    "peak_rss_mb": sum(proc_status_kb(pid, "VmHWM") or 0 for pid in group) / 1024,
                }
                for name, group in pids.items()
            }
        finally:
            for w in workers:
                w.stop()
        if cfg.profile_messages > 0:
            self._say("profiling the pipeline in-process (cProfile)")
            options = {"influx_url": influx.url, "influx_db": "zhilian_profile"} if influx is not None else {}
            results["pipeline_profile"] = profile_pipeline(options, cfg.seed, cfg.profile_messages)

    def _phases_nodered(
        self, tmp: Path, broker: MosquittoProcess, influx: InfluxProcess, installer: _NodeRedInstaller
    ) -> None:
        from zhilian.nodered import FlowConfig, FlowMode, NodeRedError, NodeRedProcess, build_flows

        results = self.results
        self._say("waiting for the Node-RED install")
        install = installer.wait()
        if install is None:
            results["nodered"] = {"skipped": installer.error}
            return
        results["nodered"] = {
            "version": install.version,
            "influx_node_version": install.influx_node_version,
            "node_version": install.node_version,
        }
        modes: tuple[FlowMode, ...] = ("standard", "tuned")
        for mode in modes:
            name = f"nodered_{mode}"
            flow = FlowConfig(
                mode,
                broker.host,
                broker.port,
                influx.host,
                influx.port,
                INFLUX_DB,
                f"nr_{mode}",
                group_size=self.config.nodered_group,
            )
            self._say(f"starting Node-RED ({mode} flow)")
            nr = NodeRedProcess(tmp / name, install, build_flows(flow))
            try:
                nr.start()
                pids = self._base_pids(broker, influx) | {"node-red": (nr.pid,)}
                self.rss.watch(pids)
                phase = Phase(name, "json", f"nr_{mode}", pids, "node-red")
                self._ramp(phase, self.config.nodered_start_rate)
                run = results["runs"][name] = self.summarize(phase)
                run["errors_logged"] = nr.errors_logged()
                run["peak_rss_mb_total"] = (proc_status_kb(nr.pid, "VmHWM") or 0) / 1024
            except NodeRedError as exc:
                results["runs"][name] = {"error": str(exc)}
            finally:
                nr.stop()


class _NodeRedInstaller:
    """`ensure_installed` in a thread, so a first-use npm install overlaps our own phase."""

    def __init__(self, prefix: Path | None) -> None:
        self.prefix = prefix
        self.install: Any = None
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="node-red-install", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from zhilian.nodered import NodeRedError, ensure_installed

        try:
            self.install = ensure_installed(self.prefix)
        except NodeRedError as exc:
            self.error = str(exc)

    def wait(self, timeout: float = 900.0) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = f"Node-RED install still running after {timeout:.0f}s"
            return None
        return self.install


# --- comparison, report, plot -------------------------------------------------------------------------------------


def compare(results: dict[str, Any]) -> dict[str, Any]:
    """Our figures against Node-RED's and the issue's targets (`met`: None when a figure is missing)."""
    runs = results.get("runs", {})
    ours = runs.get("zhilian", {})
    out: dict[str, Any] = {}
    our_rate = ours.get("max_sustained_samples_per_s", 0.0)
    our_cpu = (ours.get("at_max") or {}).get("pipeline_cpu_us_per_sample")
    for mode, target in (("standard", TARGET_VS_STANDARD), ("tuned", TARGET_VS_TUNED)):
        nr = runs.get(f"nodered_{mode}", {})
        nr_rate = nr.get("max_sustained_samples_per_s")
        ratio = our_rate / nr_rate if nr_rate else None
        nr_cpu = (nr.get("at_max") or {}).get("pipeline_cpu_us_per_sample")
        cpu_ratio = our_cpu / nr_cpu if our_cpu and nr_cpu else None
        out[f"vs_nodered_{mode}"] = {
            "ours_samples_per_s": our_rate,
            "nodered_samples_per_s": nr_rate,
            "ratio": ratio,
            "target_ratio": target,
            "met": None if ratio is None else ratio >= target,
            "ours_cpu_us_per_sample": our_cpu,
            "nodered_cpu_us_per_sample": nr_cpu,
            "cpu_ratio": cpu_ratio,
            "target_cpu_ratio": TARGET_CPU_SHARE,
            "cpu_met": None if cpu_ratio is None else cpu_ratio <= TARGET_CPU_SHARE,
        }
    alarm = results.get("alarm_latency", {})
    p99 = (alarm.get("latency_ms") or {}).get("p99")
    out["alarm_latency_p99_ms"] = {
        "value": p99,
        "target_ms": TARGET_ALARM_P99_S * 1000,
        "met": None if p99 is None else p99 < TARGET_ALARM_P99_S * 1000,
        "note": alarm.get("reason"),
    }
    conns = results.get("fleet", {}).get("connections")
    out["connections"] = {
        "value": conns,
        "target": TARGET_CONNECTIONS,
        "met": None if conns is None else conns >= TARGET_CONNECTIONS,
    }
    shares = [
        s["cpu_s"].get("fleet", 0.0) / s["cpu_window_s"]
        for r in runs.values()
        for s in r.get("steps", [])
        if s["cpu_window_s"]
    ]
    lags = [s["fleet"]["lag_ms_p99"] for r in runs.values() for s in r.get("steps", [])]
    out["generator"] = {
        "max_fleet_cpu_share_of_a_core": max(shares, default=None),
        "max_send_lag_p99_ms": max(lags, default=None),
    }
    return out


def write_plot(results: dict[str, Any], path: Path) -> Path:
    """Throughput and latency against offered load, ours vs Node-RED (matplotlib, imported here: dev dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("runs", {})
    styles = {"zhilian": ("tab:blue", "zhilian"), "nodered_standard": ("tab:red", "Node-RED standard"),
              "nodered_tuned": ("tab:orange", "Node-RED tuned (join 100)")}  # fmt: skip
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    top = 0.0
    for name, (color, label) in styles.items():
        steps = sorted(runs.get(name, {}).get("steps", []), key=lambda s: s["offered_samples_per_s"])
        if not steps:
            continue
        x = [s["offered_samples_per_s"] / 1000 for s in steps]
        top = max(top, *x)
        ax1.plot(x, [s["landed_samples_per_s"] / 1000 for s in steps], "o-", color=color, label=label)
        for s, xi in zip(steps, x, strict=True):
            if not s["sustained"]:
                ax1.plot([xi], [s["landed_samples_per_s"] / 1000], "x", color="black", markersize=9)
        own = [(xi, s["latency_ms"].get("p99")) for s, xi in zip(steps, x, strict=True) if s["latency_ms"].get("p99")]
        if own:
            ax2.plot(*zip(*own, strict=True), "o-", color=color, label=f"{label}: p99 (pipeline histogram)")
        probe = [
            (xi, s["probe_latency_ms"].get("p99"))
            for s, xi in zip(steps, x, strict=True)
            if s["probe_latency_ms"].get("p99")
        ]
        if probe:
            ax2.plot(*zip(*probe, strict=True), "s--", color=color, alpha=0.7, label=f"{label}: p99 (store probe)")
    ax1.plot([0.1, top], [0.1, top], ":", color="grey", label="landed = offered")
    # Log axes: the pipelines compared may differ by more than an order of magnitude.
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax2.set_xscale("log")
    ax1.set_xlabel("offered load (k samples/s)")
    ax1.set_ylabel("landed within the step + grace (k samples/s)")
    ax1.set_title("Throughput (x: step not sustained)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("offered load (k samples/s)")
    ax2.set_ylabel("sample taken → stored, p99 (ms)")
    ax2.set_yscale("log")
    ax2.set_title("End-to-end latency")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3, which="both")
    machine = results.get("machine", {})
    fig.suptitle(
        f"zhilian bench — {results.get('fleet', {}).get('connections', '?')} vehicles, 10 samples/message, "
        f"{machine.get('cores')}× {machine.get('cpu')}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, spec: str = ",.0f") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec)


def _step_table(run: dict[str, Any]) -> list[str]:
    steps = sorted(run.get("steps", []), key=lambda s: s["offered_samples_per_s"])
    if not steps:
        return []
    comps = sorted(steps[0]["cpu_s"])
    lines = [
        "| offered samples/s | landed/s | sustained | late | lost | latency p50 / p99 ms (pipeline) "
        f"| p50 / p99 ms (store probe) | {run.get('pipeline_component')} CPU µs/sample "
        f"| CPU s ({', '.join(comps)}) |",
        "|---:|---:|:-:|---:|---:|---:|---:|---:|---|",
    ]
    for s in steps:
        lat, probe = s["latency_ms"], s["probe_latency_ms"]
        cpu = ", ".join(f"{s['cpu_s'][k]:.1f}" for k in comps)
        lines.append(
            f"| {_fmt(s['offered_samples_per_s'])} | {_fmt(s['landed_samples_per_s'])} | {_fmt(s['sustained'])} "
            f"| {s['late_samples']} | {s['lost_samples']} "
            f"| {_fmt(lat.get('p50'), '.0f')} / {_fmt(lat.get('p99'), '.0f')} "
            f"| {_fmt(probe.get('p50'), '.0f')} / {_fmt(probe.get('p99'), '.0f')} "
            f"| {_fmt(s['pipeline_cpu_us_per_sample'], '.1f')} | {cpu} |"
        )
    return lines


def _target_rows(comp: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | met |", "|---|---:|:-:|"]
    for mode in ("standard", "tuned"):
        c = comp.get(f"vs_nodered_{mode}", {})
        lines.append(
            f"| landed samples/s ≥ {c.get('target_ratio')}× Node-RED {mode} | {_fmt(c.get('ratio'), '.2f')}× "
            f"({_fmt(c.get('ours_samples_per_s'))} vs {_fmt(c.get('nodered_samples_per_s'))}) | {_fmt(c.get('met'))} |"
        )
        lines.append(
            f"| CPU per landed sample ≤ 1/3 of Node-RED {mode} | {_fmt(c.get('cpu_ratio'), '.2f')} "
            f"({_fmt(c.get('ours_cpu_us_per_sample'), '.1f')} vs {_fmt(c.get('nodered_cpu_us_per_sample'), '.1f')} "
            f"µs) | {_fmt(c.get('cpu_met'))} |"
        )
    a = comp.get("alarm_latency_p99_ms", {})
    measured = f"{a['value']:.0f} ms" if a.get("value") is not None else f"not measured: {a.get('note')}"
    lines.append(f"| alarm latency p99 < 1 s at 80 % load | {measured} | {_fmt(a.get('met'))} |")
    c = comp.get("connections", {})
    lines.append(f"| ≥ 10,000 vehicles, own connections, one process | {_fmt(c.get('value'))} | {_fmt(c.get('met'))} |")
    return lines


def markdown_report(results: dict[str, Any], plot: Path | None) -> str:
    m = results.get("machine", {})
    cfg = results.get("config", {})
    fleet = results.get("fleet", {})
    lines = [
        f"### {results.get('started', '')[:10]} — end-to-end load benchmark (`zhilian bench`)",
        "",
        f"Machine: {m.get('cores')} × {m.get('cpu')}, {m.get('memory_gib')} GiB, kernel {m.get('kernel')}, "
        f"CPython {m.get('python')}, {m.get('mosquitto')}, {m.get('influxd')}, Node.js {m.get('node')}; "
        f"load average at start {m.get('load_average_at_start')}.",
        f"Fleet: {fleet.get('connections', 0):,} vehicles, one MQTT connection each from one process (connected in "
        f"{_fmt(fleet.get('connect_s'), '.1f')} s, fleet RSS {_fmt(fleet.get('rss_mb_connected'), '.0f')} MB); "
        f"{SAMPLES_PER_MESSAGE} samples per message; steps of {cfg.get('step_s')} s, sustained = every sample landed "
        f"within {cfg.get('grace_s')} s after the step; store {cfg.get('store')}.",
        "",
    ]
    for name, run in results.get("runs", {}).items():
        if "error" in run:
            lines += [f"**{name}**: failed — {run['error']}", ""]
            continue
        workers = run.get("ingest_workers", 1)
        on = f" ({workers} ingest workers on one shared subscription)" if workers > 1 else ""
        lines += [f"**{name}**{on} — max sustained {_fmt(run.get('max_sustained_samples_per_s'))} samples/s", ""]
        lines += [*_step_table(run), ""]
    lines += _target_rows(results.get("comparison", {}))
    alarm = results.get("alarm_latency") or {}
    if alarm.get("measured"):

        def p50_p99(key: str) -> str:
            d = alarm.get(key) or {}
            return f"{_fmt(d.get('p50'), '.0f')} / {_fmt(d.get('p99'), '.0f')} ms"

        lines += [
            "",
            f"Alarm probe: {alarm.get('probe_vehicles')} probe vehicles among {alarm.get('reporting_vehicles')} "
            f"reporting at {_fmt(alarm.get('offered_samples_per_s'))} samples/s; p50 / p99: message sent → alarm "
            f"row inserted {p50_p99('send_to_insert_ms')}, inserted → seen through the API "
            f"{p50_p99('insert_to_seen_ms')} (GET /v1/alarms answered in {p50_p99('poll_answer_ms')}, polled every"
            " 50 ms).",
        ]
    g = results.get("comparison", {}).get("generator", {})
    lines += [
        "",
        f"Load generator: at most {_fmt(g.get('max_fleet_cpu_share_of_a_core'), '.0%')} of a core while sending, "
        f"send lag p99 ≤ {_fmt(g.get('max_send_lag_p99_ms'), '.1f')} ms (messages signed ahead of each step).",
    ]
    micro = results.get("micro") or {}
    if micro:
        sizes = micro.get("sizes", {})
        lines += [
            "",
            f"Per message of this bench (10 samples; signed envelope {sizes.get('signed_envelope_bytes', 0):.0f} B, "
            f"JSON {sizes.get('json_bytes', 0):.0f} B), CPU µs, best of 3:",
            "",
            "| case | µs / message | µs / sample |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {r['us_per_message']:.1f} | {r['us_per_sample']:.1f} |"
            for name, r in micro.items()
            if name != "sizes"
        ]
    if plot is not None:
        lines += ["", f"Plot: `{plot}`."]
    return "\n".join(lines) + "\n"


def append_report(md_path: Path, text: str) -> None:
    with open(md_path, "a", encoding="utf-8") as f:
        f.write("\n\n" + text)


def print_summary(console: Console, results: dict[str, Any]) -> None:
    table = Table(title="zhilian bench — end to end")
    for col in ("pipeline", "max sustained samples/s", "pipeline CPU µs/sample", "p99 latency ms", "lost"):
        table.add_column(col, justify="left" if col == "pipeline" else "right")
    for name, run in results.get("runs", {}).items():
        if "error" in run:
            table.add_row(name, "error", "", "", "")
            continue
        at = run.get("at_max") or {}
        p99 = (at.get("latency_ms") or {}).get("p99") or (at.get("probe_latency_ms") or {}).get("p99")
        table.add_row(
            name,
            _fmt(run.get("max_sustained_samples_per_s")),
            _fmt(at.get("pipeline_cpu_us_per_sample"), ".1f"),
            _fmt(p99, ".0f"),
            str(run.get("lost_samples_total", 0)),
        )
    console.print(table)


def run_loadbench(config: LoadBenchConfig, console: Console | None = None) -> dict[str, Any]:
    return LoadBench(config, console).run()


__all__ = [
    "LoadBench",
    "LoadBenchConfig",
    "LoadBenchError",
    "RampPlanner",
    "append_report",
    "compare",
    "histogram_percentiles",
    "markdown_report",
    "run_loadbench",
    "write_plot",
]
