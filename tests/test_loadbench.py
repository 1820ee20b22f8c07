"""The end-to-end load benchmark: its ramp, its latency arithmetic, the Node-RED flow it generates, and a tiny run
of the whole chain (SQLite store, no Node-RED) that writes the JSON and the plot."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from typer.testing import CliRunner

from cloud_ingest.pipeline import SAMPLE_AGE_BUCKETS_S
from zhilian.cli import app
from zhilian.loadbench import RampPlanner, added_up, histogram_buckets, histogram_percentiles, markdown_report
from zhilian.nodered import FUNCTION_BODY, FlowConfig, build_flows, settings_js

# --- the ramp ----------------------------------------------------------------------------------------------------


@given(
    capacity=st.floats(1.0, 50_000.0),
    start=st.floats(10.0, 5_000.0),
    growth=st.floats(1.2, 2.0),
    refine=st.integers(0, 3),
)
def test_ramp_brackets_the_capacity_and_never_overstates_it(
    capacity: float, start: float, growth: float, refine: int
) -> None:
    ramp = RampPlanner(start, growth, max_steps=12, refine_steps=refine, max_rate=100_000.0)
    tried = []
    while (rate := ramp.next_rate()) is not None:
        tried.append(rate)
        ramp.record(rate, rate <= capacity)
        assert len(tried) <= 12 + refine
    if ramp.best is not None:
        assert ramp.best <= capacity
    if ramp.worst is not None:
        assert ramp.worst > capacity
    if ramp.best is not None and ramp.worst is not None:
        # Each bisection halves the bracket's log-width, down to the 5 % at which it stops.
        assert ramp.worst / ramp.best <= max(1.05, max(growth, 2.0) ** (1 / 2**refine)) + 1e-9
    elif capacity >= start:
        assert ramp.best is not None  # a sustainable start is never reported as nothing sustained


def test_ramp_goes_down_when_the_first_step_fails() -> None:
    ramp = RampPlanner(1000.0, 1.5, max_steps=8, refine_steps=1, max_rate=20_000.0)
    rates = []
    while (rate := ramp.next_rate()) is not None:
        rates.append(rate)
        ramp.record(rate, rate <= 300.0)
    assert rates == pytest.approx([1000.0, 500.0, 250.0, math.sqrt(250.0 * 500.0)])
    assert ramp.best == 250.0
    assert ramp.worst == pytest.approx(math.sqrt(250.0 * 500.0))


# --- the pipeline's latency histogram ----------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    before=st.lists(st.floats(0.0, 200.0), max_size=50),
    during=st.lists(st.floats(0.0, 200.0), min_size=1, max_size=300),
)
def test_histogram_percentiles_fall_in_the_bucket_of_the_true_percentile(
    before: list[float], during: list[float]
) -> None:
    registry = CollectorRegistry()
    hist = Histogram("zhilian_ingest_sample_age_seconds", "t", buckets=SAMPLE_AGE_BUCKETS_S, registry=registry)
    for v in before:
        hist.observe(v)
    snap0 = histogram_buckets(generate_latest(registry).decode())
    for v in during:
        hist.observe(v)
    got = histogram_percentiles(snap0, histogram_buckets(generate_latest(registry).decode()))
    assert got["count"] == len(during)
    assert got["p50"] <= got["p95"] <= got["p99"]
    bounds = [0.0, *SAMPLE_AGE_BUCKETS_S]
    ordered = sorted(during)
    for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        true = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
        hi = next(b for b in SAMPLE_AGE_BUCKETS_S if true <= b)
        lo = max(b for b in bounds if b < hi) if hi > 0 else 0.0
        assert lo * 1000 - 1e-6 <= got[key] <= hi * 1000 + 1e-6, (key, true, got)


@settings(max_examples=50, deadline=None)
@given(
    split=st.lists(st.tuples(st.floats(0.0, 200.0), st.booleans()), max_size=100),
)
def test_workers_histograms_add_up_to_one_over_all_their_observations(split: list[tuple[float, bool]]) -> None:
    def exposition(values: list[float]) -> str:
        registry = CollectorRegistry()
        hist = Histogram("zhilian_ingest_sample_age_seconds", "t", buckets=SAMPLE_AGE_BUCKETS_S, registry=registry)
        for v in values:
            hist.observe(v)
        return generate_latest(registry).decode()

    first = [v for v, second in split if not second]
    second = [v for v, second in split if second]
    assert histogram_buckets([exposition(first), exposition(second)]) == histogram_buckets(
        exposition([v for v, _ in split])
    )


def test_workers_stats_are_added_up_by_key() -> None:
    a = {"stored": 3, "duplicate": 0, "rejected": {"bad_signature": 1}, "invalid_values": {}}
    b = {"stored": 4, "duplicate": 1, "rejected": {"bad_signature": 2, "replay": 1}, "invalid_values": {"x": 1}}
    assert added_up([a, b]) == {
        "stored": 7,
        "duplicate": 1,
        "rejected": {"bad_signature": 3, "replay": 1},
        "invalid_values": {"x": 1},
    }


def test_no_new_observations_means_no_percentiles() -> None:
    snap = [(0.1, 3.0), (float("inf"), 4.0)]
    assert histogram_percentiles(snap, snap) == {}


# --- the Node-RED flow -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["standard", "tuned"])
def test_flow_generator_produces_a_valid_wired_flow(mode: str) -> None:
    cfg = FlowConfig(mode, "127.0.0.1", 1883, "127.0.0.1", 8086, "zhilian", f"nr_{mode}")  # type: ignore[arg-type]
    flows = json.loads(json.dumps(build_flows(cfg)))
    ids = [n["id"] for n in flows]
    assert len(ids) == len(set(ids))
    by_type = {n["type"]: n for n in flows}
    for node in flows:
        for outputs in node.get("wires", []):
            assert set(outputs) <= set(ids), node["id"]
        if "z" in node:
            assert node["z"] == by_type["tab"]["id"]
    assert by_type["mqtt in"]["qos"] == "1" and by_type["mqtt in"]["datatype"] == "json"
    assert by_type["mqtt in"]["topic"] == "nr/+/telemetry"
    assert by_type["influxdb batch"]["precision"] == "ms"
    assert by_type["influxdb"]["database"] == "zhilian"
    assert ("join" in by_type) == (mode == "tuned")
    if mode == "tuned":
        assert by_type["join"]["count"] == "100"
    text = settings_js(Path("/tmp/flows.json"), 1880)
    assert "httpAdminRoot: false" in text and "credentialSecret: false" in text


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_flow_function_turns_one_json_message_into_one_point_per_sample() -> None:
    cfg = FlowConfig("standard", "h", 1, "h", 2, "db", "nr_standard")
    func = next(n for n in build_flows(cfg) if n["type"] == "function")["func"]
    assert func.endswith(FUNCTION_BODY)
    msg = {"payload": {"vin": "LZHVF000000000001", "samples": [{"t": 1000, "s1": 29.5, "s20": 12.3}, {"t": 2000}]}}
    script = f"const msg = {json.dumps(msg)};\nconst out = (function () {{\n{func}\n}})();\n"
    script += "process.stdout.write(JSON.stringify(out.payload));\n"
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout) == [
        {
            "measurement": "nr_standard",
            "tags": {"vin": "LZHVF000000000001"},
            "fields": {"sample": True, "s1": 29.5, "s20": 12.3},
            "timestamp": 1000,
        },
        {
            "measurement": "nr_standard",
            "tags": {"vin": "LZHVF000000000001"},
            "fields": {"sample": True},
            "timestamp": 2000,
        },
    ]


# --- a tiny run of the whole chain -------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.e2e
def test_tiny_loadbench_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--vehicles", "40",
        "--store", "sqlite",
        "--step-seconds", "2",
        "--start-rate", "30",
        "--max-steps", "1",
        "--no-nodered",
        "--no-micro-section",
        "--no-alarm-probe",
        "--profile-messages", "40",
        "--no-report",
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {"machine", "config", "fleet", "runs", "comparison", "plot", "pipeline_profile"} <= doc.keys()
    assert doc["fleet"]["connections"] == 40
    run = doc["runs"]["zhilian"]
    assert len(run["steps"]) == 1
    for step in run["steps"]:
        assert {"offered_samples_per_s", "landed_samples_per_s", "sustained", "latency_ms", "cpu_s"} <= step.keys()
        assert set(step["cpu_s"]) == {"mosquitto", "ingest", "fleet"}
        # Nothing is lost, however slow a loaded machine makes it (the bench waits for the count to settle).
        assert step["lost_samples"] == 0
        assert step["landed_samples_final"] == step["sent_samples"] > 0
        assert step["fleet"]["unacked"] == 0
    # Two `zhilian serve` workers on one shared subscription (the default): both ingested, together everything.
    assert run["ingest_workers"] == 2 and len(run["stored_per_worker"]) == 2
    assert min(run["stored_per_worker"]) > 0
    assert run["ingest_stats"]["rejected"] == {}
    assert run["ingest_stats"]["duplicate"] == 0
    assert doc["pipeline_profile"]["outcomes"] == {"stored": 40}
    sent = sum(step["sent_samples"] for step in run["steps"]) // 10
    assert doc["fleet_counters"]["sent"] == doc["fleet_counters"]["acked"] == sent
    assert doc["nodered"] == {"skipped": "disabled"}
    assert doc["comparison"]["vs_nodered_standard"]["ratio"] is None
    plot = Path(doc["plot"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = markdown_report(doc, plot)
    assert "| offered samples/s |" in report and "not measured" in report
