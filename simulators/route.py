"""A closed riding loop through Chongqing's Yuzhong peninsula, and the plane geometry to ride along it.

The waypoints are WGS-84 and only "real-ish": good enough that a map shows a plausible ride along the river roads
and up through the old town, not survey grade.  Altitudes follow the terrain: the Yangtze and Jialing riverside
roads sit at 180-210 m, Jiefangbei at the top of the old town around 245 m, Eling park near 360 m — Chongqing
riders climb 10 % grades, and that shows in the battery current.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius; the loop is ~10 km, so the sphere is plenty


@dataclass(frozen=True, slots=True)
class Waypoint:
    lat: float
    lon: float
    alt_m: float
    name: str = ""


@dataclass(frozen=True, slots=True)
class RoutePoint:
    """A position on the route with the local direction of travel and road grade (rise over run)."""

    lat: float
    lon: float
    alt_m: float
    heading_deg: float
    grade: float


YUZHONG_LOOP: tuple[Waypoint, ...] = (
    Waypoint(29.5577, 106.5770, 245.0, "Jiefangbei"),
    Waypoint(29.5600, 106.5825, 232.0, "Xiaoshizi"),
    Waypoint(29.5648, 106.5862, 200.0, "Chaotianmen"),
    Waypoint(29.5588, 106.5868, 186.0, "Dongshuimen Bridge (north end)"),
    Waypoint(29.5532, 106.5800, 181.0, "Changbin Road, Shibati riverside"),
    Waypoint(29.5505, 106.5722, 182.0, "Chuqimen"),
    Waypoint(29.5486, 106.5650, 185.0, "Nanjimen"),
    Waypoint(29.5478, 106.5560, 190.0, "Caiyuanba"),
    Waypoint(29.5450, 106.5470, 196.0, "Changbin Road west"),
    Waypoint(29.5540, 106.5460, 290.0, "Lianglukou"),
    Waypoint(29.5525, 106.5360, 362.0, "Eling Park"),
    Waypoint(29.5655, 106.5430, 212.0, "Huanghuayuan Bridge (south end)"),
    Waypoint(29.5640, 106.5560, 205.0, "Daxigou riverside"),
    Waypoint(29.5635, 106.5680, 214.0, "Linjiangmen"),
    Waypoint(29.5629, 106.5787, 202.0, "Hongyadong"),
)

_GOLDEN_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2.0 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees true in [0, 360)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


class Route:
    """A closed loop of waypoints; `position_at(s)` finds the point `s` metres along it (wrapping around).

    Segments are short (< 2 km), so interpolating linearly in lat/lon is far below GNSS noise and keeps
    lookups cheap: one bisect and a few multiplications.
    """

    def __init__(self, waypoints: Sequence[Waypoint], start_offset_m: float = 0.0, name: str = "") -> None:
        if len(waypoints) < 3:
            raise ValueError("a closed route needs at least three waypoints")
        self.waypoints: tuple[Waypoint, ...] = tuple(waypoints)
        self.name = name
        pts = (*self.waypoints, self.waypoints[0])
        starts = [0.0]
        headings: list[float] = []
        grades: list[float] = []
        for a, b in itertools.pairwise(pts):
            seg = haversine_m(a.lat, a.lon, b.lat, b.lon)
            if seg <= 0.0:
                raise ValueError(f"waypoints {a.name!r} and {b.name!r} coincide")
            starts.append(starts[-1] + seg)
            headings.append(bearing_deg(a.lat, a.lon, b.lat, b.lon))
            grades.append((b.alt_m - a.alt_m) / seg)
        self.length_m = starts[-1]
        self.start_offset_m = start_offset_m % self.length_m
        self._starts = starts
        self._headings = headings
        self._grades = grades

    @property
    def segment_starts_m(self) -> tuple[float, ...]:
        """Distance of each waypoint from the first one along the loop, then the loop's length (len + 1 values).
        Waypoint coordinates, not offset by `start_offset_m`."""
        return tuple(self._starts)

    def position_at(self, s: float) -> RoutePoint:
        """The point `s` metres from this route's start offset, travelling in waypoint order."""
        d = (s + self.start_offset_m) % self.length_m
        i = min(bisect.bisect_right(self._starts, d) - 1, len(self.waypoints) - 1)
        a = self.waypoints[i]
        b = self.waypoints[(i + 1) % len(self.waypoints)]
        f = (d - self._starts[i]) / (self._starts[i + 1] - self._starts[i])
        return RoutePoint(
            lat=a.lat + (b.lat - a.lat) * f,
            lon=a.lon + (b.lon - a.lon) * f,
            alt_m=a.alt_m + (b.alt_m - a.alt_m) * f,
            heading_deg=self._headings[i],
            grade=self._grades[i],
        )


def route_for(index: int) -> Route:
    """The loop as vehicle `index` rides it: odd indices ride it the other way round, and start offsets are
    spread by the golden ratio so any fleet size covers the loop evenly rather than riding in a pack."""
    waypoints = YUZHONG_LOOP if index % 2 == 0 else tuple(reversed(YUZHONG_LOOP))
    direction = "clockwise" if index % 2 == 0 else "anticlockwise"
    base = Route(waypoints)
    offset = ((index * _GOLDEN_FRACTION) % 1.0) * base.length_m
    return Route(waypoints, start_offset_m=offset, name=f"yuzhong-loop-{direction}")
