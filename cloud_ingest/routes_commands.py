"""Commands and vehicle status over HTTP: issue (operator), list with their acks and the status (viewer), and the
cloud's command-signing public key (viewer), which provisioning installs on vehicles as their `cloud_key_file`."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from pydantic import BaseModel, Field, field_validator

from cloud_ingest.commands import (
    DEFAULT_TTL_S,
    MAX_LIST,
    MAX_TTL_S,
    CommandRecord,
    CommandService,
    InvalidCommandError,
    UnknownVehicleError,
)
from cloud_ingest.db import Role
from protocol.commands import MAX_ARG_STR, CommandName
from protocol.topics import VIN_RE

_UNPROCESSABLE = 422
VinPath = Annotated[str, Path(description="vehicle identification number")]
ArgJson = bool | int | float | str


class CommandIn(BaseModel):
    name: CommandName = Field(description="lock, unlock, set_profile, snapshot, speed_limit_report")
    args: dict[str, ArgJson] = Field(
        default_factory=dict,
        description='set_profile: {"profile": name or "auto"}; speed_limit_report: {"interval_s": 0 or 10..86400}',
        max_length=16,
    )
    ttl_s: float = Field(default=DEFAULT_TTL_S, ge=1, le=MAX_TTL_S, description="seconds until the command expires")

    @field_validator("args")
    @classmethod
    def _args(cls, v: dict[str, ArgJson]) -> dict[str, ArgJson]:
        for key, value in v.items():
            if len(key) > 32 or (isinstance(value, str) and len(value) > MAX_ARG_STR):
                raise ValueError("arg names are at most 32 and string values at most 64 characters")
        return v


class CommandAccepted(BaseModel):
    command_id: str = Field(description="hex of the 16-byte command id (the nonce the vehicle remembers)")
    vin: str
    name: str
    expires_ms: int
    state: Literal["pending", "sent", "acked", "expired"]


class AckOut(BaseModel):
    status: str = Field(description="done, rejected or failed")
    detail: str
    acted_ms: int | None
    received_ms: int | None


class CommandOut(BaseModel):
    command_id: str
    vin: str
    name: str
    args: dict[str, ArgJson]
    issued_ms: int
    expires_ms: int
    state: Literal["pending", "sent", "acked", "expired"]
    attempts: int = Field(description="times a transport took it to publish")
    sent_ms: int | None = Field(description="when the broker accepted it for the vehicle's session")
    ack: AckOut | None

    @classmethod
    def of(cls, r: CommandRecord) -> CommandOut:
        ack = None
        if r.ack_status is not None:
            ack = AckOut(status=r.ack_status, detail=r.ack_detail or "", acted_ms=r.acted_ms, received_ms=r.acked_ms)
        return cls(
            command_id=r.command_id,
            vin=r.vin,
            name=r.name,
            args=r.args,
            issued_ms=r.issued_ms,
            expires_ms=r.expires_ms,
            state=r.state,
            attempts=r.attempts,
            sent_ms=r.sent_ms,
            ack=ack,
        )


class StatusOut(BaseModel):
    vin: str
    online: bool
    boot: int
    conn: int = Field(description="the agent's connection attempt within its boot")
    seq: int
    created_ms: int = Field(description="when the agent sealed the report (an LWT: when that connection opened)")
    received_ms: int
    agent: str = Field(description="agent version")
    metrics: dict[str, Any] = Field(description="self-metrics: rss_kb, cpu_pct, spool_depth, evicted, reconnects ...")


class CloudKeyOut(BaseModel):
    algorithm: Literal["Ed25519"] = "Ed25519"
    key_id: str = Field(description="hex of the 8-byte key id commands carry")
    public_key: str = Field(description="base64 of the raw 32-byte public key: one line of an agent's cloud_key_file")


def commands_router(service: CommandService, require: Callable[[Role], Callable[..., Any]]) -> APIRouter:
    """The command endpoints; `require(role)` is the app's API-key dependency factory."""
    router = APIRouter(tags=["commands"])

    def unknown_vehicle(vin: str) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, f"unknown vehicle {vin!r}"[:200])

    @router.post(
        "/v1/vehicles/{vin}/commands",
        status_code=202,
        response_model=CommandAccepted,
        dependencies=[Depends(require(Role.OPERATOR))],
    )
    def issue_command(vin: VinPath, body: CommandIn) -> CommandAccepted:
        if not VIN_RE.match(vin):
            raise unknown_vehicle(vin)
        try:
            r = service.issue(vin, body.name.value, body.args, body.ttl_s)
        except UnknownVehicleError:
            raise unknown_vehicle(vin) from None
        except InvalidCommandError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        return CommandAccepted(command_id=r.command_id, vin=r.vin, name=r.name, expires_ms=r.expires_ms, state=r.state)

    @router.get(
        "/v1/vehicles/{vin}/commands", response_model=list[CommandOut], dependencies=[Depends(require(Role.VIEWER))]
    )
    def list_commands(vin: VinPath, limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100) -> list[CommandOut]:
        if not VIN_RE.match(vin) or service.registry.get_device(vin) is None:
            raise unknown_vehicle(vin)
        return [CommandOut.of(r) for r in service.list_commands(vin, limit)]

    @router.get("/v1/vehicles/{vin}/status", response_model=StatusOut, dependencies=[Depends(require(Role.VIEWER))])
    def vehicle_status(vin: VinPath) -> StatusOut:
        found = service.latest_status(vin) if VIN_RE.match(vin) else None
        if found is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no status for {vin!r}"[:200])
        return StatusOut(
            vin=found.vin,
            online=found.online,
            boot=found.boot,
            conn=found.conn,
            seq=found.seq,
            created_ms=found.created_ms,
            received_ms=found.received_ms,
            agent=found.agent,
            metrics=found.metrics,
        )

    @router.get("/v1/cloud-key", response_model=CloudKeyOut, dependencies=[Depends(require(Role.VIEWER))])
    def cloud_key() -> CloudKeyOut:
        return CloudKeyOut(key_id=service.key.key_id.hex(), public_key=base64.b64encode(service.public_key).decode())

    return router
