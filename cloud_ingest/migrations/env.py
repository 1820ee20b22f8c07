"""Alembic environment of the relational schema (registry, device keys, ledger, and what later revisions add).

Two ways in:
- `cloud_ingest.migrations.upgrade(engine)` (what `init_db` and every service start run) hands over an open
  connection, already inside the transaction (and lock) it wants the migration in: `config.attributes["connection"]`.
- The `alembic` command line with cloud_ingest/migrations/alembic.ini, for authoring revisions; the database URL
  comes from `-x url=...` or ZHILIAN_DATABASE_URL.

Offline mode (`alembic upgrade --sql`, for PostgreSQL) renders SQL for a DBA; revisions therefore keep data
migrations in SQL statements (no SELECT-then-Python), branching on `op.get_context().dialect.name` where dialects
differ.
"""

from __future__ import annotations

import logging
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from cloud_ingest.db import create_engine_for
from cloud_ingest.migrations import check_foreign_keys, sqlite_foreign_keys_off, target_metadata_of_all_models

config = context.config
target_metadata = target_metadata_of_all_models()


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # Batch mode renders SQLite's unsupported ALTERs as copy-and-move; on PostgreSQL it emits plain ALTERs.
        render_as_batch=True,
        compare_type=True,
        # One transaction for the whole run, SQLite included (Alembic assumes non-transactional DDL there).
        transactional_ddl=True,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("ZHILIAN_DATABASE_URL")
    if not url:
        raise SystemExit("give the database with -x url=... or ZHILIAN_DATABASE_URL")
    return url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given: Connection | None = config.attributes.get("connection")
    if given is not None:
        _configure(given)
        with context.begin_transaction():
            context.run_migrations()
        return
    if config.config_file_name is not None and not logging.getLogger().handlers:
        # The alembic command line: log migration steps. A host process that configured logging keeps its own.
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = create_engine_for(_url())
    try:
        with engine.connect() as connection, sqlite_foreign_keys_off(connection):
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
                check_foreign_keys(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
