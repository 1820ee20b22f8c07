"""The replay ledger: which (vin, boot, seq) identities were stored, and the high-water mark per (vin, boot).

Relational (SQLAlchemy) so that several ingest workers, possibly on several machines, share it: the ledger's
primary key is the arbiter when two workers race to store the same message. Commits use the dialect's upsert
(`INSERT ... ON CONFLICT` on SQLite and PostgreSQL alike): a row another worker recorded first is simply not
returned, so a race costs no aborted transaction and no retry loop. The statements run once or twice per ingest
call whatever its size, so they are plain SQL (cloud_ingest/sqltext.py), not SQLAlchemy expressions compiled per
call; the tables are those of cloud_ingest/db.py (MessageLedger, BootWindow, DeviceState).
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest import sqltext
from cloud_ingest.errors import StorageError

log = logging.getLogger(__name__)

Identity = tuple[str, int, int]
# Work that must commit atomically with the ledger rows (the pipeline's sample observers).
WithinCommit = Callable[[Session, set[Identity]], None]

# PostgreSQL aborts one of two transactions that wait on each other (deadlock) or, under SERIALIZABLE, conflict;
# the loser is retried as a whole. Rows are locked in sorted order, so this should be rare.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    identity: Identity
    samples: int


@dataclass(frozen=True, slots=True)
class LedgerView:
    hwm: dict[tuple[str, int], int]
    seen: set[Identity]


def _retryable(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _RETRY_SQLSTATES


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Plain SQL (cloud_ingest/sqltext.py): raises StorageError for other databases than SQLite and PostgreSQL.
        self._mark = sqltext.marker(engine)

    def lookup(self, identities: Iterable[Identity]) -> LedgerView:
        by_boot: dict[tuple[str, int], list[int]] = defaultdict(list)
        for vin, boot, seq in identities:
            by_boot[(vin, boot)].append(seq)
        view = LedgerView(hwm={}, seen=set())
        if not by_boot:
            return view
        # Two statements per call however many vehicles it carries: the windows by (vin, boot), the identities.
        # Joined against a VALUES list, not `(vin, boot, seq) IN (VALUES ...)`: SQLite answers a row-value IN by
        # scanning the whole table (40 ms at 300,000 ledger rows), the join by one index search per identity.
        boots = sorted(by_boot)
        wanted = sorted((vin, boot, seq) for (vin, boot), seqs in by_boot.items() for seq in seqs)
        m = self._mark
        try:
            with self.engine.connect() as conn:
                for part in sqltext.chunks(boots):
                    sql = (
                        f"WITH w (vin, boot) AS (VALUES {sqltext.rows(len(part), 2, m)}) SELECT b.vin, b.boot, "
                        "b.hwm_seq FROM w JOIN boot_window AS b ON b.vin = w.vin AND b.boot = w.boot"
                    )
                    for vin, boot, hwm in conn.exec_driver_sql(sql, sqltext.flat(part)):
                        view.hwm[(vin, boot)] = hwm
                for part in sqltext.chunks(wanted):
                    sql = (
                        f"WITH w (vin, boot, seq) AS (VALUES {sqltext.rows(len(part), 3, m)}) SELECT l.vin, l.boot, "
                        "l.seq FROM w JOIN message_ledger AS l ON l.vin = w.vin AND l.boot = w.boot AND l.seq = w.seq"
                    )
                    view.seen.update(
                        (vin, boot, seq) for vin, boot, seq in conn.exec_driver_sql(sql, sqltext.flat(part))
                    )
        except SQLAlchemyError as exc:
            raise StorageError(f"ledger lookup failed: {exc}") from exc
        return view

    def commit(
        self, entries: Sequence[LedgerEntry], window: int, now_ms: int, within: WithinCommit | None = None
    ) -> set[Identity]:
        """Record `entries` in one transaction; returns the identities another worker had recorded first.

        Those are left out (they count as duplicates): neither the high-water mark nor the device counters
        include them. `within(session, inserted)` runs inside that same transaction after the ledger rows are
        written, with the identities this call recorded (none of the lost ones): whatever it writes commits or rolls
        back with them. It may run more than once when a lock conflict retries the transaction.
        """
        if not entries:
            return set()
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                return self._commit_once(entries, window, now_ms, within)
            except DBAPIError as exc:
                if not _retryable(exc) or attempt == _MAX_ATTEMPTS:
                    raise StorageError(f"ledger commit failed: {exc}") from exc
                log.warning("ledger commit lost a lock conflict; retrying", extra={"attempt": attempt})
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
            except SQLAlchemyError as exc:
                raise StorageError(f"ledger commit failed: {exc}") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _commit_once(
        self, entries: Sequence[LedgerEntry], window: int, now_ms: int, within: WithinCommit | None
    ) -> set[Identity]:
        samples = {e.identity: e.samples for e in entries}
        wanted = sorted(samples)
        m = self._mark
        with Session(self.engine) as session, session.begin():
            conn = session.connection()
            # The INSERT comes first so the transaction takes its write lock before reading anything
            # (a SQLite read-then-write transaction could fail instead of waiting behind another writer).
            # Sorted rows: two PostgreSQL workers inserting overlapping sets lock them in the same order.
            inserted: set[Identity] = set()
            for part in sqltext.chunks(wanted):
                sql = (
                    f"INSERT INTO message_ledger (vin, boot, seq) VALUES {sqltext.rows(len(part), 3, m)} "
                    "ON CONFLICT (vin, boot, seq) DO NOTHING RETURNING vin, boot, seq"
                )
                inserted.update((v, b, s) for v, b, s in conn.exec_driver_sql(sql, sqltext.flat(part)))
            lost = set(wanted) - inserted
            if not inserted:
                return lost
            hwm: dict[tuple[str, int], int] = {}
            per_vin: dict[str, tuple[int, int, int]] = {}  # vin -> (messages, samples, last boot)
            for identity in sorted(inserted):
                vin, boot, seq = identity
                hwm[(vin, boot)] = max(seq, hwm.get((vin, boot), seq))
                messages, count, last_boot = per_vin.get(vin, (0, 0, boot))
                per_vin[vin] = (messages + 1, count + samples[identity], max(boot, last_boot))
            current: list[tuple[str, int, int]] = []
            tops = sorted((v, b, top) for (v, b), top in hwm.items())
            for part in sqltext.chunks(tops):
                sql = (
                    f"INSERT INTO boot_window (vin, boot, hwm_seq) VALUES {sqltext.rows(len(part), 3, m)} "
                    "ON CONFLICT (vin, boot) DO UPDATE SET hwm_seq = CASE WHEN boot_window.hwm_seq < "
                    "excluded.hwm_seq THEN excluded.hwm_seq ELSE boot_window.hwm_seq END RETURNING vin, boot, hwm_seq"
                )
                current.extend((v, b, top) for v, b, top in conn.exec_driver_sql(sql, sqltext.flat(part)))
            trims = [(vin, boot, top - window) for vin, boot, top in sorted(current)]
            if trims:
                conn.exec_driver_sql(f"DELETE FROM message_ledger WHERE vin = {m} AND boot = {m} AND seq <= {m}", trims)
            conn.exec_driver_sql(
                f"UPDATE device_state SET messages = messages + {m}, samples = samples + {m}, last_seen_ms = {m}, "
                f"last_boot = {m} WHERE vin = {m}",
                [(messages, count, now_ms, boot, vin) for vin, (messages, count, boot) in sorted(per_vin.items())],
            )
            if within is not None:
                within(session, inserted)
        return lost
