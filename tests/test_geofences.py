"""Geofences: shapes and their edges, validation, the spatial index against a brute-force shapely check, CRUD and
point queries through the API on SQLite and PostgreSQL, refresh across processes, and the rules' zone lookup."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shapely
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from shapely.geometry import shape as geojson_shape

from cloud_ingest.db import Role, create_engine_for
from cloud_ingest.geofences import (
    GeofenceIndex,
    GeofenceKind,
    GeofenceService,
    GeofenceSpec,
    IndexedFence,
    InvalidGeofence,
    compile_shape,
    stored_shape,
)
from cloud_ingest.service import IngestService
from protocol import DeviceKey, Envelope, Flags, Kind, encode_batch, seal_envelope
from protocol.batch import batch_from_rows

R_EARTH = 6_371_008.8
LAT0, LON0 = 30.2741, 120.1551  # Hangzhou


def destination(lat: float, lon: float, bearing_deg: float, metres: float) -> tuple[float, float]:
    """Great-circle destination point (spherical earth): an oracle independent of the fences' local frames."""
    d = metres / R_EARTH
    b = math.radians(bearing_deg)
    p1, l1 = math.radians(lat), math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), math.degrees(l2)


def square(lat: float, lon: float, half_deg: float) -> list[list[float]]:
    return [
        [lon - half_deg, lat - half_deg],
        [lon + half_deg, lat - half_deg],
        [lon + half_deg, lat + half_deg],
        [lon - half_deg, lat + half_deg],
        [lon - half_deg, lat - half_deg],
    ]


def polygon(shell: list[list[float]], *holes: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [shell, *holes]}


def point(lat: float, lon: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [lon, lat]}


def line(*positions: tuple[float, float]) -> dict[str, Any]:
    return {"type": "LineString", "coordinates": [[lon, lat] for lat, lon in positions]}


def spec(geometry: dict[str, Any], kind: GeofenceKind = GeofenceKind.NO_CHARGING, **params: float) -> GeofenceSpec:
    return GeofenceSpec("fence", kind, geometry, **params)


def contains(s: GeofenceSpec, lat: float, lon: float) -> bool:
    return compile_shape(s)[0].contains(lat, lon)


# --- shapes --------------------------------------------------------------------------------------------------


def test_polygon_with_a_hole_excludes_the_hole() -> None:
    s = spec(polygon(square(LAT0, LON0, 0.01), square(LAT0, LON0, 0.002)))
    assert not contains(s, LAT0, LON0)  # in the hole
    assert contains(s, LAT0 + 0.005, LON0)  # in the ring
    assert contains(s, LAT0 + 0.002, LON0)  # on the hole's edge: boundaries count as inside
    assert not contains(s, LAT0 + 0.011, LON0)
    multi = {"type": "MultiPolygon", "coordinates": [[square(LAT0, LON0, 0.001)], [square(LAT0, LON0 + 0.01, 0.001)]]}
    assert contains(spec(multi), LAT0, LON0 + 0.01) and not contains(spec(multi), LAT0, LON0 + 0.005)


@pytest.mark.parametrize(
    ("lat", "radius", "slack"), [(0.0, 100.0, 0.05), (LAT0, 100.0, 0.05), (60.0, 5000.0, 0.05), (LAT0, 50_000.0, 0.5)]
)
def test_circle_edges_match_great_circle_distance(lat: float, radius: float, slack: float) -> None:
    s = spec(point(lat, LON0), radius_m=radius)
    for bearing in range(0, 360, 15):
        assert contains(s, *destination(lat, LON0, bearing, radius - slack)), bearing
        assert not contains(s, *destination(lat, LON0, bearing, radius + slack)), bearing
    assert contains(s, lat, LON0)


