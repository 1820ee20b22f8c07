"""The device and API-key registry: who may send telemetry, with which key, and who may read it."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, Select, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.db import ApiKey, Device, DeviceState, Role, as_utc
from cloud_ingest.errors import DeviceConflict, InvalidDeviceError, StorageError
from protocol import key_id_for
from protocol.errors import TopicError
from protocol.topics import validate_vin

log = logging.getLogger(__name__)

PUBLIC_KEY_LEN = 32
KEY_CACHE_SIZE = 10_000
MAX_LIST_LIMIT = 10_000
API_KEY_PREFIX = "zk_"


@dataclass(frozen=True, slots=True)
class VehicleSummary:
    vin: str
    label: str | None
    registered_at: datetime
    last_seen_ms: int | None
    last_boot: int | None
    messages: int
    samples: int


def hash_api_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


class Registry:
    """Thread-safe: every call opens its own session; the key cache has its own lock."""

    def __init__(self, engine: Engine, cache_size: int = KEY_CACHE_SIZE) -> None:
        self.engine = engine
        self._cache_size = cache_size
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def register_device(self, vin: str, public_raw: bytes, label: str | None = None) -> Device:
        """Register `vin` with its Ed25519 public key; repeating it with the same key is a no-op."""
        try:
            validate_vin(vin)
        except TopicError as exc:
            raise InvalidDeviceError(str(exc)) from None
        if not isinstance(public_raw, bytes) or len(public_raw) != PUBLIC_KEY_LEN:
            raise InvalidDeviceError(f"a device public key is {PUBLIC_KEY_LEN} raw bytes")
        try:
            existing = self._get_device(vin)
            if existing is None:
                try:
                    with self._session() as session, session.begin():
                        device = Device(vin=vin, public_key=public_raw, key_id=key_id_for(public_raw), label=label)
                        session.add(device)
                        session.add(DeviceState(vin=vin, messages=0, samples=0))
                    log.info("device registered", extra={"vin": vin, "key_id": device.key_id.hex()})
                    existing = device
                except IntegrityError:
                    # Another worker registered the same VIN between our read and our insert.
                    existing = self._get_device(vin)
                    if existing is None:
                        raise
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        if existing.public_key != public_raw:
            log.warning("device registration conflict", extra={"vin": vin})
            raise DeviceConflict(f"VIN {vin} is already registered with a different key")
        with self._lock:
            self._keys.pop(vin, None)
        return existing

    def _get_device(self, vin: str) -> Device | None:
        with self._session() as session:
            return session.get(Device, vin)

    def get_device(self, vin: str) -> Device | None:
        try:
            return self._get_device(vin)
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc

    def get_device_key(self, vin: str) -> bytes | None:
        """The device's raw public key. Only hits are cached: a VIN unknown now may be registered elsewhere."""
        with self._lock:
            key = self._keys.get(vin)
            if key is not None:
                self._keys.move_to_end(vin)
                return key
        device = self.get_device(vin)
        if device is None:
            return None
        with self._lock:
            self._keys[vin] = device.public_key
            while len(self._keys) > self._cache_size:
                self._keys.popitem(last=False)
        return device.public_key

    def list_vehicles(self, limit: int = 1000, offset: int = 0) -> list[VehicleSummary]:
        """Vehicles ordered by VIN, at most MAX_LIST_LIMIT per call (page with offset)."""
        stmt = self._summary_query().limit(max(0, min(limit, MAX_LIST_LIMIT))).offset(max(0, offset))
        return self._summaries(stmt)

    def vehicle_summary(self, vin: str) -> VehicleSummary | None:
        found = self._summaries(self._summary_query().where(Device.vin == vin))
        return found[0] if found else None

    @staticmethod
    def _summary_query() -> Select[Device, DeviceState]:
        return select(Device, DeviceState).outerjoin(DeviceState, DeviceState.vin == Device.vin).order_by(Device.vin)

    def _summaries(self, stmt: Select[Device, DeviceState]) -> list[VehicleSummary]:
        try:
            with self._session() as session:
                rows = session.execute(stmt).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        return [
            VehicleSummary(
                vin=d.vin,
                label=d.label,
                registered_at=as_utc(d.registered_at),
                last_seen_ms=s.last_seen_ms if s else None,
                last_boot=s.last_boot if s else None,
                messages=s.messages if s else 0,
                samples=s.samples if s else 0,
            )
            for d, s in rows
        ]

    def create_api_key(self, role: Role | str, name: str) -> str:
        """Create a key and return its plaintext — the only time it exists; the database holds its SHA-256."""
        role = Role(role)
        plaintext = API_KEY_PREFIX + secrets.token_urlsafe(24)
        try:
            with self._session() as session, session.begin():
                session.add(ApiKey(name=name, role=role.value, key_hash=hash_api_key(plaintext)))
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        log.info("api key created", extra={"role": role.value, "key_name": name})
        return plaintext

    def role_for_key(self, plaintext: str) -> Role | None:
        if not plaintext.startswith(API_KEY_PREFIX) or len(plaintext) > 200:
            return None
        try:
            with self._session() as session:
                role = session.scalar(select(ApiKey.role).where(ApiKey.key_hash == hash_api_key(plaintext)))
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        return None if role is None else Role(role)
