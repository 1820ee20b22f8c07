"""Time-series storage: the store interface, the operator queries' result types, and the embedded SQLite store.

One wide table, one row per (vin, ts) and one column per catalogue signal: a batch is columnar already, most
queries ask for a few signals over a time range of one vehicle, and the (vin, ts) primary key of a WITHOUT ROWID
table keeps each vehicle's rows clustered in time order.

Beside it the SQLite store keeps `latest`, one row per vehicle with the last known value (and its time) of every
signal and the last full position, upserted in the same transaction as the samples: the fleet snapshot reads
10,000 small rows instead of searching 10 M (docs/STORAGE.md, BENCHMARKS.md). With a RetentionConfig it also keeps
a rollup table (per-interval means) filled by `maintain()`, which purges raw rows past their retention.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sqlite3
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from cloud_ingest.errors import QueryError, StorageError, UnknownSignalError
from cloud_ingest.retention import MaintenanceReport, RetentionConfig
from protocol import Batch, Catalogue, Signal, SignalType
from protocol.catalogue import Value

log = logging.getLogger(__name__)

MAX_QUERY_LIMIT = 100_000
MAX_TRACK_BUCKETS = 10_000
BUSY_TIMEOUT_S = 10.0
_SQL_TYPE = {SignalType.FLOAT: "REAL", SignalType.INT: "INTEGER", SignalType.BOOL: "INTEGER", SignalType.STR: "TEXT"}

POSITION_SIGNALS = ("CurrentLocation.Latitude", "CurrentLocation.Longitude")
GNSS_SPEED = "CurrentLocation.GNSSReceiver.GroundSpeed"
PACK_VOLTAGE = "Powertrain.TractionBattery.CurrentVoltage"
PACK_CURRENT = "Powertrain.TractionBattery.CurrentCurrent"
PACK_TEMP_MAX = "Powertrain.TractionBattery.Temperature.Max"
DEFAULT_TZ = "Asia/Shanghai"


# -- query results ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BBox:
    """A latitude/longitude box, edges included (no antimeridian crossing: min_lon <= max_lon)."""

    min_lat: float
    min_lon: float
    max_lat: float
    max_lon: float

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.min_lat, self.min_lon, self.max_lat, self.max_lon)):
            raise QueryError("bounding box edges must be finite")
        if not (-90 <= self.min_lat <= self.max_lat <= 90 and -180 <= self.min_lon <= self.max_lon <= 180):
            raise QueryError("bounding box must satisfy -90 <= min_lat <= max_lat <= 90, same for lon in ±180")


@dataclass(slots=True)  # not frozen: a snapshot makes 10,000 of them, and frozen ones cost several times more
class FleetEntry:
    """One vehicle in the fleet snapshot.

    `ts`: its newest sample. `values`: the last known (non-null) value of each asked-for signal, whenever it was
    sampled (a BMS-only sample does not blank the speed); signals never seen are absent. `position`: (ts, lat, lon)
    of its newest sample that had both coordinates, as `latest_position` answers.
    """

    vin: str
    ts: int
    values: dict[str, Value]
    position: tuple[int, float, float] | None


@dataclass(frozen=True, slots=True)
class TrackPoint:
    """One bucket of a downsampled track: [ts, ts + bucket_ms).

    `lat`/`lon`: the last fix in the bucket (a point the vehicle really passed, unlike a mean, which cuts corners);
    `max_speed`: the highest GNSS ground speed in the bucket (km/h), None without one; `samples`: fixes in it.
    """

    ts: int
    lat: float
    lon: float
    max_speed: float | None
    samples: int


@dataclass(frozen=True, slots=True)
class ChargingSession:
    start_ms: int
    end_ms: int
    energy_wh: float


@dataclass(frozen=True)
class DailyStats:
    """A vehicle's day [start_ms, end_ms) in a time zone; see `compute_daily` for the method."""

    vin: str
    day: date
    tz: str
    start_ms: int
    end_ms: int
    samples: int
    distance_km: float
    max_speed_kmh: float | None
    energy_used_wh: float
    energy_charged_wh: float
    charging_sessions: list[ChargingSession] = field(default_factory=list)
    max_battery_temp_c: float | None = None


@dataclass(frozen=True)
class RollupSeries:
    """Rollup rows of one vehicle: bucket start times, samples per bucket, and the mean of each signal."""

    timestamps: list[int]
    samples: list[int]
    columns: dict[str, list[float | None]]