def test_corridor_is_a_band_around_its_polyline_with_round_ends() -> None:
    a = (LAT0, LON0)
    b = destination(*a, 90.0, 400.0)
    c = destination(*b, 0.0, 300.0)
    s = spec(line(a, b, c), half_width_m=10.0)
    mid_ab = destination(*a, 90.0, 200.0)
    for side in (0.0, 180.0):
        assert contains(s, *destination(*mid_ab, side, 9.95))
        assert not contains(s, *destination(*mid_ab, side, 10.05))
    mid_bc = destination(*b, 0.0, 150.0)
    assert contains(s, *destination(*mid_bc, 270.0, 9.95)) and not contains(s, *destination(*mid_bc, 90.0, 10.05))
    # Round caps: beyond the start, within the half width of the end point only.
    assert contains(s, *destination(*a, 270.0, 9.95)) and not contains(s, *destination(*a, 270.0, 10.05))
    assert not contains(s, *destination(*a, 225.0, 10.05))
    # The outer corner of the bend is rounded as well.
    assert contains(s, *destination(*b, 135.0, 9.9)) and not contains(s, *destination(*b, 135.0, 10.1))


@pytest.mark.parametrize(
    ("geometry", "params", "reason"),
    [
        ({"type": "Triangle", "coordinates": []}, {}, "geometry type must be"),
        ([1, 2], {}, "GeoJSON object"),
        (polygon(square(LAT0, LON0, 0.01)[:-1]), {}, "must end where it starts"),
        (polygon([[0, 0], [1, 1], [0, 0]]), {}, "at least 4 positions"),
        (polygon([[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]), {}, "Self-intersection"),
        (polygon(square(LAT0, LON0, 0.001), square(LAT0 + 1, LON0, 0.0005)), {}, "invalid polygon"),
        (polygon([[0, 0], [1, 0], [2, 0], [0, 0]]), {}, "invalid polygon"),
        (polygon([[0, 0], [181, 0], [1, 1], [0, 0]]), {}, "longitude 181.0 is outside"),
        (polygon([[0, 0], ["a", 0], [1, 1], [0, 0]]), {}, "must be a number"),
        (polygon([[0, 0], [True, 0], [1, 1], [0, 0]]), {}, "must be a number"),
        (polygon([[0, 0], [0], [1, 1], [0, 0]]), {}, "a position is"),
        (polygon([[-179, 0], [179, 0], [179, 1], [-179, 0]]), {}, "antimeridian"),
        (polygon(square(LAT0, LON0, 0.01)), {"radius_m": 5.0}, "radius_m and half_width_m are for"),
        (point(LAT0, LON0), {}, "radius_m is required"),
        (point(LAT0, LON0), {"radius_m": 0.0}, "radius_m must be above 0"),
        (point(LAT0, LON0), {"radius_m": 1e6}, "at most 50000"),
        (point(LAT0, LON0), {"radius_m": math.nan}, "must be finite"),
        (point(89.0, LON0), {"radius_m": 10.0}, "latitudes within"),
        (point(LAT0, LON0), {"radius_m": 10.0, "half_width_m": 3.0}, "half_width_m is for"),
        (line((LAT0, LON0)), {"half_width_m": 5.0}, "at least 2 distinct"),
        (line((LAT0, LON0), (LAT0, LON0)), {"half_width_m": 5.0}, "at least 2 distinct"),
        (line((LAT0, LON0), (LAT0 + 2, LON0)), {"half_width_m": 5.0}, "at most 1 degree"),
        (line((LAT0, LON0), (LAT0 + 0.01, LON0)), {}, "half_width_m is required"),
        (line((LAT0, LON0), (LAT0 + 0.01, LON0)), {"half_width_m": 5.0, "radius_m": 1.0}, "radius_m is for"),
    ],
)
def test_invalid_geometry_is_refused_with_its_reason(geometry: Any, params: dict[str, float], reason: str) -> None:
    with pytest.raises(InvalidGeofence, match=reason):
        compile_shape(spec(geometry, **params))


def test_speed_limit_goes_with_speed_limit_zones_only() -> None:
    circle = point(LAT0, LON0)
    with pytest.raises(InvalidGeofence, match="speed_limit_kmh is required"):
        compile_shape(spec(circle, GeofenceKind.SPEED_LIMIT, radius_m=50.0))
    with pytest.raises(InvalidGeofence, match="only for speed_limit"):
        compile_shape(spec(circle, GeofenceKind.RESTRICTED, radius_m=50.0, speed_limit_kmh=15.0))
    shape, _ = compile_shape(spec(circle, GeofenceKind.SPEED_LIMIT, radius_m=50.0, speed_limit_kmh=15.0))
    slow = IndexedFence(2, 1, GeofenceKind.SPEED_LIMIT, shape, 10.0)
    index = GeofenceIndex([IndexedFence(1, 1, GeofenceKind.SPEED_LIMIT, shape, 15.0), slow])
    assert index.speed_limit_at(LAT0, LON0) == 10.0 and index.speed_limit_at(LAT0 + 1, LON0) is None


def test_lookups_of_nonsense_points_are_empty_not_errors() -> None:
    shape, _ = compile_shape(spec(point(LAT0, LON0), radius_m=50.0))
    index = GeofenceIndex([IndexedFence(1, 1, GeofenceKind.NO_CHARGING, shape)])
    for lat, lon in ((math.nan, LON0), (LAT0, math.inf), (91.0, LON0), (LAT0, -181.0)):
        assert index.zones_at(lat, lon) == set()
    assert GeofenceIndex().zones_at(LAT0, LON0) == set()
    assert index.zones_at(LAT0, LON0) == {"no_charging"}


# --- the index against brute force ---------------------------------------------------------------------------

# A 2 km square around LAT0/LON0: fences and points crowd it, so bounding boxes overlap and edges get hit.
SPAN = 0.02
coord = st.floats(-SPAN / 2, SPAN / 2, allow_nan=False)
metres = st.floats(0.5, 800.0, allow_nan=False)


@st.composite
def fence_specs(draw: st.DrawFn) -> GeofenceSpec:
    kind = draw(st.sampled_from(list(GeofenceKind)))
    limit = {"speed_limit_kmh": 20.0} if kind is GeofenceKind.SPEED_LIMIT else {}
    form = draw(st.sampled_from(["box", "holed", "circle", "corridor"]))
    lat, lon = LAT0 + draw(coord), LON0 + draw(coord)
    if form == "circle":
        return GeofenceSpec("c", kind, point(lat, lon), radius_m=draw(metres), **limit)
    if form == "corridor":
        pts = [(lat, lon)] + [(LAT0 + draw(coord), LON0 + draw(coord)) for _ in range(draw(st.integers(1, 3)))]
        assume(len(set(pts)) > 1)
        return GeofenceSpec("k", kind, line(*pts), half_width_m=draw(st.floats(0.5, 200.0)), **limit)
    half = draw(st.floats(1e-4, SPAN / 2))
    holes = [square(lat, lon, half * draw(st.floats(0.1, 0.8)))] if form == "holed" else []
    return GeofenceSpec("p", kind, polygon(square(lat, lon, half), *holes), **limit)


def haversine(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * R_EARTH * math.asin(math.sqrt(a))


def _frame_xy(lat0: float, lon0: float, lat: float, lon: float) -> tuple[float, float]:
    k = R_EARTH * math.pi / 180
    return (lon - lon0) * k * math.cos(math.radians((lat + lat0) / 2)), (lat - lat0) * k


def brute_force(s: GeofenceSpec, lat: float, lon: float) -> bool | None:
    """The answer built here, independently: shapely on the GeoJSON for polygons, the great-circle distance for
    circles, shapely's distance to the polyline for corridors. None within a millimetre of a metric edge, where the
    fences' flat local frames and the sphere may round differently."""
    g = s.geometry
    if g["type"] in ("Polygon", "MultiPolygon"):
        return bool(geojson_shape(g).covers(shapely.Point(lon, lat)))
    tolerance = 1e-3
    if g["type"] == "Point":
        lon0, lat0 = g["coordinates"]
        distance, limit = haversine(lat0, lon0, lat, lon), s.radius_m
    else:
        tolerance = 1e-6
        lons = [p[0] for p in g["coordinates"]]
        lats = [p[1] for p in g["coordinates"]]
        lat0, lon0 = (min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2
        path = shapely.LineString([_frame_xy(lat0, lon0, la, lo) for lo, la in g["coordinates"]])
        distance, limit = path.distance(shapely.Point(*_frame_xy(lat0, lon0, lat, lon))), s.half_width_m
    assert limit is not None
    return None if abs(distance - limit) < tolerance else distance <= limit


@settings(max_examples=100, deadline=None)
@given(
    specs=st.lists(fence_specs(), min_size=1, max_size=25),
    points=st.lists(st.tuples(coord, coord), min_size=1, max_size=25),
)
def test_index_agrees_with_brute_force_shapely(specs: list[GeofenceSpec], points: list[tuple[float, float]]) -> None:
    fences = []
    for i, s in enumerate(specs):
        shape, geojson = compile_shape(s)
        if i % 2:  # every other fence as a service loads it back from the database
            params = {"radius_m": s.radius_m, "half_width_m": s.half_width_m}
            shape = stored_shape(shape.shape, json.loads(json.dumps(geojson)), {k: v for k, v in params.items() if v})
        fences.append(IndexedFence(i, 1, s.kind, shape))
    index = GeofenceIndex(fences)
    # Besides random points: every vertex and center, where bounding boxes and edges are touched exactly.
    probes = [(LAT0 + a, LON0 + b) for a, b in points]
    for s in specs:
        coords = s.geometry["coordinates"]
        flat = (
            [coords] if s.geometry["type"] == "Point" else coords if s.geometry["type"] == "LineString" else coords[0]
        )
        probes += [(c[1], c[0]) for c in flat]
        # Just inside the extremes of circles and corridors: where their bounding boxes are tight.
        reach = s.radius_m or s.half_width_m
        if reach is not None:
            probes += [destination(c[1], c[0], b, reach - 0.01) for c in flat for b in (0, 45, 90, 180, 270)]
    for lat, lon in probes:
        answers = {i: brute_force(s, lat, lon) for i, s in enumerate(specs)}
        unsure = {i for i, a in answers.items() if a is None}
        expected = {i for i, a in answers.items() if a}
        assert index.fences_at(lat, lon) - unsure == expected, (lat, lon)
        assert index.zones_at(lat, lon) >= {specs[i].kind.value for i in expected}


# --- CRUD and point queries through the API ------------------------------------------------------------------


class Api:
    def __init__(self, svc: IngestService) -> None:
        self.svc = svc
        self.client = TestClient(svc.app)
        self.operator = {"Authorization": f"Bearer {svc.registry.create_api_key(Role.OPERATOR, 'gis')}"}
        self.viewer = {"X-API-Key": svc.registry.create_api_key(Role.VIEWER, "dash")}

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post("/v1/geofences", json=body, headers=self.operator)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    def at(self, lat: float, lon: float) -> list[int]:
        r = self.client.get("/v1/geofences", params={"lat": lat, "lon": lon}, headers=self.viewer)
        assert r.status_code == 200, r.text
        return [f["id"] for f in r.json()]


@pytest.fixture
def cloud(tmp_path: Path, database_url: str) -> Iterator[IngestService]:
    svc = IngestService.open(tmp_path / "ingest", database_url=database_url)
    yield svc
    svc.close()


@pytest.fixture
def api(cloud: IngestService) -> Iterator[Api]:
    a = Api(cloud)
    yield a
    a.client.close()


def test_geofence_crud_and_point_queries(api: Api) -> None:
    holed = api.create(
        {
            "name": "Block 7 with courtyard",
            "kind": "no_charging",
            "geometry": polygon(square(LAT0, LON0, 0.001), square(LAT0, LON0, 0.0003)),
        }
    )
    circle = api.create(
        {
            "name": "school",
            "kind": "speed_limit",
            "geometry": point(LAT0, LON0 + 0.01),
            "radius_m": 150,
            "speed_limit_kmh": 15,
        }
    )
    a, b = (LAT0 + 0.02, LON0), destination(LAT0 + 0.02, LON0, 90.0, 500.0)
    corridor = api.create({"name": "underpass", "kind": "restricted", "geometry": line(a, b), "half_width_m": 8})
    assert (holed["shape"], circle["shape"], corridor["shape"]) == ("polygon", "circle", "corridor")
    assert holed["revision"] == 1 and circle["speed_limit_kmh"] == 15.0 and corridor["half_width_m"] == 8.0
    assert api.at(LAT0, LON0) == []  # the courtyard
    assert api.at(LAT0 + 0.0006, LON0) == [holed["id"]]
    assert api.at(*destination(LAT0, LON0 + 0.01, 45.0, 149.9)) == [circle["id"]]
    assert api.at(*destination(LAT0, LON0 + 0.01, 45.0, 150.1)) == []
    mid = destination(*a, 90.0, 250.0)
    assert api.at(*destination(*mid, 0.0, 7.9)) == [corridor["id"]]
    assert api.at(*destination(*mid, 0.0, 8.1)) == []
    assert api.svc.geofences is not None
    assert api.svc.geofences.zones_at(LAT0 + 0.0006, LON0) == {"no_charging"}
    c = api.client
    listed = c.get("/v1/geofences", headers=api.viewer).json()
    assert [f["id"] for f in listed] == [holed["id"], circle["id"], corridor["id"]]
    assert c.get(f"/v1/geofences/{circle['id']}", headers=api.viewer).json() == circle
    # Replacing a fence moves it in the index at once.
    moved = {
        "name": "school (new site)",
        "kind": "speed_limit",
        "geometry": point(LAT0 + 0.05, LON0),
        "radius_m": 100,
        "speed_limit_kmh": 10,
    }
    r = c.put(f"/v1/geofences/{circle['id']}", json=moved, headers=api.operator)
    assert r.status_code == 200, r.text
    assert r.json()["revision"] == 2 and r.json()["created_ms"] == circle["created_ms"]
    assert api.at(LAT0, LON0 + 0.01) == [] and api.at(LAT0 + 0.05, LON0) == [circle["id"]]
    assert c.delete(f"/v1/geofences/{holed['id']}", headers=api.operator).status_code == 204
    assert c.get(f"/v1/geofences/{holed['id']}", headers=api.viewer).status_code == 404
    assert api.at(LAT0 + 0.0006, LON0) == []
    assert c.delete(f"/v1/geofences/{holed['id']}", headers=api.operator).status_code == 404
    assert c.put("/v1/geofences/999999", json=moved, headers=api.operator).status_code == 404
    # Validation, permissions and query shape.
    bowtie = {"name": "x", "kind": "restricted", "geometry": polygon([[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]])}
    r = c.post("/v1/geofences", json=bowtie, headers=api.operator)
    assert r.status_code == 422 and "Self-intersection" in r.json()["detail"]
    assert c.post("/v1/geofences", json=moved, headers=api.viewer).status_code == 403
    assert c.post("/v1/geofences", json={**moved, "name": "a\x00b"}, headers=api.operator).status_code == 422
    assert c.get("/v1/geofences", params={"lat": LAT0}, headers=api.viewer).status_code == 422
    assert c.get("/v1/geofences", params={"lat": 91, "lon": 0}, headers=api.viewer).status_code == 422
    assert c.get("/v1/geofences/0", headers=api.viewer).status_code == 422


def test_other_processes_see_changes_through_the_generation_counter(cloud: IngestService) -> None:
    """A second service on the same database (another worker) rebuilds its index when the generation moves."""
    other = GeofenceService(create_engine_for(str(cloud.engine.url.render_as_string(hide_password=False))), 0.05)
    try:
        other.start()
        mine = cloud.geofences
        assert mine is not None
        fence = mine.create(spec(point(LAT0, LON0), radius_m=30.0))
        deadline = time.monotonic() + 30.0
        while other.fences_at(LAT0, LON0) != {fence.id} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.fences_at(LAT0, LON0) == {fence.id}
        assert other.refresh() is False  # nothing new: no rebuild
        other.delete(fence.id)
        assert mine.refresh() is True and mine.fences_at(LAT0, LON0) == set()
        # A write here right after one there: patching the index with only its own fence would lose theirs.
        theirs = other.create(spec(point(LAT0, LON0), radius_m=30.0))
        ours = mine.create(spec(point(LAT0, LON0), GeofenceKind.RESTRICTED, radius_m=30.0))
        assert mine.fences_at(LAT0, LON0) == {theirs.id, ours.id}
    finally:
        other.close()
        other.engine.dispose()


def test_lookups_stay_consistent_while_fences_change(cloud: IngestService) -> None:
    geofences = cloud.geofences
    assert geofences is not None
    geofences.create(spec(point(LAT0, LON0), radius_m=30.0))
    seen: list[set[str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def look() -> None:
        try:
            while not stop.is_set():
                seen.append(set(geofences.zones_at(LAT0, LON0)))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    readers = [threading.Thread(target=look) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(10):
            fence = geofences.create(spec(point(LAT0, LON0 + 0.0001 * i), GeofenceKind.RESTRICTED, radius_m=30.0))
            geofences.delete(fence.id)
    finally:
        stop.set()
        for t in readers:
            t.join(10)
    assert not errors and seen
    assert all(s in ({"no_charging"}, {"no_charging", "restricted"}) for s in seen)


def test_the_rules_see_no_charging_zones(tmp_path: Path, database_url: str) -> None:
    """End to end inside the service: a fence made through the API raises the rules' no-charging-zone alarm."""
    svc = IngestService.open(tmp_path / "ingest", database_url=database_url)
    api = Api(svc)
    try:
        api.create({"name": "stairwell", "kind": "no_charging", "geometry": point(LAT0, LON0), "radius_m": 25})
        key = DeviceKey.from_seed(b"\x61" * 32)
        t0 = int(time.time() * 1000) - 600_000
        for n, (vin, lat) in enumerate((("LZLCGEO0000000001", LAT0), ("LZLCGEO0000000002", LAT0 + 0.01))):
            svc.registry.register_device(vin, key.public_raw)
            rows = [
                (
                    t0 + i * 1000,
                    {
                        "CurrentLocation.Latitude": lat,
                        "CurrentLocation.Longitude": LON0,
                        "Powertrain.TractionBattery.CurrentCurrent": 3.0,
                    },
                )
                for i in range(180)
            ]
            body = encode_batch(batch_from_rows(rows), svc.catalogue)
            raw = seal_envelope(Envelope(vin, key.key_id, 1, n, t0, Kind.TELEMETRY, Flags.NONE, body), key)
            assert svc.pipeline.ingest_one(vin, raw).outcome == "stored"
        alarms = api.client.get("/v1/alarms", params={"rule": "charging_in_no_charging_zone"}, headers=api.viewer)
        assert alarms.status_code == 200, alarms.text
        assert [(a["vin"], a["level"]) for a in alarms.json()] == [("LZLCGEO0000000001", 2)]
    finally:
        api.client.close()
        svc.close()


# --- hostile input -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70), json_values)
positions = st.lists(numbers, min_size=0, max_size=4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "name": st.text(max_size=210),
                "kind": st.sampled_from([*GeofenceKind, "x"]),
                "geometry": st.one_of(
                    json_values,
                    st.fixed_dictionaries(
                        {
                            "type": st.sampled_from(["Polygon", "MultiPolygon", "Point", "LineString", "x"]),
                            "coordinates": st.one_of(
                                positions,
                                st.lists(positions, max_size=6),
                                st.lists(st.lists(positions, max_size=6), max_size=3),
                                json_values,
                            ),
                        }
                    ),
                ),
            },
            optional={"radius_m": numbers, "half_width_m": numbers, "speed_limit_kmh": numbers},
        ),
    ),
    fence_id=st.one_of(st.integers(-5, 2**40), st.text(max_size=12)),
    lat=st.one_of(st.floats(), st.text(max_size=8)),
    lon=st.one_of(st.floats(), st.text(max_size=8)),
)
def test_geofence_endpoints_never_fail_on_hostile_input(api: Api, body: Any, fence_id: Any, lat: Any, lon: Any) -> None:
    from urllib.parse import quote

    c = api.client
    path = f"/v1/geofences/{quote(str(fence_id), safe='')}"
    for r in (
        c.post("/v1/geofences", json=body, headers=api.operator),
        c.put(path, json=body, headers=api.operator),
        c.get(path, headers=api.viewer),
        c.get("/v1/geofences", params={"lat": str(lat), "lon": str(lon)}, headers=api.viewer),
        c.delete(path, headers=api.operator),
    ):
        assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
