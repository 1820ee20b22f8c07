"""Alembic migrations of the relational schema, run from code: services need no alembic.ini.

Layout:
    env.py              the Alembic environment; its target metadata is `cloud_ingest.db.Base.metadata`
    versions/NNNN_*.py  one revision per file, one linear history: 0001 initial schema, 0002 device keys, ...
    script.py.mako      the template `alembic revision` fills in
    alembic.ini         only for authoring revisions with the `alembic` command (see README.md)

`upgrade(engine)` (called by `cloud_ingest.db.init_db` on every service start) takes a lock first — a PostgreSQL
advisory lock, SQLite's BEGIN IMMEDIATE — so workers starting together migrate once, and runs every pending
revision in one transaction: a failing revision leaves the schema as it was. A registry created before migrations
existed (tables, no alembic_version) is checked against revision 0001 and stamped there before upgrading.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from cloud_ingest.db import SQLITE_BEGIN_OPTION, Base
from cloud_ingest.errors import IngestError

log = logging.getLogger("zhilian.migrations")

SCRIPT_LOCATION = Path(__file__).resolve().parent
# Modules that define tables on cloud_ingest.db.Base besides cloud_ingest.db itself (e.g. "cloud_ingest.alarms"):
# imported before autogenerate and the schema test compare the models with the migrated database.
MODEL_MODULES: tuple[str, ...] = (
    "cloud_ingest.commands",
    "cloud_ingest.alarms",
    "cloud_ingest.notify",
    "cloud_ingest.lifecycle",
    "cloud_ingest.geofences",
)
BASELINE = "0001"
# What `create_all` made before revision 0001 existed; a registry matching it is adopted at the baseline.
_BASELINE_SCHEMA = {
    "device": {"vin", "public_key", "key_id", "registered_at", "label"},
    "api_key": {"id", "name", "role", "key_hash", "created_at"},
    "device_state": {"vin", "last_seen_ms", "last_boot", "messages", "samples"},
    "boot_window": {"vin", "boot", "hwm_seq"},
    "message_ledger": {"vin", "boot", "seq"},
}
# pg_advisory_xact_lock key shared by every Zhilian process migrating the same database.
_PG_LOCK_KEY = 0x5A68696C69616E


class MigrationError(IngestError):
    """The schema cannot be brought to the newest revision (unrecognised existing tables, a failing revision)."""


def target_metadata_of_all_models() -> MetaData:
    for module in MODEL_MODULES:
        importlib.import_module(module)
    return Base.metadata


def config_for(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(config_for()).get_current_head()
    if head is None:
        raise MigrationError("no revisions found")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def sqlite_foreign_keys_off(conn: Connection) -> Iterator[None]:
    """SQLite: foreign keys off around a migration, as batch mode's copy-drop-rename of a referenced table needs.

    The pragma is a no-op inside a transaction, so it is set on the driver connection before any BEGIN;
    `check_foreign_keys` then verifies the result before commit, and the pragma is restored for the pool.
    """
    if conn.dialect.name != "sqlite":
        yield
        return
    if conn.in_transaction():
        raise MigrationError("foreign keys can only be switched off outside a transaction")
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


def check_foreign_keys(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise MigrationError(f"migration left dangling foreign keys: {broken[:5]}")


@contextlib.contextmanager
def _locked_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, sqlite_foreign_keys_off(conn):
        conn.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield conn
            check_foreign_keys(conn)


def _adopt_pre_migration_schema(conn: Connection, cfg: Config) -> None:
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables or not tables & _BASELINE_SCHEMA.keys():
        return
    problems = [f"table {t} is missing" for t in sorted(_BASELINE_SCHEMA.keys() - tables)]
    for table in sorted(_BASELINE_SCHEMA.keys() & tables):
        columns = {c["name"] for c in inspect(conn).get_columns(table)}
        if columns != _BASELINE_SCHEMA[table]:
            problems.append(f"table {table} has columns {sorted(columns)}, expected {sorted(_BASELINE_SCHEMA[table])}")
    if problems:
        raise MigrationError("existing tables match no known schema, refusing to migrate: " + "; ".join(problems))
    log.warning("adopting a registry created before migrations existed", extra={"revision": BASELINE})
    command.stamp(cfg, BASELINE)


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate `engine`'s database to `revision` (default: the newest), adopting a pre-migration registry."""
    try:
        with _locked_transaction(engine) as conn:
            cfg = config_for(conn)
            _adopt_pre_migration_schema(conn, cfg)
            before = MigrationContext.configure(conn).get_current_revision()
            command.upgrade(cfg, revision)
            after = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise MigrationError(f"migration failed: {exc}") from exc
    if before != after:
        log.info("schema migrated", extra={"from_revision": before, "to_revision": after})


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate `engine`'s database back to `revision` ("base" drops everything the revisions created)."""
    try:
        with _locked_transaction(engine) as conn:
            command.downgrade(config_for(conn), revision)
    except SQLAlchemyError as exc:
        raise MigrationError(f"downgrade failed: {exc}") from exc
