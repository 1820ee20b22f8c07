"""Battery state rules: SOC jump, repeated BMS protection, ageing, battery–vehicle mismatch."""

from __future__ import annotations

from typing import ClassVar

from cloud_ingest.rules import names as n
from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample

MS_PER_YEAR = 365.25 * 24 * 3600 * 1000
PROTECTION_BITS = (
    "cell_overvoltage",
    "cell_undervoltage",
    "pack_overvoltage",
    "pack_undervoltage",
    "charge_overtemperature",
    "charge_undertemperature",
    "discharge_overtemperature",
    "discharge_undertemperature",
    "charge_overcurrent",
    "discharge_overcurrent",
    "short_circuit",
    "frontend_ic_error",
    "mosfet_software_lock",
)
_MAX_PROTECTION_EVENTS = 64


class SocJump(Rule):
    """SOC change between consecutive samples that the current cannot explain (GB/T 32960.3 "SOC jump").

    jump = |ΔSOC| − explain_factor × |I|·Δt / capacity (as % of capacity), with the larger of the two samples'
    currents and the capacity from the BMS (NominalCapacity) or the approved battery. Samples further apart than
    `max_interval_s` are not compared. A barcode change between the samples is a battery swap, not a jump.
    Metric: % SOC.
    """

    ID = "soc_jump"
    PARAMS: ClassVar = {"max_interval_s": float, "explain_factor": float}
    SIGNALS = (n.SOC, n.PACK_I, n.NOMINAL_CAPACITY, n.BARCODE)
    RECENT = (n.PACK_I, n.NOMINAL_CAPACITY)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        barcode = sample.text(n.BARCODE)
        swapped = barcode is not None and mem.get("barcode") not in (None, barcode)
        if barcode is not None:
            mem["barcode"] = barcode
        soc = sample.num(n.SOC)
        if soc is None:
            return None
        current = sample.recent(n.PACK_I)
        prev_ts, prev_soc, prev_i = mem.get("ts"), mem.get("soc"), mem.get("i")
        mem["ts"], mem["soc"], mem["i"] = sample.ts, soc, current
        if swapped or prev_ts is None or prev_soc is None:
            return None
        dt_ms = sample.ts - prev_ts
        if not 0 < dt_ms <= self.p["max_interval_s"] * 1000:
            return None
        capacity = sample.recent(n.NOMINAL_CAPACITY)
        if (capacity is None or capacity <= 0) and ctx.battery is not None:
            capacity = ctx.battery.capacity_ah
        explained = 0.0
        amps = max(abs(current or 0.0), abs(prev_i or 0.0))
        if capacity is not None and capacity > 0:
            explained = self.p["explain_factor"] * amps * dt_ms / 3_600_000 / capacity * 100.0
        jump = max(0.0, abs(soc - prev_soc) - explained)
        return self.grade(jump, {"from_pct": prev_soc, "to_pct": soc})


