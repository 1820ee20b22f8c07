"""Alarms over HTTP: list/filter (viewer), one alarm with its audit trail (viewer), workflow transitions (operator),
and the vehicle profile the hazard rules read (PUT: operator, GET: viewer).

A transition's actor in the audit trail is the calling API key's role and name (e.g. `operator:alice`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.alarms import (
    MAX_ASSIGNEE,
    MAX_LIST,
    MAX_NOTE,
    AlarmFilter,
    AlarmRecord,
    AlarmService,
    AlarmState,
    ConcurrentChangeError,
    IllegalTransitionError,
    Profile,
    UnknownAlarmError,
    UnknownVehicleError,
)
from cloud_ingest.db import ApiKey, Role
from cloud_ingest.errors import StorageError
from cloud_ingest.registry import hash_api_key
from protocol.topics import VIN_RE

_UNPROCESSABLE = 422
_MAX_MS = 2**62
_MAX_ID = 2**31 - 1
VinPath = Annotated[str, Path(description="vehicle identification number")]
AlarmId = Annotated[int, Path(ge=1, le=_MAX_ID, description="alarm id")]


class TransitionOut(BaseModel):
    at_ms: int
    actor: str = Field(description="role:name of the API key, or system:rules / system:deadline")
    from_state: AlarmState | None = Field(description="null for the detection itself")
    to_state: AlarmState
    note: str | None


class AlarmOut(BaseModel):
    id: int
    vin: str
    rule: str
    level: int = Field(description="1 advisory, 2 alarm, 3 emergency (GB/T 32960.3); the highest reached")
    state: AlarmState
    opened_ms: int = Field(description="when the rule raised it (vehicle time)")
    last_ms: int = Field(description="its newest rule event (vehicle time)")
    cleared_ms: int | None = Field(description="when the rule cleared it (vehicle time); null while it holds")
    closed_ms: int | None
    value: float | None = Field(description="the rule's metric at its newest event")
    peak: float | None = Field(description="the worst metric value seen")
    peak_ms: int | None
    detail: dict[str, Any]
    assignee: str | None
    deadline_ms: int | None = Field(description="service clock; ESCALATED once it passes")
    escalated_ms: int | None
    reopen_count: int
    created_ms: int
    updated_ms: int
    version: int = Field(description="bumped by every change; orders notifications of one alarm")

    @classmethod
    def of(cls, r: AlarmRecord) -> AlarmOut:
        return cls(**{name: getattr(r, name) for name in cls.model_fields})


class AlarmDetailOut(AlarmOut):
    transitions: list[TransitionOut]

    @classmethod
    def of(cls, r: AlarmRecord) -> AlarmDetailOut:
        fields = {name: getattr(r, name) for name in AlarmOut.model_fields}
        trail = [
            TransitionOut(
                at_ms=t.at_ms,
                actor=t.actor,
                from_state=None if t.from_state is None else AlarmState(t.from_state),
                to_state=AlarmState(t.to_state),
                note=t.note,
            )
            for t in r.transitions
        ]
        return cls(**fields, transitions=trail)


class TransitionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: AlarmState
    note: str | None = Field(default=None, max_length=MAX_NOTE)
    assignee: str | None = Field(default=None, min_length=1, max_length=MAX_ASSIGNEE)


class ProfileIn(BaseModel):
    # Bounds (gt/le) also keep NaN and infinities out: neither satisfies a comparison.
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, max_length=32, description="a model the rules file declares")
    variant: str | None = Field(default=None, max_length=64)
    chemistry: str | None = Field(default=None, max_length=8, description="a chemistry the rules file declares")
    battery_barcodes: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=16, description="packs bound to the VIN"
    )
    battery_capacity_ah: float | None = Field(default=None, gt=0, le=10_000)
    battery_cell_count: int | None = Field(default=None, ge=1, le=1000)
    battery_manufactured_ms: int | None = Field(default=None, ge=0, le=_MAX_MS)
    battery_service_life_years: float | None = Field(default=None, gt=0, le=100)
    speed_limit_kmh: float | None = Field(default=None, gt=0, le=500, description="factory controller record")
    wheel_inch: float | None = Field(default=None, gt=0, le=100)
    locked: bool | None = Field(default=None, description="null: as the vehicle's status reports it")
    reporting_interval_s: float = Field(default=5.0, gt=0, le=86_400)

    def profile(self) -> Profile:
        return Profile(
            model=self.model,
            variant=self.variant,
            chemistry=self.chemistry,
            battery_barcodes=tuple(self.battery_barcodes),
            battery_capacity_ah=self.battery_capacity_ah,
            battery_cell_count=self.battery_cell_count,
            battery_manufactured_ms=self.battery_manufactured_ms,
            battery_service_life_years=self.battery_service_life_years,
            speed_limit_kmh=self.speed_limit_kmh,
            wheel_inch=self.wheel_inch,
            locked=self.locked,
            reporting_interval_s=self.reporting_interval_s,
        )


class ProfileOut(ProfileIn):
    vin: str

    @classmethod
    def of(cls, vin: str, p: Profile) -> ProfileOut:
        return cls(
            vin=vin,
            model=p.model,
            variant=p.variant,
            chemistry=p.chemistry,
            battery_barcodes=list(p.battery_barcodes),
            battery_capacity_ah=p.battery_capacity_ah,
            battery_cell_count=p.battery_cell_count,
            battery_manufactured_ms=p.battery_manufactured_ms,
            battery_service_life_years=p.battery_service_life_years,
            speed_limit_kmh=p.speed_limit_kmh,
            wheel_inch=p.wheel_inch,
            locked=p.locked,
            reporting_interval_s=p.reporting_interval_s,
        )


_bearer = HTTPBearer(auto_error=False)
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def alarms_router(service: AlarmService, require: Callable[[Role], Callable[..., Any]]) -> APIRouter:
    """The alarm endpoints; `require(role)` is the app's API-key dependency factory."""
    router = APIRouter(tags=["alarms"])
    viewer = [Depends(require(Role.VIEWER))]

    def actor(bearer: HTTPAuthorizationCredentials | None, header_key: str | None) -> str:
        """Who is calling, for the audit trail (the route's `require` already checked the key)."""
        key = bearer.credentials if bearer is not None else header_key
        found = None
        if key:
            try:
                with Session(service.engine) as session:
                    found = session.execute(
                        select(ApiKey.role, ApiKey.name).where(ApiKey.key_hash == hash_api_key(key))
                    ).first()
            except SQLAlchemyError as exc:
                raise StorageError(f"api keys: {exc}") from exc
        return "unknown" if found is None else f"{found[0]}:{found[1]}"

    def not_found(what: str) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, what[:200])

    @router.get("/v1/alarms", response_model=list[AlarmOut], dependencies=viewer)
    def list_alarms(
        vin: Annotated[str | None, Query(max_length=32)] = None,
        rule: Annotated[str | None, Query(max_length=64)] = None,
        level: Annotated[int | None, Query(ge=1, le=3)] = None,
        state: AlarmState | None = None,
        from_ms: Annotated[int | None, Query(ge=0, le=_MAX_MS, description="opened at or after (ms)")] = None,
        to_ms: Annotated[int | None, Query(ge=0, le=_MAX_MS, description="opened at or before (ms)")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> list[AlarmOut]:
        """Newest first (by the time the rule raised them)."""
        if from_ms is not None and to_ms is not None and from_ms > to_ms:
            raise HTTPException(_UNPROCESSABLE, "from_ms is after to_ms")
        found = service.list_alarms(AlarmFilter(vin, rule, level, state, from_ms, to_ms, limit, offset))
        return [AlarmOut.of(r) for r in found]

    @router.get("/v1/alarms/{alarm_id}", response_model=AlarmDetailOut, dependencies=viewer)
    def get_alarm(alarm_id: AlarmId) -> AlarmDetailOut:
        found = service.get(alarm_id)
        if found is None:
            raise not_found(f"unknown alarm {alarm_id}")
        return AlarmDetailOut.of(found)

    @router.post(
        "/v1/alarms/{alarm_id}/transition",
        response_model=AlarmDetailOut,
        dependencies=[Depends(require(Role.OPERATOR))],
        responses={404: {"description": "unknown alarm"}, 409: {"description": "illegal transition (with reason)"}},
    )
    def transition(
        alarm_id: AlarmId,
        body: TransitionIn,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        header_key: Annotated[str | None, Depends(_api_key_header)],
    ) -> AlarmDetailOut:
        try:
            record = service.transition(alarm_id, body.to, actor(bearer, header_key), body.note, body.assignee)
        except UnknownAlarmError:
            raise not_found(f"unknown alarm {alarm_id}") from None
        except (IllegalTransitionError, ConcurrentChangeError) as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return AlarmDetailOut.of(record)

    def known_vin(vin: str) -> str:
        if not VIN_RE.match(vin):
            raise not_found(f"unknown vehicle {vin!r}")
        return vin

    @router.put(
        "/v1/vehicles/{vin}/profile",
        response_model=ProfileOut,
        dependencies=[Depends(require(Role.OPERATOR))],
        tags=["vehicles"],
    )
    def put_profile(vin: VinPath, body: ProfileIn) -> ProfileOut:
        known_vin(vin)
        rules = service.rules.config
        if body.model is not None and body.model not in rules.models:
            raise HTTPException(_UNPROCESSABLE, f"model must be one of {list(rules.models)}")
        if body.chemistry is not None and body.chemistry not in rules.chemistries:
            raise HTTPException(_UNPROCESSABLE, f"chemistry must be one of {list(rules.chemistries)}")
        try:
            saved = service.put_profile(vin, body.profile())
        except UnknownVehicleError:
            raise not_found(f"unknown vehicle {vin!r}") from None
        return ProfileOut.of(vin, saved)

    @router.get("/v1/vehicles/{vin}/profile", response_model=ProfileOut, dependencies=viewer, tags=["vehicles"])
    def get_profile(vin: VinPath) -> ProfileOut:
        known_vin(vin)
        try:
            found = service.get_profile(vin)
        except UnknownVehicleError:
            raise not_found(f"unknown vehicle {vin!r}") from None
        return ProfileOut.of(vin, found if found is not None else Profile())

    return router
