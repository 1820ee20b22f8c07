"""The shape of a rule: it observes one sample and says which level its condition is at right now.

Everything stateful that is common to all rules — how long a condition has held (per level), hysteresis on
clearing, the one open alarm per (vehicle, rule) and its peak — lives in the engine. A rule only keeps what its
own measurement needs (a previous value, a filtered slope, an anchor position) in `mem`, a small JSON-able dict
that the engine persists with the vehicle's state. Rules must keep `mem` bounded and JSON-able (lists, not
tuples; str keys; finite floats).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample
from cloud_ingest.rules.settings import RuleSettings
from protocol.catalogue import Catalogue

Direction = Literal["above", "below"]
Mem = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Observation:
    """What a rule saw in one sample.

    level  0..3, the highest level whose condition holds at this instant (before any duration is applied).
    value  the rule's metric at this instant (peak tracking), None when it has none.
    clear  the clearing condition (the hysteresis side) holds: an open alarm clears once it held for the rule's
           clear duration. A sample between the clear threshold and L1 neither raises nor clears.
    """

    level: int
    value: float | None = None
    clear: bool = False
    detail: Mapping[str, Any] | None = None


class Rule:
    ID: ClassVar[str]
    # "above"/"below": the rule grades a metric against `levels` and `clear` from the rules file.
    # None: a fixed-level rule whose condition is boolean; its level(s) are `*_level` params in the rules file.
    DIRECTION: ClassVar[Direction | None] = "above"
    PEAK: ClassVar[Literal["max", "min"]] = "max"
    PARAMS: ClassVar[Mapping[str, type]] = {}
    SIGNALS: ClassVar[tuple[str, ...]] = ()  # catalogue names the rule reads (checked at engine start)
    RECENT: ClassVar[tuple[str, ...]] = ()  # of those, the ones it may read from an earlier sample (`recent`)
    TICKS: ClassVar[bool] = False  # evaluated on `tick` (time-based) as well as on samples

    def __init__(self, settings: RuleSettings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.p = settings.params
        self.catalogue = catalogue
        levels = settings.levels
        # Graded from the most severe level down, so the first match is the answer.
        self._grades = [(i + 1, t) for i, t in enumerate(levels) if t is not None][::-1]
        self._clear = settings.clear

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        """The rule's view of one sample; None when the sample says nothing about its condition."""
        raise NotImplementedError

    def on_tick(self, mem: Mem, now_ms: int, last_sample_ms: int | None, ctx: VehicleContext) -> Observation | None:
        return None

    def tick_marks_ms(
        self, mem: Mem, last_sample_ms: int | None, ctx: VehicleContext, peak: float | None, step: float
    ) -> list[int]:
        """For a TICKS rule: the instants at which `on_tick`'s observation may change its level, or move an open
        alarm's peak (`peak` + `step`), for a vehicle silent since `last_sample_ms`. The engine ticks the vehicle
        at the first of them still to come (and when a level's duration ends), not on every round. The default,
        one mark a second after the newest sample and then none, suits a rule whose tick observation is fixed
        once it is made."""
        return [] if last_sample_ms is None else [last_sample_ms + 1000]

    # -- helpers for threshold rules ------------------------------------------------------------------------

    def grade(self, value: float, detail: Mapping[str, Any] | None = None) -> Observation:
        """Level and clearing of `value` against this rule's thresholds."""
        level = 0
        if self.DIRECTION == "above":
            for lvl, threshold in self._grades:
                if value >= threshold:
                    level = lvl
                    break
            clear = self._clear is not None and value <= self._clear
        else:
            for lvl, threshold in self._grades:
                if value <= threshold:
                    level = lvl
                    break
            clear = self._clear is not None and value >= self._clear
        return Observation(level, value, clear, detail)


def clamp_level(level: int) -> int:
    return 0 if level < 0 else 3 if level > 3 else level
