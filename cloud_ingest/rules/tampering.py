"""Illegal-modification rules: speed limiter, wheel size, controller configuration vs the factory record."""

from __future__ import annotations

import math
from typing import ClassVar

from cloud_ingest.rules import names as n
from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample


class SpeedLimiterTampering(Rule):
    """Riding faster than the model's legal maximum under motor power, measured by GNSS (not by the controller).

    GB 17761-2018 caps an e-bike's maximum design speed at 25 km/h and requires that it cannot be raised; the
    thresholds add a tolerance for GNSS speed error and tyre wear. Only fixes with HDOP <= `max_hdop` and at least
    `min_sats` satellites count, and only while the motor draws at least `drive_current_a` (when the controller
    reports its supply current), so coasting downhill is not tampering. Metric: GNSS speed, km/h.
    """

    ID = "speed_limiter_tampering"
    PARAMS: ClassVar = {"max_hdop": float, "min_sats": int, "drive_current_a": float}
    SIGNALS = (n.GNSS_SPEED, n.HDOP, n.SATS, n.SUPPLY_CURRENT)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        speed = sample.num(n.GNSS_SPEED)
        if speed is None or not sample.gnss_good(self.p["max_hdop"], self.p["min_sats"]):
            return None
        obs = self.grade(speed)
        drive = sample.num(n.SUPPLY_CURRENT)
        if obs.level and drive is not None and drive < self.p["drive_current_a"]:
            return Observation(0, None, obs.clear, {"coasting": True})
        return obs


class WheelSizeTampering(Rule):
    """The controller's wheel speed under-reads the GNSS speed: a wheel-size setting smaller than the real wheel.

    The controller derives speed from motor rpm and the configured wheel size, so configuring a smaller wheel
    makes it believe it is slower and lets the limiter allow more real speed. Distances over an exponential
    window (`tau_s`) are compared rather than instantaneous speeds, so the GNSS's ~1 s lag in acceleration and
    braking cancels out. Samples count while both speeds exist, the fix is good and GNSS speed >=
    `min_speed_kmh`; nothing is graded before `min_distance_m`. Metric: (GNSS − wheel) / GNSS distance, %.
    """

    ID = "wheel_size_tampering"
    PARAMS: ClassVar = {
        "min_speed_kmh": float,
        "max_hdop": float,
        "min_sats": int,
        "tau_s": float,
        "min_distance_m": float,
        "max_interval_s": float,
    }
    SIGNALS = (n.GNSS_SPEED, n.WHEEL_SPEED, n.HDOP, n.SATS)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        p = self.p
        gnss, wheel = sample.num(n.GNSS_SPEED), sample.num(n.WHEEL_SPEED)
        if gnss is None or wheel is None or gnss < p["min_speed_kmh"]:
            return None
        if not sample.gnss_good(p["max_hdop"], p["min_sats"]):
            return None
        prev = mem.get("ts")
        mem["ts"] = sample.ts
        if prev is None or not 0 < sample.ts - prev <= p["max_interval_s"] * 1000:
            return None
        dt = (sample.ts - prev) / 1000
        decay = math.exp(-dt / p["tau_s"])
        g = mem.get("g", 0.0) * decay + gnss / 3.6 * dt
        w = mem.get("w", 0.0) * decay + wheel / 3.6 * dt
        mem["g"], mem["w"] = g, w
        if g < p["min_distance_m"]:
            return None
        return self.grade((g - w) / g * 100.0, {"gnss_kmh": gnss, "wheel_kmh": wheel})


class ControllerConfigMismatch(Rule):
    """The controller's configured speed limit or wheel size differs from the factory record.

    A difference is `level`; a speed limit raised above the factory value is `raised_limit_level` (a derestricted
    vehicle). The controller reports its configuration in occasional config frames, so the last reported values
    are remembered. Metric: configured speed limit, km/h.
    """

    ID = "controller_config_mismatch"
    DIRECTION = None
    PARAMS: ClassVar = {
        "level": int,
        "raised_limit_level": int,
        "speed_tolerance_kmh": float,
        "wheel_tolerance_inch": float,
    }
    SIGNALS = (n.SPEED_LIMIT, n.WHEEL_SIZE)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        limit, wheel = sample.num(n.SPEED_LIMIT), sample.num(n.WHEEL_SIZE)
        if limit is not None:
            mem["limit"] = limit
        if wheel is not None:
            mem["wheel"] = wheel
        factory = ctx.controller
        if factory is None or (limit is None and wheel is None):
            return None
        p = self.p
        level = 0
        reasons: list[str] = []
        limit, wheel = mem.get("limit"), mem.get("wheel")
        if limit is not None and factory.speed_limit_kmh is not None:
            delta = limit - factory.speed_limit_kmh
            if delta > p["speed_tolerance_kmh"]:
                level = p["raised_limit_level"]
                reasons.append(f"speed limit raised to {limit} km/h (factory {factory.speed_limit_kmh})")
            elif -delta > p["speed_tolerance_kmh"]:
                level = p["level"]
                reasons.append(f"speed limit {limit} km/h (factory {factory.speed_limit_kmh})")
        if (
            wheel is not None
            and factory.wheel_inch is not None
            and abs(wheel - factory.wheel_inch) > p["wheel_tolerance_inch"]
        ):
            level = max(level, p["level"])
            reasons.append(f"wheel size {wheel} in (factory {factory.wheel_inch})")
        return Observation(level, limit, level == 0, {"reasons": reasons})
