"""The replay ledger: which (vin, boot, seq) identities were stored, and the high-water mark per (vin, boot).

Relational (SQLAlchemy) so that several ingest workers, possibly on several machines, share it: the ledger's
primary key is the arbiter when two workers race to store the same message.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, case, delete, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.db import BootWindow, DeviceState, MessageLedger
from cloud_ingest.errors import StorageError

Identity = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    identity: Identity
    samples: int


@dataclass(frozen=True, slots=True)
class LedgerView:
    hwm: dict[tuple[str, int], int]
    seen: set[Identity]


class Ledger:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def lookup(self, identities: Iterable[Identity]) -> LedgerView:
        by_boot: dict[tuple[str, int], list[int]] = defaultdict(list)
        for vin, boot, seq in identities:
            by_boot[(vin, boot)].append(seq)
        view = LedgerView(hwm={}, seen=set())
        if not by_boot:
            return view
        try:
            with Session(self.engine) as session:
                for (vin, boot), seqs in by_boot.items():
                    hwm = session.scalar(
                        select(BootWindow.hwm_seq).where(BootWindow.vin == vin, BootWindow.boot == boot)
                    )
                    if hwm is not None:
                        view.hwm[(vin, boot)] = hwm
                    for seq in session.scalars(
                        select(MessageLedger.seq).where(
                            MessageLedger.vin == vin, MessageLedger.boot == boot, MessageLedger.seq.in_(seqs)
                        )
                    ):
                        view.seen.add((vin, boot, seq))
        except SQLAlchemyError as exc:
            raise StorageError(f"ledger lookup failed: {exc}") from exc
        return view

    def commit(self, entries: Sequence[LedgerEntry], window: int, now_ms: int) -> set[Identity]:
        """Record `entries` in one transaction; returns the identities another worker had recorded first.

        Those are left out (they count as duplicates) and the rest is committed on a retry.
        """
        pending = list(entries)
        lost: set[Identity] = set()
        # A conflict is either a ledger row another worker committed first (dropped here, so each such retry
        # shrinks `pending`) or a concurrent first BootWindow insert (which exists on the retry); hence the bound.
        for _ in range(len(entries) + 2):
            if not pending:
                return lost
            try:
                self._commit_once(pending, window, now_ms)
                return lost
            except IntegrityError:
                taken = self.lookup(e.identity for e in pending).seen
                lost |= taken
                pending = [e for e in pending if e.identity not in taken]
            except SQLAlchemyError as exc:
                raise StorageError(f"ledger commit failed: {exc}") from exc
        raise StorageError("ledger commit did not converge")

    def _commit_once(self, entries: Sequence[LedgerEntry], window: int, now_ms: int) -> None:
        hwm: dict[tuple[str, int], int] = {}
        per_vin: dict[str, tuple[int, int, int]] = {}  # vin -> (messages, samples, last boot)
        for e in entries:
            vin, boot, seq = e.identity
            hwm[(vin, boot)] = max(seq, hwm.get((vin, boot), seq))
            messages, samples, last_boot = per_vin.get(vin, (0, 0, boot))
            per_vin[vin] = (messages + 1, samples + e.samples, max(boot, last_boot))
        with Session(self.engine) as session, session.begin():
            # The INSERT comes first so the transaction takes its write lock before reading anything
            # (a SQLite read-then-write transaction could fail instead of waiting behind another writer).
            session.execute(
                insert(MessageLedger), [{"vin": v, "boot": b, "seq": s} for (v, b, s) in (e.identity for e in entries)]
            )
            for (vin, boot), top in hwm.items():
                moved = session.execute(
                    update(BootWindow)
                    .where(BootWindow.vin == vin, BootWindow.boot == boot)
                    .values(hwm_seq=case((BootWindow.hwm_seq < top, top), else_=BootWindow.hwm_seq))
                ).rowcount  # type: ignore[attr-defined]
                if moved == 0:
                    # A concurrent first insert makes this raise IntegrityError: the whole commit is retried.
                    session.execute(insert(BootWindow).values(vin=vin, boot=boot, hwm_seq=top))
                current = session.scalar(
                    select(BootWindow.hwm_seq).where(BootWindow.vin == vin, BootWindow.boot == boot)
                )
                if current is None:
                    raise StorageError(f"boot window of {vin}/{boot} vanished inside its transaction")
                session.execute(
                    delete(MessageLedger).where(
                        MessageLedger.vin == vin, MessageLedger.boot == boot, MessageLedger.seq <= current - window
                    )
                )
            for vin, (messages, samples, boot) in per_vin.items():
                session.execute(
                    update(DeviceState)
                    .where(DeviceState.vin == vin)
                    .values(
                        messages=DeviceState.messages + messages,
                        samples=DeviceState.samples + samples,
                        last_seen_ms=now_ms,
                        last_boot=boot,
                    )
                )
