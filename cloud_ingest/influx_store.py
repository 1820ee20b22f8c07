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
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cloud_ingest import line_protocol as lp
from cloud_ingest.errors import QueryError, StorageError, UnknownSignalError
from cloud_ingest.tsstore import MAX_QUERY_LIMIT, POSITION_SIGNALS
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

    def __post_init__(self) -> None:
        if self.max_lines < 1 or self.max_bytes < 1 or self.max_in_flight < 1 or self.max_pending_lines < 1:
            raise ValueError("max_lines, max_bytes, max_in_flight and max_pending_lines must be positive")
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
    """One write_many call: how many of its slices are outstanding and how they ended."""

    __slots__ = ("deadline", "done", "error", "lock", "outstanding", "quarantined")

    def __init__(self, slices: int, deadline: float) -> None:
        self.deadline = deadline
        self.outstanding = slices
        self.error: StorageError | None = None
        self.quarantined = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def finish(self, quarantined: int, error: StorageError | None) -> None:
        with self.lock:
            self.quarantined += quarantined
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
    enqueued: float = dataclasses.field(default_factory=time.monotonic)


class _CredentialsRefused(StorageError):
    """401/403 on write: a configuration problem, not worth retrying within this call."""


class InfluxTimeSeriesStore:
    def __init__(self, settings: InfluxSettings, catalogue: Catalogue, quarantine_path: str | Path) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.quarantine_path = Path(quarantine_path)
        self._signals: dict[str, Signal] = {s.name: s for s in catalogue}
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
        if settings.retention_policy:
            self._write_params["rp"] = settings.retention_policy
        self._writer = httpx.Client(
            timeout=settings.request_timeout_s,
            limits=httpx.Limits(
                max_connections=settings.max_in_flight, max_keepalive_connections=settings.max_in_flight
            ),
        )
        # Reads have their own pool: a write stuck in retries must not starve the API's queries of connections.
        self._reader = httpx.Client(timeout=settings.query_timeout_s)
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
        self._stats = {"lines_written": 0, "requests": 0, "retries": 0, "quarantined_lines": 0}
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
        lines = self._encode(items)
        if not lines:
            return 0
        s = self.settings
        deadline = time.monotonic() + s.write_deadline_s
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
            self._queue.extend(_Slice(call, chunk, size) for chunk, size in chunks)
            self._cv.notify_all()
        # A request that started just before the deadline may run one request timeout beyond it.
        if not call.done.wait(s.write_deadline_s + s.request_timeout_s + 1.0):
            call.fail(StorageError(f"influx write did not finish within {s.write_deadline_s}s"))
        if call.error is not None:
            raise call.error
        return len(lines) - call.quarantined

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
                    until = self._queue[0].enqueued + s.linger_s
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
                if taken and (lines + len(sl.lines) > s.max_lines or size + sl.nbytes > s.max_bytes):
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
            sl.call.finish(0, error)
        self._cv.notify_all()

    def _send(self, slices: list[_Slice]) -> None:
        lines = [ln for sl in slices for ln in sl.lines]
        try:
            deadline = min(sl.call.deadline for sl in slices)
            bad = self._post(lines, deadline)
        except StorageError as exc:
            for sl in slices:
                sl.call.finish(0, exc)
        except Exception as exc:
            log.exception("influx write failed unexpectedly")
            for sl in slices:
                sl.call.finish(0, StorageError(f"influx write failed: {exc!r}"))
        else:
            start = 0
            for sl in slices:
                end = start + len(sl.lines)
                sl.call.finish(sum(1 for i in bad if start <= i < end), None)
                start = end
            with self._stats_lock:
                self._stats["lines_written"] += len(lines) - len(bad)
        finally:
            self._in_flight.release()
            self._release(len(lines))

    def _post(self, lines: list[bytes], deadline: float, offset: int = 0) -> set[int]:
        """Write `lines`; returns the indices (plus `offset`) of those quarantined as bad data."""
        status, text = self._post_with_retry(lines, deadline)
        if 200 <= status < 300:
            return set()
        # A 4xx: some or all lines are bad data. Partial writes stored the good ones already; re-sending them
        # while isolating the bad ones only merges identical values.
        dropped = _DROPPED_RE.search(text)
        if len(lines) == 1 or (status == 400 and dropped is not None and int(dropped.group(1)) == len(lines)):
            self._quarantine(lines, status, text)
            return set(range(offset, offset + len(lines)))
        half = len(lines) // 2
        return self._post(lines[:half], deadline, offset) | self._post(lines[half:], deadline, offset + half)

    def _post_with_retry(self, lines: list[bytes], deadline: float) -> tuple[int, str]:
        """POST until an answer that is final (2xx, or bad data), or StorageError at the deadline."""
        body = gzip.compress(b"\n".join(lines), compresslevel=self.settings.gzip_level)
        headers = {**self._headers, "Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"}
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            problem = self._attempt(body, headers)
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

    def _attempt(self, body: bytes, headers: dict[str, str]) -> tuple[int, str] | str:
        """One POST: (status, text) for a final answer, or a description of a retryable failure."""
        try:
            if not self._db_ready:
                self._ensure_database()
            with self._stats_lock:
                self._stats["requests"] += 1
            r = self._writer.post(self._write_url, params=self._write_params, content=body, headers=headers)
        except httpx.TransportError as exc:  # connection refused or reset, timeouts
            return repr(exc)
        except StorageError as exc:  # the database could not be created yet
            return str(exc)
        status, text = r.status_code, r.text[:2000]
        if status in (401, 403):
            raise _CredentialsRefused(f"influx refused the credentials ({status}): {text[:200]}")
        if 200 <= status < 300 or status in _BAD_DATA_STATUS:
            return status, text
        if status == 404:
            self._db_ready = False  # dropped under us, or never created: create it and retry
        return f"HTTP {status}: {text[:200]}"

    def _quarantine(self, lines: list[bytes], status: int, reason: str) -> None:
        reason = reason.strip()[:2000]
        record = {
            "at_ms": int(time.time() * 1000),
            "database": self.settings.database,
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

    def _ensure_database(self) -> None:
        with self._db_lock:
            if self._db_ready:
                return
            if not self.settings.create_database:
                self._db_ready = True
                return
            q = f"CREATE DATABASE {lp.influxql_identifier(self.settings.database)}"
            try:
                r = self._reader.post(
                    self._query_url, data={"q": q}, headers=self._headers, timeout=self.settings.request_timeout_s
                )
            except httpx.TransportError as exc:
                raise StorageError(f"influx unreachable at {self.settings.url}: {exc!r}") from exc
            if r.status_code in (401, 403):
                # A write-only account may not create databases; the operator made it, or writes will say so.
                log.warning("cannot create the influx database; assuming it exists", extra={"status": r.status_code})
            elif r.status_code != 200 or '"error"' in r.text:
                raise StorageError(f"cannot create influx database: HTTP {r.status_code} {r.text[:200]}")
            self._db_ready = True

    # -- reading ----------------------------------------------------------------------------------------------

    def _select(self, q: str) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of one SELECT (chunked, so a server's max-row-limit cannot cut it short)."""
        if self._closed:
            raise StorageError("time-series store is closed")
        params = {"db": self.settings.database, "epoch": "ms", "chunked": "true", "chunk_size": "10000"}
        if self.settings.retention_policy:
            params["rp"] = self.settings.retention_policy
        try:
            r = self._reader.post(self._query_url, params=params, data={"q": q}, headers=self._headers)
        except httpx.TransportError as exc:
            raise StorageError(f"influx read failed: {exc!r}") from exc
        if r.status_code != 200:
            raise StorageError(f"influx read failed: HTTP {r.status_code} {r.text[:200]}")
        columns: list[str] = []
        rows: list[list[Any]] = []
        decoder = json.JSONDecoder()
        text, pos = r.text, 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            doc, pos = decoder.raw_decode(text, pos)
            if "error" in doc:
                raise StorageError(f"influx read failed: {doc['error']}")
            for res in doc.get("results", []):
                if "error" in res:
                    if str(res["error"]).startswith("database not found"):
                        return [], []  # nothing was ever written
                    raise StorageError(f"influx read failed: {res['error']}")
                for series in res.get("series", []):
                    columns = series["columns"]
                    rows.extend(series.get("values", []))
        return columns, rows

    def _where(self, vin: str, start_ms: int = lp.MIN_TIME_MS, end_ms: int = lp.MAX_TIME_MS) -> str:
        return (
            f" FROM {lp.influxql_identifier(self.settings.measurement)}"
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
