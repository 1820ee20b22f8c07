"""A synthetic road graph of Chongqing's Yuzhong peninsula, and what a rider meets along a route through it.

The peninsula is a ridge between two rivers: the Jialing to the north and the Yangtze to the south meet at its
eastern tip (Chaotianmen). Riverside arterials run flat along both banks at about 185 m; the old town climbs to
Jiefangbei (≈ 245 m) and, further west, Eling (≈ 360 m). The graph reproduces that shape from a few lines of
geometry — a spine line with a ridge profile, land tapering to the tip — and lays a jittered grid of junctions
over it: east-west roads along the banks (arterials) and across the slope (streets), and short, steep north-south
lanes between them. Junctions where bigger roads meet are signalised. Nothing is survey grade; what matters for
telemetry is that rides climb and descend by tens of metres, stop at lights, and slow down in rush hours.

`RouteProfile` turns any `Route` into what the vehicle model needs to ride it in closed form: the signalised
stops, the speed cap of every segment, and cumulative ascent and descent (so the energy of a stretch of road is
two table look-ups). A plain `Route` (e.g. the original Yuzhong loop) gets every waypoint as a signal and no caps.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from simulators.route import Route, Waypoint

# Road classes: (speed cap km/h, share of junctions of this class that are signalised).
ROAD_CLASSES: dict[str, tuple[float, float]] = {
    "arterial": (60.0, 0.85),
    "street": (40.0, 0.6),
    "lane": (20.0, 0.2),
}
LOCAL_UTC_OFFSET_H = 8.0  # China Standard Time
# Rush hours (local time) and how much they slow traffic on each class at their peak.
RUSH_HOURS: tuple[tuple[float, float], ...] = ((8.25, 1.1), (18.0, 1.3))  # (peak hour, half-width h)
RUSH_SLOWDOWN = {"arterial": 0.45, "street": 0.35, "lane": 0.1}

_SPINE: tuple[tuple[float, float], ...] = (  # (lon, lat) of the ridge line, west to east
    (106.534, 29.5530),
    (106.548, 29.5545),
    (106.562, 29.5560),
    (106.577, 29.5585),
    (106.589, 29.5640),
)
_RIDGE_ALT: tuple[tuple[float, float], ...] = (  # (lon, ridge altitude m)
    (106.534, 362.0),
    (106.545, 300.0),
    (106.556, 262.0),
    (106.570, 250.0),
    (106.578, 245.0),
    (106.589, 205.0),
)
_RIVER_ALT_M = 182.0
_HALF_WIDTH_DEG = 0.0075  # land either side of the spine in the west (≈ 830 m), tapering to the tip
_M_PER_DEG_LAT = 111_195.0
# Roads up the flanks zigzag: no ridden segment is steeper than this (a hairpin waypoint is added where needed).
MAX_GRADE = 0.09


def _interp(points: Sequence[tuple[float, float]], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def terrain_alt_m(lat: float, lon: float) -> float:
    """Ground altitude of the synthetic peninsula: a ridge falling to the rivers, with some smaller hills."""
    half = _half_width(lon)
    across = abs(lat - _interp(_SPINE, lon)) / max(half, 1e-6)
    ridge = _interp(_RIDGE_ALT, lon)
    shape = math.exp(-((across / 0.65) ** 2))  # a broad top, steep flanks, flat banks
    bumps = 6.0 * math.sin(lon * 2900.0) * math.cos(lat * 3100.0)
    return _RIVER_ALT_M + (ridge - _RIVER_ALT_M) * shape + bumps * shape


def _half_width(lon: float) -> float:
    return _HALF_WIDTH_DEG * min(1.0, max(0.15, (106.5895 - lon) / 0.016))


@dataclass(frozen=True, slots=True)
class Junction:
    id: int
    lat: float
    lon: float
    alt_m: float
    signal: bool
    name: str


@dataclass(frozen=True, slots=True)
class Road:
    a: int
    b: int
    klass: str
    length_m: float


class RoadGraph:
    """Junctions and roads of the synthetic peninsula. Deterministic: `RoadGraph()` is always the same graph."""

    ROWS = (-2, -1, 0, 1, 2)  # across the spine; ±2 are the riverside arterials
    COLUMNS = 13  # along the spine

    def __init__(self, seed: int = 2024) -> None:
        rng = random.Random(f"roads-{seed}")
        self.junctions: list[Junction] = []
        self.roads: list[Road] = []
        self._adj: dict[int, list[tuple[int, int]]] = {}  # junction -> [(neighbour, road index)]
        grid: dict[tuple[int, int], int] = {}
        lons = [106.538 + i * (106.586 - 106.538) / (self.COLUMNS - 1) for i in range(self.COLUMNS)]
        for c, lon0 in enumerate(lons):
            for r in self.ROWS:
                lon = lon0 + rng.uniform(-0.0006, 0.0006)
                half = _half_width(lon)
                if half < 0.0025 and abs(r) == 1:
                    continue  # the narrow tip only has room for the bank roads and the spine
                lat = _interp(_SPINE, lon) + r / 2.0 * half * 0.92 + rng.uniform(-0.0002, 0.0002)
                grid[(c, r)] = len(self.junctions)
                self.junctions.append(
                    Junction(len(self.junctions), lat, lon, terrain_alt_m(lat, lon), False, f"J{c}{r:+d}")
                )
        for (c, r), j in grid.items():
            along = grid.get((c + 1, r))
            if along is not None:
                self._connect(j, along, "arterial" if abs(r) == 2 else "street")
            # Cross lanes climb between neighbouring rows on every other column (and the tip's bank-to-spine).
            for dr in (1, 2):
                up = grid.get((c, r + dr))
                if up is not None and (c % 2 == 0 or dr == 2) and not any(grid.get((c, r + k)) for k in range(1, dr)):
                    self._connect(j, up, "lane" if dr == 1 else "street")
                    break
        # Signals: a junction is signalised with the probability of the biggest road class meeting there.
        for junction in list(self.junctions):
            classes = [self.roads[k].klass for _, k in self._adj.get(junction.id, [])]
            p = max((ROAD_CLASSES[k][1] for k in classes), default=0.0)
            signal = len(classes) >= 3 and rng.random() < p
            self.junctions[junction.id] = dataclasses.replace(junction, signal=signal)

    def _connect(self, a: int, b: int, klass: str) -> None:
        ja, jb = self.junctions[a], self.junctions[b]
        length = _dist_m(ja.lat, ja.lon, jb.lat, jb.lon)
        self.roads.append(Road(a, b, klass, length))
        k = len(self.roads) - 1
        self._adj.setdefault(a, []).append((b, k))
        self._adj.setdefault(b, []).append((a, k))

    def neighbours(self, j: int) -> list[tuple[int, Road]]:
        return [(n, self.roads[k]) for n, k in self._adj.get(j, [])]

    def road_between(self, a: int, b: int) -> Road:
        for n, k in self._adj.get(a, []):
            if n == b:
                return self.roads[k]
        raise KeyError(f"no road between junctions {a} and {b}")

    def shortest_path(self, a: int, b: int) -> list[int]:
        """Fewest-junctions path from `a` to `b` (inclusive); the grid is small, BFS is plenty."""
        prev: dict[int, int] = {a: a}
        todo = deque([a])
        while todo:
            j = todo.popleft()
            if j == b:
                break
            for n, _ in self.neighbours(j):
                if n not in prev:
                    prev[n] = j
                    todo.append(n)
        if b not in prev:
            raise ValueError(f"junction {b} is not reachable from {a}")
        path = [b]
        while path[-1] != a:
            path.append(prev[path[-1]])
        return path[::-1]

    def tour(self, seed: int, length_m: tuple[float, float] = (8_000.0, 14_000.0)) -> RoadRoute:
        """A closed ride through the graph drawn from `seed`: a random walk that keeps going rather than turning
        back, for about `length_m`, and the shortest way home."""
        rng = random.Random(f"tour-{seed}")
        target = rng.uniform(*length_m)
        start = rng.randrange(len(self.junctions))
        path = [start]
        ridden = 0.0
        while ridden < target:
            here = path[-1]
            options = [(n, road) for n, road in self.neighbours(here) if len(path) < 2 or n != path[-2]]
            if not options:
                options = self.neighbours(here)
            # Prefer the bigger roads a little: riders use the arterials to get anywhere.
            weights = [{"arterial": 3.0, "street": 2.0, "lane": 1.0}[road.klass] for _, road in options]
            n, road = rng.choices(options, weights)[0]
            path.append(n)
            ridden += road.length_m
        home = self.shortest_path(path[-1], start)
        path += home[1:]
        path.pop()  # the loop closes on its own
        # A U-turn at the very end (back where the walk came from) would make two consecutive waypoints equal.
        while len(path) > 3 and path[-1] == path[0]:
            path.pop()
        return RoadRoute.through(self, path, name=f"yuzhong-graph-{seed}")


class RoadRoute(Route):
    """A `Route` through the road graph that also knows, per waypoint, whether it is a signalised junction and,
    per segment, the road class starting there."""

    def __init__(
        self,
        waypoints: Sequence[Waypoint],
        signals: Sequence[bool],
        classes: Sequence[str],
        start_offset_m: float = 0.0,
        name: str = "",
    ) -> None:
        super().__init__(waypoints, start_offset_m=start_offset_m, name=name)
        if len(signals) != len(self.waypoints) or len(classes) != len(self.waypoints):
            raise ValueError("one signal flag and one road class per waypoint")
        unknown = set(classes) - set(ROAD_CLASSES)
        if unknown:
            raise ValueError(f"unknown road classes {sorted(unknown)}")
        self.signals = tuple(signals)
        self.classes = tuple(classes)

    @classmethod
    def through(cls, graph: RoadGraph, path: Sequence[int], name: str = "") -> RoadRoute:
        waypoints: list[Waypoint] = []
        signals: list[bool] = []
        classes: list[str] = []
        for a, b in zip(path, [*path[1:], path[0]], strict=True):
            ja, jb = graph.junctions[a], graph.junctions[b]
            klass = graph.road_between(a, b).klass
            waypoints.append(Waypoint(ja.lat, ja.lon, ja.alt_m, ja.name))
            signals.append(ja.signal)
            classes.append(klass)
            hairpin = _hairpin(ja, jb)
            if hairpin is not None:
                waypoints.append(hairpin)
                signals.append(False)
                classes.append(klass)
        return cls(waypoints, signals, classes, name=name)

    def shifted(self, start_offset_m: float) -> RoadRoute:
        return RoadRoute(self.waypoints, self.signals, self.classes, start_offset_m=start_offset_m, name=self.name)


_GRAPH: RoadGraph | None = None


def chongqing_graph() -> RoadGraph:
    """The shared synthetic Yuzhong road graph (built once)."""
    global _GRAPH
    if _GRAPH is None:
        _GRAPH = RoadGraph()
    return _GRAPH


def graph_route_for(index: int) -> RoadRoute:
    """Vehicle `index`'s ride through the road graph: its own tour, deterministic by index."""
    return chongqing_graph().tour(index)


