"""Alarm levels, event kinds and the events the engine emits."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class Level(enum.IntEnum):
    """GB/T 32960.3 alarm levels: 1 does not affect normal driving, 2 affects it, 3 requires stopping at once."""

    ADVISORY = 1
    ALARM = 2
    EMERGENCY = 3


class EventKind(enum.StrEnum):
    RAISED = "raised"
    ESCALATED = "escalated"  # the open alarm's level went up (levels never go down while it is open)
    UPDATED = "updated"  # the open alarm's peak value worsened
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    vin: str
    rule: str
    level: Level
    kind: EventKind
    ts_ms: int
    value: float | None  # the rule's metric at this instant (unit in docs/RULES.md)
    peak: float | None  # the worst metric value since the alarm was raised
    raised_ms: int  # when the open alarm this event belongs to was raised
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vin": self.vin,
            "rule": self.rule,
            "level": int(self.level),
            "kind": self.kind.value,
            "ts_ms": self.ts_ms,
            "value": self.value,
            "peak": self.peak,
            "raised_ms": self.raised_ms,
            "detail": dict(self.detail),
        }
