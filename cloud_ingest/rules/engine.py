"""The rule engine: sans-I/O, stateful per vehicle, fed samples in time order and ticked for time-based rules.

For each sample every enabled rule observes it (several may fire on one sample); the engine turns observations
into alarm events with the same machinery for every rule:

- duration: the condition for a level must hold unbroken for that level's duration before the level is
  reached; a rule that saw nothing for `max_gap_s` of sample time forgets when its condition began;
- one open alarm per (vehicle, rule): it is raised at the highest level reached, escalated when a higher level
  is reached, its peak updated when the metric worsens by `update_step`; levels never go down while it is open;
- hysteresis: it clears only after the rule's clear condition has held for `clear_duration_s`.

Samples whose timestamp is not newer than the newest one seen for the vehicle are ignored (counted): rules
compute rates and durations between consecutive samples, which a late or repeated sample would corrupt.
The engine is not thread-safe; the service partitions vehicles between workers by VIN.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloud_ingest.rules.base import Observation, Rule
from cloud_ingest.rules.config import Combo, RulesConfig
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.events import AlarmEvent, EventKind, Level
from cloud_ingest.rules.names import CELL_PREFIX, PROBE_PREFIX, numbered
from cloud_ingest.rules.registry import RULES
from cloud_ingest.rules.sample import Sample, as_num
from cloud_ingest.rules.settings import RuleSettings
from cloud_ingest.rules.state import OpenAlarm, RuleState, VehicleRuleState
from protocol.batch import Batch
from protocol.catalogue import Catalogue, Value

log = logging.getLogger("zhilian.rules")
_MAX_WARNED_COMBOS = 64


@dataclass(slots=True)
class EngineStats:
    samples: int = 0
    ignored: int = 0  # out-of-order or duplicate samples
    rule_errors: int = 0  # a rule raised (logged with its traceback; its memory was reset)
    events: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in EventKind})


@dataclass(frozen=True, slots=True)
class _Bound:
    """A rule instance with what the engine needs about it, precomputed."""

    rule: Rule
    id: str
    usable: tuple[bool, bool, bool]  # which levels this rule can reach with its settings
    durations: tuple[int, int, int]
    clear_ms: int
    step: float
    peak_max: bool


class RuleEngine:
    def __init__(self, rules: RulesConfig, catalogue: Catalogue) -> None:
        rules.check_signals(catalogue)
        self.config = rules
        self.catalogue = catalogue
        self._max_gap = rules.engine.max_gap_ms
        self._recent_age = rules.engine.recent_max_age_ms
        self._cells = numbered(catalogue, CELL_PREFIX)
        self._probes = numbered(catalogue, PROBE_PREFIX)
        self._rulesets: dict[Combo, tuple[tuple[_Bound, ...], tuple[_Bound, ...]]] = {}
        recent: set[str] = set()
        for combo, settings in rules.resolved.items():
            bound = tuple(self._bind(RULES[rid], s) for rid, s in settings.items() if s.enabled)
            self._rulesets[combo] = (bound, tuple(b for b in bound if b.rule.TICKS))
            for b in bound:
                recent.update(b.rule.RECENT)
        self._recent_names = tuple(sorted(recent))
        self._states: dict[str, VehicleRuleState] = {}
        self._warned: set[tuple[str | None, str | None]] = set()
        self.stats = EngineStats()

    def _bind(self, cls: type[Rule], settings: RuleSettings) -> _Bound:
        rule = cls(settings, self.catalogue)
        # Reachable levels: those with a threshold, and those a `level`/`*_level` parameter assigns.
        used = {v for k, v in settings.params.items() if k == "level" or k.endswith("_level")}
        used.update(i + 1 for i, threshold in enumerate(settings.levels) if threshold is not None)
        usable = (1 in used, 2 in used, 3 in used)
        return _Bound(
            rule,
            cls.ID,
            usable,
            settings.duration_ms,
            settings.clear_duration_ms,
            settings.update_step,
            cls.PEAK == "max",
        )

    # -- state --------------------------------------------------------------------------------------------------

    def state(self, vin: str) -> VehicleRuleState:
        st = self._states.get(vin)
        if st is None:
            st = self._states[vin] = VehicleRuleState()
        return st

    def export_state(self, vin: str) -> dict[str, Any] | None:
        st = self._states.get(vin)
        return None if st is None else st.to_dict()

    def export_json(self, vin: str) -> str | None:
        """`export_state` as JSON text (what the alarm service persists), written without the intermediate dict."""
        st = self._states.get(vin)
        return None if st is None else st.to_json()

    def restore_state(self, vin: str, data: Mapping[str, Any]) -> None:
        """Resume a vehicle from `export_state` output (raises RuleStateError if it is not one)."""
        self._states[vin] = VehicleRuleState.from_dict(dict(data))

    def forget(self, vin: str) -> None:
        self._states.pop(vin, None)

    def vins(self) -> list[str]:
        return list(self._states)

    # -- evaluation ---------------------------------------------------------------------------------------------

    def evaluate(self, vin: str, ctx: VehicleContext, ts_ms: int, values: Mapping[str, Value]) -> list[AlarmEvent]:
        """Run every enabled rule on one sample; samples of a vehicle must come in time order."""
        st = self.state(vin)
        if st.last_ts is not None and ts_ms <= st.last_ts:
            st.ignored += 1
            self.stats.ignored += 1
            return []
        st.last_ts = ts_ms
        self.stats.samples += 1
        sample = Sample(ts_ms, values, st.recent, self._recent_age, self._cells, self._probes)
        events: list[AlarmEvent] = []
        states = st.rules
        for b in self._ruleset(ctx)[0]:
            rs = states.get(b.id) or st.rule(b.id)
            try:
                obs = b.rule.observe(rs.mem, sample, ctx)
            except Exception:
                self._rule_failed(vin, b.id, rs)
                continue
            if obs is not None:
                self._apply(vin, b, rs, obs, ts_ms, events)
        recent = st.recent
        for name in self._recent_names:
            v = values.get(name)
            if v is not None and as_num(v) is not None:
                recent[name] = [ts_ms, v]
        return events

    def evaluate_batch(self, vin: str, ctx: VehicleContext, batch: Batch) -> list[AlarmEvent]:
        """`evaluate` for every sample of a decoded batch, in order."""
        events: list[AlarmEvent] = []
        columns = list(batch.columns.items())
        for i, ts in enumerate(batch.timestamps):
            row: dict[str, Value] = {}
            for name, col in columns:
                v = col[i]
                if v is not None:
                    row[name] = v
            events += self.evaluate(vin, ctx, ts, row)
        return events

    def tick(self, vin: str, ctx: VehicleContext, now_ms: int) -> list[AlarmEvent]:
        """Evaluate the time-based rules (e.g. offline) for a vehicle at `now_ms` (the service's clock).

        A vehicle that never sent a sample has nothing to evaluate (and gets no state)."""
        st = self._states.get(vin)
        if st is None:
            return []
        events: list[AlarmEvent] = []
        for b in self._ruleset(ctx)[1]:
            rs = st.rule(b.id)
            if rs.last_obs_ms is not None and now_ms < rs.last_obs_ms:
                continue
            try:
                obs = b.rule.on_tick(rs.mem, now_ms, st.last_ts, ctx)
            except Exception:
                self._rule_failed(vin, b.id, rs)
                continue
            if obs is not None:
                self._apply(vin, b, rs, obs, now_ms, events)
        return events

    def next_tick_ms(self, vin: str, ctx: VehicleContext, after_ms: int) -> int | None:
        """When `tick` may next change something for `vin`: the first of its time-based rules' marks (level
        thresholds, an open alarm's next peak step) and pending level durations later than `after_ms`; None when
        nothing can change before the vehicle reports again. Ticking only then keeps a round's cost to the
        vehicles that are due, not to every silent one."""
        st = self._states.get(vin)
        if st is None:
            return None
        due: int | None = None
        for b in self._ruleset(ctx)[1]:
            rs = st.rules.get(b.id)
            mem = rs.mem if rs is not None else {}
            peak = rs.open.peak if rs is not None and rs.open is not None else None
            marks = b.rule.tick_marks_ms(mem, st.last_ts, ctx, peak, b.step)
            if rs is not None:
                marks += [start + b.durations[i] for i, start in enumerate(rs.since) if start is not None]
            for t in marks:
                if t > after_ms and (due is None or t < due):
                    due = t
        return due

    # -- machinery ----------------------------------------------------------------------------------------------

    def _ruleset(self, ctx: VehicleContext) -> tuple[tuple[_Bound, ...], tuple[_Bound, ...]]:
        combo = self.config.combo(ctx.model, ctx.chemistry)
        if combo != (ctx.model, ctx.chemistry) and len(self._warned) < _MAX_WARNED_COMBOS:
            key = (ctx.model, ctx.chemistry)
            if key not in self._warned:
                self._warned.add(key)
                log.warning(
                    "vehicle model or chemistry not in the rules file; base settings apply",
                    extra={"model": ctx.model, "chemistry": ctx.chemistry},
                )
        return self._rulesets[combo]

    def _rule_failed(self, vin: str, rule_id: str, rs: RuleState) -> None:
        # One faulty rule must not hide the others' alarms; its memory is reset so a poisoned value cannot make
        # it fail forever.
        self.stats.rule_errors += 1
        rs.mem = {}
        log.exception("rule failed", extra={"vin": vin, "rule": rule_id})

    def _apply(self, vin: str, b: _Bound, rs: RuleState, obs: Observation, ts: int, out: list[AlarmEvent]) -> None:
        if obs.level == 0 and rs.open is None:
            # The common case — nothing pending, nothing open — short-cut for the per-sample cost.
            since = rs.since
            if since[0] is not None or since[1] is not None or since[2] is not None:
                rs.since = [None, None, None]
            rs.last_obs_ms = ts
            return
        if rs.last_obs_ms is not None and ts - rs.last_obs_ms > self._max_gap:
            rs.since = [None, None, None]
            rs.clear_since_ms = None
        rs.last_obs_ms = ts
        level = obs.level
        since = rs.since
        reached = 0
        for i in range(3):
            if not b.usable[i]:
                continue
            if level > i:
                start = since[i]
                if start is None:
                    start = since[i] = ts
                if ts - start >= b.durations[i]:
                    reached = i + 1
            else:
                since[i] = None
        value = obs.value
        alarm = rs.open
        if alarm is None:
            if reached:
                rs.open = OpenAlarm(reached, ts, ts, value, value)
                rs.clear_since_ms = None
                self._emit(out, vin, b, EventKind.RAISED, rs.open, ts, obs)
            return
        alarm.value = value
        peak = alarm.peak
        worse = value is not None and (peak is None or (value > peak if b.peak_max else value < peak))
        if reached > alarm.level:
            alarm.level = reached
            if worse:
                alarm.peak = value
            self._emit(out, vin, b, EventKind.ESCALATED, alarm, ts, obs)
        elif worse and (peak is None or value is None or abs(value - peak) >= b.step):
            alarm.peak = value
            self._emit(out, vin, b, EventKind.UPDATED, alarm, ts, obs)
        if obs.clear:
            if rs.clear_since_ms is None:
                rs.clear_since_ms = ts
            if ts - rs.clear_since_ms >= b.clear_ms:
                rs.open = None
                rs.clear_since_ms = None
                rs.since = [None, None, None]
                self._emit(out, vin, b, EventKind.CLEARED, alarm, ts, obs)
        else:
            rs.clear_since_ms = None

    def _emit(
        self, out: list[AlarmEvent], vin: str, b: _Bound, kind: EventKind, alarm: OpenAlarm, ts: int, obs: Observation
    ) -> None:
        ts = max(ts, alarm.last_ms)
        alarm.last_ms = ts
        event = AlarmEvent(
            vin, b.id, Level(alarm.level), kind, ts, obs.value, alarm.peak, alarm.raised_ms, dict(obs.detail or {})
        )
        out.append(event)
        self.stats.events[kind.value] += 1
        log.info(
            "alarm %s",
            kind.value,
            extra={"vin": vin, "rule": b.id, "level": alarm.level, "ts_ms": ts, "value": obs.value, "peak": alarm.peak},
        )