class TimeSeriesStore(Protocol):
    """What the pipeline and the API need from a time-series backend (SQLite, or InfluxDB in influx_store.py)."""

    retention: RetentionConfig | None  # None: raw data is kept forever and there are no rollups

    def write_many(self, items: Sequence[tuple[str, Batch]]) -> int:
        """Write every batch in one durable step; re-writing the same (vin, ts) merges, never duplicates.

        Returns the number of samples written. Raises StorageError.
        """
        ...

    def latest(self, vin: str) -> tuple[int, dict[str, Value]] | None: ...

    def latest_position(self, vin: str) -> tuple[int, float, float] | None: ...

    def query(self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int) -> Batch: ...

    def fleet_snapshot(
        self,
        signals: Sequence[str] = (),
        vins: Collection[str] | None = None,
        bbox: BBox | None = None,
        stale_before_ms: int | None = None,
        seen_since_ms: int | None = None,
    ) -> list[FleetEntry]:
        """Every vehicle with telemetry (or those in `vins`), ordered by VIN, in one query whatever the fleet size.

        Filters: `bbox` on the last known position (vehicles without one are left out), `stale_before_ms` keeps
        vehicles whose newest sample is older than that, `seen_since_ms` those with one at or after it.
        """
        ...

    def track(self, vin: str, start_ms: int, end_ms: int, bucket_ms: int) -> list[TrackPoint]:
        """The vehicle's positions in [start_ms, end_ms] downsampled by the server into buckets of `bucket_ms`
        starting at start_ms (at most MAX_TRACK_BUCKETS); buckets without a fix are left out."""
        ...

    def daily(self, vin: str, day: date, tz: str = DEFAULT_TZ) -> DailyStats: ...

    def rollup(self, start_ms: int, end_ms: int) -> int:
        """(Re)computes the rollup buckets that start in [start_ms, end_ms) from the raw data; needs retention."""
        ...

    def query_rollup(
        self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int
    ) -> RollupSeries: ...

    def maintain(self, now_ms: int | None = None) -> MaintenanceReport:
        """Rollups up to now and purges past retention (what the backend does not do by itself)."""
        ...

    def ping(self) -> None:
        """Raises StorageError unless the backend answers (the health endpoint's check)."""
        ...

    def close(self) -> None: ...


# -- shared query logic -----------------------------------------------------------------------------------------


def resolve_signals(by_name: dict[str, Signal], names: Sequence[str]) -> list[Signal]:
    """The catalogue signals named, in order, without repeats; UnknownSignalError names every unknown one."""
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UnknownSignalError(unknown)
    return [by_name[n] for n in dict.fromkeys(names)]


def numeric(sig: Signal) -> bool:
    """Signals that rollups average (a mean of a boolean or a string means nothing; InfluxDB refuses it too)."""
    return sig.type in (SignalType.FLOAT, SignalType.INT)


def check_track(start_ms: int, end_ms: int, bucket_ms: int) -> None:
    if bucket_ms < 1:
        raise QueryError("bucket must be at least 1 ms")
    if start_ms > end_ms:
        raise QueryError("start is after end")
    if (end_ms - start_ms) // bucket_ms + 1 > MAX_TRACK_BUCKETS:
        raise QueryError(f"at most {MAX_TRACK_BUCKETS} buckets: use a larger bucket or a shorter range")


