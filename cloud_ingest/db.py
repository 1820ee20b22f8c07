"""Relational models (registry, per-device state, replay ledger) and engine set-up.

SQLite by default, PostgreSQL in production: the models use only portable types and constraints; everything
SQLite-specific lives in the connect/begin hooks of `create_engine_for`.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    String,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SQLITE_BUSY_TIMEOUT_MS = 10_000


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
    pass


class Device(Base):
    __tablename__ = "device"

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    key_id: Mapped[bytes] = mapped_column(LargeBinary(8))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    label: Mapped[str | None] = mapped_column(String(200), default=None)


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


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite (which begins lazily, only before DML, and breaks
        # SAVEPOINT); SQLAlchemy emits BEGIN itself in the "begin" hook below.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def create_engine_for(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL, synchronous=FULL and a busy timeout for multi-process use."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


def init_db(engine: Engine) -> None:
    Base.metadata.create_all(engine)
