"""Alembic migrations on SQLite and PostgreSQL: they build exactly the models, run both ways, adopt pre-migration
SQLite registries, refuse unknown schemas, and run once when several workers start together."""

from __future__ import annotations

import argparse
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect, text

from cloud_ingest import migrations
from cloud_ingest.db import create_engine_for, init_db
from cloud_ingest.migrations import MigrationError, target_metadata_of_all_models
from cloud_ingest.registry import KeyState, Registry
from cloud_ingest.service import IngestService
from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, key_id_for, seal_envelope

VIN = "LZHEB0A12P0000001"
KEY = DeviceKey.from_seed(b"\x31" * 32)
ROTATED = DeviceKey.from_seed(b"\x32" * 32)

# What `Base.metadata.create_all` made for SQLite before migrations existed (Zhilian 0.1.0), verbatim.
PRE_MIGRATION_SQLITE = """
CREATE TABLE device (
    vin VARCHAR(32) NOT NULL, public_key BLOB NOT NULL, key_id BLOB NOT NULL, registered_at DATETIME NOT NULL,
    label VARCHAR(200), PRIMARY KEY (vin));
CREATE TABLE api_key (
    id INTEGER NOT NULL, name VARCHAR(100) NOT NULL, role VARCHAR(16) NOT NULL, key_hash VARCHAR(64) NOT NULL,
    created_at DATETIME NOT NULL, PRIMARY KEY (id),
    CONSTRAINT ck_api_key_role CHECK (role IN ('admin', 'operator', 'viewer')), UNIQUE (key_hash));
CREATE TABLE device_state (
    vin VARCHAR(32) NOT NULL, last_seen_ms BIGINT, last_boot BIGINT, messages BIGINT NOT NULL,
    samples BIGINT NOT NULL, PRIMARY KEY (vin));
CREATE TABLE boot_window (
    vin VARCHAR(32) NOT NULL, boot BIGINT NOT NULL, hwm_seq BIGINT NOT NULL, PRIMARY KEY (vin, boot));
CREATE TABLE message_ledger (
    vin VARCHAR(32) NOT NULL, boot BIGINT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (vin, boot, seq));
"""


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = create_engine_for(database_url)
    yield e
    e.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), target_metadata_of_all_models()))


def test_upgrade_builds_exactly_the_models_and_is_idempotent(engine: Engine) -> None:
    init_db(engine)
    init_db(engine)
    assert migrations.current_revision(engine) == migrations.head_revision()
    assert schema_diff(engine) == []


def test_every_revision_downgrades_and_upgrades_again_keeping_data(engine: Engine) -> None:
    init_db(engine)
    registry = Registry(engine)
    registry.register_device(VIN, KEY.public_raw, "bike")
    registry.add_key(VIN, ROTATED.public_raw)
    registry.revoke_key(VIN, KEY.key_id)
    api_key = registry.create_api_key("viewer", "dash")

    migrations.downgrade(engine, "0001")
    with engine.connect() as conn:
        row = conn.execute(text("SELECT public_key, key_id, label FROM device WHERE vin = :v"), {"v": VIN}).one()
    # Only one key survives below 0002: the active one.
    assert (bytes(row.public_key), bytes(row.key_id), row.label) == (ROTATED.public_raw, ROTATED.key_id, "bike")
    assert "device_keys" not in tables(engine)

    init_db(engine)
    registry = Registry(engine)
    assert [(k.key_id, k.active) for k in registry.list_keys(VIN)] == [(ROTATED.key_id, True)]
    assert registry.role_for_key(api_key) is not None

    migrations.downgrade(engine, "base")
    assert tables(engine) <= {"alembic_version"}
    init_db(engine)
    assert schema_diff(engine) == []


