"""Plain SQL for the hot per-call statements of ingest, shared by SQLite and PostgreSQL.

The ingest pipeline runs a handful of statements per call whatever its size (ledger, rule state, life cycles).
Built as SQLAlchemy expressions they cost more CPU to compile and bind than the database spends running them,
and a multi-row VALUES list compiles anew for every row count. These helpers write that SQL once per shape and
hand it to the driver through `Connection.exec_driver_sql` (still inside the session's transaction, and driver
errors still come out as SQLAlchemy's DBAPIError, so retry and error handling are unchanged).

Only what both dialects read the same way goes here: `WITH w AS (VALUES ...)` joins, `INSERT ... ON CONFLICT`,
`RETURNING` (SQLite ≥ 3.35). The two drivers differ only in their placeholder: `?` (sqlite3) and `%s` (psycopg).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import Connection

from cloud_ingest.errors import StorageError

T = TypeVar("T")
# Rows per multi-row statement: at most 4 columns × 300 = 1,200 bound parameters, far below both databases' limits.
CHUNK_ROWS = 300
_MARKERS = {"qmark": "?", "format": "%s", "pyformat": "%s"}


def marker(engine: Engine | Connection) -> str:
    """The driver's positional placeholder."""
    style = engine.dialect.paramstyle
    found = _MARKERS.get(style)
    if found is None or engine.dialect.name not in ("sqlite", "postgresql"):
        raise StorageError(f"plain SQL supports SQLite and PostgreSQL drivers, not {engine.dialect.name} ({style})")
    return found


def for_update(engine: Engine | Connection) -> str:
    """The suffix that row-locks a SELECT's rows: ` FOR UPDATE` on PostgreSQL; nothing on SQLite, whose write
    transaction holds the whole file anyway."""
    return " FOR UPDATE" if engine.dialect.name == "postgresql" else ""


@lru_cache(maxsize=4096)
def rows(count: int, width: int, mark: str) -> str:
    """`(?, ?), (?, ?)`: `count` rows of `width` placeholders."""
    one = "(" + ", ".join([mark] * width) + ")"
    return ", ".join([one] * count)


@lru_cache(maxsize=4096)
def marks(count: int, mark: str) -> str:
    """`?, ?, ?`: `count` placeholders (an IN list)."""
    return ", ".join([mark] * count)


def chunks(items: Sequence[T], size: int = CHUNK_ROWS) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def flat(rows_: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
    """Row tuples as one positional parameter tuple, in order."""
    return tuple(v for row in rows_ for v in row)
