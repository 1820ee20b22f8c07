"""The ingest pipeline: verify → dedupe → decode → validate → store → observe, for batches of raw envelopes.

A synchronous core: the MQTT bridge and any HTTP feeder call `ingest_many` from a worker thread and acknowledge
their messages only after it returned (it raises StorageError when nothing may be acknowledged).

Sample observers (`SampleObserver`: the hazard rules' alarm service, the life-cycle tracker, ...) see every stored
TELEMETRY batch exactly once, inside the ledger's transaction:

- `observe(session, vin, batch)` is called after the batch's samples are durable in the time-series store and its
  ledger row is written, in the same relational transaction (`session`), before it commits. What an observer writes
  through `session` (its per-vehicle state, the alarms it derived) therefore commits atomically with the ledger
  entry: a redelivered duplicate is never observed again, and a batch whose commit did not happen is observed again
  on redelivery, from the state the observer persisted before it.
- Per vehicle, batches come in time order (by first sample time, then (boot, seq)); vehicles come in VIN order.
  Identities another worker recorded first (lost races) are not observed, nor are ALERT envelopes: an edge alert
  repeats readings its telemetry batch also carries, and it is sent ahead of that batch, so observing it would
  move a vehicle's clock past samples still to come.
- An observer may also have `prepare(session, by_vin)`: called once per ingest call, before its `observe` calls,
  with every vehicle's batches of the call, so it can load (and lock) all their state in a few statements instead
  of a few per vehicle; `finish(session)`: called once after its `observe` calls, inside the same savepoint, to
  write what it accumulated (one statement for all the call's vehicles); and `discard(session)`: called after its
  savepoint was rolled back, to drop whatever in-memory state it derived inside it.
- Each observer runs inside one SAVEPOINT for all the call's vehicles (one flush of its writes, not one per
  vehicle). A database error (SQLAlchemyError, StorageError) propagates: the whole transaction rolls back and nothing
  is acknowledged, so the batch is retried. Any other exception is a bug in that observer: its savepoint is rolled
  back, it is told to `discard`, and it runs again vehicle by vehicle, each in a SAVEPOINT of its own, so that only
  the vehicle it fails on loses that observer's work; each failure is logged and counted
  (`zhilian_ingest_observer_errors`), and ingest goes on — one broken observer must not stop the fleet's data.
- An observer may be called again for the same batches when the transaction is retried after a lock conflict, so it
  must not trust in-memory state a rolled-back transaction produced (e.g. keep a version number of what committed).
- Several ingest workers may run: an observer keeping per-vehicle state must serialise on the database (a row lock
  and/or a version check on its state row), not on a process-local lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter as TallyCounter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cloud_ingest.errors import StorageError
from cloud_ingest.ledger import Identity, Ledger, LedgerEntry
from cloud_ingest.registry import KeyLookup, Registry
from cloud_ingest.tsstore import TimeSeriesStore
from protocol import MAX_ENVELOPE_BYTES, Batch, Catalogue, Kind, SignedEnvelope, decode_batch, parse_envelope
from protocol.errors import DecodeError, SignatureError

log = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "rejected"]
SAMPLE_AGE_BUCKETS_S = (
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 60.0, 120.0, 300.0, float("inf"),
)  # fmt: skip
_ACCEPTED_KINDS = frozenset({Kind.TELEMETRY, Kind.ALERT})
# The relational ledger holds boot and seq in signed 64-bit columns (SQLite INTEGER, PostgreSQL BIGINT).
_MAX_IDENTITY = 2**63


@dataclass(frozen=True, slots=True)
class IngestResult:
    outcome: Outcome
    reason: str | None
    vin: str | None
    samples: int


@dataclass(slots=True)
class _Candidate:
    index: int
    vin: str
    identity: Identity
    body: bytes
    kind: Kind


@dataclass(slots=True)
class _Accepted:
    index: int
    vin: str
    identity: Identity
    batch: Batch
    kind: Kind


class SampleObserver(Protocol):
    """Sees each stored telemetry batch once, inside the ledger's transaction (see the module docstring)."""

    def observe(self, session: Session, vin: str, batch: Batch) -> None: ...


