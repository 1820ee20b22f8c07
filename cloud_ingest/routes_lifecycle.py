"""Vehicle and battery life cycles over HTTP (docs/LIFECYCLE.md): state and history (viewer), operator transitions
(operator; an illegal one is 409 naming from, to and the legal next states), and the battery registry.

A transition's actor in the history is the calling API key's role and name (e.g. `operator:alice`); telemetry's
transitions have the actor `telemetry`.

No `from __future__ import annotations` here: the routes' `Depends(actor)` names a closure, which FastAPI can only
see in an annotation evaluated when the route is defined.
"""

from collections.abc import Callable
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.db import ApiKey, Role
from cloud_ingest.errors import StorageError
from cloud_ingest.lifecycle import (
    MAX_HISTORY,
    MAX_NOTE,
    Activity,
    BatteryConflict,
    BatteryRecord,
    BatterySpec,
    BatteryState,
    Chemistry,
    IllegalTransition,
    InvalidLifecycleRequest,
    LifecycleEvent,
    LifecycleService,
    UnknownBatteryError,
    UnknownVehicleError,
    VehicleLifecycle,
    VehicleState,
    clean_barcode,
)
from cloud_ingest.registry import hash_api_key
from protocol.topics import VIN_RE

_UNPROCESSABLE = 422
_MAX_MS = 2**62
VinPath = Annotated[str, Path(description="vehicle identification number")]
BarcodePath = Annotated[str, Path(description="battery barcode: 1-64 printable ASCII characters, no '/' or space")]
FromMs = Annotated[int | None, Query(ge=0, le=_MAX_MS, description="events at or after (unix ms)")]
ToMs = Annotated[int | None, Query(ge=0, le=_MAX_MS, description="events at or before (unix ms)")]
Limit = Annotated[int, Query(ge=1, le=MAX_HISTORY, description="at most this many events, oldest first")]


