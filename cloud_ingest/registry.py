"""The device and API-key registry: who may send telemetry, with which keys, and who may read it.

A device has one or more Ed25519 signing keys (`device_keys`): rotation adds a key that is accepted alongside the
old ones until they are revoked; a revoked key is never accepted again (nor re-added). The pipeline asks
`lookup_key(vin, key_id)` for every envelope, so active keys are cached per process: revoking through this
Registry drops the entry at once, while other processes' caches let a revoked key expire within `key_cache_ttl_s`.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Select, func, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.db import SQLITE_BEGIN_OPTION, ApiKey, Device, DeviceKeyRow, DeviceState, Role, as_utc, utcnow
from cloud_ingest.errors import DeviceConflict, IngestError, InvalidDeviceError, StorageError
from protocol import key_id_for
from protocol.errors import TopicError
from protocol.signing import KEY_ID_LEN
from protocol.topics import validate_vin

log = logging.getLogger(__name__)

PUBLIC_KEY_LEN = 32
KEY_CACHE_SIZE = 10_000
KEY_CACHE_TTL_S = 30.0
# Bounds what a leaked operator API key can do: it cannot pile up keys; a revocation frees a slot.
MAX_ACTIVE_KEYS = 8
MAX_LIST_LIMIT = 10_000
API_KEY_PREFIX = "zk_"


class UnknownDeviceError(IngestError):
    """No device is registered under this VIN."""


class UnknownKeyError(IngestError):
    """The device has no key with this key id."""


class KeyState(enum.StrEnum):
    """Outcome of a key lookup; every state but ACTIVE is also the pipeline's rejection reason."""

    ACTIVE = "active"
    REVOKED = "revoked_key"
    UNKNOWN_KEY = "unknown_key"
    UNKNOWN_DEVICE = "unknown_device"


@dataclass(frozen=True, slots=True)
class KeyLookup:
    state: KeyState
    public_key: bytes | None = None  # set only when ACTIVE


@dataclass(frozen=True, slots=True)
class KeyRecord:
    vin: str
    key_id: bytes
    public_key: bytes
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    @classmethod
    def of(cls, row: DeviceKeyRow) -> KeyRecord:
        return cls(
            vin=row.vin,
            key_id=bytes.fromhex(row.key_id),
            public_key=row.public_key,
            created_at=as_utc(row.created_at),
            revoked_at=None if row.revoked_at is None else as_utc(row.revoked_at),
        )


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


def _checked(vin: str, public_raw: bytes) -> None:
    try:
        validate_vin(vin)
    except TopicError as exc:
        raise InvalidDeviceError(str(exc)) from None
    if not isinstance(public_raw, bytes) or len(public_raw) != PUBLIC_KEY_LEN:
        raise InvalidDeviceError(f"a device public key is {PUBLIC_KEY_LEN} raw bytes")


