"""Charging rules: out of the temperature window, over-voltage, long after full, inside a no-charging zone.

"Charging" means the pack current (positive into the battery) is at least the rule's `charge_current_a`.
"""

from __future__ import annotations

from typing import ClassVar

from cloud_ingest.rules import names as n
from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample

_NOT_CHARGING = Observation(0, 0.0, True)


class ChargingTemperature(Rule):
    """Charging outside the cells' charge temperature window [`min_temp_c`, `max_temp_c`].

    Charging li-ion cells below 0 °C plates lithium (dendrites, later internal shorts); above ~45 °C it speeds
    up degradation and gas generation. Metric: °C outside the window (negative = inside, by that much).
    """

    ID = "charging_temperature"
    PARAMS: ClassVar = {"charge_current_a": float, "min_temp_c": float, "max_temp_c": float}
    SIGNALS = (n.PACK_I, n.TEMP_MAX, n.TEMP_MIN)
    RECENT = (n.PACK_I,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        current = sample.recent(n.PACK_I)
        if current is None:
            return None
        if current < self.p["charge_current_a"]:
            return _NOT_CHARGING
        hi, lo = sample.temp_max(), sample.temp_min()
        if hi is None and lo is None:
            return None
        excess = max(
            -1e9 if hi is None else hi - self.p["max_temp_c"],
            -1e9 if lo is None else self.p["min_temp_c"] - lo,
        )
        return self.grade(excess, {"temp_max_c": hi, "temp_min_c": lo})


class ChargingOverVoltage(Rule):
    """Pack voltage per cell above the chemistry's charge limit while charging: a wrong or faulty charger.

    Cells = the BMS's CellCount, else the approved battery's. Metric: V per cell.
    """

    ID = "charging_over_voltage"
    PARAMS: ClassVar = {"charge_current_a": float}
    SIGNALS = (n.PACK_I, n.PACK_V, n.CELL_COUNT)
    RECENT = (n.PACK_I, n.CELL_COUNT)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        current = sample.recent(n.PACK_I)
        if current is None:
            return None
        if current < self.p["charge_current_a"]:
            return _NOT_CHARGING
        volts = sample.num(n.PACK_V)
        cells = sample.recent(n.CELL_COUNT)
        if (cells is None or cells < 1) and ctx.battery is not None and ctx.battery.cell_count:
            cells = float(ctx.battery.cell_count)
        if volts is None or cells is None or cells < 1:
            return None
        return self.grade(volts / cells, {"pack_v": volts, "cells": int(cells)})


class ChargingAfterFull(Rule):
    """Charge current still flowing long after the pack is full: a charger or BMS that does not terminate.

    A charger terminates when the current tapers off at full; current >= `charge_current_a` at SOC >=
    `full_soc_pct` for hours overcharges the pack. Metric: hours charging since full.
    """

    ID = "charging_after_full"
    PARAMS: ClassVar = {"charge_current_a": float, "full_soc_pct": float}
    SIGNALS = (n.PACK_I, n.SOC)
    RECENT = (n.PACK_I, n.SOC)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        current, soc = sample.recent(n.PACK_I), sample.recent(n.SOC)
        if current is None or soc is None:
            return None
        if current < self.p["charge_current_a"] or soc < self.p["full_soc_pct"]:
            mem["full_since"] = None
            return _NOT_CHARGING
        if mem.get("full_since") is None:
            mem["full_since"] = sample.ts
        return self.grade((sample.ts - mem["full_since"]) / 3_600_000, {"current_a": current})


class ChargingInNoChargingZone(Rule):
    """Charging inside a no-charging zone (residential buildings, stairwells, corridors, exits).

    The position is the last fix at most `position_max_age_s` old: indoors the receiver often has none, and a
    parked vehicle does not move. Zones come from the context's geofence lookup.
    """

    ID = "charging_in_no_charging_zone"
    DIRECTION = None
    PARAMS: ClassVar = {"level": int, "charge_current_a": float, "zone_kind": str, "position_max_age_s": float}
    SIGNALS = (n.PACK_I, n.LAT, n.LON)
    RECENT = (n.PACK_I,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        pos = sample.position()
        if pos is not None:
            mem["pos"] = [sample.ts, pos[0], pos[1]]
        current = sample.recent(n.PACK_I)
        if current is None:
            return None
        if current < self.p["charge_current_a"]:
            return _NOT_CHARGING
        last = mem.get("pos")
        if last is None or sample.ts - last[0] > self.p["position_max_age_s"] * 1000:
            return None
        inside = self.p["zone_kind"] in ctx.zones_at(last[1], last[2])
        return Observation(self.p["level"] if inside else 0, None, not inside, {"lat": last[1], "lon": last[2]})
