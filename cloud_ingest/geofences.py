"""Geofences: polygons (with holes), circles and corridors, each of a kind the rules ask about, behind a spatial index.

Geometry (what "inside" means):
- Polygons are GeoJSON (RFC 7946) Polygon or MultiPolygon in lon/lat, and containment is planar in lon/lat, as
  GeoJSON defines it. A point in a hole is outside.
- Circles (a GeoJSON Point + `radius_m`) and corridors (a LineString + `half_width_m`) are metric. Each is tested in a
  local equirectangular frame of its own (metres east and north of its reference point): a circle is an exact
  distance test and a corridor an exact distance to its polyline — no buffered polygon that cuts chords off the
  edge. The frame's error grows quickly with the distance from the reference point; the limits below keep it
  small (radius <= 50 km, half width <= 5 km, corridor extent <= 1 degree, |lat| <= 80; see `_LocalFrame`).
- The boundary counts as inside. No fence may cross the antimeridian.

Index: a shapely 2 STRtree in lon/lat holding the polygons themselves — its "intersects" query answers them
exactly, holes included, in one GEOS call — and the bounding boxes of circles and corridors (exact in their frame,
widened by a hair), whose few candidates then get the exact distance test. A `GeofenceIndex` is immutable; lookups
read the current one and never touch the database or a lock. `GeofenceService` keeps the fences in the relational
table `geofences`: create, update and delete bump a generation counter (`geofence_generation`) in their own
transaction; the writer patches its index with its fence when the counter moved by exactly its own write, and
every process polls the counter (every `refresh_interval_s`) to reload, recompiling only fences whose revision
changed.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import shapely
from prometheus_client import CollectorRegistry, Counter, Gauge
from shapely import STRtree
from sqlalchemy import BigInteger, CheckConstraint, Engine, Integer, String, Text, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud_ingest.db import SQLITE_BEGIN_OPTION, Base
from cloud_ingest.errors import IngestError, StorageError
from cloud_ingest.rules.context import ZONE_NO_CHARGING

log = logging.getLogger("zhilian.geofences")

EARTH_RADIUS_M: Final = 6_371_008.8  # mean radius (IUGG)
M_PER_DEG: Final = EARTH_RADIUS_M * math.pi / 180.0
MAX_VERTICES: Final = 10_000
MAX_RADIUS_M: Final = 50_000.0
MAX_HALF_WIDTH_M: Final = 5_000.0
MAX_METRIC_EXTENT_DEG: Final = 1.0
MAX_METRIC_LAT: Final = 80.0
MAX_SPEED_LIMIT_KMH: Final = 200.0
MAX_LIST: Final = 10_000
_FETCH_CHUNK = 500
# Widening of a metric fence's degree box: keeps float rounding from losing a point on the exact edge.
_BOX_SLACK_DEG = 1e-9


class GeofenceKind(enum.StrEnum):
    # The values are what the rules ask `zones_at` for (cloud_ingest/rules/context.py, rules file `zone_kind`).
    NO_CHARGING = ZONE_NO_CHARGING  # residential buildings, stairwells, corridors, exits
    SPEED_LIMIT = "speed_limit"  # carries speed_limit_kmh
    RESTRICTED = "restricted"  # restricted area: no e-bikes at all


class Shape(enum.StrEnum):
    POLYGON = "polygon"
    CIRCLE = "circle"
    CORRIDOR = "corridor"


class GeofenceError(IngestError):
    """Base of the geofence errors."""


class InvalidGeofence(GeofenceError):
    """A fence that cannot be stored: the message says why (the API's 422)."""


class UnknownGeofence(GeofenceError):
    """No fence has this id."""


@dataclass(frozen=True, slots=True)
class GeofenceSpec:
    name: str
    kind: GeofenceKind
    geometry: Mapping[str, Any]  # GeoJSON: Polygon | MultiPolygon | Point (circle) | LineString (corridor)
    radius_m: float | None = None
    half_width_m: float | None = None
    speed_limit_kmh: float | None = None


# --- shapes (pure) -------------------------------------------------------------------------------------------


class FenceShape(ABC):
    shape: Shape
    bbox: tuple[float, float, float, float]  # min lon, min lat, max lon, max lat
    # What the spatial index holds for the shape, in lon/lat, and whether "the point intersects it" is already the
    # exact answer (polygons) or only a filter before `contains` (a metric shape's bounding box).
    tree_geometry: shapely.Geometry
    exact_in_tree: bool

    @abstractmethod
    def contains(self, lat: float, lon: float) -> bool: ...


class PolygonShape(FenceShape):
    shape = Shape.POLYGON
    exact_in_tree = True

    def __init__(self, geom: shapely.Geometry) -> None:
        self.geom = self.tree_geometry = geom
        minx, miny, maxx, maxy = geom.bounds
        self.bbox = (minx, miny, maxx, maxy)

    def contains(self, lat: float, lon: float) -> bool:
        return bool(shapely.intersects_xy(self.geom, lon, lat))


class _MetricShape(FenceShape):
    exact_in_tree = False

    def _boxed(self, bbox: tuple[float, float, float, float]) -> None:
        self.bbox = bbox
        self.tree_geometry = shapely.box(*bbox)


class _LocalFrame:
    """Metres around (lat0, lon0): y north along the meridian, x east at the mean latitude of the point and lat0.

    The mean latitude (rather than lat0's) keeps the error second order: a distance from the reference point is off
    by under 1 mm up to 5 km at 60 degrees of latitude, under 0.5 m at 50 km (measured against great circles).
    """

    def __init__(self, lat0: float, lon0: float) -> None:
        self.lat0 = lat0
        self.lon0 = lon0

    def xy(self, lat: float, lon: float) -> tuple[float, float]:
        return (lon - self.lon0) * M_PER_DEG * math.cos(math.radians((lat + self.lat0) / 2)), (
            lat - self.lat0
        ) * M_PER_DEG

    def box(self, minx: float, miny: float, maxx: float, maxy: float) -> tuple[float, float, float, float]:
        """A lon/lat box holding every point whose local coordinates fall in the given box (widened by a hair)."""
        south = self.lat0 + miny / M_PER_DEG
        north = self.lat0 + maxy / M_PER_DEG
        # A metre east spans the most longitude where the cosine is smallest: at one of the box's latitude edges.
        narrowest = M_PER_DEG * min(
            math.cos(math.radians((south + self.lat0) / 2)), math.cos(math.radians((north + self.lat0) / 2))
        )
        return (
            self.lon0 + minx / narrowest - _BOX_SLACK_DEG,
            south - _BOX_SLACK_DEG,
            self.lon0 + maxx / narrowest + _BOX_SLACK_DEG,
            north + _BOX_SLACK_DEG,
        )


class CircleShape(_MetricShape):
    shape = Shape.CIRCLE

    def __init__(self, lat: float, lon: float, radius_m: float) -> None:
        self.frame = _LocalFrame(lat, lon)
        self.radius_m = radius_m
        self._boxed(self.frame.box(-radius_m, -radius_m, radius_m, radius_m))

    def contains(self, lat: float, lon: float) -> bool:
        x, y = self.frame.xy(lat, lon)
        return x * x + y * y <= self.radius_m * self.radius_m


class CorridorShape(_MetricShape):
    shape = Shape.CORRIDOR

    def __init__(self, positions: Sequence[tuple[float, float]], half_width_m: float) -> None:
        lons = [p[0] for p in positions]
        lats = [p[1] for p in positions]
        self.frame = _LocalFrame((min(lats) + max(lats)) / 2, (min(lons) + max(lons)) / 2)
        self.line = shapely.linestrings([self.frame.xy(lat, lon) for lon, lat in positions])
        self.half_width_m = half_width_m
        minx, miny, maxx, maxy = self.line.bounds
        hw = half_width_m
        self._boxed(self.frame.box(minx - hw, miny - hw, maxx + hw, maxy + hw))

    def contains(self, lat: float, lon: float) -> bool:
        x, y = self.frame.xy(lat, lon)
        return bool(shapely.dwithin(self.line, shapely.points(np.array((x, y))), self.half_width_m))


# --- validation ----------------------------------------------------------------------------------------------


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidGeofence(f"{what} must be a number")
    f = float(value)
    if not math.isfinite(f):
        raise InvalidGeofence(f"{what} must be finite")
    return f


def _position(value: object, where: str) -> tuple[float, float]:
    if not isinstance(value, list | tuple) or len(value) not in (2, 3):
        raise InvalidGeofence(f"{where}: a position is [longitude, latitude] (an altitude may follow)")
    lon = _number(value[0], f"{where}: longitude")
    lat = _number(value[1], f"{where}: latitude")
    if len(value) == 3:
        _number(value[2], f"{where}: altitude")
    if not -180.0 <= lon <= 180.0:
        raise InvalidGeofence(f"{where}: longitude {lon} is outside -180..180")
    if not -90.0 <= lat <= 90.0:
        raise InvalidGeofence(f"{where}: latitude {lat} is outside -90..90")
    return lon, lat


def _positions(value: object, where: str, budget: list[int]) -> list[tuple[float, float]]:
    if not isinstance(value, list | tuple):
        raise InvalidGeofence(f"{where} must be an array of positions")
    budget[0] -= len(value)
    if budget[0] < 0:
        raise InvalidGeofence(f"a fence has at most {MAX_VERTICES} vertices")
    return [_position(p, f"{where}[{i}]") for i, p in enumerate(value)]


def _rings(value: object, where: str, budget: list[int]) -> list[list[tuple[float, float]]]:
    if not isinstance(value, list | tuple) or not value:
        raise InvalidGeofence(f"{where} must be an array of linear rings (the shell, then any holes)")
    rings = []
    for i, raw in enumerate(value):
        ring = _positions(raw, f"{where}[{i}]", budget)
        if len(ring) < 4:
            raise InvalidGeofence(f"{where}[{i}]: a linear ring has at least 4 positions")
        if ring[0] != ring[-1]:
            raise InvalidGeofence(f"{where}[{i}]: a linear ring must end where it starts (closed)")
        rings.append(ring)
    return rings


def _lon_span_ok(lons: Iterable[float], where: str) -> None:
    values = list(lons)
    if max(values) - min(values) >= 180.0:
        raise InvalidGeofence(f"{where} spans 180 degrees of longitude or more (fences cannot cross the antimeridian)")


def _polygon(coords: object, multi: bool) -> tuple[PolygonShape, list[Any]]:
    """The shape and the normalised GeoJSON coordinates."""
    budget = [MAX_VERTICES]
    if multi:
        if not isinstance(coords, list | tuple) or not coords:
            raise InvalidGeofence("MultiPolygon coordinates must be a non-empty array of polygons")
        polys = [_rings(p, f"coordinates[{i}]", budget) for i, p in enumerate(coords)]
    else:
        polys = [_rings(coords, "coordinates", budget)]
    _lon_span_ok((lon for rings in polys for ring in rings for lon, _ in ring), "the polygon")
    parts = [shapely.polygons(rings[0], holes=rings[1:] or None) for rings in polys]
    geom = shapely.multipolygons(parts) if multi else parts[0]
    if not shapely.is_valid(geom):
        raise InvalidGeofence(f"invalid polygon: {shapely.is_valid_reason(geom)}")
    if geom.area <= 0:
        raise InvalidGeofence("the polygon has no area")
    plain = [[[list(p) for p in ring] for ring in rings] for rings in polys]
    return PolygonShape(geom), plain if multi else plain[0]


def _metric(what: str, value: float | None, limit: float) -> float:
    if value is None:
        raise InvalidGeofence(f"{what} is required for this geometry")
    v = _number(value, what)
    if not 0 < v <= limit:
        raise InvalidGeofence(f"{what} must be above 0 and at most {limit:g}")
    return v


def _metric_lat_ok(lat: float, where: str) -> None:
    if abs(lat) > MAX_METRIC_LAT:
        raise InvalidGeofence(f"{where}: metric fences are limited to latitudes within +-{MAX_METRIC_LAT:g}")


def compile_shape(spec: GeofenceSpec) -> tuple[FenceShape, dict[str, Any]]:
    """The shape of `spec` and its normalised GeoJSON geometry; InvalidGeofence says what is wrong."""
    g = spec.geometry
    if not isinstance(g, Mapping):
        raise InvalidGeofence("geometry must be a GeoJSON object")
    kind = g.get("type")
    coords = g.get("coordinates")
    shape: FenceShape
    if kind in ("Polygon", "MultiPolygon"):
        if spec.radius_m is not None or spec.half_width_m is not None:
            raise InvalidGeofence("radius_m and half_width_m are for Point (circle) and LineString (corridor) fences")
        shape, rings = _polygon(coords, kind == "MultiPolygon")
        geojson = {"type": kind, "coordinates": rings}
    elif kind == "Point":
        if spec.half_width_m is not None:
            raise InvalidGeofence("half_width_m is for LineString (corridor) fences; a circle has radius_m")
        lon, lat = _position(coords, "coordinates")
        _metric_lat_ok(lat, "the circle's center")
        radius = _metric("radius_m", spec.radius_m, MAX_RADIUS_M)
        shape = CircleShape(lat, lon, radius)
        geojson = {"type": "Point", "coordinates": [lon, lat]}
        _lon_span_ok(shape.bbox[0::2], "the circle")
    elif kind == "LineString":
        if spec.radius_m is not None:
            raise InvalidGeofence("radius_m is for Point (circle) fences; a corridor has half_width_m")
        positions = _positions(coords, "coordinates", [MAX_VERTICES])
        if len(positions) < 2 or len(set(positions)) < 2:
            raise InvalidGeofence("a corridor's LineString needs at least 2 distinct positions")
        lons = [p[0] for p in positions]
        lats = [p[1] for p in positions]
        if max(lons) - min(lons) > MAX_METRIC_EXTENT_DEG or max(lats) - min(lats) > MAX_METRIC_EXTENT_DEG:
            raise InvalidGeofence(f"a corridor may extend at most {MAX_METRIC_EXTENT_DEG:g} degree each way")
        for lat in lats:
            _metric_lat_ok(lat, "the corridor")
        half = _metric("half_width_m", spec.half_width_m, MAX_HALF_WIDTH_M)
        shape = CorridorShape(positions, half)
        geojson = {"type": "LineString", "coordinates": [[lon, lat] for lon, lat in positions]}
    else:
        raise InvalidGeofence("geometry type must be Polygon, MultiPolygon, Point (circle) or LineString (corridor)")
    if spec.kind is GeofenceKind.SPEED_LIMIT:
        _metric("speed_limit_kmh", spec.speed_limit_kmh, MAX_SPEED_LIMIT_KMH)
    elif spec.speed_limit_kmh is not None:
        raise InvalidGeofence(f"speed_limit_kmh is only for {GeofenceKind.SPEED_LIMIT.value} fences")
    return shape, geojson


def stored_shape(shape: str, geometry: Mapping[str, Any], params: Mapping[str, float]) -> FenceShape:
    """The shape of a stored fence: its GeoJSON was validated and normalised when written, so it is not parsed
    position by position again (a cold start of 100,000 fences is dominated by this)."""
    coords = geometry["coordinates"]
    if shape == Shape.CIRCLE:
        return CircleShape(coords[1], coords[0], params["radius_m"])
    if shape == Shape.CORRIDOR:
        return CorridorShape([(p[0], p[1]) for p in coords], params["half_width_m"])
    if geometry["type"] == "MultiPolygon":
        return PolygonShape(shapely.multipolygons([shapely.polygons(r[0], holes=r[1:] or None) for r in coords]))
    return PolygonShape(shapely.polygons(coords[0], holes=coords[1:] or None))


# --- the index (pure) ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class IndexedFence:
    id: int
    revision: int
    kind: GeofenceKind
    shape: FenceShape
    speed_limit_kmh: float | None = None


def _valid_point(lat: float, lon: float) -> bool:
    return (
        isinstance(lat, int | float)
        and isinstance(lon, int | float)
        and math.isfinite(lat)
        and math.isfinite(lon)
        and -90.0 <= lat <= 90.0
        and -180.0 <= lon <= 180.0
    )


class GeofenceIndex:
    """Immutable: which fences contain a point. Safe to share between threads."""

    def __init__(self, fences: Iterable[IndexedFence] = (), generation: int = 0) -> None:
        self.fences: tuple[IndexedFence, ...] = tuple(fences)
        self.generation = generation
        self._tree: STRtree | None = None
        self._final = [f.shape.exact_in_tree for f in self.fences]
        self._kinds = [f.kind.value for f in self.fences]  # plain str: the hot path skips enum attribute access
        if self.fences:
            self._tree = STRtree([f.shape.tree_geometry for f in self.fences])

    def __len__(self) -> int:
        return len(self.fences)

    def _hits(self, lat: float, lon: float) -> list[int]:
        if self._tree is None or not _valid_point(lat, lon):
            return []
        # One GEOS call answers polygons exactly (holes included) and finds the metric fences whose box holds the
        # point; only those are tested here. The array forms skip shapely's per-call scalar wrapping (half the cost).
        hits = self._tree.query(shapely.points(np.array(((lon, lat),))), predicate="intersects")[1]
        fences, final = self.fences, self._final
        return [i for i in hits.tolist() if final[i] or fences[i].shape.contains(lat, lon)]

    def containing(self, lat: float, lon: float) -> list[IndexedFence]:
        """The fences containing (lat, lon); none for a point that is not a finite WGS-84 position."""
        return [self.fences[i] for i in self._hits(lat, lon)]

    def fences_at(self, lat: float, lon: float) -> set[int]:
        return {self.fences[i].id for i in self._hits(lat, lon)}

    def zones_at(self, lat: float, lon: float) -> set[str]:
        kinds = self._kinds
        return {kinds[i] for i in self._hits(lat, lon)}

    def speed_limit_at(self, lat: float, lon: float) -> float | None:
        """The lowest limit of the speed-limit zones at the point, if any."""
        limits = [f.speed_limit_kmh for f in self.containing(lat, lon) if f.speed_limit_kmh is not None]
        return min(limits) if limits else None


# --- tables --------------------------------------------------------------------------------------------------


def _in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class GeofenceRow(Base):
    __tablename__ = "geofences"
    __table_args__ = (
        CheckConstraint(_in("kind", GeofenceKind), name="ck_geofences_kind"),
        CheckConstraint(_in("shape", Shape), name="ck_geofences_shape"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))
    shape: Mapped[str] = mapped_column(String(16))
    geometry: Mapped[str] = mapped_column(Text)  # GeoJSON
    params: Mapped[str] = mapped_column(Text)  # JSON: radius_m, half_width_m, speed_limit_kmh (those that apply)
    revision: Mapped[int] = mapped_column(Integer)  # 1 at creation, +1 per update: what the index recompiles by
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


class GeofenceGenerationRow(Base):
    """One row (id 1): bumped by every change to `geofences`, so every process knows when to rebuild its index."""

    __tablename__ = "geofence_generation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    generation: Mapped[int] = mapped_column(BigInteger)


@dataclass(frozen=True, slots=True)
class GeofenceRecord:
    id: int
    name: str
    kind: GeofenceKind
    shape: Shape
    geometry: dict[str, Any]
    radius_m: float | None
    half_width_m: float | None
    speed_limit_kmh: float | None
    revision: int
    created_ms: int
    updated_ms: int

    @classmethod
    def of(cls, row: GeofenceRow) -> GeofenceRecord:
        params = json.loads(row.params)
        return cls(
            id=row.id,
            name=row.name,
            kind=GeofenceKind(row.kind),
            shape=Shape(row.shape),
            geometry=json.loads(row.geometry),
            radius_m=params.get("radius_m"),
            half_width_m=params.get("half_width_m"),
            speed_limit_kmh=params.get("speed_limit_kmh"),
            revision=row.revision,
            created_ms=row.created_ms,
            updated_ms=row.updated_ms,
        )

    def spec(self) -> GeofenceSpec:
        return GeofenceSpec(self.name, self.kind, self.geometry, self.radius_m, self.half_width_m, self.speed_limit_kmh)


def _params(spec: GeofenceSpec) -> str:
    found = {"radius_m": spec.radius_m, "half_width_m": spec.half_width_m, "speed_limit_kmh": spec.speed_limit_kmh}
    return json.dumps({k: float(v) for k, v in found.items() if v is not None}, sort_keys=True)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or "\x00" in name:
        raise InvalidGeofence("name must be 1-200 characters, without NUL")


# --- the service ---------------------------------------------------------------------------------------------


class GeofenceService:
    """Fences in the database, an index in memory, kept in step (see the module docstring)."""

    def __init__(
        self, engine: Engine, refresh_interval_s: float = 2.0, metrics: CollectorRegistry | None = None
    ) -> None:
        if not refresh_interval_s > 0:
            raise ValueError("refresh_interval_s must be positive")
        self.engine = engine
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        self.refresh_interval_s = refresh_interval_s
        self._index = GeofenceIndex()
        self._loaded = False
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        registry = metrics if metrics is not None else CollectorRegistry()
        self._m_fences = Gauge("zhilian_geofences", "Fences in this process's spatial index", registry=registry)
        self._m_rebuilds = Counter("zhilian_geofence_index_rebuilds", "Spatial index rebuilds", registry=registry)
        self._m_failures = Counter(
            "zhilian_geofence_refresh_failures",
            "Index refreshes that failed (the previous index stayed in use)",
            registry=registry,
        )

    # -- lookups (hot path: no database, no lock) -------------------------------------------------------------

    @property
    def index(self) -> GeofenceIndex:
        return self._index

    def zones_at(self, lat: float, lon: float) -> Set[str]:
        """Kinds of the fences containing the point: the rules' `VehicleContext.zones_at`."""
        return self._index.zones_at(lat, lon)

    def fences_at(self, lat: float, lon: float) -> set[int]:
        return self._index.fences_at(lat, lon)

    # -- index upkeep -----------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Rebuild the index if the fences changed since it was built; True if it was rebuilt."""
        with self._refresh_lock:
            try:
                with Session(self.engine) as session:
                    generation = session.scalar(
                        select(GeofenceGenerationRow.generation).where(GeofenceGenerationRow.id == 1)
                    )
                    generation = generation or 0
                    if self._loaded and generation == self._index.generation:
                        return False
                    revisions = {i: rev for i, rev in session.execute(select(GeofenceRow.id, GeofenceRow.revision))}
                    fences = self._recompiled(session, revisions)
            except SQLAlchemyError as exc:
                self._m_failures.inc()
                raise StorageError(f"geofences: {exc}") from exc
            self._swap(GeofenceIndex(fences, generation))
        return True

    def _swap(self, index: GeofenceIndex) -> None:
        """Install `index` (the caller holds the refresh lock)."""
        self._index = index
        self._loaded = True
        self._m_fences.set(len(index))
        self._m_rebuilds.inc()
        log.info("geofence index rebuilt", extra={"fences": len(index), "generation": index.generation})

    def _recompiled(self, session: Session, revisions: Mapping[int, int]) -> list[IndexedFence]:
        old = {f.id: f for f in self._index.fences}
        keep = {i: old[i] for i, rev in revisions.items() if i in old and old[i].revision == rev}
        stale = sorted(set(revisions) - keep.keys())
        columns = select(
            GeofenceRow.id,
            GeofenceRow.revision,
            GeofenceRow.kind,
            GeofenceRow.shape,
            GeofenceRow.geometry,
            GeofenceRow.params,
        )
        # Many stale rows (a cold start): one scan; a few (another worker's edits): fetched by id.
        if len(stale) > len(revisions) // 2:
            batches: Iterable[Sequence[int] | None] = [None]
        else:
            batches = [stale[i : i + _FETCH_CHUNK] for i in range(0, len(stale), _FETCH_CHUNK)]
        wanted = set(stale)
        fresh: dict[int, IndexedFence] = {}
        for chunk in batches:
            stmt = columns if chunk is None else columns.where(GeofenceRow.id.in_(chunk))
            for fence_id, revision, kind, shape, geometry, params in session.execute(stmt):
                if fence_id not in wanted:
                    continue
                try:
                    limits = json.loads(params)
                    compiled = stored_shape(shape, json.loads(geometry), limits)
                    fence = IndexedFence(
                        fence_id, revision, GeofenceKind(kind), compiled, limits.get("speed_limit_kmh")
                    )
                except (ValueError, KeyError, TypeError, IndexError, shapely.errors.GEOSException) as exc:
                    # Only a row written around this service could get here; the rest of the index still works.
                    self._m_failures.inc()
                    log.error("stored geofence does not load; left out", extra={"id": fence_id, "error": str(exc)})
                    continue
                fresh[fence_id] = fence
        merged = keep | fresh
        return [merged[i] for i in sorted(merged)]

    def _apply_local(self, generation: int, fence_id: int, fence: IndexedFence | None) -> None:
        """After this process's own write (which moved the counter to `generation`): patch the index with that one
        fence if nothing else changed meanwhile, else reload what changed."""
        with self._refresh_lock:
            current = self._index
            if self._loaded and generation == current.generation + 1:
                fences = [f for f in current.fences if f.id != fence_id]
                if fence is not None:
                    fences.append(fence)
                    fences.sort(key=lambda f: f.id)
                self._swap(GeofenceIndex(fences, generation))
                return
        self._refresh_after_write()

    def start(self) -> None:
        """Load the index (errors propagate: a service must not start blind) and poll for other writers."""
        self.refresh()
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="geofence-refresh", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.refresh_interval_s):
            try:
                self.refresh()
            except StorageError as exc:
                log.warning("geofence refresh failed; the previous index stays in use", extra={"error": str(exc)})
            except Exception:
                self._m_failures.inc()
                log.exception("geofence refresh crashed; the previous index stays in use")

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("geofence refresh thread did not stop in time", extra={"timeout_s": timeout_s})

    # -- CRUD -------------------------------------------------------------------------------------------------

    def create(self, spec: GeofenceSpec) -> GeofenceRecord:
        _check_name(spec.name)
        shape, geojson = compile_shape(spec)
        now = int(time.time() * 1000)
        row = GeofenceRow(
            name=spec.name,
            kind=spec.kind.value,
            shape=shape.shape.value,
            geometry=json.dumps(geojson),
            params=_params(spec),
            revision=1,
            created_ms=now,
            updated_ms=now,
        )
        with self._writing() as session:
            session.add(row)
            session.flush()
            generation = self._bump(session)
        self._apply_local(generation, row.id, IndexedFence(row.id, 1, spec.kind, shape, spec.speed_limit_kmh))
        log.info("geofence created", extra={"id": row.id, "kind": spec.kind.value, "shape": shape.shape.value})
        return GeofenceRecord.of(row)

    def update(self, fence_id: int, spec: GeofenceSpec) -> GeofenceRecord:
        _check_name(spec.name)
        shape, geojson = compile_shape(spec)
        with self._writing() as session:
            row = session.get(GeofenceRow, fence_id, with_for_update=True)
            if row is None:
                raise UnknownGeofence(fence_id)
            row.name = spec.name
            row.kind = spec.kind.value
            row.shape = shape.shape.value
            row.geometry = json.dumps(geojson)
            row.params = _params(spec)
            row.revision += 1
            row.updated_ms = int(time.time() * 1000)
            generation = self._bump(session)
        fence = IndexedFence(fence_id, row.revision, spec.kind, shape, spec.speed_limit_kmh)
        self._apply_local(generation, fence_id, fence)
        log.info("geofence updated", extra={"id": fence_id, "revision": row.revision})
        return GeofenceRecord.of(row)

    def delete(self, fence_id: int) -> None:
        with self._writing() as session:
            row = session.get(GeofenceRow, fence_id, with_for_update=True)
            if row is None:
                raise UnknownGeofence(fence_id)
            session.delete(row)
            generation = self._bump(session)
        self._apply_local(generation, fence_id, None)
        log.info("geofence deleted", extra={"id": fence_id})

    def get(self, fence_id: int) -> GeofenceRecord:
        try:
            with Session(self.engine) as session:
                row = session.get(GeofenceRow, fence_id)
        except SQLAlchemyError as exc:
            raise StorageError(f"geofences: {exc}") from exc
        if row is None:
            raise UnknownGeofence(fence_id)
        return GeofenceRecord.of(row)

    def list_fences(self, limit: int = 1000, offset: int = 0, ids: Iterable[int] | None = None) -> list[GeofenceRecord]:
        stmt = select(GeofenceRow).order_by(GeofenceRow.id)
        if ids is not None:
            wanted = sorted(set(ids))
            if not wanted:
                return []
            stmt = stmt.where(GeofenceRow.id.in_(wanted))
        stmt = stmt.limit(max(1, min(limit, MAX_LIST))).offset(max(0, offset))
        try:
            with Session(self.engine) as session:
                return [GeofenceRecord.of(r) for r in session.scalars(stmt)]
        except SQLAlchemyError as exc:
            raise StorageError(f"geofences: {exc}") from exc

    def containing(self, lat: float, lon: float, limit: int = 1000) -> list[GeofenceRecord]:
        """The fences containing the point, according to this process's index."""
        return self.list_fences(limit=limit, ids=self._index.fences_at(lat, lon))

    # -- helpers ----------------------------------------------------------------------------------------------

    def _writing(self) -> _WriteTransaction:
        return _WriteTransaction(self._write_engine)

    @staticmethod
    def _bump(session: Session) -> int:
        """Move the generation counter on, in the writer's transaction; returns the new generation."""
        generation = session.scalar(
            update(GeofenceGenerationRow)
            .where(GeofenceGenerationRow.id == 1)
            .values(generation=GeofenceGenerationRow.generation + 1)
            .returning(GeofenceGenerationRow.generation)
        )
        if generation is None:  # a database set up around the migration that seeds the row
            session.add(GeofenceGenerationRow(id=1, generation=1))
            return 1
        return int(generation)

    def _refresh_after_write(self) -> None:
        # The write is committed: a failing refresh must not turn it into an error the client would retry (and
        # duplicate); the poller catches up.
        try:
            self.refresh()
        except StorageError as exc:
            log.warning("geofence index refresh after a write failed", extra={"error": str(exc)})


class _WriteTransaction:
    """`with` a write session in one transaction, database errors as StorageError (typed errors pass through)."""

    def __init__(self, engine: Engine) -> None:
        self._session = Session(engine, expire_on_commit=False)

    def __enter__(self) -> Session:
        self._session.begin()
        return self._session

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._session.commit()
                except SQLAlchemyError as err:
                    self._session.rollback()
                    raise StorageError(f"geofences: {err}") from err
            else:
                self._session.rollback()
                if isinstance(exc, SQLAlchemyError):
                    raise StorageError(f"geofences: {exc}") from exc
        finally:
            self._session.close()
