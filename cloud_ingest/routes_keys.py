"""Device signing keys over HTTP: list (viewer), add for rotation (operator), revoke (admin).

Rotation is add-then-revoke: a device's new key is accepted alongside the old one, so messages it signed before the
switch (still in its spool) keep verifying; once the device runs on the new key, the old one is revoked and every
message signed by it is rejected as `revoked_key`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Response, status
from pydantic import BaseModel, Field, field_validator

from cloud_ingest.db import Role
from cloud_ingest.errors import DeviceConflict, InvalidDeviceError
from cloud_ingest.registry import PUBLIC_KEY_LEN, KeyRecord, Registry, UnknownDeviceError, UnknownKeyError
from protocol.topics import VIN_RE

_UNPROCESSABLE = 422
VinPath = Annotated[str, Path(description="vehicle identification number")]
KeyIdPath = Annotated[str, Path(pattern=r"^[0-9a-fA-F]{16}$", description="hex of the 8-byte key id")]


def check_public_key_b64(v: str) -> str:
    """A device public key as the API takes it: base64 of the raw 32-byte Ed25519 key (ValueError otherwise)."""
    if len(v) > 128:
        raise ValueError("public_key is too long")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("public_key is not valid base64") from None
    if len(raw) != PUBLIC_KEY_LEN:
        raise ValueError(f"public_key must decode to {PUBLIC_KEY_LEN} bytes")
    return v


class KeyIn(BaseModel):
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")

    @field_validator("public_key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_public_key_b64(v)


class KeyOut(BaseModel):
    vin: str
    key_id: str = Field(description="hex of the 8-byte key id carried by envelopes signed with this key")
    public_key: str = Field(description="base64 of the raw public key")
    created_at: datetime
    revoked_at: datetime | None
    active: bool

    @classmethod
    def of(cls, r: KeyRecord) -> KeyOut:
        return cls(
            vin=r.vin,
            key_id=r.key_id.hex(),
            public_key=base64.b64encode(r.public_key).decode(),
            created_at=r.created_at,
            revoked_at=r.revoked_at,
            active=r.active,
        )


def keys_router(registry: Registry, require: Callable[[Role], Callable[..., Any]]) -> APIRouter:
    """The key endpoints; `require(role)` is the app's API-key dependency factory."""
    router = APIRouter(prefix="/v1/devices/{vin}/keys", tags=["devices"])

    def unknown_vehicle(vin: str) -> HTTPException:
        return HTTPException(status.HTTP_404_NOT_FOUND, f"unknown vehicle {vin!r}"[:200])

    @router.get("", response_model=list[KeyOut], dependencies=[Depends(require(Role.VIEWER))])
    def list_keys(vin: VinPath) -> list[KeyOut]:
        if not VIN_RE.match(vin):
            raise unknown_vehicle(vin)
        try:
            return [KeyOut.of(r) for r in registry.list_keys(vin)]
        except UnknownDeviceError:
            raise unknown_vehicle(vin) from None

    @router.post(
        "",
        status_code=201,
        response_model=KeyOut,
        dependencies=[Depends(require(Role.OPERATOR))],
        responses={200: {"model": KeyOut, "description": "the key was already active: nothing changed"}},
    )
    def add_key(vin: VinPath, body: KeyIn, response: Response) -> KeyOut:
        if not VIN_RE.match(vin):
            raise unknown_vehicle(vin)
        try:
            record, created = registry.add_key(vin, base64.b64decode(body.public_key))
        except UnknownDeviceError:
            raise unknown_vehicle(vin) from None
        except DeviceConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        except InvalidDeviceError as exc:
            raise HTTPException(_UNPROCESSABLE, str(exc)) from None
        if not created:
            response.status_code = status.HTTP_200_OK
        return KeyOut.of(record)

    @router.post("/{key_id}/revoke", response_model=KeyOut, dependencies=[Depends(require(Role.ADMIN))])
    def revoke_key(vin: VinPath, key_id: KeyIdPath) -> KeyOut:
        if not VIN_RE.match(vin):
            raise unknown_vehicle(vin)
        try:
            return KeyOut.of(registry.revoke_key(vin, bytes.fromhex(key_id)))
        except UnknownDeviceError:
            raise unknown_vehicle(vin) from None
        except UnknownKeyError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"{vin} has no key {key_id.lower()}") from None

    return router