class Registry:
    """Thread-safe: every call opens its own session; the key cache has its own lock."""

    def __init__(
        self, engine: Engine, cache_size: int = KEY_CACHE_SIZE, key_cache_ttl_s: float = KEY_CACHE_TTL_S
    ) -> None:
        self.engine = engine
        # Read-then-write transactions take SQLite's write lock up front: upgrading a read lock later fails at
        # once under a concurrent writer (SQLITE_BUSY, no busy-timeout wait). PostgreSQL ignores the option.
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        self._cache_size = cache_size
        self._ttl = key_cache_ttl_s
        # (vin, key_id) -> (public key, monotonic expiry); only ACTIVE keys are ever cached.
        self._keys: OrderedDict[tuple[str, bytes], tuple[bytes, float]] = OrderedDict()
        # Bumped by every revocation: a lookup that read the database before a revocation committed must not
        # put its (by then stale) answer into the cache afterwards.
        self._generation = 0
        self._lock = threading.Lock()

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def _write_session(self) -> Session:
        return Session(self._write_engine, expire_on_commit=False)

    # -- health -----------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise StorageError unless the database answers a trivial query."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc

    # -- devices and their keys -------------------------------------------------------------------------------

    def register_device(self, vin: str, public_raw: bytes, label: str | None = None) -> KeyRecord:
        """Register `vin` with its first key; repeating it with the same (active) key is a no-op.

        A different key for a registered VIN is a DeviceConflict: keys are added explicitly (`add_key`), never
        swapped in by a registration.
        """
        _checked(vin, public_raw)
        key_hex = key_id_for(public_raw).hex()
        try:
            with self._write_session() as session, session.begin():
                if session.get(Device, vin) is None:
                    session.add(Device(vin=vin, label=label))
                    session.add(DeviceState(vin=vin, messages=0, samples=0))
                    session.flush()
                    session.add(DeviceKeyRow(vin=vin, key_id=key_hex, public_key=public_raw))
                    created = True
                else:
                    created = False
        except IntegrityError:
            created = False  # another worker registered the same VIN between our read and our insert
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        record = self._key_record(vin, key_hex)
        if record is None or (not created and record.public_key != public_raw):
            log.warning("device registration conflict", extra={"vin": vin})
            raise DeviceConflict(f"VIN {vin} is already registered with a different key")
        if not record.active:
            raise DeviceConflict(f"key {key_hex} of {vin} is revoked")
        if created:
            log.info("device registered", extra={"vin": vin, "key_id": key_hex})
        return record

    def add_key(self, vin: str, public_raw: bytes) -> tuple[KeyRecord, bool]:
        """Add a signing key to a registered device (rotation); returns the key and whether it is new.

        Adding an active key again is a no-op; a revoked key cannot come back (DeviceConflict), nor can a device
        hold more than MAX_ACTIVE_KEYS active keys.
        """
        _checked(vin, public_raw)
        key_hex = key_id_for(public_raw).hex()
        try:
            with self._write_session() as session, session.begin():
                if session.get(Device, vin) is None:
                    raise UnknownDeviceError(vin)
                if session.get(DeviceKeyRow, (vin, key_hex)) is None:
                    active = session.scalar(
                        select(func.count())
                        .select_from(DeviceKeyRow)
                        .where(DeviceKeyRow.vin == vin, DeviceKeyRow.revoked_at.is_(None))
                    )
                    if (active or 0) >= MAX_ACTIVE_KEYS:
                        raise DeviceConflict(f"{vin} already has {MAX_ACTIVE_KEYS} active keys; revoke one first")
                    session.add(DeviceKeyRow(vin=vin, key_id=key_hex, public_key=public_raw))
                    created = True
                else:
                    created = False
        except IntegrityError:
            created = False  # the same key added concurrently
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        record = self._key_record(vin, key_hex)
        if record is None:
            raise StorageError(f"registry: key {key_hex} of {vin} vanished after being added")
        if not record.active:
            raise DeviceConflict(f"key {key_hex} of {vin} is revoked and cannot be added again")
        if created:
            log.info("device key added", extra={"vin": vin, "key_id": key_hex})
        return record, created

    def revoke_key(self, vin: str, key_id: bytes) -> KeyRecord:
        """Revoke a device key (idempotent: an already revoked key keeps its first revocation time)."""
        key_hex = key_id.hex()
        try:
            with self._session() as session, session.begin():
                session.execute(
                    update(DeviceKeyRow)
                    .where(DeviceKeyRow.vin == vin, DeviceKeyRow.key_id == key_hex, DeviceKeyRow.revoked_at.is_(None))
                    .values(revoked_at=utcnow())
                )
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        with self._lock:
            self._keys.pop((vin, key_id), None)
            self._generation += 1
        record = self._key_record(vin, key_hex)
        if record is None:
            if self.get_device(vin) is None:
                raise UnknownDeviceError(vin)
            raise UnknownKeyError(f"{vin} has no key {key_hex}")
        log.warning("device key revoked", extra={"vin": vin, "key_id": key_hex})
        return record

    def list_keys(self, vin: str) -> list[KeyRecord]:
        """The device's keys, oldest first, revoked ones included."""
        try:
            with self._session() as session:
                if session.get(Device, vin) is None:
                    raise UnknownDeviceError(vin)
                rows = session.scalars(
                    select(DeviceKeyRow)
                    .where(DeviceKeyRow.vin == vin)
                    .order_by(DeviceKeyRow.created_at, DeviceKeyRow.key_id)
                ).all()
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        return [KeyRecord.of(r) for r in rows]

    def _key_record(self, vin: str, key_hex: str) -> KeyRecord | None:
        try:
            with self._session() as session:
                row = session.get(DeviceKeyRow, (vin, key_hex))
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        return None if row is None else KeyRecord.of(row)

    def lookup_key(self, vin: str, key_id: bytes) -> KeyLookup:
        """Which key signs (vin, key_id)'s envelopes, if any may. Only ACTIVE answers are cached."""
        return self.lookup_keys([(vin, key_id)])[(vin, key_id)]

    def lookup_keys(self, wanted: Iterable[tuple[str, bytes]]) -> dict[tuple[str, bytes], KeyLookup]:
        """`lookup_key` for many (vin, key_id) at once: the cache first, then one query per 300 misses."""
        out: dict[tuple[str, bytes], KeyLookup] = {}
        misses: list[tuple[str, bytes]] = []
        now = time.monotonic()
        with self._lock:
            for cache_key in wanted:
                if cache_key in out:
                    continue
                hit = self._keys.get(cache_key)
                if hit is not None and hit[1] > now:
                    self._keys.move_to_end(cache_key)
                    out[cache_key] = KeyLookup(KeyState.ACTIVE, hit[0])
                elif len(cache_key[1]) != KEY_ID_LEN:
                    out[cache_key] = KeyLookup(KeyState.UNKNOWN_KEY)
                elif cache_key not in misses:
                    misses.append(cache_key)
            generation = self._generation
        if not misses:
            return out
        found: dict[str, dict[str, tuple[bytes, Any]]] = {}  # vin -> key_id hex -> (public key, revoked_at)
        vins = sorted({vin for vin, _ in misses})
        try:
            with self._session() as session:
                for i in range(0, len(vins), 300):
                    # One round trip: the device rows, outer-joined with their key rows.
                    stmt = (
                        select(Device.vin, DeviceKeyRow.key_id, DeviceKeyRow.public_key, DeviceKeyRow.revoked_at)
                        .outerjoin(DeviceKeyRow, DeviceKeyRow.vin == Device.vin)
                        .where(Device.vin.in_(vins[i : i + 300]))
                    )
                    for vin, key_hex, public_key, revoked_at in session.execute(stmt):
                        keys = found.setdefault(vin, {})
                        if key_hex is not None:
                            keys[key_hex] = (public_key, revoked_at)
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc
        fresh: list[tuple[tuple[str, bytes], bytes]] = []
        for cache_key in misses:
            vin, key_id = cache_key
            if vin not in found:
                out[cache_key] = KeyLookup(KeyState.UNKNOWN_DEVICE)
                continue
            key = found[vin].get(key_id.hex())
            if key is None:
                out[cache_key] = KeyLookup(KeyState.UNKNOWN_KEY)
            elif key[1] is not None:
                out[cache_key] = KeyLookup(KeyState.REVOKED)
            else:
                out[cache_key] = KeyLookup(KeyState.ACTIVE, key[0])
                fresh.append((cache_key, key[0]))
        with self._lock:
            if generation == self._generation:
                for cache_key, public_key in fresh:
                    self._keys[cache_key] = (public_key, now + self._ttl)
                    self._keys.move_to_end(cache_key)
                while len(self._keys) > self._cache_size:
                    self._keys.popitem(last=False)
        return out

    def _get_device(self, vin: str) -> Device | None:
        with self._session() as session:
            return session.get(Device, vin)

    def get_device(self, vin: str) -> Device | None:
        try:
            return self._get_device(vin)
        except SQLAlchemyError as exc:
            raise StorageError(f"registry: {exc}") from exc

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
