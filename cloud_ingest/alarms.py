"""Hazard alarms: the rule engine wired into ingest, persisted rule state, the rectification workflow.

`AlarmService` is a `SampleObserver` of the ingest pipeline (cloud_ingest/pipeline.py). For each stored telemetry
batch it runs the rule engine (cloud_ingest/rules/) on the vehicle's samples, in time order, inside the ledger's
transaction, and writes in that same transaction: the vehicle's exported rule state (`rule_state`), the alarm
changes the events imply (`alarms`, `alarm_transitions`) and their notifications (`alarm_outbox`, notify.py).
Either all of it commits with the ledger entry or none of it does, so a crash or a redelivery neither raises an
alarm twice nor misses one: a duplicate is not observed again, and an uncommitted batch is evaluated again from
the state persisted before it.

Rule state. The database row is authoritative; the engine's in-memory state is a cache of it. Each row has a
`version`; the service remembers which version its cached state equals, but only once the transaction that wrote
it committed (an after_commit hook — a rolled-back or retried transaction leaves the cache untrusted). Loading a
vehicle reads its row with SELECT ... FOR UPDATE (PostgreSQL: a row lock held until commit; SQLite: the ledger's
transaction already holds the database's write lock), restores the state if the version differs from the
cached one, and saving (once per vehicle and transaction, when it or the observer's savepoint commits) is
`UPDATE ... WHERE version = <loaded>`: two bridge workers can therefore never interleave
one VIN's batches — the second waits for the first's commit and then sees its version, and should the lock ever
be missing the version check fails the transaction (`RuleStateConflict`, a StorageError: nothing acknowledged,
redelivered, evaluated again on the new state). The cache is bounded (`max_cached_vehicles`, least recently used
out).

Time-based rules (offline) run on a supervised periodic task (`tick_interval_s`, bounded). Every save of a
vehicle's state also stores when its time-based rules may next change something (`next_tick_ms`: the instant its
silence crosses the next offline level, or moves an open alarm's peak by a step; RuleEngine.next_tick_ms); a round
ticks only the vehicles that are due, on a separate scratch engine restored from their rows, and saves them in a
transaction that re-checks the version (a vehicle that just reported is not offline). A silent fleet therefore
costs a round what is due in it, not a tick of every quiet vehicle. The same task escalates alarms whose deadline
passed.

Workflow (explicit table `MANUAL_TRANSITIONS`; anything else is refused with the reason):

    DETECTED → ACKNOWLEDGED → RECTIFYING → VERIFIED → CLOSED        (operators)
    VERIFIED → RECTIFYING                                          (verification failed)
    DETECTED | ACKNOWLEDGED | RECTIFYING | REOPENED → ESCALATED     (system: deadline passed, once per deadline)
    ESCALATED → ACKNOWLEDGED | RECTIFYING | VERIFIED                (operators pick it up where it stood)
    VERIFIED | CLOSED → REOPENED → ACKNOWLEDGED                     (system: the condition returned)

- One alarm per (vehicle, rule) that is not CLOSED (a partial unique index enforces it). An engine `raised` for a
  rule with such an alarm does not open another: if it is VERIFIED the fix did not hold and it is REOPENED; in any
  other state the returning condition is part of the incident being worked on (its `cleared_ms` is reset).
  Without one, the newest CLOSED alarm of that (vehicle, rule) is REOPENED if it closed within
  `reopen_window_s`, else a new alarm is DETECTED.
- `escalated` (a higher level) raises the alarm's level and shortens its deadline to the new level's if that is
  sooner; `escalated`/`updated` move the peak (the worst metric seen, in the rule's direction) and `peak_ms`.
- `cleared` records `cleared_ms` (the clear time in vehicle time); the workflow still needs people: VERIFIED is
  refused while the condition persists (no `cleared_ms`), and only a VERIFIED alarm can be CLOSED.
- Deadlines per level (`deadlines_s`, default L3 1 h, L2 24 h, L1 7 d) run on the service's clock from detection
  (or reopening); when one passes the alarm becomes ESCALATED once.
- Every change of state is recorded in `alarm_transitions` (who, when, from, to, note); the rules' and the deadline's
  own changes are by `system:rules` and `system:deadline`.

Notifications (notify.py), queued in the transaction of the change: `raised` (new or reopened), `escalated` (a
higher level), `cleared`, `transitioned` (an operator's or the deadline's state change). `updated` (peak) is not
pushed: it is frequent and the next notification carries the peak. Every process that ingests or serves the API
must be configured with the same channels, since the process that decides a change queues its notifications.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.orm.exc import StaleDataError

from cloud_ingest import sqltext
from cloud_ingest.commands import VehicleStatusRow
from cloud_ingest.db import SQLITE_BEGIN_OPTION, Base, Device, VehicleProfile
from cloud_ingest.errors import IngestError, StorageError
from cloud_ingest.notify import Notifier
from cloud_ingest.rules import (
    RULES,
    AlarmEvent,
    ApprovedBattery,
    EventKind,
    FactoryControllerConfig,
    RuleEngine,
    RuleStateError,
    VehicleContext,
)
from cloud_ingest.rules.context import ZoneLookup
from protocol.batch import Batch

log = logging.getLogger("zhilian.alarms")

MAX_LIST = 1000
MAX_NOTE = 1000
MAX_ASSIGNEE = 100
SYSTEM_RULES = "system:rules"
SYSTEM_DEADLINE = "system:deadline"
_TXN_KEY = "zhilian.alarms.txn"  # Session.info: the vehicles this transaction loaded, with their row versions
_OPEN_KEY = "zhilian.alarms.open"  # Session.info: (vin, rule) -> the alarm row that is not CLOSED (or None)
_HOOKED_KEY = "zhilian.alarms.hooked"


class AlarmState(enum.StrEnum):
    DETECTED = "DETECTED"
    ACKNOWLEDGED = "ACKNOWLEDGED"
    RECTIFYING = "RECTIFYING"
    VERIFIED = "VERIFIED"
    CLOSED = "CLOSED"
    ESCALATED = "ESCALATED"
    REOPENED = "REOPENED"


S = AlarmState
# What operators may do. Everything else — including the system-only targets below — is refused.
MANUAL_TRANSITIONS: Mapping[AlarmState, frozenset[AlarmState]] = {
    S.DETECTED: frozenset({S.ACKNOWLEDGED}),
    S.ACKNOWLEDGED: frozenset({S.RECTIFYING}),
    S.RECTIFYING: frozenset({S.VERIFIED}),
    S.VERIFIED: frozenset({S.CLOSED, S.RECTIFYING}),
    S.ESCALATED: frozenset({S.ACKNOWLEDGED, S.RECTIFYING, S.VERIFIED}),
    S.REOPENED: frozenset({S.ACKNOWLEDGED}),
    S.CLOSED: frozenset(),
}
# What the system does: the deadline escalates, a returning condition reopens.
ESCALATABLE = frozenset({S.DETECTED, S.ACKNOWLEDGED, S.RECTIFYING, S.REOPENED})
REOPENABLE = frozenset({S.VERIFIED, S.CLOSED})
SYSTEM_ONLY = frozenset({S.DETECTED, S.ESCALATED, S.REOPENED})


def manual_transition_error(current: AlarmState, target: AlarmState, condition_cleared: bool) -> str | None:
    """Why an operator may not move an alarm from `current` to `target` (None: they may)."""
    if target is current:
        return f"the alarm is already {current.value}"
    if target in SYSTEM_ONLY:
        return f"{target.value} is set by the system only (detection, deadline escalation, a returning condition)"
    allowed = MANUAL_TRANSITIONS[current]
    if target not in allowed:
        if not allowed:
            return f"a {current.value} alarm is final; it reopens by itself if its condition returns"
        names = ", ".join(sorted(s.value for s in allowed))
        return f"{current.value} → {target.value} is not allowed; from {current.value} only: {names}"
    if target is S.VERIFIED and not condition_cleared:
        return "cannot verify while the condition persists: the rule has not cleared it yet"
    return None


class AlarmError(IngestError):
    """An alarm request that cannot be carried out as asked."""


class UnknownAlarmError(AlarmError):
    pass


class UnknownVehicleError(AlarmError):
    pass


class IllegalTransitionError(AlarmError):
    pass


class ConcurrentChangeError(AlarmError):
    """The alarm changed between reading and writing it (another operator, the rules); retry."""


class RuleStateConflict(StorageError):
    """A vehicle's rule state changed under us (another worker's commit): the whole transaction must be retried."""


# --- tables --------------------------------------------------------------------------------------------------


class RuleStateRow(Base):
    """A vehicle's exported rule-engine state; `version` orders writes (see the module docstring)."""

    __tablename__ = "rule_state"
    __table_args__ = (Index("ix_rule_state_last_ts", "last_ts"), Index("ix_rule_state_next_tick_ms", "next_tick_ms"))

    vin: Mapped[str] = mapped_column(String(32), primary_key=True)
    state_json: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(BigInteger)
    last_ts: Mapped[int | None] = mapped_column(BigInteger, default=None)  # newest sample (vehicle time)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # When the time-based rules may next change something (RuleEngine.next_tick_ms); NULL: not before it reports.
    next_tick_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)