class PreparingObserver(SampleObserver, Protocol):
    """An observer that loads the state of all of an ingest call's vehicles at once (see the module docstring)."""

    def prepare(self, session: Session, by_vin: Mapping[str, Sequence[Batch]]) -> None: ...

    def discard(self, session: Session) -> None: ...


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class IngestPipeline:
    def __init__(
        self,
        registry: Registry,
        store: TimeSeriesStore,
        catalogue: Catalogue,
        metrics: CollectorRegistry | None = None,
        replay_window: int = 4096,
        observers: Sequence[SampleObserver] = (),
    ) -> None:
        if replay_window < 1:
            raise ValueError("replay_window must be positive")
        self.registry = registry
        self.store = store
        self.catalogue = catalogue
        self.replay_window = replay_window
        self.ledger = Ledger(registry.engine)
        self.observers: list[SampleObserver] = list(observers)
        self.metrics = metrics if metrics is not None else CollectorRegistry()
        self._m_messages = Counter(
            "zhilian_ingest_messages",
            "Envelopes seen by the ingest pipeline, by outcome and rejection reason",
            ["outcome", "reason"],
            registry=self.metrics,
        )
        self._m_samples = Counter("zhilian_ingest_samples", "Samples stored", registry=self.metrics)
        # Edge alerts (firmware_specs/ALERTS.md) are columnar batches too and are stored like telemetry; counted
        # apart so an operator sees how many the fleet raised.
        self._m_alerts = Counter("zhilian_ingest_alerts", "ALERT envelopes stored", registry=self.metrics)
        # Freshness, one observation per stored message (cheap): the load benchmark reads its percentiles as the
        # end-to-end latency "sample taken → stored"; for live data it includes the device's batching delay.
        self._m_sample_age = Histogram(
            "zhilian_ingest_sample_age_seconds",
            "Age of each stored message's newest sample when its commit returned",
            buckets=SAMPLE_AGE_BUCKETS_S,
            registry=self.metrics,
        )
        self._m_invalid = Counter(
            "zhilian_ingest_invalid_values",
            "Values dropped because they were out of their signal's range or type",
            ["signal"],
            registry=self.metrics,
        )
        self._m_observer_errors = Counter(
            "zhilian_ingest_observer_errors",
            "Sample observer failures other than database errors (their work was rolled back, ingest went on)",
            ["observer"],
            registry=self.metrics,
        )
        self._lock = threading.Lock()
        self._outcomes: TallyCounter[str] = TallyCounter()
        self._rejected: TallyCounter[str] = TallyCounter()
        self._invalid: TallyCounter[str] = TallyCounter()
        self._samples = 0
        self._alerts = 0

    # -- public ---------------------------------------------------------------------------------------------

    def ingest_one(self, claimed_vin: str | None, raw: bytes) -> IngestResult:
        return self.ingest_many([(claimed_vin, raw)])[0]

    def ingest_many(self, items: Sequence[tuple[str | None, bytes]]) -> list[IngestResult]:
        """Process a batch of raw envelopes; one result per item, in order.

        Raises StorageError if the store or the ledger failed: then none of `items` may be acknowledged.
        """
        results: list[IngestResult | None] = [None] * len(items)
        parsed: list[tuple[int, str | None, SignedEnvelope]] = []
        for index, (claimed_vin, raw) in enumerate(items):
            try:
                parsed.append((index, claimed_vin, self._parse(claimed_vin, raw)))
            except _Rejected as rej:
                results[index] = self._reject(rej, claimed_vin)
        # Keys of the whole call at once: one query for what the cache lacks, not one per message.
        keys = self.registry.lookup_keys((p.envelope.vin, p.envelope.key_id) for _, _, p in parsed)
        candidates: list[_Candidate] = []
        for index, claimed_vin, signed in parsed:
            try:
                candidates.append(self._authenticate(index, signed, keys))
            except _Rejected as rej:
                results[index] = self._reject(rej, claimed_vin)
        accepted = self._dedupe_and_decode(candidates, results)
        if accepted:
            self._store(accepted, results)
        out: list[IngestResult] = []
        for r in results:
            assert r is not None
            out.append(r)
        return out

    def add_observer(self, observer: SampleObserver) -> None:
        """Register an observer; call before ingest starts (the list is not locked)."""
        self.observers.append(observer)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "stored": self._outcomes["stored"],
                "duplicate": self._outcomes["duplicate"],
                "samples": self._samples,
                "alerts": self._alerts,
                "rejected": dict(self._rejected),
                "invalid_values": dict(self._invalid),
            }

    # -- steps ----------------------------------------------------------------------------------------------

    def _parse(self, claimed_vin: str | None, raw: bytes) -> SignedEnvelope:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise _Rejected("malformed", "payload is not bytes")
        if len(raw) > MAX_ENVELOPE_BYTES:
            raise _Rejected("oversized", f"{len(raw)} bytes > {MAX_ENVELOPE_BYTES}")
        try:
            signed = parse_envelope(bytes(raw))
        except DecodeError as exc:
            raise _Rejected(exc.reason, str(exc)) from None
        env = signed.envelope
        if env.boot >= _MAX_IDENTITY or env.seq >= _MAX_IDENTITY:
            raise _Rejected("malformed", "boot/seq beyond 2^63")
        if claimed_vin is not None and claimed_vin != env.vin:
            raise _Rejected("vin_mismatch", f"channel says {claimed_vin!r}, envelope says {env.vin!r}")
        return signed

    def _authenticate(
        self, index: int, signed: SignedEnvelope, keys: Mapping[tuple[str, bytes], KeyLookup]
    ) -> _Candidate:
        env = signed.envelope
        # By (vin, key_id): a device may hold several keys while it rotates; unknown_device, unknown_key and
        # revoked_key are told apart before any signature work.
        found = keys[(env.vin, env.key_id)]
        if found.public_key is None:
            raise _Rejected(found.state.value, f"{env.vin} key {env.key_id.hex()}")
        try:
            signed.verify(found.public_key)
        except SignatureError as exc:
            raise _Rejected("bad_signature", str(exc)) from None
        if env.kind not in _ACCEPTED_KINDS:
            raise _Rejected("unsupported_kind", env.kind.name)
        return _Candidate(index, env.vin, env.identity, env.body, env.kind)

    def _dedupe_and_decode(self, candidates: list[_Candidate], results: list[IngestResult | None]) -> list[_Accepted]:
        view = self.ledger.lookup(c.identity for c in candidates)
        in_call: set[Identity] = set()
        accepted: list[_Accepted] = []
        for c in candidates:
            vin, boot, seq = c.identity
            try:
                if c.identity in view.seen or c.identity in in_call:
                    results[c.index] = self._duplicate(vin)
                    continue
                hwm = view.hwm.get((vin, boot))
                if hwm is not None and seq <= hwm - self.replay_window:
                    raise _Rejected("replay", f"seq {seq} below window of hwm {hwm}")
                try:
                    decoded = decode_batch(c.body, self.catalogue)
                except DecodeError as exc:
                    raise _Rejected("bad_body", str(exc)) from None
            except _Rejected as rej:
                results[c.index] = self._reject(rej, vin, c.identity)
                continue
            if decoded.unknown_ids:
                log.warning("unknown signal ids skipped", extra={"vin": vin, "ids": list(decoded.unknown_ids)})
            self._drop_invalid(vin, decoded.batch)
            in_call.add(c.identity)
            accepted.append(_Accepted(c.index, vin, c.identity, decoded.batch, c.kind))
        return accepted

    def _drop_invalid(self, vin: str, batch: Batch) -> None:
        """Out-of-range values become None (counted and logged); the rest of the batch is kept."""
        for name, values in batch.columns.items():
            bad = self.catalogue.by_name(name).invalid_indices(values)
            if not bad:
                continue
            for i in bad:
                values[i] = None
            self._m_invalid.labels(signal=name).inc(len(bad))
            with self._lock:
                self._invalid[name] += len(bad)
            log.warning("invalid values dropped", extra={"vin": vin, "signal": name, "count": len(bad)})

    def _store(self, accepted: list[_Accepted], results: list[IngestResult | None]) -> None:
        # Order matters: time series first, ledger second. A crash in between leaves the rows stored but the
        # message unacknowledged and unrecorded; its redelivery passes dedupe and re-upserts the very same
        # (vin, ts) rows, which merges to the same result. Storage is therefore effectively exactly-once,
        # while the ledger never claims a message whose samples are not durable.
        try:
            self.store.write_many([(a.vin, a.batch) for a in accepted])
        except StorageError:
            log.exception("time-series write failed", extra={"messages": len(accepted)})
            raise
        except Exception as exc:
            log.exception("time-series write failed", extra={"messages": len(accepted)})
            raise StorageError(f"time-series write failed: {exc}") from exc
        entries = [LedgerEntry(a.identity, _count_samples(a.batch)) for a in accepted]
        within = None
        if self.observers:

            def within(session: Session, inserted: set[Identity]) -> None:
                self._observe(session, [a for a in accepted if a.identity in inserted])

        try:
            # Positional `within`: the ledger's signature is (entries, window, now_ms, within).
            lost = self.ledger.commit(entries, self.replay_window, int(time.time() * 1000), within)
        except StorageError:
            log.exception("ledger commit failed", extra={"messages": len(accepted)})
            raise
        committed_s = time.time()
        for a, entry in zip(accepted, entries, strict=True):
            if a.identity in lost:
                # Another worker recorded this message between our lookup and our commit.
                results[a.index] = self._duplicate(a.vin)
                continue
            results[a.index] = IngestResult("stored", None, a.vin, entry.samples)
            if a.batch.timestamps:
                self._m_sample_age.observe(committed_s - a.batch.timestamps[-1] / 1000)
            self._m_messages.labels(outcome="stored", reason="").inc()
            self._m_samples.inc(entry.samples)
            if a.kind is Kind.ALERT:
                self._m_alerts.inc()
            with self._lock:
                self._outcomes["stored"] += 1
                self._samples += entry.samples
                self._alerts += a.kind is Kind.ALERT

    def _observe(self, session: Session, stored: list[_Accepted]) -> None:
        by_vin: dict[str, list[Batch]] = {}
        for a in sorted(stored, key=lambda a: (a.vin, a.batch.timestamps[0] if a.batch.timestamps else 0, a.identity)):
            if a.kind is Kind.TELEMETRY and a.batch.timestamps:
                by_vin.setdefault(a.vin, []).append(a.batch)
        if not by_vin:
            return
        for observer in self.observers:
            try:
                with session.begin_nested():
                    self._run_observer(session, observer, by_vin)
                continue
            except (SQLAlchemyError, StorageError):
                raise
            except Exception:
                log.warning(
                    "sample observer failed on a call; running it vehicle by vehicle",
                    extra={"observer": type(observer).__name__, "vehicles": len(by_vin)},
                    exc_info=True,
                )
            # The slow path, after a bug: vehicle by vehicle, so only the one it fails on loses this observer's work.
            discard = getattr(observer, "discard", None)
            if discard is not None:
                discard(session)
            for vin, batches in by_vin.items():
                try:
                    with session.begin_nested():
                        self._run_observer(session, observer, {vin: batches})
                except (SQLAlchemyError, StorageError):
                    raise
                except Exception:
                    self._observer_failed(observer, vin)
                    if discard is not None:
                        discard(session)

    @staticmethod
    def _run_observer(session: Session, observer: SampleObserver, by_vin: Mapping[str, Sequence[Batch]]) -> None:
        prepare = getattr(observer, "prepare", None)
        if prepare is not None:
            prepare(session, by_vin)
        for vin, batches in by_vin.items():
            for batch in batches:
                observer.observe(session, vin, batch)
        finish = getattr(observer, "finish", None)
        if finish is not None:
            finish(session)

    def _observer_failed(self, observer: SampleObserver, vin: str) -> None:
        name = type(observer).__name__
        self._m_observer_errors.labels(observer=name).inc()
        log.exception("sample observer failed; its work was rolled back", extra={"vin": vin, "observer": name})

    # -- bookkeeping ----------------------------------------------------------------------------------------

    def _reject(self, rej: _Rejected, vin: str | None, identity: Identity | None = None) -> IngestResult:
        self._m_messages.labels(outcome="rejected", reason=rej.reason).inc()
        with self._lock:
            self._rejected[rej.reason] += 1
        log.warning(
            "message rejected",
            extra={"reason": rej.reason, "vin": vin, "identity": identity, "detail": str(rej)[:200]},
        )
        return IngestResult("rejected", rej.reason, vin, 0)

    def _duplicate(self, vin: str) -> IngestResult:
        self._m_messages.labels(outcome="duplicate", reason="").inc()
        with self._lock:
            self._outcomes["duplicate"] += 1
        log.info("duplicate message", extra={"vin": vin})
        return IngestResult("duplicate", None, vin, 0)


def _count_samples(batch: Batch) -> int:
    """Samples = rows of the batch (one timestamp each), whatever the number of signals sampled at that instant."""
    return len(batch.timestamps)
