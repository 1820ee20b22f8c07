"""Benchmarks of the hot paths: envelope and batch codecs, and the ingest pipeline into SQLite.

Method: each case runs for at least `min_time` seconds after a warm-up; we report the median of 5 such rounds.
Numbers are machine-specific — record them in BENCHMARKS.md with the machine they came from.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from protocol import (
    Batch,
    DeviceKey,
    Envelope,
    Flags,
    Kind,
    decode_batch,
    encode_batch,
    load_catalogue,
    parse_envelope,
    seal_envelope,
)
from protocol.catalogue import SignalType

SAMPLES_PER_BATCH = 30


def _batch(t0: int, n: int = SAMPLES_PER_BATCH) -> Batch:
    cat = load_catalogue()
    cols: dict[str, list[Any]] = {}
    for sig in cat:
        if sig.type is SignalType.BOOL:
            cols[sig.name] = [i % 2 == 0 for i in range(n)]
        elif sig.type is SignalType.INT:
            cols[sig.name] = [int(sig.min or 0) + i % 3 for i in range(n)]
        elif sig.type is SignalType.FLOAT:
            lo = sig.min or 0.0
            cols[sig.name] = [round(lo + (i + 1) * 10 * (sig.resolution or 1), sig.decimals) for i in range(n)]
    return Batch([t0 + 1000 * i for i in range(n)], cols)


def _time(fn: Callable[[], object], min_time: float = 0.2, rounds: int = 5) -> float:
    """Median seconds per call."""
    fn()
    per_call = []
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        per_call.append(elapsed / n)
    return statistics.median(per_call)


def run_benchmarks(
    console: Console | None = None, store_seconds: float = 30.0, geo_fences: int = 100_000
) -> dict[str, Any]:
    """`store_seconds`: how long each time-series backend is fed in the sustained-ingest case (0: skip it);
    `geo_fences`: fences in the geofence lookup case (zhilian/bench_geo.py; 0: skip it)."""
    console = console or Console()
    cat = load_catalogue()
    key = DeviceKey.generate()
    batch = _batch(1_700_000_000_000)
    body = encode_batch(batch, cat)
    env = Envelope("LZHBENCH000000001", key.key_id, 1, 0, 1_700_000_000_000, Kind.TELEMETRY, Flags.NONE, body)
    wire = seal_envelope(env, key)
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "batch encode (30 samples, all signals)": (lambda: encode_batch(batch, cat), SAMPLES_PER_BATCH),
        "batch decode (30 samples, all signals)": (lambda: decode_batch(body, cat), SAMPLES_PER_BATCH),
        "envelope seal (Ed25519 sign)": (lambda: seal_envelope(env, key), SAMPLES_PER_BATCH),
        "envelope parse + verify": (lambda: parse_envelope(wire).verify(key.public_raw), SAMPLES_PER_BATCH),
    }
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "body_bytes": len(body),
        "envelope_bytes": len(wire),
        "cases": {},
    }
    for name, (fn, samples) in cases.items():
        sec = _time(fn)
        results["cases"][name] = {"us_per_call": sec * 1e6, "samples_per_s": samples / sec}
    results["cases"]["pipeline ingest into SQLite (200 msgs/commit)"] = _bench_pipeline(key, cat, hazard_rules=False)
    results["cases"]["same, hazard rules + alarms on"] = _bench_pipeline(key, cat, hazard_rules=True)
    results["cases"]["rule engine, all rules on (per sample)"] = _bench_rules()
    results["decoders"] = _bench_decoders()
    table = Table(title=f"zhilian bench — envelope {len(wire)} B, body {len(body)} B for {SAMPLES_PER_BATCH} samples")
    table.add_column("case")
    table.add_column("µs / call", justify="right")
    table.add_column("samples / s", justify="right")
    for name, r in results["cases"].items():
        table.add_row(name, f"{r['us_per_call']:.1f}", f"{r['samples_per_s']:,.0f}")
    console.print(table)
    dec = Table(title="device decoders (sans-I/O cores, one stream fed in 4 KiB reads)")
    dec.add_column("decoder")
    dec.add_column("units / s", justify="right")
    dec.add_column("MB / s", justify="right")
    for name, r in results["decoders"].items():
        dec.add_row(name, f"{r['units_per_s']:,.0f} {r['unit']}", f"{r['mb_per_s']:.2f}")
    console.print(dec)
    if geo_fences > 0:
        from zhilian.bench_geo import run_geo_benchmarks

        results["geofences"] = run_geo_benchmarks(console, fences=geo_fences)
    if store_seconds > 0:
        from zhilian.bench_store import run_store_benchmarks

        results["stores"] = run_store_benchmarks(console, duration_s=store_seconds)
    return results


def _feed_all(decoder_factory: Callable[[], Any], stream: bytes) -> int:
    decoder = decoder_factory()
    out = 0
    for i in range(0, len(stream), 4096):
        out += len(decoder.feed(stream[i : i + 4096]))
    return out


def _bench_decoders() -> dict[str, dict[str, Any]]:
    """NMEA (emulated GN receiver: RMC, GGA, 2x GSA, GSV) and JBD BMS frames (0x03 + 0x04, 13 cells)."""
    from datetime import UTC, datetime, timedelta

    from edge_agent.devices.jbd import (
        REG_BASIC_INFO,
        REG_CELL_VOLTAGES,
        JbdFrameDecoder,
        build_basic_info,
        build_cell_voltages,
        encode_response,
    )
    from edge_agent.nmea import NmeaDecoder
    from simulators.bms_jbd import JbdBmsEmulator
    from simulators.nmea import SkyModel, encode_epoch
    from simulators.route import route_for
    from simulators.vehicle import VehicleModel

    model = VehicleModel(route_for(0), seed=0, start_time=1_767_225_600.0)
    sky = SkyModel(0)
    epochs = 600
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sentences: list[bytes] = []
    for i in range(epochs):
        t = start + timedelta(seconds=i)
        sentences += encode_epoch(model.state_at(t.timestamp()), t, sky.at(t.timestamp())).sentences
    nmea = b"".join(sentences)
    emu = JbdBmsEmulator(model, cells=13, probes=2)
    frames = []
    for i in range(1000):
        state = model.state_at(1_767_225_600.0 + i)
        frames.append(encode_response(REG_BASIC_INFO, build_basic_info(emu.basic_info(state))))
        cells = [mv / 1000 for mv in emu.cell_millivolts(state)]
        frames.append(encode_response(REG_CELL_VOLTAGES, build_cell_voltages(cells)))
    jbd = b"".join(frames)
    out: dict[str, dict[str, Any]] = {}
    for name, factory, stream, units, unit in (
        ("NMEA decoder (pynmea2)", NmeaDecoder, nmea, len(sentences), "sentences"),
        ("JBD BMS frame decoder", JbdFrameDecoder, jbd, len(frames), "frames"),
    ):
        sec = _time(lambda f=factory, s=stream: _feed_all(f, s), min_time=0.5, rounds=3)
        out[name] = {"unit": unit, "units_per_s": units / sec, "mb_per_s": len(stream) / sec / 1e6}
    out["CAN frame decoder (cantools, 48v profile)"] = _bench_can(model)
    return out


def _bench_can(model: Any) -> dict[str, Any]:
    """Every frame the emulated BMS + controller send in 200 s of riding, decoded into catalogue values."""
    from edge_agent.devices.can_codec import CanCodec
    from simulators.can_bus import CanVehicleEmulator

    emu = CanVehicleEmulator(model)
    codec = emu.codec
    frames = [
        codec.encode(message, values, group)
        for i in range(200)
        for message, group, values in emu.frames(model.state_at(1_767_225_600.0 + i), codec.messages)
    ]

    def decode_all() -> None:
        dec = CanCodec(codec.variant, database=codec.database)
        for frame_id, data in frames:
            dec.decode(frame_id, data)

    sec = _time(decode_all, min_time=0.5, rounds=3)
    return {"unit": "frames", "units_per_s": len(frames) / sec, "mb_per_s": 8 * len(frames) / sec / 1e6}


def _bench_rules() -> dict[str, float]:
    """Every hazard rule on, fed a simulated 10-minute e-bike ride sample by sample (GNSS, BMS with 13 cell
    voltages and probes, controller status and config), a fresh vehicle per call; reported per sample."""
    from cloud_ingest.rules import ApprovedBattery, FactoryControllerConfig, RuleEngine, VehicleContext, load_rules
    from simulators.bms_jbd import JbdBmsEmulator
    from simulators.controller_uart import ControllerEmulator
    from simulators.route import route_for
    from simulators.vehicle import VehicleModel

    cat = load_catalogue()
    t0 = 1_767_225_600.0
    model = VehicleModel(route_for(0), seed=0, start_time=t0)
    bms, ctl = JbdBmsEmulator(model), ControllerEmulator(model)
    rows: list[tuple[int, dict[str, Any]]] = []
    for i in range(600):
        state = model.state_at(t0 + i)
        values: dict[str, Any] = {
            "CurrentLocation.Latitude": state.lat,
            "CurrentLocation.Longitude": state.lon,
            "CurrentLocation.Altitude": state.altitude_m,
            "CurrentLocation.GNSSReceiver.GroundSpeed": round(state.speed_kmh, 2),
            "CurrentLocation.GNSSReceiver.FixMode": 3,
            "CurrentLocation.GNSSReceiver.HDOP": 0.9,
            "CurrentLocation.GNSSReceiver.SatellitesUsed": 14,
            "Powertrain.TractionBattery.Barcode": bms.barcode,
        }
        values.update(bms.basic_info(state).signals(cat))
        for k, mv in enumerate(bms.cell_millivolts(state), 1):
            values[f"Powertrain.TractionBattery.CellVoltage.Cell{k}"] = mv / 1000
        values.update(ctl.status(state).signals(cat))
        values.update(ctl.config().signals(cat))
        rows.append((int((t0 + i) * 1000), values))
    engine = RuleEngine(load_rules(), cat)
    ctx = VehicleContext(
        model="ebike48",
        chemistry="NMC",
        battery=ApprovedBattery(frozenset({bms.barcode}), bms.nominal_ah, bms.cells),
        controller=FactoryControllerConfig(model.variant.speed_limit_kmh, model.variant.wheel_inch),
    )
    calls = [0]

    def ride() -> None:
        calls[0] += 1
        vin = f"LZHBENCH{calls[0]:09d}"
        for ts, values in rows:
            engine.evaluate(vin, ctx, ts, values)
        engine.forget(vin)

    sec = _time(ride, min_time=0.5, rounds=3)
    return {"us_per_call": sec / len(rows) * 1e6, "samples_per_s": len(rows) / sec}


def _bench_pipeline(key: DeviceKey, cat: Any, hazard_rules: bool) -> dict[str, float]:
    """`hazard_rules`: the rule engine runs inside the ledger commit, with rule state and alarms persisted."""
    from cloud_ingest.service import IngestService

    vin = "LZHBENCH000000001"
    with tempfile.TemporaryDirectory() as tmp:
        svc = IngestService.open(Path(tmp), hazard_rules=hazard_rules)
        try:
            svc.registry.register_device(vin, key.public_raw)
            per_commit, commits = 200, 10
            msgs = []
            for seq in range(per_commit * commits):
                b = encode_batch(_batch(1_700_000_000_000 + seq * SAMPLES_PER_BATCH * 1000), cat)
                e = Envelope(vin, key.key_id, 1, seq, 1_700_000_000_000, Kind.TELEMETRY, Flags.NONE, b)
                msgs.append((vin, seal_envelope(e, key)))
            start = time.perf_counter()
            for i in range(commits):
                res = svc.pipeline.ingest_many(msgs[i * per_commit : (i + 1) * per_commit])
                assert all(r.outcome == "stored" for r in res), res[:3]
            elapsed = time.perf_counter() - start
        finally:
            svc.close()
    n = per_commit * commits
    return {"us_per_call": elapsed / n * 1e6, "samples_per_s": n * SAMPLES_PER_BATCH / elapsed}