def congestion_factor(klass: str, unix_s: float) -> float:
    """Share of its free speed traffic on a road of `klass` allows at `unix_s` (1.0 outside rush hours)."""
    hour = ((unix_s / 3600.0) + LOCAL_UTC_OFFSET_H) % 24.0
    worst = 0.0
    for peak, half in RUSH_HOURS:
        d = abs(hour - peak)
        if d < half:
            worst = max(worst, math.cos(d / half * math.pi / 2.0) ** 2)
    return 1.0 - RUSH_SLOWDOWN.get(klass, 0.3) * worst


class RouteProfile:
    """What a rider meets along a `Route`, in route coordinates (metres from waypoint 0, wrapping at length):
    signalised stops, speed caps and cumulative ascent/descent."""

    def __init__(self, route: Route) -> None:
        starts = route.segment_starts_m
        n = len(route.waypoints)
        self.length_m = starts[-1]
        self.offset_m = route.start_offset_m
        if isinstance(route, RoadRoute):
            signals, classes = route.signals, route.classes
        else:
            signals, classes = (True,) * n, ("street",) * n
        self.starts = starts
        self.classes = classes
        self.caps_kmh = tuple(ROAD_CLASSES[k][0] if isinstance(route, RoadRoute) else math.inf for k in classes)
        self.signal_at = tuple(starts[i] for i in range(n) if signals[i])
        up = [0.0]
        down = [0.0]
        for i in range(n):
            rise = route.waypoints[(i + 1) % n].alt_m - route.waypoints[i].alt_m
            up.append(up[-1] + max(0.0, rise))
            down.append(down[-1] + max(0.0, -rise))
        self._up = up
        self._down = down

    def _segment(self, d: float) -> int:
        return min(bisect.bisect_right(self.starts, d) - 1, len(self.classes) - 1)

    def route_coord(self, s: float) -> float:
        """Route coordinate of ride distance `s` (the model's odometer along this route)."""
        return (s + self.offset_m) % self.length_m

    def cap_kmh(self, s: float) -> float:
        return self.caps_kmh[self._segment(self.route_coord(s))]

    def klass(self, s: float) -> str:
        return self.classes[self._segment(self.route_coord(s))]

    def climb(self, s: float) -> tuple[float, float]:
        """(ascent, descent) in metres ridden from ride distance 0 to `s`, both growing with `s`."""
        return self._climb_abs(s + self.offset_m)[0] - self._climb_abs(self.offset_m)[0], self._climb_abs(
            s + self.offset_m
        )[1] - self._climb_abs(self.offset_m)[1]

    def _climb_abs(self, d: float) -> tuple[float, float]:
        laps, r = divmod(d, self.length_m)
        i = self._segment(r)
        f = (r - self.starts[i]) / (self.starts[i + 1] - self.starts[i])
        up = self._up[i] + (self._up[i + 1] - self._up[i]) * f
        down = self._down[i] + (self._down[i + 1] - self._down[i]) * f
        return laps * self._up[-1] + up, laps * self._down[-1] + down

    def next_signal(self, s: float, min_ahead_m: float) -> float:
        """Ride distance of the first signalised junction at least `min_ahead_m` beyond `s` (inf if none)."""
        if not self.signal_at:
            return math.inf
        d = self.route_coord(s + min_ahead_m)
        i = bisect.bisect_left(self.signal_at, d)
        ahead = self.signal_at[i] - d if i < len(self.signal_at) else self.length_m - d + self.signal_at[0]
        return s + min_ahead_m + ahead


