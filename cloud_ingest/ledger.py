"""The replay ledger: which (vin, boot, seq) identities were stored, and the high-water mark per (vin, boot).

Relational (SQLAlchemy) so that several ingest workers, possibly on several machines, share it: the ledger's
primary key is the arbiter when two workers race to store the same message. Commits use the dialect's upsert
(`INSERT ... ON CONFLICT` on SQLite and PostgreSQL alike): a row another worker recorded first is simply not
returned, so a race costs no aborted transaction and no retry loop.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Engine, Table, bindparam, case, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.db import BootWindow, DeviceState, MessageLedger
from cloud_ingest.errors import StorageError

log = logging.getLogger(__name__)

Identity = tuple[str, int, int]
# Work that must commit atomically with the ledger rows (the pipeline's sample observers).
WithinCommit = Callable[[Session, set[Identity]], None]

_LEDGER = cast(Table, MessageLedger.__table__)
_WINDOWS = cast(Table, BootWindow.__table__)
_UPSERTS: dict[str, Callable[[Table], Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
# PostgreSQL aborts one of two transactions that wait on each other (deadlock) or, under SERIALIZABLE, conflict;
# the loser is retried as a whole. Rows are locked in sorted order, so this should be rare.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_MAX_ATTEMPTS = 5
_IN_CHUNK = 300  # identities per IN (...) list: 900 bound parameters, far below SQLite's and PostgreSQL's limits
_DEVICES = cast(Table, DeviceState.__table__)
# Executed for many rows at once (executemany): the window trim per (vin, boot), the counters per vehicle.
_TRIM = _LEDGER.delete().where(
    _LEDGER.c.vin == bindparam("b_vin"), _LEDGER.c.boot == bindparam("b_boot"), _LEDGER.c.seq <= bindparam("b_below")
)
_COUNT = (
    _DEVICES.update()
    .where(_DEVICES.c.vin == bindparam("b_vin"))
    .values(
        messages=_DEVICES.c.messages + bindparam("b_messages"),
        samples=_DEVICES.c.samples + bindparam("b_samples"),
        last_seen_ms=bindparam("b_seen"),
        last_boot=bindparam("b_boot"),
    )
)


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
        upsert = _UPSERTS.get(engine.dialect.name)
        if upsert is None:
            raise StorageError(f"the ledger supports SQLite and PostgreSQL, not {engine.dialect.name}")
        self._upsert = upsert

    def lookup(self, identities: Iterable[Identity]) -> LedgerView:
        by_boot: dict[tuple[str, int], list[int]] = defaultdict(list)
        for vin, boot, seq in identities:
            by_boot[(vin, boot)].append(seq)
        view = LedgerView(hwm={}, seen=set())
        if not by_boot:
            return view
        # Two statements per call however many vehicles it carries: the windows by (vin, boot), the identities.
        boots = sorted(by_boot)
        wanted = sorted((vin, boot, seq) for (vin, boot), seqs in by_boot.items() for seq in seqs)
        try:
            with Session(self.engine) as session:
                conn = session.connection()
                for i in range(0, len(boots), _IN_CHUNK):
                    stmt = select(_WINDOWS.c.vin, _WINDOWS.c.boot, _WINDOWS.c.hwm_seq).where(
                        tuple_(_WINDOWS.c.vin, _WINDOWS.c.boot).in_(boots[i : i + _IN_CHUNK])
                    )
                    for vin, boot, hwm in conn.execute(stmt):
                        view.hwm[(vin, boot)] = hwm
                for i in range(0, len(wanted), _IN_CHUNK):
                    stmt = select(_LEDGER.c.vin, _LEDGER.c.boot, _LEDGER.c.seq).where(
                        tuple_(_LEDGER.c.vin, _LEDGER.c.boot, _LEDGER.c.seq).in_(wanted[i : i + _IN_CHUNK])
                    )
                    view.seen.update((vin, boot, seq) for vin, boot, seq in conn.execute(stmt))
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
        with Session(self.engine) as session, session.begin():
            # The INSERT comes first so the transaction takes its write lock before reading anything
            # (a SQLite read-then-write transaction could fail instead of waiting behind another writer).
            # Sorted rows: two PostgreSQL workers inserting overlapping sets lock them in the same order.
            ins = self._upsert(_LEDGER).values([{"vin": v, "boot": b, "seq": s} for v, b, s in wanted])
            ins = ins.on_conflict_do_nothing(index_elements=["vin", "boot", "seq"]).returning(
                _LEDGER.c.vin, _LEDGER.c.boot, _LEDGER.c.seq
            )
            inserted: set[Identity] = {(v, b, s) for v, b, s in session.execute(ins)}
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
            up = self._upsert(_WINDOWS).values(
                [{"vin": v, "boot": b, "hwm_seq": top} for (v, b), top in sorted(hwm.items())]
            )
            up = up.on_conflict_do_update(
                index_elements=["vin", "boot"],
                set_={
                    "hwm_seq": case(
                        (_WINDOWS.c.hwm_seq < up.excluded.hwm_seq, up.excluded.hwm_seq), else_=_WINDOWS.c.hwm_seq
                    )
                },
            ).returning(_WINDOWS.c.vin, _WINDOWS.c.boot, _WINDOWS.c.hwm_seq)
            conn = session.connection()
            trims = [
                {"b_vin": vin, "b_boot": boot, "b_below": current - window}
                for vin, boot, current in sorted(session.execute(up).all())
            ]
            if trims:
                conn.execute(_TRIM, trims)
            conn.execute(
                _COUNT,
                [
                    {"b_vin": vin, "b_messages": messages, "b_samples": count, "b_seen": now_ms, "b_boot": boot}
                    for vin, (messages, count, boot) in sorted(per_vin.items())
                ],
            )
            if within is not None:
                within(session, inserted)
        return lost
