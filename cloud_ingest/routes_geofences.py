"""Geofences over HTTP: create, replace and delete (operator), read and list (viewer), and which fences contain a
point (`GET /v1/geofences?lat=..&lon=..`, answered from the spatial index). A geometry the service cannot use is
422 with the reason (an open ring, a self-intersection, a hole outside its shell, a radius out of bounds ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cloud_ingest.db import Role
from cloud_ingest.geofences import (
    MAX_LIST,
    GeofenceKind,
    GeofenceRecord,
    GeofenceService,
    GeofenceSpec,
    InvalidGeofence,
    Shape,
    UnknownGeofence,
)

_UNPROCESSABLE = 422
_MAX_ID = 2**31 - 1
FenceId = Annotated[int, Path(ge=1, le=_MAX_ID, description="geofence id")]


class GeofenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    kind: GeofenceKind = Field(description="no_charging, speed_limit (needs speed_limit_kmh) or restricted")
    geometry: dict[str, Any] = Field(
        description="GeoJSON [lon, lat]: Polygon or MultiPolygon (holes allowed), Point (a circle: give radius_m) "
        "or LineString (a corridor: give half_width_m)",
        examples=[{"type": "Point", "coordinates": [120.1551, 30.2741]}],
    )
    radius_m: float | None = Field(default=None, allow_inf_nan=False, description="circle radius, metres")
    half_width_m: float | None = Field(default=None, allow_inf_nan=False, description="corridor half width, metres")
    speed_limit_kmh: float | None = Field(default=None, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        # PostgreSQL text cannot hold NUL: refused here as a bad request rather than failing in the database.
        if "\x00" in v:
            raise ValueError("NUL characters are not allowed")
        return v

    def spec(self) -> GeofenceSpec:
        return GeofenceSpec(self.name, self.kind, self.geometry, self.radius_m, self.half_width_m, self.speed_limit_kmh)


class GeofenceOut(BaseModel):
    id: int
    name: str
    kind: GeofenceKind
    shape: Shape
    geometry: dict[str, Any] = Field(description="normalised GeoJSON")
    radius_m: float | None
    half_width_m: float | None
    speed_limit_kmh: float | None
    revision: int = Field(description="1 when created, +1 per replacement")
    created_ms: int
    updated_ms: int

    @classmethod
    def of(cls, r: GeofenceRecord) -> GeofenceOut:
        return cls(
            id=r.id,
            name=r.name,
            kind=r.kind,
            shape=r.shape,
            geometry=r.geometry,
            radius_m=r.radius_m,
            half_width_m=r.half_width_m,
            speed_limit_kmh=r.speed_limit_kmh,
            revision=r.revision,
            created_ms=r.created_ms,
            updated_ms=r.updated_ms,
        )


def geofences_router(service: GeofenceService, require: Callable[[Role], Callable[..., Any]]) -> APIRouter:
    """The geofence endpoints; `require(role)` is the app's API-key dependency factory."""
    router = APIRouter(prefix="/v1/geofences", tags=["geofences"])
    viewer = [Depends(require(Role.VIEWER))]
    operator = [Depends(require(Role.OPERATOR))]

    def unknown(fence_id: int) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, f"unknown geofence {fence_id}")

    @router.post("", status_code=201, response_model=GeofenceOut, dependencies=operator)
    def create_geofence(body: GeofenceIn) -> GeofenceOut:
        try:
            return GeofenceOut.of(service.create(body.spec()))
        except InvalidGeofence as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None

    @router.get("", response_model=list[GeofenceOut], dependencies=viewer)
    def list_geofences(
        lat: Annotated[float | None, Query(ge=-90, le=90, description="with lon: only fences containing it")] = None,
        lon: Annotated[float | None, Query(ge=-180, le=180)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 1000,
        offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
    ) -> list[GeofenceOut]:
        """By id; with lat and lon, only the fences containing that point."""
        if (lat is None) != (lon is None):
            raise HTTPException(_UNPROCESSABLE, "give both lat and lon, or neither")
        if lat is not None and lon is not None:
            return [GeofenceOut.of(r) for r in service.containing(lat, lon, limit)]
        return [GeofenceOut.of(r) for r in service.list_fences(limit, offset)]

    @router.get("/{fence_id}", response_model=GeofenceOut, dependencies=viewer)
    def get_geofence(fence_id: FenceId) -> GeofenceOut:
        try:
            return GeofenceOut.of(service.get(fence_id))
        except UnknownGeofence:
            raise unknown(fence_id) from None

    @router.put("/{fence_id}", response_model=GeofenceOut, dependencies=operator)
    def replace_geofence(fence_id: FenceId, body: GeofenceIn) -> GeofenceOut:
        try:
            return GeofenceOut.of(service.update(fence_id, body.spec()))
        except UnknownGeofence:
            raise unknown(fence_id) from None
        except InvalidGeofence as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None

    @router.delete("/{fence_id}", status_code=204, response_class=Response, dependencies=operator)
    def delete_geofence(fence_id: FenceId) -> Response:
        try:
            service.delete(fence_id)
        except UnknownGeofence:
            raise unknown(fence_id) from None
        return Response(status_code=204)

    return router
