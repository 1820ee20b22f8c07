"""Geofence lookups at city scale: 100,000 fences, the spatial index's build time and the cost of one lookup.

`zhilian bench` runs it (BENCHMARKS.md); alone: `python -m zhilian.bench_geo [--fences N]`.

The fleet's city is a 0.5 x 0.5 degree square (about 48 x 56 km, Hangzhou's latitude) holding a deterministic mix:
60 % building footprints (quadrilaterals 15-80 m across, one in ten with a courtyard hole), 30 % circles
(radius 10-100 m), 10 % corridors (3-6 vertices over 100-1,000 m, half width 3-20 m); the share of the city
inside some fence is reported. Measured (wall clock, and this process's CPU time, as the machine is shared):
- compile: GeoJSON parsed and validated into shapes, as the API does for each new fence;
- index build: the STRtree over 100,000 bounding boxes (`GeofenceIndex(...)`);
- lookup: `zones_at(lat, lon)` for points uniform over the city (most are in no fence) and for points at fence
  centres (each in at least one); median of rounds of 20,000 lookups, per lookup;
- database: a cold `GeofenceService.refresh()` loading all rows from SQLite (compile without re-validation + build),
  and one `create()` at that size (insert, generation bump, incremental refresh: only the new fence is compiled,
  the tree is rebuilt).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import insert, update

from cloud_ingest.db import create_engine_for, init_db
from cloud_ingest.geofences import (
    M_PER_DEG,
    GeofenceGenerationRow,
    GeofenceIndex,
    GeofenceKind,
    GeofenceRow,
    GeofenceService,
    GeofenceSpec,
    IndexedFence,
    compile_shape,
)

CITY_LAT, CITY_LON = 30.05, 119.95  # south-west corner
CITY_SPAN_DEG = 0.5
LOOKUPS_PER_ROUND = 20_000
ROUNDS = 5


def _offset(lat: float, lon: float, east_m: float, north_m: float) -> tuple[float, float]:
    return lat + north_m / M_PER_DEG, lon + east_m / (M_PER_DEG * math.cos(math.radians(lat)))


def _quad(rng: random.Random, lat: float, lon: float, half_m: float) -> list[list[float]]:
    turn = rng.uniform(0, math.pi / 2)
    ring = []
    for k in range(4):
        a = turn + k * math.pi / 2
        la, lo = _offset(lat, lon, half_m * math.cos(a), half_m * math.sin(a))
        ring.append([lo, la])
    return [*ring, ring[0]]


def city_fences(count: int, seed: int = 7) -> list[GeofenceSpec]:
    rng = random.Random(seed)
    kinds = list(GeofenceKind)
    specs: list[GeofenceSpec] = []
    for i in range(count):
        lat = CITY_LAT + rng.random() * CITY_SPAN_DEG
        lon = CITY_LON + rng.random() * CITY_SPAN_DEG
        kind = kinds[i % len(kinds)]
        limit = {"speed_limit_kmh": 15.0} if kind is GeofenceKind.SPEED_LIMIT else {}
        roll = rng.random()
        if roll < 0.6:
            half = rng.uniform(7.5, 40.0)
            rings = [_quad(rng, lat, lon, half)]
            if rng.random() < 0.1:
                rings.append(_quad(rng, lat, lon, half * 0.3))
            specs.append(GeofenceSpec(f"b{i}", kind, {"type": "Polygon", "coordinates": rings}, **limit))
        elif roll < 0.9:
            geometry = {"type": "Point", "coordinates": [lon, lat]}
            specs.append(GeofenceSpec(f"c{i}", kind, geometry, radius_m=rng.uniform(10, 100), **limit))
        else:
            pts = [[lon, lat]]
            heading = rng.uniform(0, 2 * math.pi)
            for _ in range(rng.randint(2, 5)):
                heading += rng.uniform(-0.8, 0.8)
                step = rng.uniform(50, 200)
                la, lo = _offset(pts[-1][1], pts[-1][0], step * math.cos(heading), step * math.sin(heading))
                pts.append([lo, la])
            geometry = {"type": "LineString", "coordinates": pts}
            specs.append(GeofenceSpec(f"k{i}", kind, geometry, half_width_m=rng.uniform(3, 20), **limit))
    return specs


def _center(spec: GeofenceSpec) -> tuple[float, float]:
    g = spec.geometry
    if g["type"] == "Point":
        lon, lat = g["coordinates"]
    elif g["type"] == "LineString":
        lon, lat = g["coordinates"][0]
    else:  # a footprint's courtyard is a hole: step halfway to a corner, inside the ring
        ring = g["coordinates"][0]
        lon = (sum(p[0] for p in ring[:4]) / 4 + ring[0][0]) / 2
        lat = (sum(p[1] for p in ring[:4]) / 4 + ring[0][1]) / 2
    return lat, lon


def _lookups(index: GeofenceIndex, points: list[tuple[float, float]]) -> dict[str, float]:
    """µs per lookup (wall: median of rounds; CPU: best round), mean fences found, share of points in any."""
    wall: list[float] = []
    cpu: list[float] = []
    zones_at = index.zones_at
    for r in range(ROUNDS):
        chunk = points[r * LOOKUPS_PER_ROUND : (r + 1) * LOOKUPS_PER_ROUND]
        start, start_cpu = time.perf_counter(), time.process_time()
        for lat, lon in chunk:
            zones_at(lat, lon)
        wall.append((time.perf_counter() - start) / len(chunk))
        cpu.append((time.process_time() - start_cpu) / len(chunk))
    found = [len(index.fences_at(lat, lon)) for lat, lon in points[:LOOKUPS_PER_ROUND]]
    return {
        "us_wall": statistics.median(wall) * 1e6,
        "us_cpu": min(cpu) * 1e6,
        "mean_fences": sum(found) / len(found),
        "share_inside": sum(1 for n in found if n) / len(found),
    }


def run_geo_benchmarks(console: Console | None = None, fences: int = 100_000, database: bool = True) -> dict[str, Any]:
    console = console or Console()
    specs = city_fences(fences)
    console.print(f"geofences: compiling {fences:,} fences ...")
    start = time.process_time()
    compiled = [IndexedFence(i + 1, 1, s.kind, compile_shape(s)[0], s.speed_limit_kmh) for i, s in enumerate(specs)]
    compile_s = time.process_time() - start
    start = time.process_time()
    index = GeofenceIndex(compiled, 1)
    build_s = time.process_time() - start
    rng = random.Random(11)
    total = ROUNDS * LOOKUPS_PER_ROUND
    uniform = [(CITY_LAT + rng.random() * CITY_SPAN_DEG, CITY_LON + rng.random() * CITY_SPAN_DEG) for _ in range(total)]
    centres = [_center(specs[rng.randrange(fences)]) for _ in range(total)]
    results: dict[str, Any] = {
        "fences": fences,
        "compile_cpu_us_per_fence": compile_s / fences * 1e6,
        "index_build_cpu_s": build_s,
        "lookup_uniform": _lookups(index, uniform),
        "lookup_in_fence": _lookups(index, centres),
    }
    if database:
        results |= _bench_database(specs)
    table = Table(title=f"geofences: {fences:,} fences over {CITY_SPAN_DEG} x {CITY_SPAN_DEG} degrees")
    table.add_column("case")
    table.add_column("wall", justify="right")
    table.add_column("CPU", justify="right")
    table.add_row("compile + validate (per fence)", "", f"{results['compile_cpu_us_per_fence']:.1f} µs")
    table.add_row("index build (STRtree)", "", f"{build_s * 1000:.0f} ms")
    for key, what in (("lookup_uniform", "uniform points"), ("lookup_in_fence", "points in fences")):
        r = results[key]
        label = f"zones_at, {what} ({r['mean_fences']:.2f} fences each, {r['share_inside']:.0%} in any)"
        table.add_row(label, f"{r['us_wall']:.2f} µs", f"{r['us_cpu']:.2f} µs")
    if database:
        table.add_row(
            "cold refresh from SQLite (load + compile + build)",
            f"{results['cold_refresh_s']:.2f} s",
            f"{results['cold_refresh_cpu_s']:.2f} s",
        )
        table.add_row(
            "create one fence at this size (incl. index update)",
            f"{results['create_one_s'] * 1000:.0f} ms",
            f"{results['create_one_cpu_s'] * 1000:.0f} ms",
        )
    console.print(table)
    return results


def _bench_database(specs: list[GeofenceSpec]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="zl-bench-geo-") as tmp:
        engine = create_engine_for(f"sqlite:///{Path(tmp) / 'registry.db'}")
        try:
            init_db(engine)
            now = int(time.time() * 1000)
            rows = []
            for i, s in enumerate(specs):
                shape, geojson = compile_shape(s)
                params = {k: v for k, v in (("radius_m", s.radius_m), ("half_width_m", s.half_width_m)) if v}
                if s.speed_limit_kmh is not None:
                    params["speed_limit_kmh"] = s.speed_limit_kmh
                rows.append(
                    {
                        "id": i + 1,
                        "name": s.name,
                        "kind": s.kind.value,
                        "shape": shape.shape.value,
                        "geometry": json.dumps(geojson),
                        "params": json.dumps(params),
                        "revision": 1,
                        "created_ms": now,
                        "updated_ms": now,
                    }
                )
            with engine.begin() as conn:
                conn.execute(insert(GeofenceRow), rows)
                conn.execute(update(GeofenceGenerationRow).values(generation=1))
            service = GeofenceService(engine)
            start, start_cpu = time.perf_counter(), time.process_time()
            service.refresh()
            cold, cold_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            start, start_cpu = time.perf_counter(), time.process_time()
            service.create(specs[0])
            one, one_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            assert len(service.index) == len(specs) + 1
            return {
                "cold_refresh_s": cold,
                "cold_refresh_cpu_s": cold_cpu,
                "create_one_s": one,
                "create_one_cpu_s": one_cpu,
            }
        finally:
            engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fences", type=int, default=100_000)
    parser.add_argument("--no-database", action="store_true", help="skip the SQLite refresh and create cases")
    args = parser.parse_args()
    print(json.dumps(run_geo_benchmarks(fences=args.fences, database=not args.no_database), indent=2))


if __name__ == "__main__":
    main()