def test_concurrent_workers_migrate_once(engine: Engine) -> None:
    url = engine.url.render_as_string(hide_password=False)
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def start_worker() -> None:
        e = create_engine_for(url)
        try:
            barrier.wait(timeout=10)
            init_db(e)
        except BaseException as exc:
            errors.append(exc)
        finally:
            e.dispose()

    threads = [threading.Thread(target=start_worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert migrations.current_revision(engine) == migrations.head_revision()


def _pre_migration_registry(path: Path) -> None:
    e = create_engine_for(f"sqlite:///{path}")
    try:
        with e.begin() as conn:
            for stmt in PRE_MIGRATION_SQLITE.split(";"):
                if stmt.strip():
                    conn.exec_driver_sql(stmt)
            conn.execute(
                text("INSERT INTO device VALUES (:v, :pk, :kid, '2024-05-01 10:00:00.000000', 'old bike')"),
                {"v": VIN, "pk": KEY.public_raw, "kid": key_id_for(KEY.public_raw)},
            )
            conn.exec_driver_sql(f"INSERT INTO device_state VALUES ('{VIN}', 1714557600000, 3, 7, 70)")
            conn.exec_driver_sql(f"INSERT INTO boot_window VALUES ('{VIN}', 3, 7)")
            conn.exec_driver_sql(f"INSERT INTO message_ledger VALUES ('{VIN}', 3, 7)")
    finally:
        e.dispose()


def test_a_pre_migration_sqlite_registry_is_adopted_and_upgraded(tmp_path: Path) -> None:
    _pre_migration_registry(tmp_path / "registry.db")
    svc = IngestService.open(tmp_path)
    try:
        assert migrations.current_revision(svc.engine) == migrations.head_revision()
        assert svc.registry.lookup_key(VIN, KEY.key_id).state is KeyState.ACTIVE
        summary = svc.registry.vehicle_summary(VIN)
        assert summary is not None and (summary.label, summary.messages, summary.samples) == ("old bike", 7, 70)
        body = encode_batch(Batch([1_700_000_000_000], {"Speed": [1.0]}), svc.catalogue)

        def sealed(seq: int) -> bytes:
            return seal_envelope(Envelope(VIN, KEY.key_id, 3, seq, 0, Kind.TELEMETRY, Flags.NONE, body), KEY)

        assert svc.pipeline.ingest_one(VIN, sealed(7)).outcome == "duplicate"  # the ledger came along
        assert svc.pipeline.ingest_one(VIN, sealed(8)).outcome == "stored"
    finally:
        svc.close()


def test_unknown_existing_tables_are_refused_untouched(tmp_path: Path) -> None:
    e = create_engine_for(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        with e.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE device (vin VARCHAR(32) PRIMARY KEY, colour TEXT)")
        with pytest.raises(MigrationError, match="match no known schema"):
            init_db(e)
        assert tables(e) == {"device"}
    finally:
        e.dispose()


def test_alembic_command_line_environment_and_offline_sql(tmp_path: Path) -> None:
    """The authoring path of migrations/README.md: the shipped alembic.ini, a URL from -x, SQL for a DBA."""
    ini = str(migrations.SCRIPT_LOCATION / "alembic.ini")
    url = f"sqlite:///{tmp_path / 'authoring.db'}"
    command.upgrade(Config(ini, cmd_opts=argparse.Namespace(x=[f"url={url}"])), "head")
    e = create_engine_for(url)
    try:
        assert migrations.current_revision(e) == migrations.head_revision() and schema_diff(e) == []
    finally:
        e.dispose()

    buffer = io.StringIO()
    cfg = Config(
        ini, output_buffer=buffer, cmd_opts=argparse.Namespace(x=["url=postgresql+psycopg://nobody@nowhere/zl"])
    )
    command.upgrade(cfg, "head", sql=True)
    rendered = buffer.getvalue()
    assert "CREATE TABLE device_keys" in rendered and "encode(key_id, 'hex')" in rendered
    assert "ALTER TABLE device DROP COLUMN public_key" in rendered