def _no_nul(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL: refused here as a bad request rather than failing in the database.
    if value is not None and "\x00" in value:
        raise ValueError("NUL characters are not allowed")
    return value


Note = Annotated[str | None, AfterValidator(_no_nul), Field(default=None, max_length=MAX_NOTE)]

_bearer = HTTPBearer(auto_error=False)
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


class EventOut(BaseModel):
    id: int = Field(description="history order: the order the machine went through its changes")
    ts_ms: int = Field(description="when it happened: the sample's time (telemetry) or the request's (api)")
    event: str = Field(description="transition, activity, paired, unpaired or maintenance_due")
    from_state: str | None
    to_state: str
    source: str = Field(description="telemetry or api")
    actor: str
    note: str | None
    related: str | None = Field(description="the other side of a pairing: a barcode (vehicle) or a VIN (battery)")

    @classmethod
    def of(cls, e: LifecycleEvent) -> "EventOut":
        return cls(
            id=e.id,
            ts_ms=e.ts_ms,
            event=e.event,
            from_state=e.from_state,
            to_state=e.to_state,
            source=e.source,
            actor=e.actor,
            note=e.note,
            related=e.related,
        )


class VehicleLifecycleOut(BaseModel):
    vin: str
    state: VehicleState
    since_ms: int | None = Field(description="null while the vehicle never left its initial state")
    activity: Activity | None = Field(description="parked, riding or charging while active (from telemetry)")
    activity_since_ms: int | None
    battery_barcode: str | None = Field(description="the pack in the vehicle, as telemetry or pairing last said")
    odometer_km: float = Field(description="distance integrated from speed (there is no odometer signal)")
    next_service_km: float
    maintenance_due: bool
    next_states: list[VehicleState] = Field(description="states an operator may move it to now")
    history: list[EventOut]

    @classmethod
    def of(cls, v: VehicleLifecycle) -> "VehicleLifecycleOut":
        return cls(
            vin=v.vin,
            state=v.state,
            since_ms=v.since_ms,
            activity=v.activity,
            activity_since_ms=v.activity_since_ms,
            battery_barcode=v.battery_barcode,
            odometer_km=round(v.odometer_m / 1000, 3),
            next_service_km=round(v.next_service_m / 1000, 3),
            maintenance_due=v.maintenance_due,
            next_states=v.next_states,
            history=[EventOut.of(e) for e in v.history],
        )


class VehicleTransitionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: VehicleState
    note: Note = None


class BatteryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    barcode: str = Field(min_length=1, max_length=64, description="1-64 printable ASCII characters, no '/' or space")
    chemistry: Chemistry | None = None
    capacity_ah: float | None = Field(default=None, gt=0, le=1000, allow_inf_nan=False)
    cells: int | None = Field(default=None, ge=1, le=64, description="cells in series")
    rated_cycles: int | None = Field(default=None, ge=1, le=100_000, description="design cycle life")
    manufactured: date | None = Field(default=None, ge=date(1990, 1, 1), le=date(2200, 1, 1))
    service_life_years: float | None = Field(default=None, gt=0, le=50, allow_inf_nan=False)

    def spec(self) -> BatterySpec:
        return BatterySpec(
            barcode=self.barcode,
            chemistry=self.chemistry,
            capacity_ah=self.capacity_ah,
            cells=self.cells,
            rated_cycles=self.rated_cycles,
            manufactured=self.manufactured,
            service_life_years=self.service_life_years,
        )


class BatteryOut(BaseModel):
    barcode: str
    registered: bool = Field(description="false: known only from a vehicle's telemetry")
    chemistry: str | None
    capacity_ah: float | None
    cells: int | None
    rated_cycles: int | None
    manufactured: date | None
    service_life_years: float | None
    expires: date | None = Field(description="manufactured + service life")
    state: BatteryState
    since_ms: int
    vin: str | None = Field(description="the vehicle it is paired with")
    soh_pct: float | None = Field(description="last state of health reported")
    cycles: int | None = Field(description="last cycle count reported")
    next_states: list[BatteryState] = Field(description="states an operator may move it to now")

    @classmethod
    def fields_of(cls, b: BatteryRecord) -> dict[str, Any]:
        return {
            "barcode": b.barcode,
            "registered": b.registered,
            "chemistry": b.chemistry,
            "capacity_ah": b.capacity_ah,
            "cells": b.cells,
            "rated_cycles": b.rated_cycles,
            "manufactured": b.manufactured,
            "service_life_years": b.service_life_years,
            "expires": b.expires,
            "state": b.state,
            "since_ms": b.since_ms,
            "vin": b.vin,
            "soh_pct": b.soh_pct,
            "cycles": b.cycles,
            "next_states": b.next_states,
        }

    @classmethod
    def of(cls, b: BatteryRecord) -> "BatteryOut":
        return cls(**cls.fields_of(b))


class BatteryLifecycleOut(BatteryOut):
    history: list[EventOut]

    @classmethod
    def of(cls, b: BatteryRecord) -> "BatteryLifecycleOut":
        return cls(**cls.fields_of(b), history=[EventOut.of(e) for e in b.history])


class BatteryTransitionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: BatteryState
    note: Note = None
    vin: str | None = Field(default=None, max_length=32, description="the vehicle to pair with (to=paired only)")


class IllegalTransitionOut(BaseModel):
    detail: dict[str, Any] = Field(description="message, entity, from, to, allowed (the legal next states)")


def _conflict(exc: IllegalTransition) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        {
            "message": str(exc),
            "entity": exc.entity.value,
            "from": exc.from_state,
            "to": exc.to_state,
            "allowed": exc.allowed,
        },
    )


def _range(from_ms: int | None, to_ms: int | None) -> None:
    if from_ms is not None and to_ms is not None and from_ms > to_ms:
        raise HTTPException(_UNPROCESSABLE, "from_ms is after to_ms")


