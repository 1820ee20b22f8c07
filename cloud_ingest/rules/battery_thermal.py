"""Battery thermal rules: thermal runaway, its precursor, over-temperature tiers, probe temperature difference."""

from __future__ import annotations

import math
from typing import ClassVar

from cloud_ingest.rules import names as n
from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample


class ThermalRunaway(Rule):
    """GB 38031-2020 Annex C thermal-runaway criteria, applied to the pack in service.

    Runaway when the temperature rises at >= `rate_c_per_s` for longer than `rate_hold_s` AND either the voltage
    dropped by more than `voltage_drop_pct` of its value before the rise (lowest cell, or the pack) OR the
    temperature reached the maximum operating temperature `max_temp_c`. The rate is measured between consecutive
    samples of the hottest probe; samples further apart than `max_interval_s` give no rate.
    Metric: the hottest temperature (°C).
    """

    ID = "thermal_runaway"
    DIRECTION = None
    PARAMS: ClassVar = {
        "level": int,
        "rate_c_per_s": float,
        "rate_hold_s": float,
        "voltage_drop_pct": float,
        "max_temp_c": float,
        "max_interval_s": float,
        "clear_rate_c_per_s": float,
        "clear_temp_c": float,
    }
    SIGNALS = (n.TEMP_MAX, n.PACK_V, n.CELL_V_MIN)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        t = sample.temp_max()
        if t is None:
            return None
        p = self.p
        ts = sample.ts
        pack_v = sample.num(n.PACK_V)
        cell_v = sample.num(n.CELL_V_MIN)
        prev_ts = mem.get("ts")
        rate = None
        if prev_ts is not None and 0 < ts - prev_ts <= p["max_interval_s"] * 1000:
            rate = (t - mem["t"]) / ((ts - prev_ts) / 1000)
        if rate is not None and rate >= p["rate_c_per_s"]:
            if mem.get("since") is None:
                # The rise began at the previous sample: its voltages are the "initial voltage" of the criterion.
                mem["since"] = prev_ts
                mem["ref_pack"] = mem.get("pack")
                mem["ref_cell"] = mem.get("cell")
        else:
            mem["since"] = mem["ref_pack"] = mem["ref_cell"] = None
        mem["ts"], mem["t"], mem["pack"], mem["cell"] = ts, t, pack_v, cell_v

        since = mem["since"]
        rate_held = since is not None and ts - since > p["rate_hold_s"] * 1000
        drop = max(_drop_pct(mem["ref_pack"], pack_v), _drop_pct(mem["ref_cell"], cell_v))
        hot = t >= p["max_temp_c"]
        runaway = rate_held and (drop > p["voltage_drop_pct"] or hot)
        calm = (rate is None or rate < p["clear_rate_c_per_s"]) and t < p["clear_temp_c"]
        detail = {"rate_c_per_s": None if rate is None else round(rate, 3), "voltage_drop_pct": round(drop, 1)}
        return Observation(p["level"] if runaway else 0, t, not runaway and calm, detail)


def _drop_pct(ref: float | None, now: float | None) -> float:
    if ref is None or now is None or ref <= 0:
        return 0.0
    return (ref - now) / ref * 100.0


class ThermalRunawayPrecursor(Rule):
    """Sustained temperature rise at low current: heat that I²R cannot explain, i.e. an internal source.

    At |current| <= `low_current_a` a 48 V pack dissipates about a watt, so its temperature should at most drift
    with the ambient; a steady rise of degrees per minute means a reaction inside a cell. The rate is an
    exponentially weighted mean of the sample-to-sample rate (time constant `tau_s`), which smooths the 0.1 °C
    quantisation; it is graded only after `warmup_s` of uninterrupted low-current data and above `min_temp_c`
    (a cold pack warming up indoors is not a hazard). Each sample-to-sample rate is clipped to
    ±`max_rate_c_per_s` first, so one glitching probe reading cannot hold the mean up for minutes (faster real
    rises are the thermal-runaway rule's business).
    Metric: temperature rise, °C/min.
    """

    ID = "thermal_runaway_precursor"
    PARAMS: ClassVar = {
        "low_current_a": float,
        "tau_s": float,
        "warmup_s": float,
        "min_temp_c": float,
        "max_interval_s": float,
        "max_rate_c_per_s": float,
    }
    SIGNALS = (n.TEMP_MAX, n.PACK_I)
    RECENT = (n.PACK_I,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        t = sample.temp_max()
        current = sample.recent(n.PACK_I)
        if t is None or current is None:
            return None
        p = self.p
        ts = sample.ts
        prev_ts = mem.get("ts")
        mem["ts"], prev_t = ts, mem.get("t")
        mem["t"] = t
        if abs(current) > p["low_current_a"]:
            # Under load the rise is explained; the filter restarts at the next rest.
            mem["rate"], mem["span"] = 0.0, 0
            return None
        if prev_ts is None or prev_t is None or not 0 < ts - prev_ts <= p["max_interval_s"] * 1000:
            mem["rate"], mem["span"] = 0.0, 0
            return None
        dt = (ts - prev_ts) / 1000
        alpha = 1.0 - math.exp(-dt / p["tau_s"])
        cap = p["max_rate_c_per_s"]
        step = min(cap, max(-cap, (t - prev_t) / dt))
        rate = mem.get("rate", 0.0)
        rate += alpha * (step - rate)
        mem["rate"] = rate
        mem["span"] = mem.get("span", 0) + (ts - prev_ts)
        if mem["span"] < p["warmup_s"] * 1000:
            return None
        per_min = rate * 60.0
        if t < p["min_temp_c"]:
            return Observation(0, per_min, True)
        return self.grade(per_min, {"temp_c": t, "current_a": current})


class BatteryOverTemperature(Rule):
    """Pack/cell over-temperature in tiers, on the hottest probe (the BMS maximum, else the hottest probe).

    Metric: °C.
    """

    ID = "battery_over_temperature"
    SIGNALS = (n.TEMP_MAX,)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        t = sample.temp_max()
        return None if t is None else self.grade(t)


class ProbeTemperatureDifference(Rule):
    """Temperature difference across the pack's probes (GB/T 32960.3 "temperature difference" alarm).

    A large difference means local heating (a bad cell or connection) that the maximum alone may not show yet.
    Needs at least two probes, or the BMS's Max and Min. Metric: °C.
    """

    ID = "probe_temperature_difference"
    SIGNALS = (n.TEMP_MAX, n.TEMP_MIN)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        probes = sample.probes()
        if len(probes) >= 2:
            diff = max(probes) - min(probes)
        else:
            hi, lo = sample.num(n.TEMP_MAX), sample.num(n.TEMP_MIN)
            if hi is None or lo is None:
                return None
            diff = hi - lo
        return self.grade(diff)
