"""Per-vehicle rule state: everything the engine needs to resume a vehicle exactly where it was.

`VehicleRuleState.to_dict()` is JSON-able and versioned (`to_json()` writes the same as JSON text); the service
persists it (e.g. with each ingest commit) and `from_dict` restores it in a new process. A condition that began
before the restart keeps its start time, and an alarm that was open stays open, so a restart neither raises an
alarm twice nor misses one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from cloud_ingest.rules.errors import RuleStateError

STATE_VERSION = 1


@dataclass(slots=True)
class OpenAlarm:
    level: int
    raised_ms: int
    last_ms: int  # time of the newest event of this alarm (events of one alarm never go back in time)
    peak: float | None
    value: float | None


@dataclass(slots=True)
class RuleState:
    # Start of the current unbroken stretch in which the condition for L1, L2, L3 held (None: not holding).
    since: list[int | None] = field(default_factory=lambda: [None, None, None])
    last_obs_ms: int | None = None
    clear_since_ms: int | None = None
    open: OpenAlarm | None = None
    mem: dict[str, Any] = field(default_factory=dict)  # the rule's own memory (see base.Rule)

    def to_dict(self) -> dict[str, Any]:
        # The same keys, in the same order, as the dataclass's fields: `VehicleRuleState.to_json` writes the fields.
        o = self.open
        return {
            "since": list(self.since),
            "last_obs_ms": self.last_obs_ms,
            "clear_since_ms": self.clear_since_ms,
            "open": None
            if o is None
            else {"level": o.level, "raised_ms": o.raised_ms, "last_ms": o.last_ms, "peak": o.peak, "value": o.value},
            "mem": self.mem,
        }

    @classmethod
    def from_dict(cls, d: Any) -> RuleState:
        if not isinstance(d, dict):
            raise RuleStateError("rule state must be an object")
        since = d.get("since")
        if not isinstance(since, list) or len(since) != 3 or not all(_opt_int(v) for v in since):
            raise RuleStateError("rule state 'since' must be three timestamps or nulls")
        for key in ("last_obs_ms", "clear_since_ms"):
            if not _opt_int(d.get(key)):
                raise RuleStateError(f"rule state {key!r} must be a timestamp or null")
        mem = d.get("mem", {})
        if not isinstance(mem, dict):
            raise RuleStateError("rule state 'mem' must be an object")
        open_alarm = None
        if d.get("open") is not None:
            o = d["open"]
            try:
                open_alarm = OpenAlarm(
                    level=_int(o["level"]),
                    raised_ms=_int(o["raised_ms"]),
                    last_ms=_int(o["last_ms"]),
                    peak=_opt_float(o.get("peak")),
                    value=_opt_float(o.get("value")),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise RuleStateError(f"open alarm is malformed: {exc}") from None
            if not 1 <= open_alarm.level <= 3:
                raise RuleStateError(f"open alarm level {open_alarm.level} is not 1..3")
        return cls(list(since), d.get("last_obs_ms"), d.get("clear_since_ms"), open_alarm, mem)


@dataclass(slots=True)
class VehicleRuleState:
    last_ts: int | None = None  # newest sample evaluated: older or equal timestamps are ignored
    ignored: int = 0  # samples ignored as out of order or duplicate
    recent: dict[str, list[Any]] = field(default_factory=dict)  # signal -> [ts, value] for cross-signal look-ups
    rules: dict[str, RuleState] = field(default_factory=dict)

    def rule(self, rule_id: str) -> RuleState:
        st = self.rules.get(rule_id)
        if st is None:
            st = self.rules[rule_id] = RuleState()
        return st

    def open_alarms(self) -> dict[str, OpenAlarm]:
        return {rid: st.open for rid, st in self.rules.items() if st.open is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "last_ts": self.last_ts,
            "ignored": self.ignored,
            "recent": {k: list(v) for k, v in self.recent.items()},
            "rules": {rid: st.to_dict() for rid, st in self.rules.items()},
        }

    def to_json(self) -> str:
        """`to_dict()` as compact JSON, without building it: orjson writes the dataclasses' fields directly (the
        ingest pipeline saves a vehicle's state with every call that carried it; this is ≈ 10× cheaper). The rules
        refuse NaN and ±inf (cloud_ingest/rules/sample.py), which JSON could not carry either way."""
        return orjson.dumps(
            {
                "version": STATE_VERSION,
                "last_ts": self.last_ts,
                "ignored": self.ignored,
                "recent": self.recent,
                "rules": self.rules,
            }
        ).decode()

    @classmethod
    def from_dict(cls, d: Any) -> VehicleRuleState:
        if not isinstance(d, dict):
            raise RuleStateError("vehicle rule state must be an object")
        if d.get("version") != STATE_VERSION:
            raise RuleStateError(f"vehicle rule state version {d.get('version')!r} is not {STATE_VERSION}")
        if not _opt_int(d.get("last_ts")) or not isinstance(d.get("ignored", 0), int):
            raise RuleStateError("vehicle rule state 'last_ts'/'ignored' malformed")
        recent = d.get("recent", {})
        if not isinstance(recent, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) for v in recent.values()
        ):
            raise RuleStateError("vehicle rule state 'recent' malformed")
        rules = d.get("rules", {})
        if not isinstance(rules, dict):
            raise RuleStateError("vehicle rule state 'rules' must be an object")
        return cls(
            last_ts=d.get("last_ts"),
            ignored=d.get("ignored", 0),
            recent={k: list(v) for k, v in recent.items()},
            rules={str(rid): RuleState.from_dict(st) for rid, st in rules.items()},
        )


def _opt_int(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool))


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def _opt_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"expected a number, got {v!r}")
    return float(v)
