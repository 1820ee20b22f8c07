"""Resolved settings of one rule for one (vehicle model, chemistry): what a rule instance is built with.

Built and validated by `cloud_ingest.rules.config` from the rules file; rules only read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LEVELS = (1, 2, 3)  # L1 advisory, L2 alarm, L3 emergency (GB/T 32960.3 alarm levels 1-3)


@dataclass(frozen=True, slots=True)
class RuleSettings:
    id: str
    enabled: bool
    source: str
    # Threshold per level (index 0 = L1); None = the level is not used. Empty for fixed-level rules.
    levels: tuple[float | None, float | None, float | None]
    clear: float | None
    # How long the condition for each level must hold before that level is reached (ms).
    duration_ms: tuple[int, int, int]
    clear_duration_ms: int
    # An open alarm's peak is reported again (kind "updated") only when it worsened by at least this much.
    update_step: float
    params: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    # A pending condition whose rule saw no observation for this long forgets when it began: continuity unproven.
    max_gap_ms: int
    # Cross-signal look-ups (e.g. the current for a temperature rule) accept a value this old at most.
    recent_max_age_ms: int