def day_bounds(day: date, tz: str) -> tuple[int, int]:
    """[start, end) in ms of the calendar day in time zone `tz` (23 or 25 hours long across a DST change)."""
    try:
        zone = ZoneInfo(tz)
    except (ValueError, OSError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise QueryError(f"unknown time zone {tz[:60]!r}") from exc
    midnight = datetime.min.time()
    start = datetime.combine(day, midnight, zone)
    end = datetime.combine(day + timedelta(days=1), midnight, zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def iter_query(store: TimeSeriesStore, vin: str, start_ms: int, end_ms: int, signals: list[str]) -> Iterator[Batch]:
    """Every row of the range, page by page (a day at more than 1 Hz exceeds one query's limit)."""
    while start_ms <= end_ms:
        page = store.query(vin, start_ms, end_ms, signals, MAX_QUERY_LIMIT)
        if page.timestamps:
            yield page
        if len(page.timestamps) < MAX_QUERY_LIMIT:
            return
        start_ms = page.timestamps[-1] + 1


# Integration does not bridge a gap longer than this: no data is not evidence of riding (or charging).
MAX_GAP_MS = 30_000
# Pack current at or above this (into the battery, the catalogue's sign) counts as charging.
CHARGE_MIN_A = 0.5
# Charging samples closer than this belong to one session (telemetry gaps do not split a session).
SESSION_GAP_MS = 600_000
DAILY_SIGNALS = [GNSS_SPEED, PACK_VOLTAGE, PACK_CURRENT, PACK_TEMP_MAX]


def compute_daily(vin: str, day: date, tz: str, start_ms: int, end_ms: int, rows: Sequence[Batch]) -> DailyStats:
    """Daily aggregates from the day's samples (sans-I/O: both backends fetch, this computes).

    - distance: GNSS ground speed integrated over time, trapezoid between consecutive samples that have a speed;
      a pair further apart than MAX_GAP_MS adds nothing. Speed, not haversine over fixes: a parked receiver's
      position jitter would add kilometres a day, its speed reads 0.
    - energy: pack power P = V·I, trapezoid over consecutive samples with both, same gap rule; P < 0 (discharge)
      adds to `energy_used_wh`, P > 0 (charging) to `energy_charged_wh`.
    - charging sessions: maximal runs of samples with I >= CHARGE_MIN_A, consecutive ones at most SESSION_GAP_MS
      apart, a sample below the threshold ending the run; the energy of a session is that of the segments inside
      it. A session across midnight counts on both days, each with its own part.
    - max battery temperature: the highest Temperature.Max of the day.
    """
    ts: list[int] = []
    cols: dict[str, list[Value | None]] = {n: [] for n in DAILY_SIGNALS}
    for page in rows:
        ts.extend(page.timestamps)
        for n in DAILY_SIGNALS:
            cols[n].extend(page.columns[n])
    speed, volt, amp, temp = (cols[n] for n in DAILY_SIGNALS)

    distance = 0.0
    max_speed: float | None = None
    prev: tuple[int, float] | None = None
    for t, v in zip(ts, speed, strict=True):
        if v is None:
            continue
        fv = float(v)
        max_speed = fv if max_speed is None else max(max_speed, fv)
        if prev is not None and t - prev[0] <= MAX_GAP_MS:
            distance += (prev[1] + fv) / 2 * (t - prev[0]) / 3_600_000  # km/h × h
        prev = (t, fv)

    used = charged = 0.0
    sessions: list[ChargingSession] = []
    run_start = run_end = None  # times of the current session's first and last sample
    run_energy = 0.0
    last: tuple[int, float, float] | None = None  # (t, power W, current A) of the previous sample with both
    for t, v, i in zip(ts, volt, amp, strict=True):
        if v is None or i is None:
            continue
        p = float(v) * float(i)
        charging = float(i) >= CHARGE_MIN_A
        seg_charge = 0.0
        if last is not None and t - last[0] <= MAX_GAP_MS:
            dt_h = (t - last[0]) / 3_600_000
            used += (max(0.0, -last[1]) + max(0.0, -p)) / 2 * dt_h
            seg_charge = (max(0.0, last[1]) + max(0.0, p)) / 2 * dt_h
            charged += seg_charge
        if charging:
            if run_start is not None and run_end is not None and t - run_end <= SESSION_GAP_MS:
                if last is not None and last[0] == run_end:
                    run_energy += seg_charge  # the segment from the session's previous sample to this one
                run_end = t
            else:
                if run_start is not None and run_end is not None:
                    sessions.append(ChargingSession(run_start, run_end, run_energy))
                run_start = run_end = t
                run_energy = 0.0
        elif run_start is not None and run_end is not None:
            sessions.append(ChargingSession(run_start, run_end, run_energy))
            run_start = run_end = None
        last = (t, p, float(i))
    if run_start is not None and run_end is not None:
        sessions.append(ChargingSession(run_start, run_end, run_energy))

    temps = [float(x) for x in temp if x is not None]
    return DailyStats(
        vin=vin,
        day=day,
        tz=tz,
        start_ms=start_ms,
        end_ms=end_ms,
        samples=len(ts),
        distance_km=distance,
        max_speed_kmh=max_speed,
        energy_used_wh=used,
        energy_charged_wh=charged,
        charging_sessions=sessions,
        max_battery_temp_c=max(temps) if temps else None,
    )


def daily_from_store(store: TimeSeriesStore, vin: str, day: date, tz: str) -> DailyStats:
    start_ms, end_ms = day_bounds(day, tz)
    pages = list(iter_query(store, vin, start_ms, end_ms - 1, DAILY_SIGNALS))
    return compute_daily(vin, day, tz, start_ms, end_ms, pages)


# -- the SQLite store -------------------------------------------------------------------------------------------


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


def _ts_col(sig: Signal) -> str:
    """The `latest` table's column holding when `sig`'s last known value was sampled."""
    return sig.column + "__ts"


class NewestState:
    """What one write_many call knows of a vehicle's newest state (merged into `latest` by the upsert)."""

    __slots__ = ("position", "ts", "values")

    def __init__(self, ts: int) -> None:
        self.ts = ts
        self.values: dict[str, tuple[int, Value]] = {}
        self.position: tuple[int, float, float] | None = None


def newest_states(items: Sequence[tuple[str, Batch]]) -> dict[str, NewestState]:
    out: dict[str, NewestState] = {}
    lat_name, lon_name = POSITION_SIGNALS
    for vin, batch in items:
        stamps = batch.timestamps
        if not stamps:
            continue
        if all(a <= b for a, b in itertools.pairwise(stamps)):
            order: Sequence[int] = range(len(stamps) - 1, -1, -1)
        else:
            order = sorted(range(len(stamps)), key=stamps.__getitem__, reverse=True)
        acc = out.get(vin)
        if acc is None:
            acc = out[vin] = NewestState(stamps[order[0]])
        else:
            acc.ts = max(acc.ts, stamps[order[0]])
        # Newest first, so each column usually stops at its first element.
        for name, col in batch.columns.items():
            for i in order:
                v = col[i]
                if v is not None:
                    known = acc.values.get(name)
                    if known is None or stamps[i] >= known[0]:
                        acc.values[name] = (stamps[i], v)
                    break
        lats, lons = batch.columns.get(lat_name), batch.columns.get(lon_name)
        if lats is not None and lons is not None:
            for i in order:
                la, lo = lats[i], lons[i]
                if la is not None and lo is not None:
                    if acc.position is None or stamps[i] >= acc.position[0]:
                        acc.position = (stamps[i], float(la), float(lo))
                    break
    return out


class SqliteTimeSeriesStore:
    """The embedded default store.

    Thread-safety: one sqlite3 connection per thread (thread-local). WAL lets the ingest worker write while
    FastAPI's threadpool reads, each on its own connection, without a Python-level lock serialising them;
    SQLite's own locking (plus busy_timeout) orders concurrent writers, also across processes.
    """

    # Rows deleted per purge transaction: short enough that ingest never waits long for the write lock.
    PURGE_CHUNK = 5_000
    # Raw time range rolled up per transaction.
    ROLLUP_STEP_MS = 3_600_000

    def __init__(self, path: str | Path, catalogue: Catalogue, retention: RetentionConfig | None = None) -> None:
        self.path = str(path)
        self.catalogue = catalogue
        self.retention = retention
        self._signals: dict[str, Signal] = {s.name: s for s in catalogue}
        self._numeric = [s for s in catalogue if numeric(s)]
        self._rollup_table = f"telemetry_{retention.rollup_interval_s}s" if retention else None
        self._local = threading.local()
        # Open connections by holder id. A holder lives in its thread's local storage, so when the thread ends
        # (AnyIO and executor workers come and go) its finalizer closes the connection: no fd leak over uptime.
        self._all: dict[int, sqlite3.Connection] = {}
        self._all_lock = threading.Lock()
        self._closed = False
        self._latest_sql: dict[tuple[str, ...], str] = {}
        self._maint_lock = threading.Lock()
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

    def _add_missing_columns(self, conn: sqlite3.Connection, table: str, wanted: list[tuple[str, str]]) -> None:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({_quote(table)})")}
        for col, typ in wanted:
            if col not in have:
                # The catalogue gained a signal since the table was made; signals are never removed from it.
                conn.execute(f"ALTER TABLE {_quote(table)} ADD COLUMN {_quote(col)} {typ}")
                log.info("column added", extra={"table": table, "column": col})

    def _migrate(self, conn: sqlite3.Connection) -> None:
        cols = [(s.column, _SQL_TYPE[s.type]) for s in self.catalogue]
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS telemetry (vin TEXT NOT NULL, ts INTEGER NOT NULL"
            f"{''.join(f', {_quote(c)} {t}' for c, t in cols)}, PRIMARY KEY (vin, ts)) WITHOUT ROWID"
        )
        self._add_missing_columns(conn, "telemetry", cols)
        have_latest = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'latest'").fetchone()
        latest_cols = [(c, t) for s in self.catalogue for c, t in ((s.column, _SQL_TYPE[s.type]), (_ts_col(s), "INT"))]
        conn.execute(
            "CREATE TABLE IF NOT EXISTS latest (vin TEXT PRIMARY KEY, ts INTEGER NOT NULL, pos_ts INTEGER,"
            f" pos_lat REAL, pos_lon REAL{''.join(f', {_quote(c)} {t}' for c, t in latest_cols)})"
        )
        self._add_missing_columns(conn, "latest", latest_cols)
        conn.execute("CREATE TABLE IF NOT EXISTS ts_meta (key TEXT PRIMARY KEY, value INTEGER)")
        if not have_latest:
            self._rebuild_latest(conn)
        if self.retention is not None and self._rollup_table is not None:
            # Rollup and purge select by time across vehicles; ingest appends near the index's right edge.
            conn.execute("CREATE INDEX IF NOT EXISTS telemetry_by_ts ON telemetry (ts)")
            rcols = [(s.column, "REAL") for s in self._numeric]
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_quote(self._rollup_table)} (vin TEXT NOT NULL, ts INTEGER NOT NULL,"
                f" samples INTEGER NOT NULL{''.join(f', {_quote(c)} {t}' for c, t in rcols)},"
                " PRIMARY KEY (vin, ts)) WITHOUT ROWID"
            )
            self._add_missing_columns(conn, self._rollup_table, rcols)
            table = _quote(self._rollup_table)
            conn.execute(f"CREATE INDEX IF NOT EXISTS {_quote(self._rollup_table + '_by_ts')} ON {table} (ts)")

    def _rebuild_latest(self, conn: sqlite3.Connection) -> None:
        """Fills `latest` from the samples of a store made before it existed (once; newest-first index scans)."""
        vins = [r[0] for r in conn.execute("SELECT DISTINCT vin FROM telemetry")]
        if not vins:
            return
        log.info("building the latest-state table", extra={"vehicles": len(vins)})
        lat, lon = (_quote(self._signals[n].column) for n in POSITION_SIGNALS)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for vin in vins:
                (ts,) = conn.execute("SELECT max(ts) FROM telemetry WHERE vin = ?", (vin,)).fetchone()
                pos = conn.execute(
                    f"SELECT ts, {lat}, {lon} FROM telemetry WHERE vin = ? AND {lat} IS NOT NULL AND {lon} IS NOT NULL"
                    " ORDER BY ts DESC LIMIT 1",
                    (vin,),
                ).fetchone()
                conn.execute(
                    "INSERT INTO latest (vin, ts, pos_ts, pos_lat, pos_lon) VALUES (?, ?, ?, ?, ?)",
                    (vin, ts, *(pos or (None, None, None))),
                )
                for sig in self.catalogue:
                    c = _quote(sig.column)
                    row = conn.execute(
                        f"SELECT ts, {c} FROM telemetry WHERE vin = ? AND {c} IS NOT NULL ORDER BY ts DESC LIMIT 1",
                        (vin,),
                    ).fetchone()
                    if row is not None:
                        conn.execute(
                            f"UPDATE latest SET {c} = ?, {_quote(_ts_col(sig))} = ? WHERE vin = ?",
                            (row[1], row[0], vin),
                        )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

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
        latest_groups: dict[tuple[str, ...], list[tuple[object, ...]]] = {}
        for vin, st in newest_states(items).items():
            names = tuple(sorted(st.values))
            row: list[object] = [vin, st.ts, *(st.position or (None, None, None))]
            for n in names:
                t, v = st.values[n]
                row += (v, t)
            latest_groups.setdefault(names, []).append(tuple(row))
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for names, rows in groups.items():
                    conn.executemany(self._upsert_sql(names), rows)
                for names, rows in latest_groups.items():
                    conn.executemany(self._latest_upsert_sql(names), rows)
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

    def _latest_upsert_sql(self, names: tuple[str, ...]) -> str:
        sql = self._latest_sql.get(names)
        if sql is not None:
            return sql
        cols: list[str] = []
        sets = [
            "ts = max(ts, excluded.ts)",
            *(
                f"{c} = CASE WHEN excluded.pos_ts >= coalesce(pos_ts, excluded.pos_ts) THEN excluded.{c} ELSE {c} END"
                for c in ("pos_lat", "pos_lon")
            ),
            # Last: every SET expression reads the row's old values, so pos_ts may change after the others used it.
            "pos_ts = CASE WHEN excluded.pos_ts >= coalesce(pos_ts, excluded.pos_ts) THEN excluded.pos_ts"
            " ELSE pos_ts END",
        ]
        for n in names:
            sig = self._signals[n]
            c, t = _quote(sig.column), _quote(_ts_col(sig))
            cols += (c, t)
            # Only a value sampled at least as late replaces the known one: a backfilled old batch does not.
            newer = f"excluded.{t} >= coalesce({t}, excluded.{t})"
            sets += (f"{c} = CASE WHEN {newer} THEN excluded.{c} ELSE {c} END",)
            sets += (f"{t} = CASE WHEN {newer} THEN excluded.{t} ELSE {t} END",)
        sql = (
            f"INSERT INTO latest (vin, ts, pos_ts, pos_lat, pos_lon{''.join(', ' + c for c in cols)})"
            f" VALUES (?, ?, ?, ?, ?{', ?' * len(cols)}) ON CONFLICT (vin) DO UPDATE SET {', '.join(sets)}"
        )
        self._latest_sql[names] = sql
        return sql

    @staticmethod
    def _from_sql(sig: Signal, raw: object) -> Value | None:
        if raw is None:
            return None
        if sig.type is SignalType.BOOL:
            return bool(raw)
        return raw  # type: ignore[return-value]

    def _read(self, sql: str, params: Sequence[object] | dict[str, object] = ()) -> list[Any]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except (sqlite3.Error, OverflowError) as exc:
            raise StorageError(f"time-series read failed: {exc}") from exc

    def latest(self, vin: str) -> tuple[int, dict[str, Value]] | None:
        """The newest row of `vin` with its non-null values (signals sampled at that instant)."""
        sigs = list(self.catalogue)
        cols = "".join(", " + _quote(s.column) for s in sigs)
        rows = self._read(f"SELECT ts{cols} FROM telemetry WHERE vin = ? ORDER BY ts DESC LIMIT 1", (vin,))
        if not rows:
            return None
        row = rows[0]
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
        rows = self._read(
            f"SELECT ts, {_quote(lat)}, {_quote(lon)} FROM telemetry WHERE vin = ? AND {_quote(lat)} IS NOT"
            f" NULL AND {_quote(lon)} IS NOT NULL ORDER BY ts DESC LIMIT 1",
            (vin,),
        )
        return None if not rows else (int(rows[0][0]), float(rows[0][1]), float(rows[0][2]))

    def query(self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int) -> Batch:
        """Samples of `vin` with start_ms <= ts <= end_ms, oldest first, at most `limit` rows."""
        sigs = list(self.catalogue) if signals is None else resolve_signals(self._signals, signals)
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise QueryError(f"limit must be in 1..{MAX_QUERY_LIMIT}")
        cols = "".join(", " + _quote(s.column) for s in sigs)
        rows = self._read(
            f"SELECT ts{cols} FROM telemetry WHERE vin = ? AND ts >= ? AND ts <= ? ORDER BY ts LIMIT ?",
            (vin, start_ms, end_ms, limit),
        )
        batch = Batch(timestamps=[int(r[0]) for r in rows], columns={s.name: [] for s in sigs})
        for i, sig in enumerate(sigs, start=1):
            if sig.type is SignalType.BOOL:
                batch.columns[sig.name] = [None if r[i] is None else bool(r[i]) for r in rows]
            else:
                batch.columns[sig.name] = [r[i] for r in rows]
        return batch

    # -- operator queries -----------------------------------------------------------------------------------

    def fleet_snapshot(
        self,
        signals: Sequence[str] = (),
        vins: Collection[str] | None = None,
        bbox: BBox | None = None,
        stale_before_ms: int | None = None,
        seen_since_ms: int | None = None,
    ) -> list[FleetEntry]:
        sigs = resolve_signals(self._signals, signals)
        where: list[str] = []
        params: list[object] = []
        if vins is not None:
            if not vins:
                return []
            # One parameter however many VINs (SQLite limits the number of parameters per statement).
            where.append("vin IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(vins)))
        if bbox is not None:
            where.append("pos_lat BETWEEN ? AND ? AND pos_lon BETWEEN ? AND ?")
            params += (bbox.min_lat, bbox.max_lat, bbox.min_lon, bbox.max_lon)
        if stale_before_ms is not None:
            where.append("ts < ?")
            params.append(stale_before_ms)
        if seen_since_ms is not None:
            where.append("ts >= ?")
            params.append(seen_since_ms)
        cols = "".join(", " + _quote(s.column) for s in sigs)
        rows = self._read(
            f"SELECT vin, ts, pos_ts, pos_lat, pos_lon{cols} FROM latest"
            f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY vin",
            params,
        )
        # Per row and signal, this loop is the cost of a 10,000-vehicle snapshot: plain comprehensions, and only
        # booleans converted (SQLite hands back the other types as stored).
        names = [s.name for s in sigs]
        bools = {i for i, s in enumerate(sigs, start=5) if s.type is SignalType.BOOL}
        out: list[FleetEntry] = []
        for r in rows:
            if bools:
                r = tuple(bool(v) if i in bools and v is not None else v for i, v in enumerate(r))
            values = {n: v for n, v in zip(names, r[5:], strict=True) if v is not None}
            pos = None if r[2] is None else (r[2], r[3], r[4])
            out.append(FleetEntry(r[0], r[1], values, pos))
        return out

    def track(self, vin: str, start_ms: int, end_ms: int, bucket_ms: int) -> list[TrackPoint]:
        check_track(start_ms, end_ms, bucket_ms)
        lat, lon, spd = (_quote(self._signals[n].column) for n in (*POSITION_SIGNALS, GNSS_SPEED))
        # Group in SQL, then fetch each bucket's last latitude and last longitude by primary key: at most two
        # point lookups per bucket instead of shipping every row to Python.
        rows = self._read(
            f"WITH g AS (SELECT (ts - :start) / :w AS b, count({lat}) AS n, max({spd}) AS vmax,"
            f" max(CASE WHEN {lat} IS NOT NULL THEN ts END) AS t_lat,"
            f" max(CASE WHEN {lon} IS NOT NULL THEN ts END) AS t_lon"
            " FROM telemetry WHERE vin = :vin AND ts >= :start AND ts <= :end GROUP BY b)"
            f" SELECT g.b, a.{lat}, o.{lon}, g.vmax, g.n FROM g"
            " JOIN telemetry a ON a.vin = :vin AND a.ts = g.t_lat"
            " JOIN telemetry o ON o.vin = :vin AND o.ts = g.t_lon ORDER BY g.b",
            {"vin": vin, "start": start_ms, "end": end_ms, "w": bucket_ms},
        )
        return [
            TrackPoint(
                start_ms + int(b) * bucket_ms,
                float(la),
                float(lo),
                None if vmax is None else float(vmax),
                int(n),
            )
            for b, la, lo, vmax, n in rows
        ]

    def daily(self, vin: str, day: date, tz: str = DEFAULT_TZ) -> DailyStats:
        return daily_from_store(self, vin, day, tz)

    # -- retention ------------------------------------------------------------------------------------------

    def _require_retention(self) -> tuple[RetentionConfig, str]:
        if self.retention is None or self._rollup_table is None:
            raise QueryError("this store keeps no rollups (no retention configured)")
        return self.retention, self._rollup_table

    def rollup(self, start_ms: int, end_ms: int) -> int:
        cfg, table = self._require_retention()
        w = cfg.rollup_interval_ms
        start, end = start_ms - start_ms % w, end_ms - end_ms % w  # whole buckets (Python's % floors)
        cols = [_quote(s.column) for s in self._numeric]
        sql = (
            f"INSERT OR REPLACE INTO {_quote(table)} (vin, ts, samples{''.join(', ' + c for c in cols)})"
            f" SELECT vin, ts - ((ts % {w}) + {w}) % {w} AS b, count(*){''.join(f', avg({c})' for c in cols)}"
            " FROM telemetry WHERE ts >= ? AND ts < ? GROUP BY vin, b"
        )
        conn = self._conn()
        rows = 0
        step = max(w, self.ROLLUP_STEP_MS - self.ROLLUP_STEP_MS % w)
        lo = start
        try:
            while lo < end:
                with self._maintenance_step():
                    # Jump over stretches without data (a first run may start at a years-old sample).
                    (first,) = conn.execute(
                        "SELECT min(ts) FROM telemetry WHERE ts >= ? AND ts < ?", (lo, end)
                    ).fetchone()
                    if first is None:
                        break
                    lo = int(first) - int(first) % w
                    hi = min(lo + step, end)
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        rows += conn.execute(sql, (lo, hi)).rowcount
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                lo = hi
        except (sqlite3.Error, OverflowError) as exc:
            raise StorageError(f"rollup failed: {exc}") from exc
        return rows

    def query_rollup(self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int) -> RollupSeries:
        _, table = self._require_retention()
        sigs = self._numeric if signals is None else resolve_signals(self._signals, signals)
        bad = [s.name for s in sigs if not numeric(s)]
        if bad:
            raise QueryError(f"rollups hold numeric signals only, not {', '.join(bad)}")
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise QueryError(f"limit must be in 1..{MAX_QUERY_LIMIT}")
        cols = "".join(", " + _quote(s.column) for s in sigs)
        rows = self._read(
            f"SELECT ts, samples{cols} FROM {_quote(table)} WHERE vin = ? AND ts >= ? AND ts <= ? ORDER BY ts LIMIT ?",
            (vin, start_ms, end_ms, limit),
        )
        return RollupSeries(
            timestamps=[int(r[0]) for r in rows],
            samples=[int(r[1]) for r in rows],
            columns={s.name: [None if r[i] is None else float(r[i]) for r in rows] for i, s in enumerate(sigs, 2)},
        )

    @contextlib.contextmanager
    def _maintenance_step(self) -> Iterator[None]:
        """One short maintenance transaction. close() waits for the one in progress instead of closing its
        connection under it (the maintenance thread's connection is not the closing thread's), and none starts
        after close()."""
        with self._maint_lock:
            if self._closed:
                raise StorageError("time-series store is closed")
            yield

    def _meta(self, key: str) -> int | None:
        rows = self._read("SELECT value FROM ts_meta WHERE key = ?", (key,))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def _purge(self, table: str, before_ms: int) -> int:
        """Deletes rows older than `before_ms` in short transactions (ingest gets the lock between them)."""
        sql = (
            f"DELETE FROM {_quote(table)} WHERE (vin, ts) IN"
            f" (SELECT vin, ts FROM {_quote(table)} WHERE ts < ? LIMIT {self.PURGE_CHUNK})"
        )
        conn = self._conn()
        total = 0
        try:
            while True:
                with self._maintenance_step():
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        n = conn.execute(sql, (before_ms,)).rowcount
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                total += n
                if n < self.PURGE_CHUNK:
                    return total
        except sqlite3.Error as exc:
            raise StorageError(f"purge of {table} failed: {exc}") from exc

    def maintain(self, now_ms: int | None = None) -> MaintenanceReport:
        """Rolls up every complete bucket since the last run (recomputing the last `lateness_s`), then purges raw
        rows older than `raw_s` and rollups older than `rollup_s`. `now_ms` (default: the clock) lets tests and
        tools move time. Without retention configured: nothing to do."""
        if self.retention is None or self._rollup_table is None:
            return MaintenanceReport()
        cfg = self.retention
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        w = cfg.rollup_interval_ms
        to = now_ms - now_ms % w  # the current bucket is not complete yet
        with self._maintenance_step():
            done = self._meta("rollup_done_ms")
            first = self._read("SELECT min(ts) FROM telemetry")[0][0] if done is None else None
        # The first pass starts at the oldest row; later ones re-open the buckets late samples may still reach.
        frm = (to if first is None else int(first)) if done is None else min(done, to - cfg.lateness_s * 1000)
        # Buckets about to be purged gain nothing from a rollup the purge deletes right after.
        frm = max(frm, now_ms - cfg.rollup_s * 1000)
        rows = self.rollup(frm, to) if frm < to else 0
        try:
            with self._maintenance_step():
                conn = self._conn()
                conn.execute("INSERT OR REPLACE INTO ts_meta (key, value) VALUES ('rollup_done_ms', ?)", (to,))
        except sqlite3.Error as exc:
            raise StorageError(f"maintenance bookkeeping failed: {exc}") from exc
        raw = self._purge("telemetry", now_ms - cfg.raw_s * 1000)
        rolled = self._purge(self._rollup_table, now_ms - cfg.rollup_s * 1000)
        if raw or rolled:
            log.info("purged past retention", extra={"raw_rows": raw, "rollup_rows": rolled})
        return MaintenanceReport(frm, to, rows, raw, rolled)

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise StorageError(f"time-series store unavailable: {exc}") from exc

    def close(self) -> None:
        with self._all_lock:
            self._closed = True
        # Each maintenance step is one short transaction (an hour of rollup, a purge chunk).
        acquired = self._maint_lock.acquire(timeout=BUSY_TIMEOUT_S * 3)
        if not acquired:
            log.error("closing the time-series store while a maintenance step still runs")
        try:
            with self._all_lock:
                conns = list(self._all.values())
                self._all.clear()  # in place: the finalizers hold this very dict
            for conn in conns:
                conn.close()
            self._local = threading.local()
        finally:
            if acquired:
                self._maint_lock.release()
