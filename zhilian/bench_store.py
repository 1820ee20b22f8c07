"""Sustained-ingest benchmarks of the time-series backends: the SQLite store and InfluxDB (a private influxd).

Method: every sample carries the full catalogue (every signal filled, values changing from sample to sample);
`write_many` gets 200 batches of 30 samples per call (as the bridge hands the pipeline up to 256 messages), spread
over 100 vehicles, one call after the other, until `duration_s` have passed. Reported: samples/s and values/s,
and for InfluxDB the CPU seconds influxd and this process spent per 1,000 samples (both share the machine's cores).
The pipeline case runs signed envelopes through `IngestPipeline.ingest_many` (verify, dedupe, decode, validate,
store, ledger) into a service whose store is InfluxDB.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.table import Table

from cloud_ingest.influx_store import InfluxSettings, InfluxTimeSeriesStore
from cloud_ingest.retention import RetentionConfig
from cloud_ingest.routes_queries import DEFAULT_SNAPSHOT_SIGNALS
from cloud_ingest.tsstore import DEFAULT_TZ, BBox, SqliteTimeSeriesStore, TimeSeriesStore, day_bounds
from protocol import Batch, Catalogue, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope
from protocol.catalogue import SignalType
from zhilian.influx import InfluxError, InfluxProcess, find_influxd
from zhilian.serve import freeze_startup_heap

SAMPLES_PER_BATCH = 30
BATCHES_PER_CALL = 200
VEHICLES = 100
T0 = 1_767_225_600_000


def full_batch(cat: Catalogue, t0: int, seed: int, n: int = SAMPLES_PER_BATCH) -> Batch:
    """`n` samples at 1 Hz with every catalogue signal set to an in-range value that varies per sample."""
    cols: dict[str, list[Any]] = {}
    for sig in cat:
        if sig.type is SignalType.BOOL:
            cols[sig.name] = [(seed + i) % 3 == 0 for i in range(n)]
        elif sig.type is SignalType.INT:
            first, last = int(sig.min or 0), int(sig.max or 0)
            cols[sig.name] = [first + (seed + i) % (last - first + 1) for i in range(n)]
        elif sig.type is SignalType.FLOAT:
            lo, hi = sig.min or 0.0, sig.max or 0.0
            step = sig.resolution or 1.0
            span = max(1, int((hi - lo) / step))
            cols[sig.name] = [round(lo + ((seed * 7919 + i * 31) % span) * step, sig.decimals) for i in range(n)]
        else:
            cols[sig.name] = [f"ZH-{seed % VEHICLES:04d}-v1.2"] * n
    return Batch([t0 + 1000 * i for i in range(n)], cols)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _sustained(store: TimeSeriesStore, cat: Catalogue, duration_s: float, server_pid: int | None) -> dict[str, Any]:
    # Pre-built so the timed loop measures the store, not the benchmark's own value generation.
    templates = [full_batch(cat, 0, seed) for seed in range(BATCHES_PER_CALL)]
    vins = [f"LZHBENCH{v:09d}" for v in range(VEHICLES)]
    calls = samples = 0
    cpu0, server0 = time.process_time(), _proc_cpu_s(server_pid) if server_pid else 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        items = []
        for b, tpl in enumerate(templates):
            # Each call moves time forward: every sample is a new point, as in live ingest.
            t0 = T0 + (calls * BATCHES_PER_CALL // VEHICLES + b // VEHICLES) * SAMPLES_PER_BATCH * 1000
            items.append((vins[b % VEHICLES], Batch([t0 + ts for ts in tpl.timestamps], tpl.columns)))
        samples += store.write_many(items)
        calls += 1
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {
        "seconds": elapsed,
        "samples": samples,
        "samples_per_s": samples / elapsed,
        "values_per_s": samples * len(cat) / elapsed,
        "client_cpu_s_per_1k_samples": (time.process_time() - cpu0) / samples * 1000,
    }
    if server_pid:
        out["server_cpu_s_per_1k_samples"] = (_proc_cpu_s(server_pid) - server0) / samples * 1000
    return out


def _pipeline(service_options: dict[str, Any], cat: Catalogue, messages: int) -> dict[str, Any]:
    from cloud_ingest.service import IngestService

    key = DeviceKey.generate()
    vins = [f"LZHBENCHP{v:08d}" for v in range(VEHICLES)]
    with tempfile.TemporaryDirectory() as tmp:
        svc = IngestService.open(Path(tmp), **service_options)
        try:
            for vin in vins:
                svc.registry.register_device(vin, key.public_raw)
            wire = []
            for seq in range(messages):
                vin = vins[seq % VEHICLES]
                t0 = T0 + (seq // VEHICLES) * SAMPLES_PER_BATCH * 1000
                body = encode_batch(full_batch(cat, t0, seq), cat)
                env = Envelope(vin, key.key_id, 1, seq, t0, Kind.TELEMETRY, Flags.NONE, body)
                wire.append((vin, seal_envelope(env, key)))
            start = time.perf_counter()
            for i in range(0, messages, BATCHES_PER_CALL):
                results = svc.pipeline.ingest_many(wire[i : i + BATCHES_PER_CALL])
                assert all(r.outcome == "stored" for r in results), results[:3]
            elapsed = time.perf_counter() - start
        finally:
            svc.close()
    return {
        "seconds": elapsed,
        "samples": messages * SAMPLES_PER_BATCH,
        "samples_per_s": messages * SAMPLES_PER_BATCH / elapsed,
    }


def run_store_benchmarks(
    console: Console | None = None, duration_s: float = 30.0, scale_vehicles: int = 10_000, scale_samples: int = 30
) -> dict[str, Any]:
    """Sustained ingest per backend for `duration_s`, then the operator queries over `scale_vehicles` vehicles with
    `scale_samples` samples each plus a one-day 1 Hz track (0 vehicles: skip). The full 10 M-row run is
    `run_scale_benchmarks` with its defaults (`zhilian bench-store-scale`), which takes about ten minutes."""
    console = console or Console()
    cat = load_catalogue()
    results: dict[str, Any] = {"signals": len(cat), "samples_per_call": SAMPLES_PER_BATCH * BATCHES_PER_CALL}
    cases: dict[str, Callable[[Path], dict[str, Any]]] = {}

    def sqlite_case(tmp: Path) -> dict[str, Any]:
        store = SqliteTimeSeriesStore(tmp / "telemetry.db", cat)
        try:
            return _sustained(store, cat, duration_s, None)
        finally:
            store.close()

    def influx_case(tmp: Path) -> dict[str, Any]:
        with InfluxProcess(tmp / "influxd") as server:
            assert server.proc is not None
            store = InfluxTimeSeriesStore(InfluxSettings(server.url, database="bench"), cat, tmp / "quarantine.jsonl")
            try:
                out = _sustained(store, cat, duration_s, server.proc.pid)
                out.update(requests=store.stats()["requests"], retries=store.stats()["retries"])
            finally:
                store.close()
            out["pipeline"] = _pipeline({"influx_url": server.url, "influx_db": "bench_pipeline"}, cat, 2000)
            return out

    cases["SQLite store"] = sqlite_case
    try:
        find_influxd()
        cases["InfluxDB store"] = influx_case
    except InfluxError as exc:
        results["influx_skipped"] = str(exc)
    for name, case in cases.items():
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = case(Path(tmp))
    table = Table(
        title=f"sustained ingest, {len(cat)} signals per sample, {SAMPLES_PER_BATCH * BATCHES_PER_CALL} "
        "samples per write_many"
    )
    for col in ("backend", "samples / s", "values / s", "client CPU s / 1k samples", "server CPU s / 1k samples"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for name in cases:
        r = results[name]
        server = r.get("server_cpu_s_per_1k_samples")
        table.add_row(
            name,
            f"{r['samples_per_s']:,.0f}",
            f"{r['values_per_s']:,.0f}",
            f"{r['client_cpu_s_per_1k_samples']:.3f}",
            "-" if server is None else f"{server:.3f}",
        )
    if "InfluxDB store" in results:
        p = results["InfluxDB store"]["pipeline"]
        table.add_row("pipeline → InfluxDB (verify, decode, store)", f"{p['samples_per_s']:,.0f}", "", "", "")
    console.print(table)
    if scale_vehicles > 0:
        backends = ("sqlite", "influx") if "InfluxDB store" in cases else ("sqlite",)
        results["queries"] = run_scale_benchmarks(console, scale_vehicles, scale_samples, backends)
    return results


# -- operator queries at scale ------------------------------------------------------------------------------------

# What a vehicle reports every second (GNSS fix, controller status, BMS basic info): 30 of the catalogue's signals.
# Cell voltages, probes and configuration come far less often, so a fleet's rows are this wide, not 84 signals.
REALISTIC_SIGNALS = [
    "CurrentLocation.Latitude",
    "CurrentLocation.Longitude",
    "CurrentLocation.Altitude",
    "CurrentLocation.Heading",
    "CurrentLocation.GNSSReceiver.GroundSpeed",
    "CurrentLocation.GNSSReceiver.FixMode",
    "CurrentLocation.GNSSReceiver.HDOP",
    "CurrentLocation.GNSSReceiver.SatellitesUsed",
    "CurrentLocation.GNSSReceiver.BeiDouInUse",
    "CurrentLocation.GNSSReceiver.FixQuality",
    "CurrentLocation.GNSSReceiver.PDOP",
    "CurrentLocation.GNSSReceiver.VDOP",
    "Speed",
    "Powertrain.ElectricMotor.Speed",
    "Powertrain.ElectricMotor.Temperature",
    "Powertrain.ElectricMotor.ControllerTemperature",
    "Powertrain.ElectricMotor.PhaseCurrent",
    "Powertrain.ElectricMotor.SupplyCurrent",
    "Powertrain.ElectricMotor.FaultCode",
    "Chassis.Brake.IsEngaged",
    "Chassis.Accelerator.PedalPosition",
    "Powertrain.ElectricMotor.AssistLevel",
    "Powertrain.TractionBattery.StateOfCharge",
    "Powertrain.TractionBattery.CurrentVoltage",
    "Powertrain.TractionBattery.CurrentCurrent",
    "Powertrain.TractionBattery.Temperature.Max",
    "Powertrain.TractionBattery.Temperature.Min",
    "Powertrain.TractionBattery.CellVoltage.Max",
    "Powertrain.TractionBattery.CellVoltage.Min",
    "Powertrain.TractionBattery.ProtectionStatus",
]
SCALE_TEMPLATES = 64
TRACK_POINTS = 1000
QUERY_RUNS = 5


def _vehicle_origin(v: int) -> tuple[float, float]:
    """Spread over a 1.4° × 1.4° square around Shanghai, deterministically per vehicle."""
    return 30.5 + (v * 7919 % 10_000) / 10_000 * 1.4, 120.8 + (v * 104_729 % 10_000) / 10_000 * 1.4


class ScaleFleet:
    """A fleet whose rows are realistic (REALISTIC_SIGNALS, changing values, moving positions), cheap to make:
    every signal but the position comes from a few pre-built 30-sample templates."""

    def __init__(self, cat: Catalogue, vehicles: int, samples_per_vehicle: int, day: date, tz: str = DEFAULT_TZ):
        if samples_per_vehicle % SAMPLES_PER_BATCH or samples_per_vehicle > 86_400:
            raise ValueError(f"samples per vehicle must be a multiple of {SAMPLES_PER_BATCH}, at most 86,400")
        self.cat = Catalogue([cat.by_name(n) for n in REALISTIC_SIGNALS])
        self.vehicles = vehicles
        self.samples_per_vehicle = samples_per_vehicle
        self.day = day
        self.tz = tz
        self.day_start, self.day_end = day_bounds(day, tz)
        self.vins = [f"LZHSCALE{v:09d}" for v in range(vehicles)]
        self.track_vin = self.vins[0]  # rides the whole day at 1 Hz: 86,400 rows
        self.templates = [full_batch(self.cat, 0, seed) for seed in range(SCALE_TEMPLATES)]
        self.rows = (vehicles - 1) * samples_per_vehicle + 86_400

    def batch(self, v: int, t0: int, k: int) -> Batch:
        """The k-th 30-sample batch of vehicle v, starting at t0."""
        tpl = self.templates[(v + k) % SCALE_TEMPLATES]
        lat0, lon0 = _vehicle_origin(v)
        step = k * SAMPLES_PER_BATCH
        cols = dict(tpl.columns)
        cols["CurrentLocation.Latitude"] = [round(lat0 + (step + i) * 1e-5, 7) for i in range(SAMPLES_PER_BATCH)]
        cols["CurrentLocation.Longitude"] = [round(lon0 + (step + i) * 7e-6, 7) for i in range(SAMPLES_PER_BATCH)]
        return Batch([t0 + 1000 * i for i in range(SAMPLES_PER_BATCH)], cols)

    def calls(self, per_call: int = BATCHES_PER_CALL) -> Iterator[list[tuple[str, Batch]]]:
        """write_many arguments in time order, as live ingest hands them over: the tracked vehicle's day first
        (it starts at midnight), then the fleet, 30 seconds of every vehicle per round, ending at the day's end."""
        items: list[tuple[str, Batch]] = []
        for k in range(86_400 // SAMPLES_PER_BATCH):
            items.append((self.track_vin, self.batch(0, self.day_start + k * SAMPLES_PER_BATCH * 1000, k)))
            if len(items) == per_call:
                yield items
                items = []
        fleet_start = self.day_end - self.samples_per_vehicle * 1000
        for k in range(self.samples_per_vehicle // SAMPLES_PER_BATCH):
            t0 = fleet_start + k * SAMPLES_PER_BATCH * 1000
            for v in range(1, self.vehicles):
                items.append((self.vins[v], self.batch(v, t0, k)))
                if len(items) == per_call:
                    yield items
                    items = []
        if items:
            yield items


def _timed_cpu(fn: Callable[[], Any], runs: int = QUERY_RUNS, server_pid: int | None = None) -> dict[str, Any]:
    """First (cold) call, then `runs` more: wall-clock median and best, in ms; plus what the last call returned.

    Also the median CPU time of this process and of the server per call: on a machine shared with other work the
    wall clock includes waiting for a core, the CPU time does not (on an idle machine, wall ≈ the two added)."""
    times, cpu, server = [], [], []
    result = None
    for _ in range(runs + 1):
        cpu0, srv0 = time.process_time(), _proc_cpu_s(server_pid) if server_pid else 0.0
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - cpu0) * 1000)
        server.append((_proc_cpu_s(server_pid) - srv0) * 1000 if server_pid else 0.0)
    warm = sorted(times[1:])
    out = {
        "first_ms": times[0],
        "median_ms": warm[len(warm) // 2],
        "best_ms": warm[0],
        "cpu_ms": sorted(cpu[1:])[len(warm) // 2],
        "result": result,
    }
    if server_pid:
        out["server_cpu_ms"] = sorted(server[1:])[len(warm) // 2]
    return out


def _load(store: TimeSeriesStore, fleet: ScaleFleet, progress: Callable[[str], None]) -> dict[str, Any]:
    start = time.perf_counter()
    written = 0
    last_report = start
    for items in fleet.calls():
        written += store.write_many(items)
        now = time.perf_counter()
        if now - last_report > 30:
            progress(f"  {written:,} / {fleet.rows:,} rows, {written / (now - start):,.0f} rows/s")
            last_report = now
    elapsed = time.perf_counter() - start
    return {"rows": written, "seconds": elapsed, "rows_per_s": written / elapsed}


def _queries(store: TimeSeriesStore, fleet: ScaleFleet, app_client: Any, server_pid: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def timed(fn: Callable[[], Any], runs: int = QUERY_RUNS) -> dict[str, Any]:
        return _timed_cpu(fn, runs, server_pid)

    snap = timed(lambda: store.fleet_snapshot(DEFAULT_SNAPSHOT_SIGNALS))
    out["snapshot"] = {k: v for k, v in snap.items() if k != "result"} | {"vehicles": len(snap["result"])}
    if len(snap["result"]) != fleet.vehicles:
        raise RuntimeError(f"snapshot saw {len(snap['result'])} of {fleet.vehicles} vehicles")
    lean = timed(lambda: store.fleet_snapshot(DEFAULT_SNAPSHOT_SIGNALS[:1]))
    out["snapshot_1_signal"] = {k: v for k, v in lean.items() if k != "result"}
    box = BBox(min_lat=30.5, min_lon=120.8, max_lat=30.64, max_lon=121.0)  # about 1/50 of the fleet's square
    boxed = timed(lambda: store.fleet_snapshot(DEFAULT_SNAPSHOT_SIGNALS, bbox=box))
    out["snapshot_bbox"] = {k: v for k, v in boxed.items() if k != "result"} | {"vehicles": len(boxed["result"])}
    page = fleet.vins[: min(1000, fleet.vehicles)]
    paged = timed(lambda: store.fleet_snapshot((), vins=page))
    out["snapshot_1000_vins"] = {k: v for k, v in paged.items() if k != "result"}
    bucket = -(-(fleet.day_end - fleet.day_start) // TRACK_POINTS)
    track = timed(lambda: store.track(fleet.track_vin, fleet.day_start, fleet.day_end - 1, bucket))
    points = track["result"]
    out["track_day"] = {k: v for k, v in track.items() if k != "result"} | {
        "points": len(points),
        "samples": sum(p.samples for p in points),
    }
    if sum(p.samples for p in points) != 86_400:
        raise RuntimeError(f"the track saw {sum(p.samples for p in points)} of 86,400 fixes")
    daily = timed(lambda: store.daily(fleet.track_vin, fleet.day, fleet.tz), runs=2)
    out["daily"] = {k: v for k, v in daily.items() if k != "result"} | {"samples": daily["result"].samples}
    if app_client is not None:
        # The same through HTTP (in-process ASGI client): routing, validation and JSON of every vehicle included.
        r = timed(lambda: app_client.get("/v1/fleet/snapshot"))
        out["http_snapshot"] = {k: v for k, v in r.items() if k != "result"} | {"bytes": len(r["result"].content)}
        params = {"from": _iso(fleet.day_start), "to": _iso(fleet.day_end - 1), "points": TRACK_POINTS}
        r = timed(lambda: app_client.get(f"/v1/vehicles/{fleet.track_vin}/track", params=params))
        out["http_track"] = {k: v for k, v in r.items() if k != "result"} | {"bytes": len(r["result"].content)}
    return out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _app_client(store: TimeSeriesStore, cat: Catalogue, tmp: Path, track_vin: str) -> Any:
    """The query routes over `store`, authenticated by a real viewer key, with the tracked vehicle registered."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from cloud_ingest.db import Role, create_engine_for, init_db
    from cloud_ingest.registry import Registry
    from cloud_ingest.routes_queries import queries_router

    engine = create_engine_for(f"sqlite:///{tmp / 'registry.db'}")
    init_db(engine)
    registry = Registry(engine)
    registry.register_device(track_vin, DeviceKey.from_seed(b"\x01" * 32).public_raw)  # the same on a rerun
    key = registry.create_api_key(Role.VIEWER, "bench")

    def require(_role: Role) -> Callable[[], None]:
        def check() -> None:
            return None

        return check

    app = FastAPI()
    app.include_router(queries_router(store, registry, cat, require))
    return TestClient(app, headers={"X-API-Key": key})


def _sqlite_join_snapshot(path: str, cat: Catalogue, signals: list[str]) -> dict[str, Any]:
    """The alternative to the `latest` table, for the record: newest row per vehicle by an indexed max(ts) join
    (its values are those of the newest row only, not the last known ones)."""
    import sqlite3

    cols = ", ".join(f't."{cat.by_name(n).column}"' for n in signals)
    sql = (
        f"SELECT t.vin, t.ts, {cols} FROM telemetry t JOIN (SELECT vin, max(ts) AS ts FROM telemetry GROUP BY vin) m"
        " ON t.vin = m.vin AND t.ts = m.ts"
    )
    conn = sqlite3.connect(path)
    try:
        r = _timed_cpu(lambda: conn.execute(sql).fetchall(), runs=2)
    finally:
        conn.close()
    return {k: v for k, v in r.items() if k != "result"} | {"vehicles": len(r["result"])}


def run_scale_benchmarks(
    console: Console | None = None,
    vehicles: int = 10_000,
    samples_per_vehicle: int = 1_020,
    backends: Sequence[str] = ("sqlite", "influx"),
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Loads `vehicles` vehicles (`samples_per_vehicle` realistic 1 Hz samples each, one of them a whole day at
    1 Hz) into each backend with retention on, as deployed, then times the operator queries. With the defaults:
    10,285,380 rows, the acceptance's "≥ 10 M".

    `data_dir` keeps the data (default: a temporary directory): a later run with the same fleet size finds each
    backend's `loaded.json` there and only queries again (to re-measure on a quieter machine)."""
    console = console or Console()
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        return _run_scale(console, vehicles, samples_per_vehicle, backends, data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        return _run_scale(console, vehicles, samples_per_vehicle, backends, Path(tmp))


def _run_scale(
    console: Console, vehicles: int, samples_per_vehicle: int, backends: Sequence[str], root: Path
) -> dict[str, Any]:
    cat = load_catalogue()
    tz = DEFAULT_TZ
    # Yesterday in Shanghai: recent enough for a 30-day raw retention policy to accept every point.
    day = (datetime.now(ZoneInfo(tz)) - timedelta(days=1)).date()
    results: dict[str, Any] = {"vehicles": vehicles, "samples_per_vehicle": samples_per_vehicle, "tz": tz}
    retention = RetentionConfig()
    for backend in backends:
        if backend not in ("sqlite", "influx"):
            raise ValueError(f"unknown backend {backend!r}")
        if backend == "influx":
            try:
                find_influxd()
            except InfluxError as exc:
                results["influx_skipped"] = str(exc)
                continue
        work = root / backend
        work.mkdir(exist_ok=True)
        marker = work / "loaded.json"
        loaded = json.loads(marker.read_text()) if marker.exists() else None
        if loaded is not None and (loaded["vehicles"], loaded["samples_per_vehicle"]) == (
            vehicles,
            samples_per_vehicle,
        ):
            fleet = ScaleFleet(cat, vehicles, samples_per_vehicle, date.fromisoformat(loaded["day"]), tz)
        else:
            loaded = None
            fleet = ScaleFleet(cat, vehicles, samples_per_vehicle, day, tz)
        results.update(
            rows=fleet.rows, signals_per_row=len(REALISTIC_SIGNALS), day=fleet.day.isoformat(), track_samples=86_400
        )
        server: InfluxProcess | None = None
        store: TimeSeriesStore
        try:
            if backend == "sqlite":
                store = SqliteTimeSeriesStore(work / "telemetry.db", cat, retention)
            else:
                server = InfluxProcess(work / "influxd").start()
                store = InfluxTimeSeriesStore(
                    InfluxSettings(server.url, database="scale"), cat, work / "quarantine.jsonl", retention
                )
            out: dict[str, Any] = {}
            if loaded is None:
                console.print(f"[bold]{backend}[/]: loading {fleet.rows:,} rows of {vehicles:,} vehicles ...")
                out["load"] = _load(store, fleet, console.print)
                console.print(f"  loaded: {out['load']['rows_per_s']:,.0f} rows/s")
                marker.write_text(
                    json.dumps(
                        {"vehicles": vehicles, "samples_per_vehicle": samples_per_vehicle, "day": str(fleet.day)}
                    )
                )
            else:
                console.print(f"[bold]{backend}[/]: reusing the {fleet.rows:,} rows loaded in {work}")
            console.print("  querying ...")
            client = _app_client(store, cat, work, fleet.track_vin)
            # The queries run in the state `zhilian serve` runs them in: start-up's heap frozen.
            freeze_startup_heap()
            try:
                out["queries"] = _queries(store, fleet, client, server.proc.pid if server and server.proc else None)
            finally:
                client.close()
            if isinstance(store, SqliteTimeSeriesStore):
                out["sqlite_join_snapshot"] = _sqlite_join_snapshot(store.path, cat, DEFAULT_SNAPSHOT_SIGNALS)
                out["db_bytes"] = sum(p.stat().st_size for p in work.glob("telemetry.db*"))
            else:
                out["db_bytes"] = sum(p.stat().st_size for p in (work / "influxd").rglob("*") if p.is_file())
            store.close()
            results[backend] = out
        finally:
            if server is not None:
                server.stop()
    _scale_table(console, results)
    return results


def _scale_table(console: Console, results: dict[str, Any]) -> None:
    table = Table(
        title=f"operator queries over {results['rows']:,} rows ({results['vehicles']:,} vehicles, "
        f"{results['signals_per_row']} signals per row); wall-clock median of {QUERY_RUNS} after a first run, ms "
        "(CPU: this process + the server, per call)"
    )
    for col in ("case", "SQLite", "InfluxDB"):
        table.add_column(col, justify="left" if col == "case" else "right")

    def cell(backend: str, key: str) -> str:
        q = results.get(backend, {}).get("queries", {}).get(key)
        if q is None:
            return "-"
        cpu = q["cpu_ms"] + q.get("server_cpu_ms", 0.0)
        return f"{q['median_ms']:,.1f} (CPU {cpu:,.0f}, first {q['first_ms']:,.0f})"

    for key, label in (
        ("snapshot", "fleet snapshot, all vehicles, 6 signals"),
        ("snapshot_1_signal", "fleet snapshot, all vehicles, SOC only"),
        ("snapshot_bbox", "fleet snapshot in a bounding box"),
        ("snapshot_1000_vins", "positions of a 1,000-vehicle page"),
        ("track_day", "one-day 1 Hz track → 1,000 points"),
        ("daily", "daily aggregates of that day"),
        ("http_snapshot", "GET /v1/fleet/snapshot (HTTP, JSON)"),
        ("http_track", "GET /v1/vehicles/{vin}/track (HTTP, JSON)"),
    ):
        table.add_row(label, cell("sqlite", key), cell("influx", key))
    for backend in ("sqlite", "influx"):
        load = results.get(backend, {}).get("load")
        if load:
            table.add_row(f"load ({backend}), rows/s", f"{load['rows_per_s']:,.0f}", "")
    console.print(table)
