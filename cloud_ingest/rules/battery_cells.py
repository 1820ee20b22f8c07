"""Cell voltage rules: spread, over-/under-voltage per chemistry, suspected internal short."""

from __future__ import annotations

import statistics
from typing import ClassVar

from cloud_ingest.rules import names as n
from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample


class CellVoltageSpread(Rule):
    """Highest minus lowest cell voltage (GB/T 32960.3 "cell consistency" alarm). Metric: mV."""

    ID = "cell_voltage_spread"
    SIGNALS = (n.CELL_V_MAX, n.CELL_V_MIN)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        ext = sample.cell_extremes()
        if ext is None:
            return None
        return self.grade((ext[1] - ext[0]) * 1000.0)


class CellOverVoltage(Rule):
    """Highest cell voltage above the chemistry's limit (GB/T 32960.3 "cell over-voltage"). Metric: V."""

    ID = "cell_over_voltage"
    SIGNALS = (n.CELL_V_MAX,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        ext = sample.cell_extremes()
        hi = ext[1] if ext is not None else sample.num(n.CELL_V_MAX)
        return None if hi is None else self.grade(hi)


class CellUnderVoltage(Rule):
    """Lowest cell voltage below the chemistry's limit (GB/T 32960.3 "cell under-voltage"). Metric: V."""

    ID = "cell_under_voltage"
    DIRECTION = "below"
    PEAK = "min"
    SIGNALS = (n.CELL_V_MIN,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        ext = sample.cell_extremes()
        lo = ext[0] if ext is not None else sample.num(n.CELL_V_MIN)
        return None if lo is None else self.grade(lo)


class InternalShortSuspected(Rule):
    """One cell falls while the others hold, at rest: the self-discharge signature of a soft internal short.

    Once the pack has rested (|current| <= `rest_current_a`) for `settle_s` — long enough for the load's
    polarisation to relax — each cell's deviation from the median cell is recorded as its baseline. From then on
    the metric is the largest fall of a cell's deviation below its baseline. Measuring against the median makes
    the pack's common drift (relaxation, temperature, balancing of all cells) cancel; only a cell that loses
    charge on its own shows. The baseline is retaken at every new rest, so the metric measures one rest period
    (a night parked is the typical window), and when the pack's barcode changes (a swap made at rest puts other
    cells behind the same numbers). Metric: mV.
    """

    ID = "internal_short_suspected"
    PARAMS: ClassVar = {"rest_current_a": float, "settle_s": float, "min_cells": int}
    SIGNALS = (n.PACK_I, n.BARCODE)
    RECENT = (n.PACK_I,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        current = sample.recent(n.PACK_I)
        cells = sample.cells()
        if current is None or len(cells) < self.p["min_cells"]:
            return None
        if abs(current) > self.p["rest_current_a"]:
            mem["rest_since"] = None
            mem["base"] = None
            return None
        barcode = sample.text(n.BARCODE)
        if barcode is not None and barcode != mem.get("barcode"):
            if mem.get("barcode") is not None:  # another pack: start a new rest and a new baseline
                mem["rest_since"] = None
                mem["base"] = None
            mem["barcode"] = barcode
        ts = sample.ts
        if mem.get("rest_since") is None:
            mem["rest_since"] = ts
        if ts - mem["rest_since"] < self.p["settle_s"] * 1000:
            return None
        med = statistics.median(v for _, v in cells)
        deviation = {str(number): (v - med) * 1000.0 for number, v in cells}
        base = mem.get("base")
        if base is None or base.keys() != deviation.keys():
            mem["base"] = deviation
            return self.grade(0.0)
        worst_cell, worst = "", 0.0
        for key, dev in deviation.items():
            fall = base[key] - dev
            if fall > worst:
                worst_cell, worst = key, fall
        return self.grade(worst, {"cell": int(worst_cell)} if worst_cell else None)
