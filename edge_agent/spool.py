"""The durable spool: every batch the agent has taken, on the board's disk until the broker's PUBACK.

One SQLite file, `spool.db` in the agent's state dir, in WAL mode with `synchronous=FULL`: a call that returned has
committed and fsynced, so power loss or kill -9 loses nothing that was spooled.

Life of a row
  put    the flusher stores the encoded columnar batch (`protocol.encode_batch`): kind, created_ms, n_samples, body,
         and whether the publisher knew the broker to be unreachable at that moment (`offline`).
  next   the publisher takes the first row in send order: alerts and command acks (priority 0) in id order,
         then telemetry (priority 1) in id order; acks count as alerts for eviction too. The AUTOINCREMENT id is
         never reused, so order survives deletes and restarts.
  seal   at FIRST send, not at batch time, the publisher signs the body into an envelope with this boot's next
         sequence number and stores those exact bytes with their (boot, seq) before publishing. Every retry —
         after a reconnect, or after a kill -9 and restart in a later boot — republishes the very same bytes, so
         the cloud's (vin, boot, seq) ledger stores them once. Sealing late keeps sequence numbers dense in send
         order (the cloud's replay window is per boot) and lets the BACKFILL flag say how the message was sent.
  ack    the row is deleted only after the broker's PUBACK.

Backfill rule (`backfill_flags`): a row is sealed with `Flags.BACKFILL` when it was spooled while the publisher
knew the broker to be unreachable (the last connection attempt failed or the connection was lost), or when it
waited in the spool longer than `max_live_wait_ms` (the agent passes 2 × its batch interval) before its first
send — which also covers rows left over from an earlier boot. Otherwise it is live.

Eviction policy (the spool is bounded by `max_rows` and `max_bytes`; bytes count body plus sealed envelope).
When a put (or a seal, which adds the envelope's bytes) leaves the spool over a bound, `plan_eviction` chooses:
  1. Thinning: among UNSENT (unsealed) telemetry rows in id order, take the oldest half and evict every other
     one of it (the 2nd, 4th, ... oldest). The whole pass is evicted at once, even if fewer rows would do: that
     frees about a quarter of the telemetry, so the next passes come rarely (hysteresis), and repeated passes
     leave the oldest history progressively sparser instead of cutting it off.
  2. If still over a bound: the oldest telemetry row, one at a time (sealed ones included: they are only in
     flight, and the next send then simply finds them gone).
  3. Only when no telemetry is left: the oldest alert, one at a time.
The row being sealed is never evicted by its own seal. Every evicted row is counted, per kind, in the `meta`
table within the same transaction as the delete, so the counts survive restarts (`evicted`, `evicted_alerts`).

Threading: `Spool` is synchronous and owns one connection; every call commits (with an fsync) before returning.
The agent drives it through `SpoolWorker`, which runs every call on one dedicated thread, so fsyncs never block the
event loop and the connection is never used concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from protocol import Flags, Kind

SPOOL_FILE = "spool.db"
SCHEMA_VERSION = 1
PRIO_ALERT = 0
PRIO_TELEMETRY = 1
# A sealed envelope is its body plus a small header and a 64-byte signature; bodies are capped at a quarter of
# max_bytes so a sealed row (body + envelope) always fits on its own and the byte bound can always be restored.
MIN_MAX_BYTES = 4096

_T = TypeVar("_T")
log = logging.getLogger(__name__)


class SpoolError(Exception):
    """The spool file cannot be opened, read or written (disk full, corruption, I/O error)."""


class SpoolRowTooLarge(SpoolError):
    """A batch larger than the spool's per-row limit (max_bytes / 4)."""


def priority_of(kind: Kind) -> int:
    # Command acks travel with alerts: small, rare, and the operator is waiting for them.
    return PRIO_ALERT if kind in (Kind.ALERT, Kind.COMMAND_ACK) else PRIO_TELEMETRY


@dataclass(frozen=True, slots=True)
class SpoolRow:
    id: int
    kind: Kind
    created_ms: int
    n_samples: int
    offline: bool
    body: bytes
    sealed: bytes | None
    boot: int | None
    seq: int | None


@dataclass(frozen=True, slots=True)
class RowInfo:
    """What the eviction policy needs to know about a row."""

    id: int
    prio: int
    sealed: bool
    size: int