def lifecycle_router(service: LifecycleService, require: Callable[[Role], Callable[..., Any]]) -> APIRouter:
    """The life-cycle endpoints; `require(role)` is the app's API-key dependency factory."""
    router = APIRouter(tags=["lifecycle"])
    viewer = [Depends(require(Role.VIEWER))]
    conflict: dict[int | str, dict[str, Any]] = {
        409: {"model": IllegalTransitionOut, "description": "illegal transition: from, to, legal next states"}
    }

    def actor(
        role: Annotated[Role, Depends(require(Role.OPERATOR))],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> str:
        """Who is calling, for the history (the key was already checked by `require`)."""
        key = bearer.credentials if bearer is not None else header_key
        name = None
        if key:
            try:
                with Session(service.engine) as session:
                    name = session.scalar(select(ApiKey.name).where(ApiKey.key_hash == hash_api_key(key)))
            except SQLAlchemyError as exc:
                raise StorageError(f"api keys: {exc}") from exc
        return f"{role.value}:{name or '?'}"

    def unknown_vehicle(vin: str) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, f"unknown vehicle {vin!r}"[:200])

    def unknown_battery(barcode: str) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, f"unknown battery {barcode!r}"[:200])

    def checked_barcode(barcode: str) -> str:
        if clean_barcode(barcode) != barcode:
            raise unknown_battery(barcode)
        return barcode

    @router.get("/v1/vehicles/{vin}/lifecycle", response_model=VehicleLifecycleOut, dependencies=viewer)
    def vehicle_lifecycle(
        vin: VinPath, from_ms: FromMs = None, to_ms: ToMs = None, limit: Limit = 1000
    ) -> VehicleLifecycleOut:
        _range(from_ms, to_ms)
        if not VIN_RE.match(vin):
            raise unknown_vehicle(vin)
        try:
            return VehicleLifecycleOut.of(service.vehicle(vin, from_ms, to_ms, limit))
        except UnknownVehicleError:
            raise unknown_vehicle(vin) from None

    @router.post("/v1/vehicles/{vin}/lifecycle", response_model=VehicleLifecycleOut, responses=conflict)
    def vehicle_transition(
        vin: VinPath, body: VehicleTransitionIn, who: Annotated[str, Depends(actor)]
    ) -> VehicleLifecycleOut:
        if not VIN_RE.match(vin):
            raise unknown_vehicle(vin)
        try:
            return VehicleLifecycleOut.of(service.transition_vehicle(vin, body.to, who, body.note))
        except UnknownVehicleError:
            raise unknown_vehicle(vin) from None
        except IllegalTransition as exc:
            raise _conflict(exc) from None

    @router.post(
        "/v1/batteries",
        status_code=201,
        response_model=BatteryOut,
        responses={
            200: {
                "model": BatteryOut,
                "description": "already registered with the same data, or known only from telemetry and now completed",
            },
            409: {"description": "already registered with different data"},
        },
    )
    def register_battery(body: BatteryIn, response: Response, who: Annotated[str, Depends(actor)]) -> BatteryOut:
        try:
            record, created = service.register_battery(body.spec(), who)
        except InvalidLifecycleRequest as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        except BatteryConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        if not created:
            response.status_code = status.HTTP_200_OK
        return BatteryOut.of(record)

    @router.get("/v1/batteries/{barcode}", response_model=BatteryOut, dependencies=viewer)
    def get_battery(barcode: BarcodePath) -> BatteryOut:
        try:
            return BatteryOut.of(service.battery(checked_barcode(barcode), history=False))
        except UnknownBatteryError:
            raise unknown_battery(barcode) from None

    @router.get("/v1/batteries/{barcode}/lifecycle", response_model=BatteryLifecycleOut, dependencies=viewer)
    def battery_lifecycle(
        barcode: BarcodePath, from_ms: FromMs = None, to_ms: ToMs = None, limit: Limit = 1000
    ) -> BatteryLifecycleOut:
        _range(from_ms, to_ms)
        try:
            return BatteryLifecycleOut.of(service.battery(checked_barcode(barcode), from_ms, to_ms, limit))
        except UnknownBatteryError:
            raise unknown_battery(barcode) from None

    @router.post("/v1/batteries/{barcode}/lifecycle", response_model=BatteryLifecycleOut, responses=conflict)
    def battery_transition(
        barcode: BarcodePath, body: BatteryTransitionIn, who: Annotated[str, Depends(actor)]
    ) -> BatteryLifecycleOut:
        checked_barcode(barcode)
        if body.vin is not None and not VIN_RE.match(body.vin):
            raise HTTPException(_UNPROCESSABLE, "vin: 8-32 characters A-Z 0-9")
        try:
            record = service.transition_battery(barcode, body.to, who, body.note, body.vin)
        except UnknownBatteryError:
            raise unknown_battery(barcode) from None
        except UnknownVehicleError:
            raise HTTPException(_UNPROCESSABLE, f"unknown vehicle {body.vin!r}") from None
        except InvalidLifecycleRequest as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        except IllegalTransition as exc:
            raise _conflict(exc) from None
        return BatteryLifecycleOut.of(record)

    return router