def _dist_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    dy = (lat2 - lat1) * _M_PER_DEG_LAT
    dx = (lon2 - lon1) * _M_PER_DEG_LAT * math.cos(math.radians((lat1 + lat2) / 2))
    return math.hypot(dx, dy)


def _hairpin(a: Junction, b: Junction) -> Waypoint | None:
    """The bend of a road that zigzags from `a` to `b` to stay within MAX_GRADE, or None if it runs straight."""
    straight = _dist_m(a.lat, a.lon, b.lat, b.lon)
    needed = abs(b.alt_m - a.alt_m) / (MAX_GRADE * 0.98)  # a margin for the planar approximation
    if needed <= straight:
        return None
    # One bend at the side of the midpoint makes the road two legs of `needed / 2` each.
    side = math.sqrt((needed / 2.0) ** 2 - (straight / 2.0) ** 2)
    dy = (b.lat - a.lat) * _M_PER_DEG_LAT
    dx = (b.lon - a.lon) * _M_PER_DEG_LAT * math.cos(math.radians(a.lat))
    # Perpendicular to the road, always to its east/north side so the bend is deterministic.
    px, py = -dy / straight, dx / straight
    if px < 0:
        px, py = -px, -py
    lat = (a.lat + b.lat) / 2.0 + py * side / _M_PER_DEG_LAT
    lon = (a.lon + b.lon) / 2.0 + px * side / (_M_PER_DEG_LAT * math.cos(math.radians(a.lat)))
    return Waypoint(lat, lon, (a.alt_m + b.alt_m) / 2.0, f"{a.name}~{b.name}")