class BmsProtectionRepeated(Rule):
    """The BMS's protections trip again and again: each rising edge of a protection bit counts as an event.

    One trip is the BMS doing its job; repeated trips within `window_s` mean the cause persists (a failing cell,
    a wrong charger, a controller drawing too much). Bits in `ignore_mask` are not counted. Metric: events in
    the window.
    """

    ID = "bms_protection_repeated"
    PARAMS: ClassVar = {"window_s": float, "ignore_mask": int}
    SIGNALS = (n.PROTECTION,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        raw = sample.values.get(n.PROTECTION)
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            return None
        status = raw & 0xFFFF & ~self.p["ignore_mask"]
        prev = mem.get("prev")
        new = status if prev is None else status & ~prev
        mem["prev"] = status
        events: list[list[int]] = mem.setdefault("events", [])
        for bit in range(16):
            if new >> bit & 1:
                events.append([sample.ts, bit])
        horizon = sample.ts - self.p["window_s"] * 1000
        while events and (events[0][0] <= horizon or len(events) > _MAX_PROTECTION_EVENTS):
            events.pop(0)
        bits = sorted({b for _, b in events})
        names = [PROTECTION_BITS[b] if b < len(PROTECTION_BITS) else f"bit{b}" for b in bits]
        return self.grade(float(len(events)), {"protections": names})


_AGE_OK = Observation(0, None, True, {"service_life_expired": False})


class BatteryAgeing(Rule):
    """State of health below the end-of-life tiers, or the pack past its marked service life.

    The service life is the pack's mark (approved battery) or, when unmarked, `default_service_life_years` for the
    chemistry; past it the rule is at least at `service_life_level`. A vehicle whose BMS has never reported a state
    of health (the JBD basic info has none) is judged on the age alone: within its service life the condition is
    clear, so a service-life alarm clears once the pack is replaced and its production date recorded. Metric: SOH %.
    """

    ID = "battery_ageing"
    DIRECTION = "below"
    PEAK = "min"
    PARAMS: ClassVar = {"service_life_level": int, "default_service_life_years": float}
    SIGNALS = (n.SOH,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        soh = sample.num(n.SOH)
        expired = False
        battery = ctx.battery
        if battery is not None and battery.manufactured_ms is not None:
            years = battery.service_life_years or self.p["default_service_life_years"]
            expired = sample.ts > battery.manufactured_ms + years * MS_PER_YEAR
        if soh is None:
            if not expired:
                # Clear on age alone only where SOH never came: else the SOH samples decide (they may be sparse).
                known_age = battery is not None and battery.manufactured_ms is not None
                return _AGE_OK if known_age and not mem.get("soh_seen") else None
            return Observation(self.p["service_life_level"], None, False, {"service_life_expired": True})
        mem["soh_seen"] = True
        obs = self.grade(soh)
        if not expired:
            return obs
        return Observation(max(obs.level, self.p["service_life_level"]), soh, False, {"service_life_expired": True})


class BatteryVehicleMismatch(Rule):
    """The pack in the vehicle is not the approved one.

    Any of: its barcode is not bound to the VIN; its capacity differs from the approved capacity by more than
    `capacity_tolerance_pct`; its cell count differs from the approved count. More cells than approved — or a
    pack voltage above what the approved cell count can hold (`cell_max_v` per cell + `voltage_margin_pct`) —
    is the classic "voltage upgrade" for speed and escalates to `more_cells_level`. Barcode, capacity and cell
    count are remembered from the last sample that carried them (the BMS reports the barcode once per connection).
    """

    ID = "battery_vehicle_mismatch"
    DIRECTION = None
    PARAMS: ClassVar = {
        "level": int,
        "more_cells_level": int,
        "capacity_tolerance_pct": float,
        "cell_max_v": float,
        "voltage_margin_pct": float,
    }
    SIGNALS = (n.BARCODE, n.NOMINAL_CAPACITY, n.CELL_COUNT, n.PACK_V)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        barcode = sample.text(n.BARCODE)
        if barcode is not None:
            mem["barcode"] = barcode
        capacity = sample.num(n.NOMINAL_CAPACITY)
        if capacity is not None:
            mem["capacity"] = capacity
        cells = sample.num(n.CELL_COUNT)
        if cells is not None:
            mem["cells"] = cells
        approved = ctx.battery
        if approved is None:
            return None
        p = self.p
        level = 0
        reasons: list[str] = []
        if approved.barcodes and mem.get("barcode") is not None and mem["barcode"] not in approved.barcodes:
            level = p["level"]
            reasons.append(f"barcode {mem['barcode']} not bound to this vehicle")
        if approved.capacity_ah and mem.get("capacity") is not None:
            off = abs(mem["capacity"] - approved.capacity_ah) / approved.capacity_ah * 100.0
            if off > p["capacity_tolerance_pct"]:
                level = max(level, p["level"])
                reasons.append(f"capacity {mem['capacity']} Ah, approved {approved.capacity_ah} Ah")
        if approved.cell_count and mem.get("cells") is not None and mem["cells"] != approved.cell_count:
            more = mem["cells"] > approved.cell_count
            level = max(level, p["more_cells_level"] if more else p["level"])
            reasons.append(f"{int(mem['cells'])} cells, approved {approved.cell_count}")
        pack_v = sample.num(n.PACK_V)
        if approved.cell_count and pack_v is not None:
            ceiling = approved.cell_count * p["cell_max_v"] * (1.0 + p["voltage_margin_pct"] / 100.0)
            if pack_v > ceiling:
                level = max(level, p["more_cells_level"])
                reasons.append(f"pack at {pack_v} V, more than {approved.cell_count} cells can hold")
        if not reasons and "barcode" not in mem and "capacity" not in mem and "cells" not in mem and pack_v is None:
            return None
        return Observation(level, None, level == 0, {"reasons": reasons})
