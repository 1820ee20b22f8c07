"""Connectivity rules: the vehicle stopped reporting."""

from __future__ import annotations

import math

from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample

_ONLINE = Observation(0, 0.0, True)


class VehicleOffline(Rule):
    """No sample for longer than a multiple of the vehicle's reporting interval (evaluated on `tick`).

    Time is the tick's clock against the newest sample's timestamp (the vehicle's GNSS clock), so a vehicle's
    clock skew shifts the alarm by that much. Any new sample clears it. Metric: silence / reporting interval.
    """

    ID = "vehicle_offline"
    TICKS = True

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        return _ONLINE

    def on_tick(self, mem: Mem, now_ms: int, last_sample_ms: int | None, ctx: VehicleContext) -> Observation | None:
        if last_sample_ms is None or ctx.reporting_interval_s <= 0:
            return None
        silence_s = (now_ms - last_sample_ms) / 1000
        return self.grade(silence_s / ctx.reporting_interval_s, {"silence_s": round(silence_s, 1)})

    def tick_marks_ms(
        self, mem: Mem, last_sample_ms: int | None, ctx: VehicleContext, peak: float | None, step: float
    ) -> list[int]:
        # The metric grows linearly with the silence: each level's threshold, and the open alarm's next peak step,
        # is crossed at a known instant.
        if last_sample_ms is None or ctx.reporting_interval_s <= 0:
            return []
        unit_ms = ctx.reporting_interval_s * 1000
        marks = [threshold for _, threshold in self._grades]
        if peak is not None and step > 0:
            marks.append(peak + step)
        return [last_sample_ms + math.ceil(m * unit_ms) for m in marks]
