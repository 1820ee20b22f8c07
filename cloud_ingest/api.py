"""The operator HTTP API (FastAPI): device registration, fleet overview, telemetry queries, metrics.

Endpoints doing database work are plain `def`, so FastAPI runs them in its threadpool and the event loop never
blocks on SQLite or the network.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel, Field, field_validator

from cloud_ingest.alarms import AlarmService
from cloud_ingest.commands import CommandService
from cloud_ingest.db import Role
from cloud_ingest.errors import DeviceConflict, InvalidDeviceError, QueryError, StorageError, UnknownSignalError
from cloud_ingest.geofences import GeofenceService
from cloud_ingest.lifecycle import LifecycleService
from cloud_ingest.pipeline import IngestPipeline
from cloud_ingest.registry import Registry, VehicleSummary
from cloud_ingest.routes_alarms import alarms_router
from cloud_ingest.routes_commands import commands_router
from cloud_ingest.routes_geofences import geofences_router
from cloud_ingest.routes_keys import check_public_key_b64, keys_router
from cloud_ingest.routes_lifecycle import lifecycle_router
from cloud_ingest.routes_queries import queries_router
from cloud_ingest.tsstore import MAX_QUERY_LIMIT, TimeSeriesStore
from protocol import Catalogue
from protocol.errors import TopicError
from protocol.topics import VIN_RE, validate_vin

log = logging.getLogger(__name__)

JsonValue = float | int | bool | str
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SIGNALS_PARAM = 4096
_UNPROCESSABLE = 422  # spelled out: Starlette renamed the constant and deprecated the old name
VinPath = Annotated[str, Path(description="vehicle identification number")]


# -- models -----------------------------------------------------------------------------------------------------


class DeviceIn(BaseModel):
    vin: str = Field(description="8-32 characters A-Z 0-9", examples=["LZ1EB2024A0000001"])
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    label: str | None = Field(default=None, max_length=200)

    @field_validator("vin")
    @classmethod
    def _vin(cls, v: str) -> str:
        try:
            return validate_vin(v)
        except TopicError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_public_key_b64(v)


class DeviceOut(BaseModel):
    vin: str
    key_id: str = Field(description="hex of the 8-byte key id carried by the device's envelopes")


class Position(BaseModel):
    lat: float
    lon: float
    ts: datetime


class VehicleOut(BaseModel):
    vin: str
    label: str | None
    registered_at: datetime
    last_seen: datetime | None
    messages: int
    samples: int
    position: Position | None = Field(description="last known position: the newest sample that had one")


class LatestOut(BaseModel):
    vin: str
    ts: datetime
    ts_ms: int
    values: dict[str, JsonValue]


class TelemetryOut(BaseModel):
    vin: str
    signals: list[str]
    timestamps_ms: list[int]
    columns: dict[str, list[JsonValue | None]]


class SignalOut(BaseModel):
    name: str
    id: int
    type: str
    unit: str
    source: str
    description: str
    min: float | None
    max: float | None
    resolution: float | None


class IngestStatsOut(BaseModel):
    stored: int
    duplicate: int
    samples: int
    rejected: dict[str, int]
    invalid_values: dict[str, int]


class ApiKeyIn(BaseModel):
    role: Role
    name: str = Field(min_length=1, max_length=100)


class ApiKeyOut(BaseModel):
    key: str = Field(description="shown once; only its hash is stored")
    role: Role
    name: str


class Health(BaseModel):
    status: str = Field(default="ok", description="ok, or degraded while a backing store is unreachable")
    down: dict[str, str] | None = Field(default=None, description="unreachable components (degraded only)")


# -- helpers ----------------------------------------------------------------------------------------------------


def _ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # naive times are taken as UTC
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _dt(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <api key>")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <api key>")


def create_app(
    registry: Registry,
    store: TimeSeriesStore,
    pipeline: IngestPipeline,
    catalogue: Catalogue,
    commands: CommandService | None = None,
    alarms: AlarmService | None = None,
    lifecycle: LifecycleService | None = None,
    geofences: GeofenceService | None = None,
) -> FastAPI:
    app = FastAPI(
        title="Zhilian cloud ingest",
        version="0.1.0",
        description="Operator API of the Zhilian telemetry cloud: devices, vehicles, telemetry, ingest metrics.",
    )
    http_metrics = CollectorRegistry()
    m_requests = Counter(
        "zhilian_http_requests", "HTTP requests served", ["method", "route", "status"], registry=http_metrics
    )

    @app.middleware("http")
    async def _count_requests(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        # The route template (not the raw path) keeps label cardinality bounded.
        path = getattr(route, "path", "<unmatched>")
        m_requests.labels(method=request.method, route=path, status=str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # The default handler echoes the offending input, and Python's JSON parser accepts NaN and Infinity, which
        # a JSON response cannot carry: such a body turned a 422 into a 500.
        return JSONResponse(status_code=_UNPROCESSABLE, content={"detail": _json_safe(jsonable_encoder(exc.errors()))})

    @app.exception_handler(StorageError)
    def _storage_error(_request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage unavailable", extra={"error": str(exc)})
        return JSONResponse(status_code=503, content={"detail": "storage unavailable"})

    def require(min_role: Role) -> Callable[..., Role]:
        def check(
            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
            header_key: Annotated[str | None, Depends(_api_key_header)],
        ) -> Role:
            key = bearer.credentials if bearer is not None else header_key
            role = registry.role_for_key(key) if key else None
            if role is None:
                raise HTTPException(
                    status.HTTP_401_UNAUTHORIZED, "missing or unknown API key", {"WWW-Authenticate": "Bearer"}
                )
            if not role.allows(min_role):
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"requires role {min_role.value}")
            return role

        return check

    admin = [Depends(require(Role.ADMIN))]
    viewer = [Depends(require(Role.VIEWER))]
    app.include_router(keys_router(registry, require))
    app.include_router(queries_router(store, registry, catalogue, require))
    if commands is not None:
        app.include_router(commands_router(commands, require))
    if alarms is not None:
        app.include_router(alarms_router(alarms, require))
    if lifecycle is not None:
        app.include_router(lifecycle_router(lifecycle, require))
    if geofences is not None:
        app.include_router(geofences_router(geofences, require))

    def known_vin(vin: str) -> VehicleSummary:
        summary = registry.vehicle_summary(vin) if VIN_RE.match(vin) else None
        if summary is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown vehicle {vin!r}"[:200])
        return summary

    def vehicle_out(v: VehicleSummary, found: tuple[int, float, float] | None) -> VehicleOut:
        position = None
        if found is not None:
            ts, lat, lon = found
            position = Position(lat=lat, lon=lon, ts=_dt(ts))
        return VehicleOut(
            vin=v.vin,
            label=v.label,
            registered_at=v.registered_at,
            last_seen=None if v.last_seen_ms is None else _dt(v.last_seen_ms),
            messages=v.messages,
            samples=v.samples,
            position=position,
        )

    @app.get(
        "/healthz",
        response_model=Health,
        response_model_exclude_none=True,
        tags=["ops"],
        responses={503: {"model": Health, "description": "degraded: a backing store is unreachable"}},
    )
    def healthz(response: Response) -> Health:
        down: dict[str, str] = {}
        try:
            registry.ping()
        except StorageError as exc:
            log.error("health check: registry unreachable", extra={"error": str(exc)})
            down["registry"] = "unreachable"  # the detail (hosts, ports) goes to the log, not to anonymous callers
        try:
            store.ping()
        except StorageError as exc:
            log.error("health check: time-series store unreachable", extra={"error": str(exc)})
            down["timeseries"] = "unreachable"
        if down:
            response.status_code = 503
            return Health(status="degraded", down=down)
        return Health()

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics() -> Response:
        body = generate_latest(pipeline.metrics) + generate_latest(http_metrics)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/devices", status_code=201, response_model=DeviceOut, dependencies=admin, tags=["devices"])
    def register_device(body: DeviceIn) -> DeviceOut:
        try:
            device = registry.register_device(body.vin, base64.b64decode(body.public_key), body.label)
        except DeviceConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except InvalidDeviceError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return DeviceOut(vin=device.vin, key_id=device.key_id.hex())

    @app.get("/v1/vehicles", response_model=list[VehicleOut], dependencies=viewer, tags=["vehicles"])
    def list_vehicles(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
    ) -> list[VehicleOut]:
        page = registry.list_vehicles(limit=limit, offset=offset)
        # One snapshot query for the page's positions, not one store lookup per vehicle.
        snapshot = {e.vin: e.position for e in store.fleet_snapshot(vins=[v.vin for v in page])} if page else {}
        return [vehicle_out(v, snapshot.get(v.vin)) for v in page]

    @app.get("/v1/vehicles/{vin}/latest", response_model=LatestOut, dependencies=viewer, tags=["vehicles"])
    def latest(vin: VinPath) -> LatestOut:
        known_vin(vin)
        found = store.latest(vin)
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no telemetry for {vin}")
        ts, values = found
        return LatestOut(vin=vin, ts=_dt(ts), ts_ms=ts, values=values)

    @app.get("/v1/vehicles/{vin}/telemetry", response_model=TelemetryOut, dependencies=viewer, tags=["vehicles"])
    def telemetry(
        vin: VinPath,
        start: Annotated[datetime | None, Query(description="ISO-8601; default: end - 1 hour")] = None,
        end: Annotated[datetime | None, Query(description="ISO-8601, inclusive; default: now")] = None,
        signals: Annotated[
            str | None,
            Query(max_length=MAX_SIGNALS_PARAM, description="comma-separated catalogue names; default: all"),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_QUERY_LIMIT)] = 1000,
    ) -> TelemetryOut:
        end_ms = _ms(end) if end is not None else _ms(datetime.now(UTC))
        start_ms = _ms(start) if start is not None else end_ms - 3_600_000
        if start_ms > end_ms:
            raise HTTPException(_UNPROCESSABLE, "start is after end")
        names = None
        if signals is not None:
            names = [n.strip() for n in signals.split(",") if n.strip()]
            unknown = [n for n in names if n not in catalogue]
            if unknown:
                raise HTTPException(_UNPROCESSABLE, {"message": "unknown signals", "unknown": unknown})
            if not names:
                raise HTTPException(_UNPROCESSABLE, "signals is empty")
        known_vin(vin)
        try:
            batch = store.query(vin, start_ms, end_ms, names, limit)
        except UnknownSignalError as exc:
            raise HTTPException(_UNPROCESSABLE, {"message": "unknown signals", "unknown": exc.names}) from None
        except QueryError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return TelemetryOut(vin=vin, signals=list(batch.columns), timestamps_ms=batch.timestamps, columns=batch.columns)

    @app.get("/v1/catalogue", response_model=list[SignalOut], dependencies=viewer, tags=["catalogue"])
    def get_catalogue() -> list[SignalOut]:
        return [
            SignalOut(
                name=s.name,
                id=s.id,
                type=s.type.value,
                unit=s.unit,
                source=s.source,
                description=s.description,
                min=s.min,
                max=s.max,
                resolution=s.resolution,
            )
            for s in catalogue
        ]

    @app.get("/v1/ingest/stats", response_model=IngestStatsOut, dependencies=viewer, tags=["ingest"])
    def ingest_stats() -> IngestStatsOut:
        return IngestStatsOut(**pipeline.stats())

    @app.post("/v1/api-keys", status_code=201, response_model=ApiKeyOut, dependencies=admin, tags=["auth"])
    def create_api_key(body: ApiKeyIn) -> ApiKeyOut:
        return ApiKeyOut(key=registry.create_api_key(body.role, body.name), role=body.role, name=body.name)

    return app
