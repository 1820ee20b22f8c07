"""Relational models (registry, device keys, per-device state, replay ledger) and engine set-up.

SQLite by default, PostgreSQL in production: the models use only portable types and constraints; everything
SQLite-specific lives in the connect/begin hooks of `create_engine_for`. The schema itself is owned by the Alembic
revisions in cloud_ingest/migrations/ (`init_db` runs them); a model change needs a new revision there.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SQLITE_BUSY_TIMEOUT_MS = 10_000
# PostgreSQL pool: a bounded pool (a burst waits at most POOL_TIMEOUT_S for a connection, then fails as a
# StorageError the bridge retries) and bounded connect/statement times, so an unreachable or hung server turns into
# an error instead of a stuck ingest thread.
PG_POOL_SIZE = 5
PG_MAX_OVERFLOW = 5
PG_POOL_TIMEOUT_S = 10
PG_POOL_RECYCLE_S = 1800
PG_CONNECT_TIMEOUT_S = 5
PG_STATEMENT_TIMEOUT_MS = 30_000
# Execution option naming the statement the SQLite "begin" hook emits; migrations ask for BEGIN IMMEDIATE.
SQLITE_BEGIN_OPTION = "zhilian_sqlite_begin"


class Role(enum.StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, required: Role) -> bool:
        return self.rank >= required.rank


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes even for timezone-aware columns; they were written as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Base(DeclarativeBase):
    # Deterministic constraint names on every backend, so a later revision can drop or alter one by name
    # (SQLite batch mode and PostgreSQL ALTER both need them). Check constraints are named explicitly.
    metadata = MetaData(
        naming_convention={
            "pk": "pk_%(table_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "ix": "ix_%(table_name)s_%(column_0_name)s",
        }
    )


class Device(Base):
    __tablename__ = "device"

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    label: Mapped[str | None] = mapped_column(String(200), default=None)


class DeviceKeyRow(Base):
    """A device's Ed25519 signing keys: several may be active at once (rotation); a revoked key stays, marked."""

    __tablename__ = "device_keys"

    vin: Mapped[str] = mapped_column(String(32), ForeignKey("device.vin"), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)  # lowercase hex of the envelope's 8 bytes
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)


class ApiKey(Base):
    __tablename__ = "api_key"
    __table_args__ = (CheckConstraint("role IN ('admin', 'operator', 'viewer')", name="ck_api_key_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeviceState(Base):
    """Counters per device; created at registration so ingest only ever UPDATEs it (atomic increments)."""

    __tablename__ = "device_state"

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    last_seen_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    last_boot: Mapped[int | None] = mapped_column(BigInteger, default=None)
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    samples: Mapped[int] = mapped_column(BigInteger, default=0)


class BootWindow(Base):
    """High-water mark of sequence numbers per (vin, boot): the replay window slides below it."""

    __tablename__ = "boot_window"

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    boot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hwm_seq: Mapped[int] = mapped_column(BigInteger)


class MessageLedger(Base):
    """Identities of stored messages inside the replay window; its primary key is what dedupes across workers."""

    __tablename__ = "message_ledger"

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    boot: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class VehicleProfile(Base):
    """What the hazard rules need to know about a vehicle beyond its telemetry (cloud_ingest/alarms.py builds a
    rules VehicleContext from it). Optional: a vehicle without a row gets the rules file's base settings."""

    __tablename__ = "vehicle_profile"

    vin: Mapped[str] = mapped_column(String(32), ForeignKey("device.vin"), primary_key=True)
    model: Mapped[str | None] = mapped_column(String(32), default=None)  # "ebike48", "emoto72"
    variant: Mapped[str | None] = mapped_column(String(64), default=None)  # the maker's variant name, informative
    chemistry: Mapped[str | None] = mapped_column(String(8), default=None)  # "NMC", "LFP"
    battery_barcodes_json: Mapped[str] = mapped_column(Text, default="[]")  # packs bound to the VIN
    battery_capacity_ah: Mapped[float | None] = mapped_column(Float, default=None)
    battery_cell_count: Mapped[int | None] = mapped_column(Integer, default=None)
    battery_manufactured_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    battery_service_life_years: Mapped[float | None] = mapped_column(Float, default=None)
    speed_limit_kmh: Mapped[float | None] = mapped_column(Float, default=None)  # factory controller record
    wheel_inch: Mapped[float | None] = mapped_column(Float, default=None)
    locked: Mapped[bool | None] = mapped_column(Boolean, default=None)  # None: as the vehicle's status reports
    reporting_interval_s: Mapped[float] = mapped_column(Float, default=5.0)
    updated_ms: Mapped[int] = mapped_column(BigInteger)


def _switch_to_wal(cur: Any) -> None:
    """`PRAGMA journal_mode=WAL`, retried while another connection holds the lock it needs. Switching a new file
    needs an exclusive lock, and SQLite answers "database is locked" at once, without its busy handler, when
    another process is inside a write transaction (workers starting together: one migrates, the others failed
    in 5 of 30 trials)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite (which begins lazily, only before DML, and breaks
        # SAVEPOINT); SQLAlchemy emits BEGIN itself in the "begin" hook below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "BEGIN"))


def create_engine_for(url: str) -> Engine:
    """An engine for `url`.

    SQLite files get WAL, synchronous=FULL and a busy timeout for multi-process use. PostgreSQL URLs
    (`postgresql://` is taken as `postgresql+psycopg://`, the driver we ship) get a bounded, pre-pinging pool
    and connect/statement timeouts unless the URL sets its own.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, connect_args={"check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in parsed.query:
            connect_args["connect_timeout"] = PG_CONNECT_TIMEOUT_S
        if "options" not in parsed.query:
            connect_args["options"] = f"-c statement_timeout={PG_STATEMENT_TIMEOUT_MS}"
        return create_engine(
            parsed,
            pool_pre_ping=True,
            pool_size=PG_POOL_SIZE,
            max_overflow=PG_MAX_OVERFLOW,
            pool_timeout=PG_POOL_TIMEOUT_S,
            pool_recycle=PG_POOL_RECYCLE_S,
            connect_args=connect_args,
        )
    return create_engine(parsed, pool_pre_ping=True)


def init_db(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (creating it, or adopting a pre-Alembic SQLite registry)."""
    from cloud_ingest.migrations import upgrade

    upgrade(engine)
