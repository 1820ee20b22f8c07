"""The InfluxDB time-series store: line protocol to the v1-compatible `/write`, InfluxQL on `/query`.

Schema (docs/STORAGE.md): measurement `telemetry`, tag `vin`, one field per catalogue signal named by the signal's
dotted name, typed by the catalogue (float, integer with the `i` suffix, boolean, string), time in ms; plus a
boolean field `sample` in every point so a sample whose signals were all empty still exists and every row comes
back, as it does from the SQLite store.

Writing. `write_many` encodes every row first (a value the protocol cannot carry fails the whole call with
StorageError before anything is sent, like the SQLite transaction), hands its lines to one sender thread and
waits. The sender coalesces the lines of concurrent callers into requests of at most `max_lines` lines or
`max_bytes` bytes, lingering up to `linger_s` for more while a request is not full (time- and size-based
batching), and posts them gzip'd through a pool of `max_in_flight` workers. A worker retries connection errors,
timeouts, 5xx and every other answer that does not blame the data, with exponential backoff until the oldest
caller's deadline; then the callers get StorageError (401/403 at once): the bridge does not acknowledge and the
broker redelivers; re-written points merge, nothing is lost or doubled. A 400, 413 or 422 means bad data: the
request is bisected until the rejected lines are isolated, those are appended (fsynced) to the quarantine file
with the server's reason and counted, the rest lands. `write_many`
returns only when every one of its lines got a 2xx or sits in quarantine. Lines waiting or in flight are bounded
by `max_pending_lines`; beyond it callers wait (backpressure), for at most their deadline.

Fleet state. Once a call's samples are stored, one more line per vehicle updates the fleet-state series (policy
`zhilian_state`; see `state_slot_ns`) that the snapshot reads; the sender never puts lines for different
policies or precisions into one request. Retention (optional): policies `raw` and `rollup` and a continuous query,
created at start; the server deletes and downsamples by itself.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import msgpack

from cloud_ingest import line_protocol as lp
from cloud_ingest.errors import QueryError, StorageError, UnknownSignalError
from cloud_ingest.retention import MaintenanceReport, RetentionConfig
from cloud_ingest.tsstore import (
    DEFAULT_TZ,
    GNSS_SPEED,
    MAX_QUERY_LIMIT,
    POSITION_SIGNALS,
    BBox,
    DailyStats,
    FleetEntry,
    NewestState,
    RollupSeries,
    TrackPoint,
    check_track,
    daily_from_store,
    newest_states,
    numeric,
    resolve_signals,
)
from protocol import Batch, Catalogue, Signal, SignalType
from protocol.catalogue import Value

log = logging.getLogger("zhilian.influx")

SAMPLE_FIELD = "sample"
VIN_TAG = "vin"
_DROPPED_RE = re.compile(r"dropped=(\d+)")
# Answers that blame the data: the only ones that send lines to quarantine. Any other refusal (404 without the
# database or a DBRP mapping, 405 from a misrouted proxy, 5xx, ...) is the server's or the setup's problem: retried
# until the deadline, then StorageError, so nothing is acknowledged and nothing is lost.
_BAD_DATA_STATUS = frozenset({400, 413, 422})


# The fleet state: one point per vehicle in one series, at a time slot derived from the VIN (see state_slot_ns).
STATE_POLICY = "zhilian_state"
STATE_SLOT_BITS = 49
STATE_SHARD_S = 7 * 86_400  # one shard group holds every slot: 2**49 ns is 6.5 days
STATE_WRITE_DEADLINE_S = 5.0


def state_slot_ns(vin: str) -> int:
    """Where vehicle `vin`'s state point lives: a 49-bit hash of the VIN as nanoseconds after the epoch.

    A single series (no tag) because InfluxDB 1.x pays per series and per shard in every query: `last()` grouped
    by vin costs ≈ 0.25 ms per vehicle (2.5 s for 10,000), one series of 10,000 points ≈ 0.01 ms per vehicle.
    Two VINs share a slot with probability ≈ n²/2^50 (1e-4 for 300,000 vehicles)."""
    return int.from_bytes(hashlib.blake2b(vin.encode(), digest_size=8).digest(), "big") >> (64 - STATE_SLOT_BITS)


class _VinState:
    """What this process knows the fleet state holds for one vehicle: its newest sample time, position time, and
    per-signal times of values it wrote (older ones: at most `floor`)."""

    __slots__ = ("field_ts", "floor", "pos_ts", "ts")

    def __init__(self, ts: int, pos_ts: int | None, floor: int = lp.MIN_TIME_MS - 1) -> None:
        self.ts = ts
        self.pos_ts = pos_ts
        self.floor = floor
        self.field_ts: dict[str, int] = {}


def field_key(sig: Signal) -> str:
    """A signal's field: `s` + its wire id, which the catalogue never reuses, so a renamed signal keeps its history;
    lines are a quarter as long as with dotted names, which saves influxd about a third of its CPU per sample."""
    return f"s{sig.id}"


@dataclass(frozen=True)
class InfluxSettings:
    """Where and how to write. Credentials: `token` (InfluxDB 2.x/3.x, `Authorization: Token`) or
    `username`/`password` (InfluxDB 1.x, HTTP basic auth); none for a server without authentication."""

    url: str
    database: str = "zhilian"
    retention_policy: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    measurement: str = "telemetry"
    create_database: bool = True
    max_lines: int = 5_000
    # Uncompressed: InfluxDB 1.x limits the decoded body (max-body-size, 25 MB by default).
    max_bytes: int = 8 * 1024 * 1024
    linger_s: float = 0.005
    max_in_flight: int = 2
    max_pending_lines: int = 100_000
    write_deadline_s: float = 30.0
    request_timeout_s: float = 10.0
    query_timeout_s: float = 30.0
    gzip_level: int = 1
    # Answers to queries gzip'd: worth it over a slow link; next to the server, compressing a 10,000-vehicle
    # snapshot costs influxd more CPU (≈ 20 ms) than sending it.
    gzip_reads: bool = False
    # Ask for query answers as MessagePack (InfluxDB 1.4+; cheaper for influxd to encode and for us to decode than
    # JSON); a server that answers JSON instead (2.x/3.x v1 compatibility) is read as JSON, as is any other answer.
    msgpack_reads: bool = True
    # Vehicles whose fleet-state times are kept in memory (the out-of-order guard), least recently written out.
    state_cache_vehicles: int = 100_000

    def __post_init__(self) -> None:
        if (
            min(self.max_lines, self.max_bytes, self.max_in_flight, self.max_pending_lines, self.state_cache_vehicles)
            < 1
        ):
            raise ValueError(
                "max_lines, max_bytes, max_in_flight, max_pending_lines and state_cache_vehicles must be positive"
            )
        if self.write_deadline_s <= 0 or self.request_timeout_s <= 0 or self.query_timeout_s <= 0:
            raise ValueError("deadlines and timeouts must be positive")
        lp.measurement(self.measurement)

    def headers(self) -> dict[str, str]:
        if self.token is not None:
            return {"Authorization": f"Token {self.token}"}
        if self.username is not None:
            raw = f"{self.username}:{self.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}


class _Call:
    """One submission: how many of its slices are outstanding, how they ended, which lines were quarantined."""

    __slots__ = ("deadline", "done", "error", "lock", "outstanding", "quarantined")

    def __init__(self, slices: int, deadline: float) -> None:
        self.deadline = deadline
        self.outstanding = slices
        self.error: StorageError | None = None
        self.quarantined: set[int] = set()  # indices into the submitted lines
        self.lock = threading.Lock()
        self.done = threading.Event()

    def finish(self, quarantined: set[int], error: StorageError | None) -> None:
        with self.lock:
            self.quarantined |= quarantined
            if error is not None and self.error is None:
                self.error = error
            self.outstanding -= 1
            if self.outstanding == 0:
                self.done.set()

    def fail(self, error: StorageError) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
        self.done.set()


@dataclass(eq=False, slots=True)
class _Slice:
    call: _Call
    lines: list[bytes]
    nbytes: int
    offset: int  # index of its first line among the call's lines
    params: dict[str, str]  # where /write puts them (database, retention policy, precision)
    enqueued: float = dataclasses.field(default_factory=time.monotonic)


class _CredentialsRefused(StorageError):
    """401/403 on write: a configuration problem, not worth retrying within this call."""


class InfluxTimeSeriesStore:
    """`retention`: the store creates (idempotently, at start and whenever it re-creates the database) a raw
    retention policy that becomes the database's default and receives every write, a rollup policy, and the
    continuous query that fills the rollup measurement; the server then downsamples and deletes on its own."""

    def __init__(
        self,
        settings: InfluxSettings,
        catalogue: Catalogue,
        quarantine_path: str | Path,
        retention: RetentionConfig | None = None,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.retention = retention
        self.quarantine_path = Path(quarantine_path)
        self._signals: dict[str, Signal] = {s.name: s for s in catalogue}
        self._numeric = [s for s in catalogue if numeric(s)]
        db = lp.influxql_identifier(settings.database)
        self._raw_rp = settings.retention_policy or (retention.raw_policy if retention else None)
        meas = lp.influxql_identifier(settings.measurement)
        # Fully qualified: the database's default policy may be another one (set by an operator, or older data).
        self._from = f"{db}.{lp.influxql_identifier(self._raw_rp)}.{meas}" if self._raw_rp else meas
        self._rollup_from: str | None = None
        state_meas = f"{settings.measurement}_state"
        self._state_head = lp.measurement(state_meas)
        self._state_from = f"{db}.{lp.influxql_identifier(STATE_POLICY)}.{lp.influxql_identifier(state_meas)}"
        self._state: OrderedDict[str, _VinState] = OrderedDict()
        self._state_loaded = False
        self._state_lock = threading.Lock()
        if retention is not None:
            rollup_meas = f"{settings.measurement}_{retention.rollup_interval_s}s"
            lp.measurement(rollup_meas)
            rp = lp.influxql_identifier(retention.rollup_policy)
            self._rollup_from = f"{db}.{rp}.{lp.influxql_identifier(rollup_meas)}"
        self._field_prefixes = {s.name: f",{lp.key('field key', field_key(s))}=" for s in catalogue}
        self._head = (
            f"{lp.measurement(settings.measurement)},{lp.key('tag key', VIN_TAG)}=",
            f" {lp.key('field key', SAMPLE_FIELD)}=t",
        )
        self._headers = settings.headers()
        base = settings.url.rstrip("/")
        self._write_url = f"{base}/write"
        self._query_url = f"{base}/query"
        self._ping_url = f"{base}/ping"
        self._write_params = {"db": settings.database, "precision": "ms"}
        if self._raw_rp:
            self._write_params["rp"] = self._raw_rp
        # The fleet state goes to its own policy (kept forever) with nanosecond slots; the sender never mixes
        # lines of different targets in one request.
        self._state_params = {"db": settings.database, "precision": "ns", "rp": STATE_POLICY}
        self._writer = httpx.Client(
            timeout=settings.request_timeout_s,
            limits=httpx.Limits(
                max_connections=settings.max_in_flight, max_keepalive_connections=settings.max_in_flight
            ),
        )
        # Reads have their own pool: a write stuck in retries must not starve the API's queries of connections.
        self._reader = httpx.Client(
            timeout=settings.query_timeout_s,
            headers=None if settings.gzip_reads else {"Accept-Encoding": "identity"},
        )
        self._cv = threading.Condition()
        self._queue: deque[_Slice] = deque()
        self._pending_lines = 0  # queued or in flight
        self._queued_lines = 0
        self._blocked = 0  # callers waiting for room (backpressure)
        self._closed = False
        self._db_ready = False
        self._db_lock = threading.Lock()
        self._quarantine_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats = {
            "lines_written": 0,
            "requests": 0,
            "state_requests": 0,
            "state_errors": 0,
            "retries": 0,
            "quarantined_lines": 0,
        }
        self._in_flight = threading.BoundedSemaphore(settings.max_in_flight)
        self._pool = ThreadPoolExecutor(settings.max_in_flight, thread_name_prefix="influx-write")
        self._sender = threading.Thread(target=self._send_loop, name="influx-sender", daemon=True)
        self._sender.start()
        try:
            self._ensure_database()
        except StorageError as exc:
            # The service starts without its time-series server (it reports degraded); writes retry until it is up.
            log.warning("influx not ready at start; will retry on first write", extra={"error": str(exc)})

    # -- writing ----------------------------------------------------------------------------------------------

    def write_many(self, items: Sequence[tuple[str, Batch]]) -> int:
        """The samples first (StorageError unless stored); once they are, the fleet state of their vehicles, so the
        snapshot never shows what is not stored.

        The state is derived data: when its write fails (the samples being stored), the call still succeeds — the
        samples must be acknowledged — the failure is logged and counted (`stats()["state_errors"]`), and the
        vehicles are forgotten by the out-of-order guard, so their next samples rewrite every field they carry."""
        lines = self._encode(items)
        if not lines:
            return 0
        deadline = time.monotonic() + self.settings.write_deadline_s
        quarantined = self._submit(lines, deadline)
        kept = self._without(items, quarantined) if quarantined else items
        newest = newest_states(kept)
        with self._state_lock:
            # Guard and enqueue together: two calls for one vehicle enqueue their state in the order they checked.
            try:
                state = self._state_lines(newest)
            except StorageError as exc:  # the state could not be loaded: nothing was enqueued
                self._state_failed(newest, exc)
                return len(lines) - len(quarantined)
            # Bounded more tightly than the samples: they are stored, and a failing state write must not hold up
            # the caller (the bridge acknowledges when this returns).
            state_deadline = min(deadline, time.monotonic() + STATE_WRITE_DEADLINE_S)
            call = self._enqueue(state, state_deadline, self._state_params) if state else None
        if call is not None:
            try:
                bad = self._wait(call)
            except StorageError as exc:
                self._state_failed(newest, exc)
            else:
                if bad:
                    self._state_failed(newest, StorageError(f"influx refused {len(bad)} fleet-state lines"))
        return len(lines) - len(quarantined)

    def _state_failed(self, newest: dict[str, NewestState], exc: StorageError) -> None:
        with self._state_lock:
            for vin in newest:
                self._state.pop(vin, None)
        with self._stats_lock:
            self._stats["state_errors"] += 1
        log.error(
            "influx fleet-state write failed; the samples are stored, the snapshot lags for these vehicles",
            extra={"error": str(exc), "vehicles": len(newest)},
        )

    def _submit(self, lines: list[bytes], deadline: float) -> set[int]:
        """Writes `lines` through the sender; the indices of those quarantined. Raises StorageError."""
        return self._wait(self._enqueue(lines, deadline, self._write_params))

    def _wait(self, call: _Call) -> set[int]:
        s = self.settings
        # A request that started just before the deadline may run one request timeout beyond it.
        if not call.done.wait(max(0.0, call.deadline - time.monotonic()) + s.request_timeout_s + 1.0):
            call.fail(StorageError(f"influx write did not finish within {s.write_deadline_s}s"))
        if call.error is not None:
            raise call.error
        return call.quarantined

    def _enqueue(self, lines: list[bytes], deadline: float, params: dict[str, str] | None = None) -> _Call:
        params = params if params is not None else self._write_params
        s = self.settings
        chunks = self._split(lines)
        call = _Call(len(chunks), deadline)
        with self._cv:
            while (
                not self._closed and self._pending_lines > 0 and self._pending_lines + len(lines) > s.max_pending_lines
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageError(f"influx write backlog full ({self._pending_lines} lines pending)")
                self._blocked += 1
                try:
                    self._cv.wait(left)
                finally:
                    self._blocked -= 1
            if self._closed:
                raise StorageError("time-series store is closed")
            self._pending_lines += len(lines)
            self._queued_lines += len(lines)
            offset = 0
            for chunk, size in chunks:
                self._queue.append(_Slice(call, chunk, size, offset, params))
                offset += len(chunk)
            self._cv.notify_all()
        return call

    @staticmethod
    def _without(items: Sequence[tuple[str, Batch]], lines: set[int]) -> list[tuple[str, Batch]]:
        """`items` minus the rows whose lines (one per row, in order) were quarantined."""
        out: list[tuple[str, Batch]] = []
        base = 0
        for vin, batch in items:
            n = len(batch.timestamps)
            keep = [i for i in range(n) if base + i not in lines]
            base += n
            if len(keep) == n:
                out.append((vin, batch))
            elif keep:
                cols = {name: [col[i] for i in keep] for name, col in batch.columns.items()}
                out.append((vin, Batch([batch.timestamps[i] for i in keep], cols)))
        return out

    def _state_lines(self, newest: dict[str, NewestState]) -> list[bytes]:
        """One state line per vehicle carrying what is newer than the state already written (from this process;
        loaded from the server once). Out-of-order data — a spool backfilled after newer samples — changes only
        the fields it is newest for."""
        self._load_state()
        out: list[bytes] = []
        for vin, new in newest.items():
            known = self._state.get(vin)
            if known is None:
                known = self._state[vin] = _VinState(lp.MIN_TIME_MS - 1, None)
            else:
                self._state.move_to_end(vin)
            fields = ["vin=" + lp.str_value(vin)]
            if new.ts > known.ts:
                fields.append(f"ts={new.ts}i")
                known.ts = new.ts
            for name, (t, v) in new.values.items():
                if t >= known.field_ts.get(name, known.floor):
                    fields.append(self._field_prefixes[name][1:] + lp.FORMATTERS[self._signals[name].type](v))
                    known.field_ts[name] = t
            if new.position is not None and (known.pos_ts is None or new.position[0] >= known.pos_ts):
                t, la, lo = new.position
                fields.append(f"pos_ts={t}i,pos_lat={lp.float_value(la)},pos_lon={lp.float_value(lo)}")
                known.pos_ts = t
            if len(fields) > 1:
                out.append(f"{self._state_head} {','.join(fields)} {state_slot_ns(vin)}".encode())
        while len(self._state) > self.settings.state_cache_vehicles:
            self._state.popitem(last=False)
        return out

    def _load_state(self) -> None:
        """What the server's fleet state holds (newest time and position time per vehicle), once per store: the
        guard against out-of-order data then holds across restarts too."""
        if self._state_loaded:
            return
        _, rows = self._select(f'SELECT "vin", "ts", "pos_ts" FROM {self._state_from}')
        for _, vin, ts, pos_ts in rows[-self.settings.state_cache_vehicles :]:
            if isinstance(vin, str) and ts is not None:
                # Which fields are how old is not kept in the server: none older than the newest sample is taken.
                self._state[vin] = _VinState(int(ts), None if pos_ts is None else int(pos_ts), floor=int(ts))
        self._state_loaded = True

    def _encode(self, items: Sequence[tuple[str, Batch]]) -> list[bytes]:
        """One line per row, formatted column by column (type dispatch and key once per column, not per value)."""
        out: list[bytes] = []
        head, marker = self._head
        for vin, batch in items:
            unknown = [name for name in batch.columns if name not in self._signals]
            if unknown:
                raise UnknownSignalError(unknown)
            n = len(batch.timestamps)
            try:
                prefix = head + lp.key("tag value", vin) + marker
                cols: list[list[str | None]] = []
                for name, values in batch.columns.items():
                    if len(values) != n:
                        raise lp.LineProtocolError(f"column {name} has {len(values)} values for {n} timestamps")
                    cols.append(lp.column(self._signals[name].type, self._field_prefixes[name], values))
                stamps = lp.timestamps_ms(batch.timestamps)
            except lp.LineProtocolError as exc:
                raise StorageError(f"cannot write {vin[:40]!r} to influx: {exc}") from exc
            rows = zip(*cols, strict=True) if cols else iter([()] * n)
            out.extend(
                (prefix + "".join(filter(None, row)) + " " + ts).encode() for row, ts in zip(rows, stamps, strict=True)
            )
        return out

    def _split(self, lines: list[bytes]) -> list[tuple[list[bytes], int]]:
        """Chunks of at most max_lines lines and max_bytes bytes (a longer single line goes alone)."""
        s = self.settings
        chunks: list[tuple[list[bytes], int]] = []
        cur: list[bytes] = []
        size = 0
        for ln in lines:
            if cur and (len(cur) >= s.max_lines or size + len(ln) + 1 > s.max_bytes):
                chunks.append((cur, size))
                cur, size = [], 0
            cur.append(ln)
            size += len(ln) + 1
        chunks.append((cur, size))
        return chunks

    def _send_loop(self) -> None:
        s = self.settings
        while True:
            try:
                with self._cv:
                    while not self._queue and not self._closed:
                        self._cv.wait(0.5)
                    if self._closed:
                        self._fail_queued(StorageError("time-series store is closed"))
                        return
                    # Linger for more lines while the request is not full: coalesces concurrent callers.
                    # Fleet-state lines follow a write that already waited: they go at once.
                    head = self._queue[0]
                    until = head.enqueued + (0.0 if head.params is self._state_params else s.linger_s)
                    while not self._closed and self._queued_lines < s.max_lines:
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                # Bounded in flight: while all workers are busy, lines pile up here and go out together next.
                acquired = False
                while not acquired and not self._closed:
                    acquired = self._in_flight.acquire(timeout=0.5)
                if not acquired:
                    continue
                taken = self._take()
                if taken:
                    self._pool.submit(self._send, taken)
                else:
                    self._in_flight.release()
            except Exception:  # a bug here must not silently stop every future write
                log.exception("influx sender loop error")
                time.sleep(0.1)

    def _take(self) -> list[_Slice]:
        s = self.settings
        taken: list[_Slice] = []
        lines = size = 0
        with self._cv:
            while self._queue:
                sl = self._queue[0]
                if taken and (
                    lines + len(sl.lines) > s.max_lines
                    or size + sl.nbytes > s.max_bytes
                    or sl.params is not taken[0].params  # another target: the next request
                ):
                    break
                self._queue.popleft()
                self._queued_lines -= len(sl.lines)
                if sl.call.done.is_set():  # its caller gave up already
                    self._release(len(sl.lines))
                    continue
                taken.append(sl)
                lines += len(sl.lines)
                size += sl.nbytes
        return taken

    def _release(self, n: int) -> None:
        with self._cv:
            self._pending_lines -= n
            self._cv.notify_all()

    def _fail_queued(self, error: StorageError) -> None:
        while self._queue:
            sl = self._queue.popleft()
            self._pending_lines -= len(sl.lines)
            self._queued_lines -= len(sl.lines)
            sl.call.finish(set(), error)
        self._cv.notify_all()

    def _send(self, slices: list[_Slice]) -> None:
        lines = [ln for sl in slices for ln in sl.lines]
        try:
            deadline = min(sl.call.deadline for sl in slices)
            bad = self._post(lines, deadline, slices[0].params)
        except StorageError as exc:
            for sl in slices:
                sl.call.finish(set(), exc)
        except Exception as exc:
            log.exception("influx write failed unexpectedly")
            for sl in slices:
                sl.call.finish(set(), StorageError(f"influx write failed: {exc!r}"))
        else:
            start = 0
            for sl in slices:
                end = start + len(sl.lines)
                sl.call.finish({i - start + sl.offset for i in bad if start <= i < end}, None)
                start = end
            with self._stats_lock:
                self._stats["lines_written"] += len(lines) - len(bad)
        finally:
            self._in_flight.release()
            self._release(len(lines))

    def _post(self, lines: list[bytes], deadline: float, params: dict[str, str], offset: int = 0) -> set[int]:
        """Write `lines`; returns the indices (plus `offset`) of those quarantined as bad data."""
        status, text = self._post_with_retry(lines, deadline, params)
        if 200 <= status < 300:
            return set()
        # A 4xx: some or all lines are bad data. Partial writes stored the good ones already; re-sending them
        # while isolating the bad ones only merges identical values.
        dropped = _DROPPED_RE.search(text)
        if len(lines) == 1 or (status == 400 and dropped is not None and int(dropped.group(1)) == len(lines)):
            self._quarantine(lines, status, text, params)
            return set(range(offset, offset + len(lines)))
        half = len(lines) // 2
        return self._post(lines[:half], deadline, params, offset) | self._post(
            lines[half:], deadline, params, offset + half
        )

    def _post_with_retry(self, lines: list[bytes], deadline: float, params: dict[str, str]) -> tuple[int, str]:
        """POST until an answer that is final (2xx, or bad data), or StorageError at the deadline."""
        body = gzip.compress(b"\n".join(lines), compresslevel=self.settings.gzip_level)
        headers = {**self._headers, "Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            problem = self._attempt(body, headers, params)
            if isinstance(problem, tuple):
                if attempt > 1:
                    log.info("influx write succeeded after retries", extra={"attempts": attempt})
                return problem
            if self._closed or time.monotonic() + backoff > deadline:
                raise StorageError(f"influx write failed after {attempt} attempts: {problem}")
            log.warning(
                "influx write failed; retrying",
                extra={"attempt": attempt, "error": problem, "backoff_s": backoff, "lines": len(lines)},
            )
            with self._stats_lock:
                self._stats["retries"] += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _attempt(self, body: bytes, headers: dict[str, str], params: dict[str, str]) -> tuple[int, str] | str:
        """One POST: (status, text) for a final answer, or a description of a retryable failure."""
        try:
            if not self._db_ready:
                self._ensure_database()
            with self._stats_lock:
                self._stats["requests"] += 1
                if params is self._state_params:
                    self._stats["state_requests"] += 1
            r = self._writer.post(self._write_url, params=params, content=body, headers=headers)
        except httpx.TransportError as exc:  # connection refused or reset, timeouts
            return repr(exc)
        except StorageError as exc:  # the database could not be created yet
            return str(exc)
        status, text = r.status_code, r.text[:2000]
        if status in (401, 403):
            raise _CredentialsRefused(f"influx refused the credentials ({status}): {text[:200]}")
        if 200 <= status < 300 or status in _BAD_DATA_STATUS:
            return status, text
        if status == 404 or "retention policy not found" in text:
            self._db_ready = False  # dropped under us, or never created: create it (and its policies) and retry
        return f"HTTP {status}: {text[:200]}"

    def _quarantine(self, lines: list[bytes], status: int, reason: str, params: dict[str, str]) -> None:
        reason = reason.strip()[:2000]
        record = {
            "at_ms": int(time.time() * 1000),
            "database": self.settings.database,
            "write_params": params,  # what to post the lines to /write with (policy, precision) after a fix
            "status": status,
            "reason": reason,
            "lines": [ln.decode("utf-8", errors="replace") for ln in lines],
        }
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            with self._quarantine_lock:
                self.quarantine_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.quarantine_path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:
            # Not in the server and not on disk: the caller must not acknowledge.
            raise StorageError(f"cannot write the influx quarantine file {self.quarantine_path}: {exc}") from exc
        with self._stats_lock:
            self._stats["quarantined_lines"] += len(lines)
        log.error(
            "influx rejected data; quarantined",
            extra={
                "status": status,
                "reason": reason[:300],
                "lines": len(lines),
                "file": str(self.quarantine_path),
            },
        )

    def _admin(self, q: str) -> str | None:
        """One administrative statement; the server's error text (None when it succeeded)."""
        try:
            r = self._reader.post(
                self._query_url, data={"q": q}, headers=self._headers, timeout=self.settings.request_timeout_s
            )
        except httpx.TransportError as exc:
            raise StorageError(f"influx unreachable at {self.settings.url}: {exc!r}") from exc
        if r.status_code in (401, 403):
            return f"HTTP {r.status_code}"
        if r.status_code != 200:
            raise StorageError(f"influx statement failed: HTTP {r.status_code} {r.text[:200]}")
        errors = [str(res["error"]) for res in r.json().get("results", []) if "error" in res]
        return errors[0] if errors else None

    def _ensure_database(self) -> None:
        with self._db_lock:
            if self._db_ready:
                return
            if not self.settings.create_database:
                self._db_ready = True
                return
            error = self._admin(f"CREATE DATABASE {lp.influxql_identifier(self.settings.database)}")
            if error is not None and error.startswith("HTTP 40"):
                # A write-only account may not create databases; the operator made it, or writes will say so.
                log.warning("cannot create the influx database; assuming it exists", extra={"error": error})
            elif error is not None:
                raise StorageError(f"cannot create influx database: {error[:200]}")
            if error is None or not error.startswith("HTTP 40"):
                self._policy(STATE_POLICY, None, STATE_SHARD_S, default=False)
            if self.retention is not None:
                self._ensure_retention(self.retention)
            self._db_ready = True

    def _policy(self, name: str, duration_s: int | None, shard_s: int, default: bool) -> None:
        """Creates retention policy `name` or alters it to these settings (idempotent). None: kept forever."""
        db = lp.influxql_identifier(self.settings.database)
        duration = "INF" if duration_s is None else f"{duration_s}s"
        spec = f"DURATION {duration} REPLICATION 1 SHARD DURATION {shard_s}s{' DEFAULT' if default else ''}"
        error = self._admin(f"CREATE RETENTION POLICY {lp.influxql_identifier(name)} ON {db} {spec}")
        if error is not None and "already exists" in error:
            alter = spec.replace(" REPLICATION 1", "")
            error = self._admin(f"ALTER RETENTION POLICY {lp.influxql_identifier(name)} ON {db} {alter}")
        if error is not None:
            raise StorageError(f"cannot set up influx retention policy {name!r}: {error[:200]}")

    def _ensure_retention(self, cfg: RetentionConfig) -> None:
        """Retention policies and the rollup continuous query, made to match `cfg` (idempotent: a policy that
        exists is altered to the configured duration, a continuous query that differs is replaced)."""
        db = lp.influxql_identifier(self.settings.database)

        def shard(duration_s: int, long_s: int) -> int:
            # Shard groups are what the server deletes: a day's makes raw retention precise to a day.
            return long_s if duration_s >= 2 * long_s else (86_400 if duration_s >= 2 * 86_400 else 3_600)

        raw = self._raw_rp or cfg.raw_policy
        self._policy(raw, cfg.raw_s, shard(cfg.raw_s, 86_400), default=True)
        self._policy(cfg.rollup_policy, cfg.rollup_s, shard(cfg.rollup_s, 7 * 86_400), default=False)
        name = lp.influxql_identifier(f"zhilian_{self.settings.measurement}_{cfg.rollup_interval_s}s")
        cq = (
            f"CREATE CONTINUOUS QUERY {name} ON {db} RESAMPLE EVERY {cfg.every_s}s FOR {cfg.lateness_s}s"
            f" BEGIN {self._rollup_select(cfg)} GROUP BY time({cfg.rollup_interval_s}s), * END"
        )
        error = self._admin(cq)
        if error is not None and "already exists" in error:
            # Same name, other definition (the catalogue grew, the interval changed): replace it.
            error = self._admin(f"DROP CONTINUOUS QUERY {name} ON {db}") or self._admin(cq)
        if error is not None:
            raise StorageError(f"cannot create the influx rollup continuous query: {error[:200]}")
        log.info(
            "influx retention in place",
            extra={"raw_policy": raw, "raw_s": cfg.raw_s, "rollup_policy": cfg.rollup_policy, "rollup_s": cfg.rollup_s},
        )

    def _rollup_select(self, cfg: RetentionConfig) -> str:
        means = "".join(f", mean({f}) AS {f}" for f in (lp.influxql_identifier(field_key(s)) for s in self._numeric))
        return (
            f'SELECT count({lp.influxql_identifier(SAMPLE_FIELD)}) AS "samples"{means} INTO {self._rollup_from}'
            f" FROM {self._from}"
        )

    # -- reading ----------------------------------------------------------------------------------------------

    def _query(self, q: str) -> list[list[dict[str, Any]]]:
        """Series of each statement in `q` (several `;`-separated statements cost one round trip), chunked so a
        server's max-row-limit cannot cut them short; a series split over chunks is merged back."""
        if self._closed:
            raise StorageError("time-series store is closed")
        params = {"db": self.settings.database, "epoch": "ms", "chunked": "true", "chunk_size": "10000"}
        headers = {**self._headers, "Accept": _MSGPACK} if self.settings.msgpack_reads else self._headers
        try:
            r = self._reader.post(self._query_url, params=params, data={"q": q}, headers=headers)
        except httpx.TransportError as exc:
            raise StorageError(f"influx read failed: {exc!r}") from exc
        if r.status_code != 200:
            raise StorageError(f"influx read failed: HTTP {r.status_code} {r.text[:200]}")
        out: dict[int, dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]]] = {}
        for doc in _answer_documents(r):
            if not isinstance(doc, dict):
                raise StorageError(f"influx read failed: unexpected answer {type(doc).__name__}")
            if "error" in doc:
                raise StorageError(f"influx read failed: {doc['error']}")
            for res in doc.get("results", []):
                stmt = out.setdefault(int(res.get("statement_id", 0)), {})
                if "error" in res:
                    error = str(res["error"])
                    if error.startswith(("database not found", "retention policy not found")):
                        continue  # nothing was ever written there
                    raise StorageError(f"influx read failed: {error}")
                for series in res.get("series", []):
                    key = (series.get("name", ""), tuple(sorted((series.get("tags") or {}).items())))
                    have = stmt.get(key)
                    if have is None:
                        stmt[key] = {**series, "values": list(series.get("values") or [])}
                    else:
                        have["values"].extend(series.get("values") or [])
        return [list(out.get(i, {}).values()) for i in range(max(out, default=-1) + 1)]

    def _select(self, q: str) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of one SELECT, all series together."""
        columns: list[str] = []
        rows: list[list[Any]] = []
        for series in (self._query(q) or [[]])[0]:
            columns = series["columns"]
            rows.extend(series["values"])
        return columns, rows

    def _where(self, vin: str, start_ms: int = lp.MIN_TIME_MS, end_ms: int = lp.MAX_TIME_MS, src: str = "") -> str:
        return (
            f" FROM {src or self._from}"
            f" WHERE {lp.influxql_identifier(VIN_TAG)}::tag = {lp.influxql_string(vin)}"
            f" AND time >= {start_ms * 1_000_000} AND time <= {end_ms * 1_000_000}"
        )

    @staticmethod
    def _fields(sigs: Sequence[Signal]) -> str:
        return "".join(f", {lp.influxql_identifier(field_key(s))}::field" for s in sigs)

    @staticmethod
    def _from_influx(sig: Signal, raw: object) -> Value | None:
        if raw is None:
            return None
        # JSON has one number type: a float field holding 50.0 comes back as 50.
        if sig.type is SignalType.FLOAT:
            return float(raw)  # type: ignore[arg-type]
        if sig.type is SignalType.INT:
            return int(raw)  # type: ignore[call-overload,no-any-return]
        if sig.type is SignalType.BOOL:
            return bool(raw)
        return str(raw)

    def _check_vin(self, vin: str) -> bool:
        """False for a VIN no point could have been written under (so no row exists)."""
        try:
            lp.key("tag value", vin)
        except lp.LineProtocolError:
            return False
        return True

    def latest(self, vin: str) -> tuple[int, dict[str, Value]] | None:
        """The newest sample of `vin` with its non-null values."""
        if not self._check_vin(vin):
            return None
        sigs = list(self.catalogue)
        q = f"SELECT {lp.influxql_identifier(SAMPLE_FIELD)}::field{self._fields(sigs)}{self._where(vin)}"
        _, rows = self._select(q + " ORDER BY time DESC LIMIT 1")
        if not rows:
            return None
        row = rows[0]
        values: dict[str, Value] = {}
        for sig, raw in zip(sigs, row[2:], strict=True):
            value = self._from_influx(sig, raw)
            if value is not None:
                values[sig.name] = value
        return int(row[0]), values

    def latest_position(self, vin: str) -> tuple[int, float, float] | None:
        """(ts, lat, lon) of the newest sample of `vin` that has a position (see the SQLite store for why)."""
        if not self._check_vin(vin):
            return None
        lat, lon = (lp.influxql_identifier(field_key(self._signals[n])) for n in POSITION_SIGNALS)
        # `f = f` holds exactly where f is present: InfluxQL has no IS NOT NULL, and NaN cannot be stored.
        q = (
            f"SELECT {lat}::field, {lon}::field{self._where(vin)} AND {lat}::field = {lat}::field"
            f" AND {lon}::field = {lon}::field ORDER BY time DESC LIMIT 1"
        )
        _, rows = self._select(q)
        if not rows:
            return None
        ts, la, lo = rows[0]
        return int(ts), float(la), float(lo)

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
        batch = Batch(timestamps=[], columns={s.name: [] for s in sigs})
        start_ms, end_ms = max(start_ms, lp.MIN_TIME_MS), min(end_ms, lp.MAX_TIME_MS)
        if start_ms > end_ms or not self._check_vin(vin):
            return batch
        fields = f"{lp.influxql_identifier(SAMPLE_FIELD)}::field{self._fields(sigs)}"
        _, rows = self._select(f"SELECT {fields}{self._where(vin, start_ms, end_ms)} ORDER BY time ASC LIMIT {limit}")
        for row in rows:
            batch.timestamps.append(int(row[0]))
            for sig, raw in zip(sigs, row[2:], strict=True):
                batch.columns[sig.name].append(self._from_influx(sig, raw))
        return batch

    # -- operator queries -------------------------------------------------------------------------------------

    def fleet_snapshot(
        self,
        signals: Sequence[str] = (),
        vins: Collection[str] | None = None,
        bbox: BBox | None = None,
        stale_before_ms: int | None = None,
        seen_since_ms: int | None = None,
    ) -> list[FleetEntry]:
        """One read of the fleet-state series (one point per vehicle), the filters applied by the server."""
        sigs = resolve_signals(self._signals, signals)
        conds: list[str] = []
        if bbox is not None:
            conds.append(
                f'"pos_lat" >= {lp.float_value(bbox.min_lat)} AND "pos_lat" <= {lp.float_value(bbox.max_lat)}'
                f' AND "pos_lon" >= {lp.float_value(bbox.min_lon)} AND "pos_lon" <= {lp.float_value(bbox.max_lon)}'
            )
        if stale_before_ms is not None:
            conds.append(f'"ts" < {stale_before_ms}')
        if seen_since_ms is not None:
            conds.append(f'"ts" >= {seen_since_ms}')
        wanted = None if vins is None else set(vins)
        if wanted is not None and not wanted:
            return []
        fields = "".join(f", {lp.influxql_identifier(field_key(s))}" for s in sigs)
        where = f" WHERE {' AND '.join(conds)}" if conds else ""
        _, rows = self._select(
            f'SELECT "vin", "ts", "pos_ts", "pos_lat", "pos_lon"{fields} FROM {self._state_from}{where}'
        )
        # JSON has one number type: whole floats arrive as ints (MessagePack keeps them floats). Only those columns
        # need converting; the rest arrives typed.
        floats = [i for i, s in enumerate(sigs, start=6) if s.type is SignalType.FLOAT]
        columns = [(i, s.name) for i, s in enumerate(sigs, start=6)]
        rows.sort(key=_vin_of_row)
        out: list[FleetEntry] = []
        append = out.append
        for row in rows:
            vin, ts, pos_ts, lat, lon = row[1:6]
            if ts is None or type(vin) is not str or (wanted is not None and vin not in wanted):
                continue
            for i in floats:
                if type(row[i]) is int:
                    row[i] = float(row[i])
            append(
                FleetEntry(
                    vin,
                    ts,
                    {n: row[i] for i, n in columns if row[i] is not None},
                    None if pos_ts is None else (pos_ts, float(lat), float(lon)),
                )
            )
        return out

    def track(self, vin: str, start_ms: int, end_ms: int, bucket_ms: int) -> list[TrackPoint]:
        """`GROUP BY time(bucket, offset)` with the offset aligning the buckets on start_ms."""
        check_track(start_ms, end_ms, bucket_ms)
        lo_ms, hi_ms = max(start_ms, lp.MIN_TIME_MS), min(end_ms, lp.MAX_TIME_MS)
        if lo_ms > hi_ms or not self._check_vin(vin):
            return []
        lat, lon, spd = (lp.influxql_identifier(field_key(self._signals[n])) for n in (*POSITION_SIGNALS, GNSS_SPEED))
        q = (
            f"SELECT last({lat}), last({lon}), max({spd}), count({lat}){self._where(vin, lo_ms, hi_ms)}"
            f" GROUP BY time({bucket_ms}ms, {start_ms % bucket_ms}ms) fill(none)"
        )
        _, rows = self._select(q)
        return [
            TrackPoint(int(ts), float(la), float(lo), None if vmax is None else float(vmax), int(n))
            for ts, la, lo, vmax, n in rows
            if la is not None and lo is not None
        ]

    def daily(self, vin: str, day: date, tz: str = DEFAULT_TZ) -> DailyStats:
        return daily_from_store(self, vin, day, tz)

    # -- retention ----------------------------------------------------------------------------------------------

    def _require_retention(self) -> tuple[RetentionConfig, str]:
        if self.retention is None or self._rollup_from is None:
            raise QueryError("this store keeps no rollups (no retention configured)")
        if not self._db_ready:
            self._ensure_database()
        return self.retention, self._rollup_from

    def rollup(self, start_ms: int, end_ms: int) -> int:
        """What the continuous query does on its schedule, for any range (`SELECT ... INTO`), a day per
        statement, skipping stretches without data."""
        cfg, _ = self._require_retention()
        w = cfg.rollup_interval_ms
        lo, end = max(start_ms, lp.MIN_TIME_MS), min(end_ms, lp.MAX_TIME_MS)
        lo, end = lo - lo % w, end - end % w
        step = max(w, 86_400_000 - 86_400_000 % w)
        written = 0
        select = self._rollup_select(cfg)
        while lo < end:
            _, first = self._select(
                f"SELECT first({lp.influxql_identifier(SAMPLE_FIELD)}) FROM {self._from}"
                f" WHERE time >= {lo * 1_000_000} AND time < {end * 1_000_000}"
            )
            if not first:
                break
            lo = int(first[0][0]) - int(first[0][0]) % w
            hi = min(lo + step, end)
            _, rows = self._select(
                f"{select} WHERE time >= {lo * 1_000_000} AND time < {hi * 1_000_000}"
                f" GROUP BY time({cfg.rollup_interval_s}s), *"
            )
            written += sum(int(r[1]) for r in rows)
            lo = hi
        return written

    def query_rollup(self, vin: str, start_ms: int, end_ms: int, signals: list[str] | None, limit: int) -> RollupSeries:
        _, src = self._require_retention()
        sigs = self._numeric if signals is None else resolve_signals(self._signals, signals)
        bad = [s.name for s in sigs if not numeric(s)]
        if bad:
            raise QueryError(f"rollups hold numeric signals only, not {', '.join(bad)}")
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise QueryError(f"limit must be in 1..{MAX_QUERY_LIMIT}")
        out = RollupSeries([], [], {s.name: [] for s in sigs})
        lo_ms, hi_ms = max(start_ms, lp.MIN_TIME_MS), min(end_ms, lp.MAX_TIME_MS)
        if lo_ms > hi_ms or not self._check_vin(vin):
            return out
        where = self._where(vin, lo_ms, hi_ms, src)
        _, rows = self._select(f'SELECT "samples"::field{self._fields(sigs)}{where} ORDER BY time LIMIT {limit}')
        for row in rows:
            out.timestamps.append(int(row[0]))
            out.samples.append(int(row[1]))
            for sig, raw in zip(sigs, row[2:], strict=True):
                out.columns[sig.name].append(None if raw is None else float(raw))
        return out

    def maintain(self, now_ms: int | None = None) -> MaintenanceReport:
        """The server rolls up (continuous query) and deletes (retention service) by itself; this catches the
        rollups up when they lag more than the continuous query's window behind — the first start over data
        written before retention was configured, or influxd having been down."""
        if self.retention is None:
            return MaintenanceReport()
        cfg, src = self._require_retention()
        if now_ms is None:
            now_ms = int(time.time() * 1000)
        w = cfg.rollup_interval_ms
        to = now_ms - now_ms % w
        _, newest = self._select(f'SELECT last("samples") FROM {src}')
        if newest:
            frm = int(newest[0][0]) + w
        else:
            _, first = self._select(f"SELECT first({lp.influxql_identifier(SAMPLE_FIELD)}) FROM {self._from}")
            if not first:
                return MaintenanceReport()
            frm = int(first[0][0])
        frm = max(frm, now_ms - cfg.raw_s * 1000)  # nothing older is left to roll up
        if frm >= to - cfg.lateness_s * 1000:
            return MaintenanceReport()
        rows = self.rollup(frm, to)
        return MaintenanceReport(frm, to, rows)

    # -- operations -------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raises StorageError unless the server answers /ping."""
        if self._closed:
            raise StorageError("time-series store is closed")
        try:
            r = self._reader.get(self._ping_url, timeout=2.0)
        except httpx.TransportError as exc:
            raise StorageError(f"influx unreachable: {exc!r}") from exc
        if r.status_code != 204:
            raise StorageError(f"influx /ping answered {r.status_code}")

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            out = dict(self._stats)
        with self._cv:
            out["pending_lines"] = self._pending_lines
            out["blocked_writers"] = self._blocked
        return out

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._sender.join(timeout=5.0)
        # In-flight requests stop retrying once closed; each is bounded by one request timeout.
        self._pool.shutdown(wait=True)
        self._writer.close()
        self._reader.close()


_MSGPACK = "application/x-msgpack"


def _vin_of_row(row: list[Any]) -> str:
    """Sort key of a fleet-state row: its VIN (rows without one, never written by us, sort first)."""
    vin = row[1]
    return vin if type(vin) is str else ""


def _answer_documents(r: httpx.Response) -> list[Any]:
    """The documents of a (chunked) /query answer: concatenated MessagePack maps when the server sent MessagePack,
    else concatenated JSON objects."""
    if r.headers.get("content-type", "").startswith(_MSGPACK):
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=2**31 - 1)
        unpacker.feed(r.content)
        try:
            return list(unpacker)
        except (ValueError, msgpack.UnpackException) as exc:
            raise StorageError(f"influx read failed: bad MessagePack answer: {exc}") from exc
    docs: list[Any] = []
    decoder = json.JSONDecoder()
    text, pos = r.text, 0
    try:
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                return docs
            doc, pos = decoder.raw_decode(text, pos)
            docs.append(doc)
    except ValueError as exc:
        raise StorageError(f"influx read failed: bad JSON answer: {exc}") from exc