def backfill_flags(row: SpoolRow, now_ms: int, max_live_wait_ms: int) -> Flags:
    """The flags a row gets at its first send (see the module docstring for the rule)."""
    if row.offline or now_ms - row.created_ms > max_live_wait_ms:
        return Flags.BACKFILL
    return Flags.NONE


def plan_eviction(rows: Sequence[RowInfo], max_rows: int, max_bytes: int, protect: int | None = None) -> list[int]:
    """Ids to evict, in eviction order, so that `rows` (in id order) fit both bounds. Pure policy, no I/O."""
    depth = len(rows)
    total = sum(r.size for r in rows)
    if depth <= max_rows and total <= max_bytes:
        return []
    victims: list[int] = []
    gone: set[int] = set()

    def evict(r: RowInfo) -> None:
        nonlocal depth, total
        victims.append(r.id)
        gone.add(r.id)
        depth -= 1
        total -= r.size

    unsent = [r for r in rows if r.prio == PRIO_TELEMETRY and not r.sealed and r.id != protect]
    for r in unsent[: len(unsent) // 2][1::2]:
        evict(r)
    for prio in (PRIO_TELEMETRY, PRIO_ALERT):
        for r in rows:
            if depth <= max_rows and total <= max_bytes:
                return victims
            if r.prio == prio and r.id != protect and r.id not in gone:
                evict(r)
    return victims


class Spool:
    def __init__(self, path: str | Path, max_rows: int = 50_000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_rows < 1:
            raise ValueError("spool max_rows must be >= 1")
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"spool max_bytes must be >= {MIN_MAX_BYTES}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) so each call is one commit.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        try:
            self._init_schema()
            depth, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(body) + coalesce(length(sealed), 0)), 0) FROM spool"
            ).fetchone()
            self.depth: int = int(depth)
            self.bytes: int = int(size)
            self.evicted = self._meta("evicted_telemetry") + self._meta("evicted_alert")
            self.evicted_alerts = self._meta("evicted_alert")
        except sqlite3.Error as exc:
            self._db.close()
            raise SpoolError(f"cannot open spool {self.path}: {exc}") from exc
        # Bounds may have shrunk in the configuration since the file was written.
        self._enforce(protect=None)

    def _init_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a committed put survives power loss, not just a crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS spool (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                prio INTEGER NOT NULL,
                kind INTEGER NOT NULL,
                created_ms INTEGER NOT NULL,
                n_samples INTEGER NOT NULL,
                offline INTEGER NOT NULL,
                body BLOB NOT NULL,
                sealed BLOB,
                boot INTEGER,
                seq INTEGER
            );
            CREATE INDEX IF NOT EXISTS spool_send_order ON spool (prio, id);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            """
        )
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise SpoolError(f"spool schema version {version} is not {SCHEMA_VERSION}")

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _write(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` in one IMMEDIATE transaction; SQLite errors become SpoolError after a rollback."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                out = fn()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        return out

    # -- operations ---------------------------------------------------------------------------------------

    def put(self, kind: Kind, created_ms: int, n_samples: int, body: bytes, offline: bool = False) -> int:
        """Store a batch durably; returns its id. May evict older rows (counted) to stay within the bounds."""
        if len(body) > self.max_bytes // 4:
            raise SpoolRowTooLarge(f"batch of {len(body)} bytes exceeds the spool's row limit {self.max_bytes // 4}")

        def insert() -> int:
            cur = self._db.execute(
                "INSERT INTO spool (prio, kind, created_ms, n_samples, offline, body) VALUES (?, ?, ?, ?, ?, ?)",
                (priority_of(kind), int(kind), created_ms, n_samples, int(offline), body),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        row_id = self._write(insert)
        self.depth += 1
        self.bytes += len(body)
        # A second transaction, and a rare one: a crash in between leaves one row too many until the next open.
        self._enforce(protect=None)
        return row_id

    def next(self) -> SpoolRow | None:
        """The first row in send order (alerts, then telemetry, each in id order), or None when empty."""
        try:
            r = self._db.execute(
                "SELECT id, kind, created_ms, n_samples, offline, body, sealed, boot, seq FROM spool"
                " ORDER BY prio, id LIMIT 1"
            ).fetchone()
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        if r is None:
            return None
        return SpoolRow(r[0], Kind(r[1]), r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8])

    def seal(self, row_id: int, sealed: bytes, boot: int, seq: int) -> bool:
        """Store the envelope to publish for `row_id`, durably; False if the row is gone (evicted) or already sealed.

        A sealed row is never sealed again: its bytes are its identity at the cloud.
        """
        cur = self._write(
            lambda: self._db.execute(
                "UPDATE spool SET sealed = ?, boot = ?, seq = ? WHERE id = ? AND sealed IS NULL",
                (sealed, boot, seq, row_id),
            )
        )
        if cur.rowcount != 1:
            return False
        self.bytes += len(sealed)
        self._enforce(protect=row_id)
        return True

    def ack(self, row_id: int) -> bool:
        """Delete a row after its PUBACK; False if it was no longer there (evicted while in flight)."""

        def delete() -> int | None:
            r = self._db.execute(
                "DELETE FROM spool WHERE id = ? RETURNING length(body) + coalesce(length(sealed), 0)", (row_id,)
            ).fetchone()
            return None if r is None else int(r[0])

        size = self._write(delete)
        if size is None:
            return False
        self.depth -= 1
        self.bytes -= size
        return True

    def rows(self) -> list[SpoolRow]:
        """Every row in send order (for tests and diagnostics; reads the whole spool)."""
        try:
            found = self._db.execute(
                "SELECT id, kind, created_ms, n_samples, offline, body, sealed, boot, seq FROM spool ORDER BY prio, id"
            ).fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {self.path}: {exc}") from exc
        return [SpoolRow(r[0], Kind(r[1]), r[2], r[3], bool(r[4]), r[5], r[6], r[7], r[8]) for r in found]

    def close(self) -> None:
        self._db.close()

    # -- bounds -------------------------------------------------------------------------------------------

    def _enforce(self, protect: int | None) -> None:
        if self.depth <= self.max_rows and self.bytes <= self.max_bytes:
            return  # the common case: no scan at all

        def evict() -> tuple[int, int, int]:
            infos = [
                RowInfo(r[0], r[1], bool(r[2]), r[3])
                for r in self._db.execute(
                    "SELECT id, prio, sealed IS NOT NULL, length(body) + coalesce(length(sealed), 0)"
                    " FROM spool ORDER BY id"
                )
            ]
            by_id = {r.id: r for r in infos}
            victims = [by_id[i] for i in plan_eviction(infos, self.max_rows, self.max_bytes, protect)]
            self._db.executemany("DELETE FROM spool WHERE id = ?", [(v.id,) for v in victims])
            alerts = sum(1 for v in victims if v.prio == PRIO_ALERT)
            telemetry = len(victims) - alerts
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = value + ?",
                [("evicted_telemetry", telemetry, telemetry), ("evicted_alert", alerts, alerts)],
            )
            return telemetry, alerts, sum(v.size for v in victims)

        telemetry, alerts, size = self._write(evict)
        self.depth -= telemetry + alerts
        self.bytes -= size
        self.evicted += telemetry + alerts
        self.evicted_alerts += alerts
        log.warning(
            "spool full: batches evicted",
            extra={"telemetry": telemetry, "alerts": alerts, "depth": self.depth, "bytes": self.bytes},
        )


class SpoolWorker:
    """The spool for the event loop: every call runs on one dedicated thread, in submission order."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")

    async def _call(self, fn: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def put(self, kind: Kind, created_ms: int, n_samples: int, body: bytes, offline: bool) -> int:
        return await self._call(self.spool.put, kind, created_ms, n_samples, body, offline)

    async def next(self) -> SpoolRow | None:
        return await self._call(self.spool.next)

    async def seal(self, row_id: int, sealed: bytes, boot: int, seq: int) -> bool:
        return await self._call(self.spool.seal, row_id, sealed, boot, seq)

    async def ack(self, row_id: int) -> bool:
        return await self._call(self.spool.ack, row_id)

    async def close(self) -> None:
        await self._call(self.spool.close)
        self._pool.shutdown(wait=False)

    # Counters are plain ints written by the worker thread; reading them from the loop is safe.
    @property
    def depth(self) -> int:
        return self.spool.depth

    @property
    def bytes(self) -> int:
        return self.spool.bytes

    @property
    def evicted(self) -> int:
        return self.spool.evicted
