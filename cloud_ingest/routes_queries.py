"""Operator queries over HTTP: the fleet snapshot, a vehicle's downsampled track, its daily aggregates and its
long-term rollups. Each is one query to the time-series store, whatever the fleet size or the range
(docs/STORAGE.md has the method of each, BENCHMARKS.md their cost at 10 M rows)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, Field

from cloud_ingest.db import Role
from cloud_ingest.errors import QueryError
from cloud_ingest.registry import Registry
from cloud_ingest.tsstore import (
    DEFAULT_TZ,
    GNSS_SPEED,
    MAX_QUERY_LIMIT,
    MAX_TRACK_BUCKETS,
    PACK_CURRENT,
    PACK_TEMP_MAX,
    PACK_VOLTAGE,
    BBox,
    FleetEntry,
    TimeSeriesStore,
)
from protocol import Catalogue
from protocol.topics import VIN_RE

_UNPROCESSABLE = 422
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
JsonValue = float | int | bool | str
VinPath = Annotated[str, Path(description="vehicle identification number")]
# A query string carries a few hundred VINs at most; larger sets belong in the registry's pages (/v1/vehicles).
MAX_SNAPSHOT_VINS = 1000
DEFAULT_SNAPSHOT_SIGNALS = [
    "Powertrain.TractionBattery.StateOfCharge",
    GNSS_SPEED,
    "Speed",
    PACK_VOLTAGE,
    PACK_CURRENT,
    PACK_TEMP_MAX,
]
DEFAULT_TRACK_POINTS = 1000


class PositionOut(BaseModel):
    lat: float
    lon: float
    ts: datetime


class FleetVehicleOut(BaseModel):
    vin: str
    ts: datetime = Field(description="the newest sample")
    values: list[JsonValue | None] = Field(
        description="last known value of each signal in `signals`, in that order (null: never seen)"
    )
    position: PositionOut | None = Field(description="the newest sample that had a position")


class SnapshotOut(BaseModel):
    count: int
    signals: list[str] = Field(description="the signals of every vehicle's `values`, in order")
    vehicles: list[FleetVehicleOut]


class TrackPointOut(BaseModel):
    ts: datetime = Field(description="start of the bucket")
    lat: float = Field(description="the last fix in the bucket")
    lon: float
    max_speed_kmh: float | None = Field(description="highest GNSS ground speed in the bucket")
    samples: int = Field(description="fixes in the bucket")


class TrackOut(BaseModel):
    vin: str
    start: datetime
    end: datetime
    bucket_ms: int
    points: list[TrackPointOut]


class ChargingSessionOut(BaseModel):
    start: datetime
    end: datetime
    energy_wh: float


class DailyOut(BaseModel):
    vin: str
    date: date
    tz: str
    start: datetime
    end: datetime = Field(description="exclusive")
    samples: int
    distance_km: float = Field(description="GNSS ground speed integrated over time")
    max_speed_kmh: float | None
    energy_used_wh: float = Field(description="∫V·I dt while discharging")
    energy_charged_wh: float
    charging_sessions: list[ChargingSessionOut]
    max_battery_temp_c: float | None


class RollupOut(BaseModel):
    vin: str
    signals: list[str]
    timestamps: list[datetime] = Field(description="start of each bucket")
    samples: list[int]
    means: dict[str, list[float | None]]


def _ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # naive times are taken as UTC
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _dt(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def snapshot_json(names: list[str], entries: list[FleetEntry]) -> bytes:
    """The snapshot answer, the same JSON as SnapshotOut's, serialised by hand: validating 10,000 models would cost
    more than the query itself. Values are positional (names once, in `signals`): keyed by name, the names made up
    two thirds of a 10,000-vehicle answer (4 MB instead of 1.4 MB). orjson writes it and its datetimes (as pydantic
    does, with OPT_UTC_Z) in ≈ 6 ms where `json.dumps` of ISO strings took ≈ 110 ms (BENCHMARKS.md)."""
    td, epoch = timedelta, _EPOCH
    vehicles = [
        {
            "vin": e.vin,
            "ts": epoch + td(milliseconds=e.ts),
            "values": [e.values.get(n) for n in names],
            "position": None
            if e.position is None
            else {"lat": e.position[1], "lon": e.position[2], "ts": epoch + td(milliseconds=e.position[0])},
        }
        for e in entries
    ]
    return orjson.dumps({"count": len(vehicles), "signals": names, "vehicles": vehicles}, option=orjson.OPT_UTC_Z)


def _names(raw: str | None, catalogue: Catalogue, default: list[str]) -> list[str]:
    if raw is None:
        return default
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in catalogue]
    if unknown:
        raise HTTPException(_UNPROCESSABLE, {"message": "unknown signals", "unknown": unknown[:50]})
    return names


def _bbox(raw: str) -> BBox:
    parts = raw.split(",")
    try:
        min_lon, min_lat, max_lon, max_lat = (float(p) for p in parts)
        return BBox(min_lat=min_lat, min_lon=min_lon, max_lat=max_lat, max_lon=max_lon)
    except (ValueError, QueryError):
        raise HTTPException(
            _UNPROCESSABLE, "bbox must be min_lon,min_lat,max_lon,max_lat within ±180/±90, min <= max"
        ) from None


def _range(start: datetime | None, end: datetime | None, default_span: timedelta) -> tuple[int, int]:
    end_ms = _ms(end) if end is not None else _ms(datetime.now(UTC))
    start_ms = _ms(start) if start is not None else end_ms - default_span // timedelta(milliseconds=1)
    if start_ms > end_ms:
        raise HTTPException(_UNPROCESSABLE, "from is after to")
    return start_ms, end_ms


def queries_router(
    store: TimeSeriesStore,
    registry: Registry,
    catalogue: Catalogue,
    require: Callable[[Role], Callable[..., Any]],
) -> APIRouter:
    """`require(role)` is the app's API-key dependency factory; every route here needs a viewer key."""
    router = APIRouter(dependencies=[Depends(require(Role.VIEWER))])

    def known_vin(vin: str) -> None:
        if not VIN_RE.match(vin) or registry.vehicle_summary(vin) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown vehicle {vin!r}"[:200])

    @router.get("/v1/fleet/snapshot", response_model=SnapshotOut, tags=["fleet"])
    def fleet_snapshot(
        signals: Annotated[
            str | None,
            Query(max_length=4096, description="comma-separated catalogue names; default: SOC, speeds, pack V/I/T"),
        ] = None,
        vins: Annotated[
            str | None, Query(max_length=40 * MAX_SNAPSHOT_VINS, description="comma-separated VINs; default: all")
        ] = None,
        bbox: Annotated[
            str | None, Query(max_length=200, description="min_lon,min_lat,max_lon,max_lat of the last position")
        ] = None,
        stale_since: Annotated[
            datetime | None, Query(description="only vehicles whose newest sample is older than this")
        ] = None,
        seen_since: Annotated[
            datetime | None, Query(description="only vehicles with a sample at or after this")
        ] = None,
    ) -> Response:
        names = _names(signals, catalogue, DEFAULT_SNAPSHOT_SIGNALS)
        vin_list = None
        if vins is not None:
            vin_list = [v.strip() for v in vins.split(",") if v.strip()]
            if len(vin_list) > MAX_SNAPSHOT_VINS:
                raise HTTPException(_UNPROCESSABLE, f"at most {MAX_SNAPSHOT_VINS} VINs")
        try:
            entries = store.fleet_snapshot(
                names,
                vins=vin_list,
                bbox=None if bbox is None else _bbox(bbox),
                stale_before_ms=None if stale_since is None else _ms(stale_since),
                seen_since_ms=None if seen_since is None else _ms(seen_since),
            )
        except QueryError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return Response(snapshot_json(names, entries), media_type="application/json")

    @router.get("/v1/vehicles/{vin}/track", response_model=TrackOut, tags=["vehicles"])
    def track(
        vin: VinPath,
        start: Annotated[datetime | None, Query(alias="from", description="ISO-8601; default: to - 24 h")] = None,
        end: Annotated[datetime | None, Query(alias="to", description="ISO-8601, inclusive; default: now")] = None,
        points: Annotated[
            int, Query(ge=1, le=MAX_TRACK_BUCKETS, description="at most this many buckets over the range")
        ] = DEFAULT_TRACK_POINTS,
        interval: Annotated[
            float | None, Query(gt=0, le=10 * 365 * 86_400, description="bucket size in seconds (instead of points)")
        ] = None,
    ) -> TrackOut:
        start_ms, end_ms = _range(start, end, timedelta(days=1))
        if interval is not None:
            bucket_ms = max(1, round(interval * 1000))
        else:
            bucket_ms = max(1, math.ceil((end_ms - start_ms + 1) / points))
        known_vin(vin)
        try:
            found = store.track(vin, start_ms, end_ms, bucket_ms)
        except QueryError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return TrackOut(
            vin=vin,
            start=_dt(start_ms),
            end=_dt(end_ms),
            bucket_ms=bucket_ms,
            points=[
                TrackPointOut(ts=_dt(p.ts), lat=p.lat, lon=p.lon, max_speed_kmh=p.max_speed, samples=p.samples)
                for p in found
            ],
        )

    @router.get("/v1/vehicles/{vin}/daily", response_model=DailyOut, tags=["vehicles"])
    def daily(
        vin: VinPath,
        day: Annotated[date, Query(alias="date", description="calendar day, YYYY-MM-DD")],
        tz: Annotated[str, Query(max_length=64, description="IANA time zone of the day")] = DEFAULT_TZ,
    ) -> DailyOut:
        known_vin(vin)
        try:
            d = store.daily(vin, day, tz)
        except QueryError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return DailyOut(
            vin=vin,
            date=d.day,
            tz=d.tz,
            start=_dt(d.start_ms),
            end=_dt(d.end_ms),
            samples=d.samples,
            distance_km=d.distance_km,
            max_speed_kmh=d.max_speed_kmh,
            energy_used_wh=d.energy_used_wh,
            energy_charged_wh=d.energy_charged_wh,
            charging_sessions=[
                ChargingSessionOut(start=_dt(s.start_ms), end=_dt(s.end_ms), energy_wh=s.energy_wh)
                for s in d.charging_sessions
            ],
            max_battery_temp_c=d.max_battery_temp_c,
        )

    @router.get(
        "/v1/vehicles/{vin}/rollup",
        response_model=RollupOut,
        tags=["vehicles"],
        responses={404: {"description": "unknown vehicle, or the service keeps no rollups (no retention)"}},
    )
    def rollup(
        vin: VinPath,
        start: Annotated[datetime | None, Query(alias="from", description="ISO-8601; default: to - 30 days")] = None,
        end: Annotated[datetime | None, Query(alias="to", description="ISO-8601, inclusive; default: now")] = None,
        signals: Annotated[
            str | None, Query(max_length=4096, description="comma-separated numeric signals; default: all numeric")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_QUERY_LIMIT)] = 10_000,
    ) -> RollupOut:
        start_ms, end_ms = _range(start, end, timedelta(days=30))
        names = None if signals is None else _names(signals, catalogue, [])
        known_vin(vin)
        if store.retention is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "this service keeps no rollups (retention is off)")
        try:
            r = store.query_rollup(vin, start_ms, end_ms, names, limit)
        except QueryError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return RollupOut(
            vin=vin,
            signals=list(r.columns),
            timestamps=[_dt(t) for t in r.timestamps],
            samples=r.samples,
            means=r.columns,
        )

    return router