_STATES_SQL = ", ".join(f"'{s.value}'" for s in AlarmState)


class AlarmRow(Base):
    __tablename__ = "alarms"
    __table_args__ = (
        CheckConstraint(f"state IN ({_STATES_SQL})", name="ck_alarms_state"),
        CheckConstraint("level BETWEEN 1 AND 3", name="ck_alarms_level"),
        Index("ix_alarms_vin_rule", "vin", "rule"),
        Index("ix_alarms_state_deadline", "state", "deadline_ms"),
        Index("ix_alarms_opened_ms", "opened_ms"),
        Index(
            "uq_alarms_open",
            "vin",
            "rule",
            unique=True,
            sqlite_where=text("state <> 'CLOSED'"),
            postgresql_where=text("state <> 'CLOSED'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vin: Mapped[str] = mapped_column(String(32))
    rule: Mapped[str] = mapped_column(String(64))
    level: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    opened_ms: Mapped[int] = mapped_column(BigInteger)  # when the rule raised it (vehicle time)
    last_ms: Mapped[int] = mapped_column(BigInteger)  # its newest rule event (vehicle time)
    cleared_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)  # the rule cleared it (vehicle time)
    value: Mapped[float | None] = mapped_column(Float, default=None)
    peak: Mapped[float | None] = mapped_column(Float, default=None)
    peak_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    detail_json: Mapped[str] = mapped_column(Text, default="{}")
    assignee: Mapped[str | None] = mapped_column(String(MAX_ASSIGNEE), default=None)
    deadline_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)  # service clock
    escalated_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    closed_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    reopen_count: Mapped[int] = mapped_column(Integer, default=0)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # Optimistic lock: every UPDATE checks and bumps it (StaleDataError when someone else changed the row).
    version: Mapped[int] = mapped_column(Integer)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012  (SQLAlchemy's declarative hook, read once)


class AlarmTransitionRow(Base):
    __tablename__ = "alarm_transitions"
    __table_args__ = (Index("ix_alarm_transitions_alarm_id", "alarm_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alarm_id: Mapped[int] = mapped_column(Integer, ForeignKey("alarms.id"))
    at_ms: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(100))
    from_state: Mapped[str | None] = mapped_column(String(16), default=None)
    to_state: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(String(MAX_NOTE), default=None)


# --- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransitionRecord:
    at_ms: int
    actor: str
    from_state: str | None
    to_state: str
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_ms": self.at_ms,
            "actor": self.actor,
            "from": self.from_state,
            "to": self.to_state,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class AlarmRecord:
    id: int
    vin: str
    rule: str
    level: int
    state: str
    opened_ms: int
    last_ms: int
    cleared_ms: int | None
    closed_ms: int | None
    value: float | None
    peak: float | None
    peak_ms: int | None
    detail: dict[str, Any]
    assignee: str | None
    deadline_ms: int | None
    escalated_ms: int | None
    reopen_count: int
    created_ms: int
    updated_ms: int
    version: int
    transitions: tuple[TransitionRecord, ...] = ()

    @classmethod
    def of(cls, row: AlarmRow, transitions: Sequence[AlarmTransitionRow] = ()) -> AlarmRecord:
        return cls(
            id=row.id,
            vin=row.vin,
            rule=row.rule,
            level=row.level,
            state=row.state,
            opened_ms=row.opened_ms,
            last_ms=row.last_ms,
            cleared_ms=row.cleared_ms,
            closed_ms=row.closed_ms,
            value=row.value,
            peak=row.peak,
            peak_ms=row.peak_ms,
            detail=json.loads(row.detail_json),
            assignee=row.assignee,
            deadline_ms=row.deadline_ms,
            escalated_ms=row.escalated_ms,
            reopen_count=row.reopen_count,
            created_ms=row.created_ms,
            updated_ms=row.updated_ms,
            version=row.version,
            transitions=tuple(
                TransitionRecord(t.at_ms, t.actor, t.from_state, t.to_state, t.note) for t in transitions
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The notification payload's `alarm` (without the audit trail)."""
        return {
            "id": self.id,
            "vin": self.vin,
            "rule": self.rule,
            "level": self.level,
            "state": self.state,
            "opened_ms": self.opened_ms,
            "last_ms": self.last_ms,
            "cleared_ms": self.cleared_ms,
            "closed_ms": self.closed_ms,
            "value": self.value,
            "peak": self.peak,
            "peak_ms": self.peak_ms,
            "detail": self.detail,
            "assignee": self.assignee,
            "deadline_ms": self.deadline_ms,
            "escalated_ms": self.escalated_ms,
            "reopen_count": self.reopen_count,
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class AlarmFilter:
    vin: str | None = None
    rule: str | None = None
    level: int | None = None
    state: AlarmState | None = None
    from_ms: int | None = None  # opened at or after
    to_ms: int | None = None  # opened at or before
    limit: int = 100
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Profile:
    """A vehicle's rule-context facts (the `vehicle_profile` row); every field optional but the interval."""

    model: str | None = None
    variant: str | None = None
    chemistry: str | None = None
    battery_barcodes: tuple[str, ...] = ()
    battery_capacity_ah: float | None = None
    battery_cell_count: int | None = None
    battery_manufactured_ms: int | None = None
    battery_service_life_years: float | None = None
    speed_limit_kmh: float | None = None
    wheel_inch: float | None = None
    locked: bool | None = None  # None: as the vehicle's status reports it
    reporting_interval_s: float = 5.0

    @classmethod
    def of(cls, row: VehicleProfile) -> Profile:
        return cls(
            model=row.model,
            variant=row.variant,
            chemistry=row.chemistry,
            battery_barcodes=tuple(json.loads(row.battery_barcodes_json)),
            battery_capacity_ah=row.battery_capacity_ah,
            battery_cell_count=row.battery_cell_count,
            battery_manufactured_ms=row.battery_manufactured_ms,
            battery_service_life_years=row.battery_service_life_years,
            speed_limit_kmh=row.speed_limit_kmh,
            wheel_inch=row.wheel_inch,
            locked=row.locked,
            reporting_interval_s=row.reporting_interval_s,
        )

    def context(self, status_locked: bool, zones_at: ZoneLookup) -> VehicleContext:
        battery = None
        if (
            self.battery_barcodes
            or self.battery_capacity_ah is not None
            or self.battery_cell_count is not None
            or self.battery_manufactured_ms is not None
            or self.battery_service_life_years is not None
        ):
            battery = ApprovedBattery(
                frozenset(self.battery_barcodes),
                self.battery_capacity_ah,
                self.battery_cell_count,
                self.battery_manufactured_ms,
                self.battery_service_life_years,
            )
        controller = None
        if self.speed_limit_kmh is not None or self.wheel_inch is not None:
            controller = FactoryControllerConfig(self.speed_limit_kmh, self.wheel_inch)
        return VehicleContext(
            model=self.model,
            chemistry=self.chemistry,
            battery=battery,
            controller=controller,
            locked=self.locked if self.locked is not None else status_locked,
            reporting_interval_s=self.reporting_interval_s,
            zones_at=zones_at,
        )


# --- configuration -------------------------------------------------------------------------------------------


def _default_deadlines() -> dict[int, float]:
    return {3: 3600.0, 2: 86_400.0, 1: 7 * 86_400.0}


@dataclass(frozen=True, slots=True)
class AlarmsConfig:
    deadlines_s: Mapping[int, float] = field(default_factory=_default_deadlines)
    reopen_window_s: float = 7 * 86_400.0
    tick_interval_s: float = 5.0  # a due vehicle's offline alarm comes at most this late
    tick_page: int = 500
    context_ttl_s: float = 10.0
    max_cached_vehicles: int = 50_000

    def __post_init__(self) -> None:
        if set(self.deadlines_s) != {1, 2, 3} or not all(0 < v < 10 * 365 * 86_400 for v in self.deadlines_s.values()):
            raise ValueError("deadlines_s needs a positive deadline for each level 1, 2, 3")
        if not 0.05 <= self.tick_interval_s <= 300:
            raise ValueError("tick_interval_s must be in [0.05, 300]")
        if self.reopen_window_s < 0 or self.tick_page < 1 or self.max_cached_vehicles < 1:
            raise ValueError("tick_page and max_cached_vehicles must be positive, reopen_window_s >= 0")

    def deadline_ms(self, level: int) -> int:
        return int(self.deadlines_s[level] * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _no_zones(lat: float, lon: float) -> frozenset[str]:
    return frozenset()


def _json_safe(value: Any) -> Any:
    """Rule details may carry inf/nan (a ratio over zero); JSON bodies must not."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _coalesce(events: Sequence[AlarmEvent]) -> list[AlarmEvent]:
    """Drop an `updated` event when the next event of the same alarm is another `updated`: within one batch only
    the last of a run changes what is stored (value, peak, its time), and each costs a row write."""
    out: list[AlarmEvent] = []
    for i, ev in enumerate(events):
        if ev.kind is EventKind.UPDATED:
            following = next((e for e in events[i + 1 :] if e.rule == ev.rule), None)
            if following is not None and following.kind is EventKind.UPDATED:
                continue
        out.append(ev)
    return out


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


_IN_CHUNK = 500  # VINs per IN (...) list: far below SQLite's and PostgreSQL's bound-parameter limits
# The rule-state statements of every ingest call are plain SQL (cloud_ingest/sqltext.py): the versioned save is
# executed for many vehicles at once (executemany); its WHERE takes the version the transaction checked out.
_INSERT_STATE = (
    "INSERT INTO rule_state (vin, state_json, version, last_ts, updated_ms, next_tick_ms) VALUES ({m}, {m}, 1, {m}, "
    "{m}, {m})"
)
_UPDATE_STATE = (
    "UPDATE rule_state SET state_json = {m}, version = version + 1, last_ts = {m}, updated_ms = {m}, "
    "next_tick_ms = {m} WHERE vin = {m} AND version = {m}"
)


_NO_PROFILE = Profile()


@dataclass(slots=True)
class _Loaded:
    """A vehicle checked out by one transaction: its row version (None: no row yet) and its context."""

    version: int | None
    ctx: VehicleContext
    dirty: bool = False  # evaluated since the last save


# --- the service ---------------------------------------------------------------------------------------------


class AlarmService:
    """Rule evaluation inside ingest, the alarm workflow, vehicle profiles. Thread-safe."""

    def __init__(
        self,
        engine: Engine,
        rules: RuleEngine,
        notifier: Notifier | None = None,
        config: AlarmsConfig | None = None,
        zones_at: ZoneLookup | None = None,
        clock: Callable[[], int] | None = None,
        metrics: CollectorRegistry | None = None,
        tick_rules: RuleEngine | None = None,
    ) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        mark = sqltext.marker(engine)
        self._mark = mark
        self._insert_state = _INSERT_STATE.format(m=mark)
        self._update_state = _UPDATE_STATE.format(m=mark)
        self._for_update = sqltext.for_update(engine)
        self.rules = rules
        # Ticks run on a scratch engine of their own (same rules): they never touch the ingest cache.
        self._tick_rules = tick_rules if tick_rules is not None else RuleEngine(rules.config, rules.catalogue)
        self.notifier = notifier
        self.config = config or AlarmsConfig()
        self.zones_at: ZoneLookup = zones_at if zones_at is not None else _no_zones
        self.clock = clock if clock is not None else _now_ms
        self._lock = threading.Lock()  # the ingest engine and the caches below
        # vin -> rule_state version the ingest engine's state equals (only versions whose transaction committed).
        self._committed: OrderedDict[str, int] = OrderedDict()
        self._checked_out: dict[str, int] = {}  # vins loaded by open transactions (never evicted meanwhile)
        self._contexts: dict[str, tuple[float, VehicleContext]] = {}
        reg = metrics if metrics is not None else CollectorRegistry()
        self._m_events = Counter("zhilian_alarm_rule_events", "rule engine events applied", ["kind"], registry=reg)
        self._m_restores = Counter(
            "zhilian_alarm_state_restores", "rule states loaded from the database (cache misses)", registry=reg
        )
        self._m_bad_state = Counter(
            "zhilian_alarm_state_unreadable", "persisted rule states that could not be restored (reset)", registry=reg
        )
        self._m_tick_errors = Counter(
            "zhilian_alarm_tick_errors", "periodic alarm task rounds that failed", registry=reg
        )
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick_rounds = 0
        self.tick_errors = 0

    # -- the observer (inside the ingest transaction) ---------------------------------------------------------

    def prepare(self, session: Session, by_vin: Mapping[str, Sequence[Batch]]) -> None:
        """Check out all of an ingest call's vehicles at once (a few statements, not a few per vehicle)."""
        txn = self._txn(session)
        todo = [vin for vin in by_vin if vin not in txn]
        if todo:
            txn.update(self._load_many(session, todo))

    def discard(self, session: Session) -> None:
        """The pipeline rolled back this observer's savepoint: nothing it evaluated in this transaction counts."""
        txn: dict[str, _Loaded] = session.info.pop(_TXN_KEY, {})
        session.info.pop(_OPEN_KEY, None)
        with self._lock:
            for vin in txn:
                self._release(vin)
                self._committed.pop(vin, None)

    def observe(self, session: Session, vin: str, batch: Batch) -> None:
        txn = self._txn(session)
        loaded = txn.get(vin)
        try:
            if loaded is None:
                loaded = txn[vin] = self._load_many(session, [vin])[vin]
            with self._lock:
                events = self.rules.evaluate_batch(vin, loaded.ctx, batch)
            loaded.dirty = True  # saved once per vehicle and transaction, by `_before_commit`
            now = self.clock()
            for ev in _coalesce(events):
                self._apply(session, ev, now)
        except BaseException:
            # Whatever this transaction did to the vehicle's state must not be trusted later (the pipeline rolls
            # back this observer's savepoint, so the alarm rows it cached are gone too).
            checked_out = txn.pop(vin, None) is not None
            session.info.pop(_OPEN_KEY, None)
            with self._lock:
                if checked_out:
                    self._release(vin)
                self._committed.pop(vin, None)
            raise

    def _txn(self, session: Session) -> dict[str, _Loaded]:
        if not session.info.get(_HOOKED_KEY):
            session.info[_HOOKED_KEY] = True
            # Not `once`: SQLAlchemy fires these for SAVEPOINTs too (the pipeline's per-observer ones); the
            # handlers act on the outermost transaction only.
            event.listen(session, "before_commit", self._before_commit)
            event.listen(session, "after_commit", self._after_commit)
            event.listen(session, "after_rollback", self._after_rollback)
        return cast(dict[str, _Loaded], session.info.setdefault(_TXN_KEY, {}))

    def _before_commit(self, session: Session) -> None:
        """Persist the state of every vehicle evaluated since the last save, inside the transaction (or the
        savepoint) being committed: one write per vehicle however many of its batches one ingest call carried, in
        two statements for all of them (new rows, updated rows)."""
        txn: dict[str, _Loaded] = session.info.get(_TXN_KEY, {})
        dirty = sorted((vin, loaded) for vin, loaded in txn.items() if loaded.dirty)
        if not dirty:
            return
        states = []
        with self._lock:
            for vin, loaded in dirty:
                last_ts = self.rules.state(vin).last_ts
                next_tick = self.rules.next_tick_ms(vin, loaded.ctx, last_ts if last_ts is not None else 0)
                states.append((vin, loaded, self.rules.export_json(vin), last_ts, next_tick))
        self._save_many(session, states)
        for _vin, loaded in dirty:
            loaded.dirty = False

    def _after_commit(self, session: Session) -> None:
        if session.in_nested_transaction():
            return
        session.info.pop(_OPEN_KEY, None)
        txn: dict[str, _Loaded] = session.info.pop(_TXN_KEY, {})
        with self._lock:
            for vin, loaded in txn.items():
                self._release(vin)
                if loaded.version is not None:
                    self._committed[vin] = loaded.version
                    self._committed.move_to_end(vin)
            self._evict()

    def _after_rollback(self, session: Session) -> None:
        if session.in_nested_transaction():
            return  # another observer's savepoint; this one's own failures are handled in `observe`
        session.info.pop(_OPEN_KEY, None)
        txn: dict[str, _Loaded] = session.info.pop(_TXN_KEY, {})
        with self._lock:
            for vin in txn:
                self._release(vin)
                self._committed.pop(vin, None)

    def _release(self, vin: str) -> None:
        n = self._checked_out.get(vin, 0) - 1
        if n > 0:
            self._checked_out[vin] = n
        else:
            self._checked_out.pop(vin, None)

    def _evict(self) -> None:
        excess = len(self._committed) - self.config.max_cached_vehicles
        if excess <= 0:
            return  # the common case, after every commit: no copy of a fleet-sized list of VINs
        for vin in list(self._committed)[:excess]:
            if vin not in self._checked_out:
                del self._committed[vin]
                self.rules.forget(vin)

    def _load_many(self, session: Session, vins: Sequence[str]) -> dict[str, _Loaded]:
        """Check vehicles out for this transaction: lock their state rows (in VIN order, as every worker does), and
        bring the ingest engine's state to each unless the cache already equals that committed version."""
        order = sorted(vins)
        versions: dict[str, int] = {}
        conn = session.connection()
        for chunk in sqltext.chunks(order, _IN_CHUNK):
            sql = (
                f"SELECT vin, version FROM rule_state WHERE vin IN ({sqltext.marks(len(chunk), self._mark)}) "
                f"ORDER BY vin{self._for_update}"
            )
            versions.update((vin, version) for vin, version in conn.exec_driver_sql(sql, tuple(chunk)))
        contexts = self._contexts_for(session, order)
        stale: list[str] = []
        with self._lock:
            for vin in order:
                version = versions.get(vin)
                if version is None or self._committed.get(vin) != version:
                    if version is None:
                        self.rules.forget(vin)
                    else:
                        stale.append(vin)
                # From here the engine's state runs ahead of what committed.
                self._committed.pop(vin, None)
        for chunk in sqltext.chunks(stale, _IN_CHUNK):
            saved = session.execute(
                select(RuleStateRow.vin, RuleStateRow.state_json).where(RuleStateRow.vin.in_(chunk))
            ).all()
            for vin, state_json in saved:
                self._restore(self.rules, vin, state_json, under_lock=True)
        with self._lock:
            for vin in order:  # not evicted until their commit or rollback
                self._checked_out[vin] = self._checked_out.get(vin, 0) + 1
        return {vin: _Loaded(versions.get(vin), contexts[vin]) for vin in order}

    def _restore(self, rules: RuleEngine, vin: str, saved: str, under_lock: bool) -> None:
        self._m_restores.inc()
        try:
            data = json.loads(saved)
            if under_lock:
                with self._lock:
                    rules.restore_state(vin, data)
            else:
                rules.restore_state(vin, data)
        except (ValueError, RuleStateError) as exc:
            # A state this version cannot read (corrupt, or written by an incompatible release): start the vehicle
            # afresh rather than block its ingest forever. Open alarms stay in the alarms table.
            self._m_bad_state.inc()
            log.error("unreadable rule state; vehicle restarts from empty", extra={"vin": vin, "error": str(exc)})
            rules.forget(vin)

    def _save_many(
        self, session: Session, states: Sequence[tuple[str, _Loaded, str | None, int | None, int | None]]
    ) -> None:
        """Write vehicles' states (vin, checked-out version, exported state as JSON, newest sample, next tick due)."""
        now = self.clock()
        fresh: list[tuple[Any, ...]] = []
        bumped: list[tuple[Any, ...]] = []
        for vin, loaded, state, last_ts, next_tick in states:
            assert state is not None
            if loaded.version is None:
                fresh.append((vin, state, last_ts, now, next_tick))
            else:
                bumped.append((state, last_ts, now, next_tick, vin, loaded.version))
        conn = session.connection()
        if fresh:
            conn.exec_driver_sql(self._insert_state, fresh)
        if bumped:
            if conn.dialect.supports_sane_multi_rowcount:
                done = conn.exec_driver_sql(self._update_state, bumped).rowcount
            else:
                done = sum(conn.exec_driver_sql(self._update_state, p).rowcount for p in bumped)
            if done != len(bumped):
                raise RuleStateConflict(
                    f"rule state of {len(bumped) - done} of {len(bumped)} vehicles changed under their version"
                )
        for _vin, loaded, _state, _ts, _next in states:
            loaded.version = 1 if loaded.version is None else loaded.version + 1

    # -- vehicle context --------------------------------------------------------------------------------------

    def _contexts_for(self, session: Session, vins: Sequence[str]) -> dict[str, VehicleContext]:
        """Each vehicle's rule context, from the cache while fresh, else from its profile (and, unless the profile
        says, its last status's lock flag): two statements for all the misses."""
        now = time.monotonic()
        out: dict[str, VehicleContext] = {}
        missing: list[str] = []
        for vin in vins:
            cached = self._contexts.get(vin)
            if cached is not None and cached[0] > now:
                out[vin] = cached[1]
            else:
                missing.append(vin)
        profiles: dict[str, Profile] = {}
        status_locked: set[str] = set()
        for chunk in sqltext.chunks(missing, _IN_CHUNK):
            for row in session.scalars(select(VehicleProfile).where(VehicleProfile.vin.in_(chunk))):
                profiles[row.vin] = Profile.of(row)
            ask = [vin for vin in chunk if profiles.get(vin, _NO_PROFILE).locked is None]
            if ask:
                for vin, metrics_json in session.execute(
                    select(VehicleStatusRow.vin, VehicleStatusRow.metrics_json).where(VehicleStatusRow.vin.in_(ask))
                ).all():
                    if metrics_json is not None and json.loads(metrics_json).get("locked") is True:
                        status_locked.add(vin)
        if missing:
            with self._lock:
                if len(self._contexts) + len(missing) > self.config.max_cached_vehicles:
                    self._contexts.clear()  # rare; cheaper than an LRU on this hot path
                for vin in missing:
                    ctx = profiles.get(vin, _NO_PROFILE).context(vin in status_locked, self.zones_at)
                    self._contexts[vin] = (now + self.config.context_ttl_s, ctx)
                    out[vin] = ctx
        return out

    def get_profile(self, vin: str) -> Profile | None:
        try:
            with Session(self.engine) as session:
                if session.get(Device, vin) is None:
                    raise UnknownVehicleError(vin)
                row = session.get(VehicleProfile, vin)
                return Profile.of(row) if row is not None else None
        except SQLAlchemyError as exc:
            raise StorageError(f"vehicle profile: {exc}") from exc

    def put_profile(self, vin: str, profile: Profile) -> Profile:
        values = {
            "model": profile.model,
            "variant": profile.variant,
            "chemistry": profile.chemistry,
            "battery_barcodes_json": json.dumps(sorted(set(profile.battery_barcodes))),
            "battery_capacity_ah": profile.battery_capacity_ah,
            "battery_cell_count": profile.battery_cell_count,
            "battery_manufactured_ms": profile.battery_manufactured_ms,
            "battery_service_life_years": profile.battery_service_life_years,
            "speed_limit_kmh": profile.speed_limit_kmh,
            "wheel_inch": profile.wheel_inch,
            "locked": profile.locked,
            "reporting_interval_s": profile.reporting_interval_s,
            "updated_ms": self.clock(),
        }
        try:
            with Session(self._write_engine) as session, session.begin():
                if session.get(Device, vin) is None:
                    raise UnknownVehicleError(vin)
                row = session.get(VehicleProfile, vin)
                if row is None:
                    session.add(VehicleProfile(vin=vin, **values))
                else:
                    for k, v in values.items():
                        setattr(row, k, v)
        except SQLAlchemyError as exc:
            raise StorageError(f"vehicle profile: {exc}") from exc
        with self._lock:
            self._contexts.pop(vin, None)
        log.info("vehicle profile set", extra={"vin": vin})
        got = self.get_profile(vin)
        assert got is not None
        return got

    # -- applying rule events ---------------------------------------------------------------------------------

    def _apply(self, session: Session, ev: AlarmEvent, now: int) -> None:
        self._m_events.labels(kind=ev.kind.value).inc()
        # The open alarm of (vin, rule), looked up once per transaction: a busy vehicle's rules may emit many
        # events in one ingest call.
        open_rows: dict[tuple[str, str], AlarmRow | None] = session.info.setdefault(_OPEN_KEY, {})
        key = (ev.vin, ev.rule)
        if key in open_rows:
            row = open_rows[key]
        else:
            row = session.execute(
                select(AlarmRow)
                .where(AlarmRow.vin == ev.vin, AlarmRow.rule == ev.rule, AlarmRow.state != S.CLOSED.value)
                .with_for_update()
            ).scalar_one_or_none()
        self._apply_to(session, row, ev, now)

    def _apply_to(self, session: Session, row: AlarmRow | None, ev: AlarmEvent, now: int) -> None:
        open_rows: dict[tuple[str, str], AlarmRow | None] = session.info[_OPEN_KEY]
        key = (ev.vin, ev.rule)
        open_rows[key] = row
        level = int(ev.level)
        if ev.kind is EventKind.CLEARED:
            if row is None:
                log.warning("rule cleared an alarm that is not open", extra={"vin": ev.vin, "rule": ev.rule})
                return
            row.cleared_ms = ev.ts_ms
            self._touch(row, ev, now)
            self._notify(session, row, "cleared")
            return
        if row is None or ev.kind is EventKind.RAISED:
            # An escalation or update without an open alarm means the two lost step (e.g. the alarm was closed
            # by hand while the rule still held it): the condition is there, so it counts as raised.
            row = open_rows[key] = self._raise(session, row, ev, now)
            self._notify(session, row, "raised")
            return
        self._raise_level(row, level, now)
        self._touch(row, ev, now)
        if ev.kind is EventKind.ESCALATED:
            self._notify(session, row, "escalated")

    def _raise(self, session: Session, row: AlarmRow | None, ev: AlarmEvent, now: int) -> AlarmRow:
        level = int(ev.level)
        if row is None:
            closed = session.execute(
                select(AlarmRow)
                .where(
                    AlarmRow.vin == ev.vin,
                    AlarmRow.rule == ev.rule,
                    AlarmRow.state == S.CLOSED.value,
                    AlarmRow.closed_ms >= now - int(self.config.reopen_window_s * 1000),
                )
                .order_by(AlarmRow.closed_ms.desc(), AlarmRow.id.desc())
                .limit(1)
                .with_for_update()
            ).scalar_one_or_none()
            if closed is None:
                row = AlarmRow(
                    vin=ev.vin,
                    rule=ev.rule,
                    level=level,
                    state=S.DETECTED.value,
                    opened_ms=ev.raised_ms,
                    last_ms=ev.ts_ms,
                    value=_finite(ev.value),
                    peak=_finite(ev.peak),
                    peak_ms=ev.ts_ms if ev.peak is not None else None,
                    detail_json=json.dumps(_json_safe(dict(ev.detail))),
                    deadline_ms=now + self.config.deadline_ms(level),
                    reopen_count=0,
                    created_ms=now,
                    updated_ms=now,
                )
                session.add(row)
                session.flush()
                self._record(session, row, SYSTEM_RULES, None, S.DETECTED, f"raised at level {level}", now)
                return row
            row = closed
        row.cleared_ms = None
        if AlarmState(row.state) in REOPENABLE:
            row.level = max(row.level, level)
            previous = AlarmState(row.state)
            row.state = S.REOPENED.value
            row.reopen_count += 1
            row.closed_ms = None
            row.escalated_ms = None
            row.deadline_ms = now + self.config.deadline_ms(level)
            self._touch(row, ev, now)
            session.flush()
            self._record(session, row, SYSTEM_RULES, previous, S.REOPENED, f"condition returned at level {level}", now)
        else:
            self._raise_level(row, level, now)
            self._touch(row, ev, now)
        return row

    def _raise_level(self, row: AlarmRow, level: int, now: int) -> None:
        """Levels only go up; a higher level's deadline applies if it is sooner (unless already escalated)."""
        if level <= row.level:
            return
        row.level = level
        if row.escalated_ms is None and row.deadline_ms is not None:
            row.deadline_ms = min(row.deadline_ms, now + self.config.deadline_ms(level))

    def _touch(self, row: AlarmRow, ev: AlarmEvent, now: int) -> None:
        row.last_ms = max(row.last_ms, ev.ts_ms)
        row.value = _finite(ev.value)
        peak = _finite(ev.peak)
        if peak is not None:
            higher = RULES[ev.rule].PEAK == "max" if ev.rule in RULES else True
            if row.peak is None or (peak > row.peak if higher else peak < row.peak):
                row.peak = peak
                row.peak_ms = ev.ts_ms
        if ev.detail:
            row.detail_json = json.dumps(_json_safe(dict(ev.detail)))
        row.updated_ms = now

    def _record(
        self,
        session: Session,
        row: AlarmRow,
        actor: str,
        previous: AlarmState | None,
        to: AlarmState,
        note: str | None,
        now: int,
    ) -> AlarmTransitionRow:
        t = AlarmTransitionRow(
            alarm_id=row.id,
            at_ms=now,
            actor=actor[:100],
            from_state=None if previous is None else previous.value,
            to_state=to.value,
            note=None if note is None else note[:MAX_NOTE],
        )
        session.add(t)
        return t

    def _notify(
        self, session: Session, row: AlarmRow, event_name: str, transition: AlarmTransitionRow | None = None
    ) -> None:
        if self.notifier is None or not self.notifier.channels:
            return
        session.flush()  # the version the payload carries is the one that commits
        payload: dict[str, Any] = {"alarm": AlarmRecord.of(row).to_dict()}
        if transition is not None:
            payload["transition"] = {
                "at_ms": transition.at_ms,
                "actor": transition.actor,
                "from": transition.from_state,
                "to": transition.to_state,
                "note": transition.note,
            }
        self.notifier.enqueue(session, row.vin, event_name, payload)

    # -- workflow (API) ---------------------------------------------------------------------------------------

    def transition(
        self, alarm_id: int, to: AlarmState, actor: str, note: str | None = None, assignee: str | None = None
    ) -> AlarmRecord:
        now = self.clock()
        try:
            with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                row = session.execute(
                    select(AlarmRow).where(AlarmRow.id == alarm_id).with_for_update()
                ).scalar_one_or_none()
                if row is None:
                    raise UnknownAlarmError(alarm_id)
                current = AlarmState(row.state)
                reason = manual_transition_error(current, to, row.cleared_ms is not None)
                if reason is not None:
                    raise IllegalTransitionError(reason)
                row.state = to.value
                if to is S.CLOSED:
                    row.closed_ms = now
                if assignee is not None:
                    row.assignee = assignee[:MAX_ASSIGNEE]
                row.updated_ms = now
                session.flush()
                t = self._record(session, row, actor, current, to, note, now)
                self._notify(session, row, "transitioned", t)
                transitions = self._transitions(session, alarm_id)
                record = AlarmRecord.of(row, transitions)
        except StaleDataError as exc:
            raise ConcurrentChangeError(f"alarm {alarm_id} changed meanwhile; read it again and retry") from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"alarms: {exc}") from exc
        log.info(
            "alarm transition",
            extra={"alarm_id": alarm_id, "from": current.value, "to": to.value, "actor": actor, "vin": record.vin},
        )
        return record

    @staticmethod
    def _transitions(session: Session, alarm_id: int) -> list[AlarmTransitionRow]:
        return list(
            session.scalars(
                select(AlarmTransitionRow)
                .where(AlarmTransitionRow.alarm_id == alarm_id)
                .order_by(AlarmTransitionRow.id)
            )
        )

    def get(self, alarm_id: int) -> AlarmRecord | None:
        try:
            with Session(self.engine) as session:
                row = session.get(AlarmRow, alarm_id)
                return None if row is None else AlarmRecord.of(row, self._transitions(session, alarm_id))
        except SQLAlchemyError as exc:
            raise StorageError(f"alarms: {exc}") from exc

    def list_alarms(self, f: AlarmFilter) -> list[AlarmRecord]:
        if not 1 <= f.limit <= MAX_LIST or f.offset < 0:
            raise ValueError(f"limit must be in 1..{MAX_LIST} and offset >= 0")
        conditions = []
        if f.vin is not None:
            conditions.append(AlarmRow.vin == f.vin)
        if f.rule is not None:
            conditions.append(AlarmRow.rule == f.rule)
        if f.level is not None:
            conditions.append(AlarmRow.level == f.level)
        if f.state is not None:
            conditions.append(AlarmRow.state == f.state.value)
        if f.from_ms is not None:
            conditions.append(AlarmRow.opened_ms >= f.from_ms)
        if f.to_ms is not None:
            conditions.append(AlarmRow.opened_ms <= f.to_ms)
        stmt = (
            select(AlarmRow)
            .where(*conditions)
            .order_by(AlarmRow.opened_ms.desc(), AlarmRow.id.desc())
            .limit(f.limit)
            .offset(f.offset)
        )
        try:
            with Session(self.engine) as session:
                return [AlarmRecord.of(r) for r in session.scalars(stmt)]
        except SQLAlchemyError as exc:
            raise StorageError(f"alarms: {exc}") from exc

    # -- periodic: time-based rules and deadlines -------------------------------------------------------------

    def tick_once(self) -> dict[str, int]:
        """One round: offline rule for stale vehicles, then deadline escalations. Returns what it did."""
        now = self.clock()
        with self._tick_lock:  # the scratch engine is not thread-safe
            return {"ticked": self._tick_vehicles(now), "escalated": self._escalate_overdue(now)}

    def _tick_vehicles(self, now: int) -> int:
        """Tick the vehicles that are due (`next_tick_ms` passed), a page at a time: a silent fleet costs a round
        only the vehicles whose offline level or peak can change now, not every vehicle that is quiet."""
        after = ""
        ticked = 0
        while True:
            try:
                with Session(self.engine) as session:
                    page = session.execute(
                        select(RuleStateRow.vin, RuleStateRow.version, RuleStateRow.state_json)
                        .where(RuleStateRow.next_tick_ms <= now, RuleStateRow.vin > after)
                        .order_by(RuleStateRow.vin)
                        .limit(self.config.tick_page)
                    ).all()
            except SQLAlchemyError as exc:
                raise StorageError(f"rule state: {exc}") from exc
            for vin, version, state_json in page:
                ticked += 1
                self._tick_vehicle(vin, version, state_json, now)
            if len(page) < self.config.tick_page:
                return ticked
            after = page[-1][0]

    def _tick_vehicle(self, vin: str, version: int, state_json: str, now: int) -> None:
        scratch = self._tick_rules
        try:
            with Session(self.engine) as session:
                ctx = self._contexts_for(session, [vin])[vin]
            self._restore(scratch, vin, state_json, under_lock=False)
            events = scratch.tick(vin, ctx, now)
            # Saved even without events: the state moved on (durations, last observation) and so did the due time.
            state = scratch.export_json(vin)
            assert state is not None
            last_ts = scratch.state(vin).last_ts
            next_tick = scratch.next_tick_ms(vin, ctx, now)
            with Session(self._write_engine) as session, session.begin():
                current = session.execute(
                    select(RuleStateRow.version).where(RuleStateRow.vin == vin).with_for_update()
                ).scalar_one_or_none()
                if current != version:
                    return  # it reported (or another worker ticked it) meanwhile: not evaluated on stale state
                self._save_many(session, [(vin, _Loaded(version, ctx), state, last_ts, next_tick)])
                for ev in events:
                    self._apply(session, ev, now)
        except SQLAlchemyError as exc:
            raise StorageError(f"rule tick: {exc}") from exc
        finally:
            scratch.forget(vin)

    def _escalate_overdue(self, now: int) -> int:
        due = (
            select(AlarmRow.id)
            .where(
                AlarmRow.state.in_([s.value for s in ESCALATABLE]),
                AlarmRow.escalated_ms.is_(None),
                AlarmRow.deadline_ms <= now,
            )
            .order_by(AlarmRow.deadline_ms)
            .limit(self.config.tick_page)
        )
        try:
            with Session(self.engine) as session:
                ids = list(session.scalars(due))
        except SQLAlchemyError as exc:
            raise StorageError(f"alarm escalation: {exc}") from exc
        return sum(self._escalate(alarm_id, now) for alarm_id in ids)

    def _escalate(self, alarm_id: int, now: int) -> bool:
        try:
            with Session(self._write_engine) as session, session.begin():
                row = session.execute(
                    select(AlarmRow).where(AlarmRow.id == alarm_id).with_for_update()
                ).scalar_one_or_none()
                if (
                    row is None
                    or AlarmState(row.state) not in ESCALATABLE
                    or row.escalated_ms is not None
                    or row.deadline_ms is None
                    or row.deadline_ms > now
                ):
                    return False  # moved on meanwhile
                previous = AlarmState(row.state)
                row.state = S.ESCALATED.value
                row.escalated_ms = now
                row.updated_ms = now
                session.flush()
                overdue_s = (now - row.deadline_ms) // 1000
                t = self._record(
                    session, row, SYSTEM_DEADLINE, previous, S.ESCALATED, f"deadline passed {overdue_s} s ago", now
                )
                self._notify(session, row, "transitioned", t)
        except StaleDataError:
            log.info("alarm changed while escalating; next round", extra={"alarm_id": alarm_id})
            return False
        except SQLAlchemyError as exc:
            raise StorageError(f"alarm escalation: {exc}") from exc
        log.warning("alarm escalated: deadline passed", extra={"alarm_id": alarm_id, "from": previous.value})
        return True

    def start(self) -> None:
        """Run `tick_once` every `tick_interval_s` on a supervised thread until `stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="zhilian-alarm-tick", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self.config.tick_interval_s * min(2**failures, 12)):
            try:
                self.tick_once()
                self.tick_rounds += 1
                failures = 0
            except Exception:
                # Supervision: a storage outage or a bug in one round must not end the periodic task.
                failures += 1
                self.tick_errors += 1
                self._m_tick_errors.inc()
                log.exception("periodic alarm task failed; retrying", extra={"failures": failures})

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("periodic alarm task did not stop in time")
            self._thread = None
