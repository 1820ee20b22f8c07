"""Sustained-ingest benchmarks of the time-series backends: the SQLite store and InfluxDB (a private influxd).

Method: every sample carries the full catalogue (every signal filled, values changing from sample to sample);
`write_many` gets 200 batches of 30 samples per call (as the bridge hands the pipeline up to 256 messages), spread
over 100 vehicles, one call after the other, until `duration_s` have passed. Reported: samples/s and values/s,
and for InfluxDB the CPU seconds influxd and this process spent per 1,000 samples (both share the machine's cores).
The pipeline case runs signed envelopes through `IngestPipeline.ingest_many` (verify, dedupe, decode, validate,
store, ledger) into a service whose store is InfluxDB.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from cloud_ingest.influx_store import InfluxSettings, InfluxTimeSeriesStore
from cloud_ingest.tsstore import SqliteTimeSeriesStore, TimeSeriesStore
from protocol import Batch, Catalogue, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope
from protocol.catalogue import SignalType
from zhilian.influx import InfluxError, InfluxProcess, find_influxd

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


def run_store_benchmarks(console: Console | None = None, duration_s: float = 30.0) -> dict[str, Any]:
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
    return results
