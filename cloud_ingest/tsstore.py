"""Time-series storage: the store interface and its embedded SQLite implementation.

One wide table, one row per (vin, ts) and one column per catalogue signal: a batch is columnar already, most
queries ask for a few signals over a time range of one vehicle, and the (vin, ts) primary key of a WITHOUT ROWID
table keeps each vehicle's rows clustered in time order.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cloud_ingest.errors import QueryError, StorageError, UnknownSignalError
from protocol import Batch, Catalogue, Signal, SignalType
from protocol.catalogue import Value

log = logging.getLogger(__name__)

MAX_QUERY_LIMIT = 100_000
BUSY_TIMEOUT_S = 10.0
_SQL_TYPE = {SignalType.FLOAT: "REAL", SignalType.INT: "INTEGER", SignalType.BOOL: "INTEGER", SignalType.STR: "TEXT"}


class TimeSeriesStore(Protocol):
    """What the pipeline and the API need from a time-series backend (SQLite, or InfluxDB in influx_store.py)."""

    def write_many(self, items: Sequence[tuple[str, Batch]]) -> int:
        """Write every batch in one durable step; re-writing the same (vin, ts) merges, never duplicates.

        Returns the number of samples written. Raises StorageError.
        """
        ...

    def latest(self, vin: str) -> tuple[int, dict[str, Value]] | None: ...

    def latest_position(self, vin: str) -> tuple[int, float, float] | None: ...

    def query(self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int) -> Batch: ...

    def ping(self) -> None:
        """Raises StorageError unless the backend answers (the health endpoint's check)."""
        ...

    def close(self) -> None: ...


POSITION_SIGNALS = ("CurrentLocation.Latitude", "CurrentLocation.Longitude")


class _ConnHolder:
    """Owns one thread's connection; lives exactly as long as that thread's local storage."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _close_thread_conn(
    registry: dict[int, sqlite3.Connection], lock: threading.Lock, key: int, conn: sqlite3.Connection
) -> None:
    with lock:
        registry.pop(key, None)
    conn.close()  # closing twice (after store.close()) is harmless


def _quote(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


class SqliteTimeSeriesStore:
    """The embedded default store.

    Thread-safety: one sqlite3 connection per thread (thread-local). WAL lets the ingest worker write while
    FastAPI's threadpool reads, each on its own connection, without a Python-level lock serialising them;
    SQLite's own locking (plus busy_timeout) orders concurrent writers, also across processes.
    """

    def __init__(self, path: str | Path, catalogue: Catalogue) -> None:
        self.path = str(path)
        self.catalogue = catalogue
        self._signals: dict[str, Signal] = {s.name: s for s in catalogue}
        self._local = threading.local()
        # Open connections by holder id. A holder lives in its thread's local storage, so when the thread ends
        # (AnyIO and executor workers come and go) its finalizer closes the connection: no fd leak over uptime.
        self._all: dict[int, sqlite3.Connection] = {}
        self._all_lock = threading.Lock()
        self._closed = False
        try:
            self._migrate(self._conn())
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open time-series store {self.path}: {exc}") from exc

    def _conn(self) -> sqlite3.Connection:
        holder: _ConnHolder | None = getattr(self._local, "holder", None)
        if holder is not None:
            return holder.conn
        if self._closed:
            raise StorageError("time-series store is closed")
        # check_same_thread=False only so close() may close every thread's connection; each connection is
        # otherwise used by the thread that opened it.
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        holder = _ConnHolder(conn)
        self._local.holder = holder
        with self._all_lock:
            self._all[id(holder)] = conn
        weakref.finalize(holder, _close_thread_conn, self._all, self._all_lock, id(holder), conn)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        cols = ", ".join(f"{_quote(s.column)} {_SQL_TYPE[s.type]}" for s in self.catalogue)
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS telemetry (vin TEXT NOT NULL, ts INTEGER NOT NULL"
            f"{', ' + cols if cols else ''}, PRIMARY KEY (vin, ts)) WITHOUT ROWID"
        )
        have = {row[1] for row in conn.execute("PRAGMA table_info(telemetry)")}
        for sig in self.catalogue:
            if sig.column not in have:
                # The catalogue gained a signal since the table was made; signals are never removed from it.
                conn.execute(f"ALTER TABLE telemetry ADD COLUMN {_quote(sig.column)} {_SQL_TYPE[sig.type]}")
                log.info("telemetry column added", extra={"signal": sig.name, "column": sig.column})

    def _signal(self, name: str) -> Signal:
        sig = self._signals.get(name)
        if sig is None:
            raise UnknownSignalError([name])
        return sig

    def write_many(self, items: Sequence[tuple[str, Batch]]) -> int:
        # Rows are grouped by the set of columns they carry so each group is one executemany of one upsert.
        groups: dict[tuple[str, ...], list[tuple[object, ...]]] = {}
        written = 0
        for vin, batch in items:
            unknown = [name for name in batch.columns if name not in self._signals]
            if unknown:
                raise UnknownSignalError(unknown)
            names = tuple(batch.columns)
            rows = groups.setdefault(names, [])
            for i, ts in enumerate(batch.timestamps):
                rows.append((vin, ts, *(batch.columns[n][i] for n in names)))
            written += len(batch.timestamps)
        if not groups:
            return 0
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for names, rows in groups.items():
                    conn.executemany(self._upsert_sql(names), rows)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OverflowError) as exc:
            raise StorageError(f"time-series write failed: {exc}") from exc
        return written

    def _upsert_sql(self, names: tuple[str, ...]) -> str:
        cols = [_quote(self._signals[n].column) for n in names]
        insert = (
            f"INSERT INTO telemetry (vin, ts{''.join(', ' + c for c in cols)}) "
            f"VALUES (?, ?{', ?' * len(cols)}) ON CONFLICT (vin, ts) DO "
        )
        if not cols:
            return insert + "NOTHING"
        # A redelivery or an overlapping batch fills in what it carries and leaves the other columns alone.
        return insert + "UPDATE SET " + ", ".join(f"{c} = COALESCE(excluded.{c}, {c})" for c in cols)

    @staticmethod
    def _from_sql(sig: Signal, raw: object) -> Value | None:
        if raw is None:
            return None
        if sig.type is SignalType.BOOL:
            return bool(raw)
        return raw  # type: ignore[return-value]

    def latest(self, vin: str) -> tuple[int, dict[str, Value]] | None:
        """The newest row of `vin` with its non-null values (signals sampled at that instant)."""
        sigs = list(self.catalogue)
        cols = "".join(", " + _quote(s.column) for s in sigs)
        try:
            row = (
                self._conn()
                .execute(f"SELECT ts{cols} FROM telemetry WHERE vin = ? ORDER BY ts DESC LIMIT 1", (vin,))
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StorageError(f"time-series read failed: {exc}") from exc
        if row is None:
            return None
        values: dict[str, Value] = {}
        for sig, raw in zip(sigs, row[1:], strict=True):
            value = self._from_sql(sig, raw)
            if value is not None:
                values[sig.name] = value
        return int(row[0]), values

    def latest_position(self, vin: str) -> tuple[int, float, float] | None:
        """(ts, lat, lon) of the newest row of `vin` that has a position.

        Not simply the newest row: a vehicle in a tunnel or basement keeps sending BMS data without a fix, and
        its last known position is what an operator needs then.
        """
        lat, lon = self._signals[POSITION_SIGNALS[0]].column, self._signals[POSITION_SIGNALS[1]].column
        try:
            row = (
                self._conn()
                .execute(
                    f"SELECT ts, {_quote(lat)}, {_quote(lon)} FROM telemetry WHERE vin = ? AND {_quote(lat)} IS NOT"
                    f" NULL AND {_quote(lon)} IS NOT NULL ORDER BY ts DESC LIMIT 1",
                    (vin,),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise StorageError(f"time-series read failed: {exc}") from exc
        return None if row is None else (int(row[0]), float(row[1]), float(row[2]))

    def query(self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int) -> Batch:
        """Samples of `vin` with start_ms <= ts <= end_ms, oldest first, at most `limit` rows."""
        if signals is None:
            sigs = list(self.catalogue)
        else:
            unknown = [n for n in signals if n not in self._signals]
            if unknown:
                raise UnknownSignalError(unknown)
            sigs = [self._signals[n] for n in dict.fromkeys(signals)]
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise QueryError(f"limit must be in 1..{MAX_QUERY_LIMIT}")
        cols = "".join(", " + _quote(s.column) for s in sigs)
        try:
            rows = (
                self._conn()
                .execute(
                    f"SELECT ts{cols} FROM telemetry WHERE vin = ? AND ts >= ? AND ts <= ? ORDER BY ts LIMIT ?",
                    (vin, start_ms, end_ms, limit),
                )
                .fetchall()
            )
        except (sqlite3.Error, OverflowError) as exc:
            raise StorageError(f"time-series read failed: {exc}") from exc
        batch = Batch(timestamps=[int(r[0]) for r in rows], columns={s.name: [] for s in sigs})
        for r in rows:
            for i, sig in enumerate(sigs, start=1):
                batch.columns[sig.name].append(self._from_sql(sig, r[i]))
        return batch

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"time-series store unavailable: {exc}") from exc

    def close(self) -> None:
        with self._all_lock:
            self._closed = True
            conns = list(self._all.values())
            self._all.clear()  # in place: the finalizers hold this very dict
        for conn in conns:
            conn.close()
        self._local = threading.local()
