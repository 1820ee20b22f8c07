"""Rules on where and how the vehicle moves: elevator entry, theft while locked, crash or fall, GNSS cut/jamming."""

from __future__ import annotations

import math
from typing import ClassVar

from cloud_ingest.rules import names as n
from cloud_ingest.rules.base import Mem, Observation, Rule
from cloud_ingest.rules.context import VehicleContext
from cloud_ingest.rules.sample import Sample

_EARTH_RADIUS_M = 6_371_008.8


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine); metres-scale accuracy is all these rules need."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


class ElevatorEntrySuspected(Rule):
    """The vehicle is taken into a building and up or down: the e-bike-in-the-lift fire hazard.

    The catalogue has no barometer or accelerometer, so this works from what GNSS and the controller give:
    - `push_level`: GNSS lost or degraded while the wheel turns at walking pace (`walk_min_kmh`..`walk_max_kmh`)
      without motor drive — the vehicle is being pushed somewhere the sky is not visible.
    - `vertical_level`: after such a fade, a (degraded) fix within `max_horizontal_m` of the last good outdoor fix
      reports an altitude at least `storey_m` away from it, within `window_s` — the vehicle changed floors.
    The alarm clears once a good fix (outdoors) has held for the clear duration. Limits: in an elevator cab the
    receiver usually has no fix at all, so the vertical evidence arrives only when a floor near a window gives
    one; degraded altitude is noisy (tens of metres at high HDOP). A barometric altitude signal would make this
    rule reliable (proposed in docs/RULES.md).
    Metric: altitude change, m.
    """

    ID = "elevator_entry_suspected"
    DIRECTION = None
    PARAMS: ClassVar = {
        "push_level": int,
        "vertical_level": int,
        "walk_min_kmh": float,
        "walk_max_kmh": float,
        "drive_current_a": float,
        "good_hdop": float,
        "good_sats": int,
        "lost_hdop": float,
        "lost_sats": int,
        "storey_m": float,
        "max_horizontal_m": float,
        "window_s": float,
    }
    SIGNALS = (n.LAT, n.LON, n.ALT, n.WHEEL_SPEED, n.SUPPLY_CURRENT, n.THROTTLE, n.FIX_MODE, n.HDOP, n.SATS)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        p = self.p
        pos = sample.position()
        alt = sample.num(n.ALT)
        if sample.gnss_good(p["good_hdop"], p["good_sats"]) and pos is not None:
            mem["good"] = [sample.ts, pos[0], pos[1], alt]
            mem["faded"] = False
            return Observation(0, None, True)
        lost = sample.gnss_lost(p["lost_hdop"], p["lost_sats"])
        wheel = sample.num(n.WHEEL_SPEED)
        if wheel is None and pos is None:
            return None
        if lost:
            mem["faded"] = True
        level = 0
        detail: dict[str, object] = {}
        if lost and wheel is not None and self._pushed(sample, wheel):
            level = p["push_level"]
            detail["pushed_kmh"] = wheel
        good = mem.get("good")
        value = None
        if mem.get("faded") and good is not None and pos is not None and alt is not None and good[3] is not None:
            near = distance_m(good[1], good[2], pos[0], pos[1]) <= p["max_horizontal_m"]
            recent = sample.ts - good[0] <= p["window_s"] * 1000
            value = abs(alt - good[3])
            if near and recent and value >= p["storey_m"]:
                level = max(level, p["vertical_level"])
                detail["altitude_change_m"] = round(alt - good[3], 1)
        return Observation(level, value, False, detail)

    def _pushed(self, sample: Sample, wheel: float) -> bool:
        p = self.p
        if not p["walk_min_kmh"] <= wheel <= p["walk_max_kmh"]:
            return False
        drive = sample.num(n.SUPPLY_CURRENT)
        if drive is not None and abs(drive) >= p["drive_current_a"]:
            return False
        throttle = sample.num(n.THROTTLE)
        return throttle is None or throttle == 0


class TheftWhileLocked(Rule):
    """The vehicle moves while its owner has it locked (context `locked`).

    Rolling (wheel speed >= `wheel_min_kmh`) is at least `rolling_level`; displacement from where it was locked —
    the first good fix (HDOP <= `max_hdop`, >= `min_sats`) after locking — is graded by the distance thresholds
    (a vehicle carried away on a truck does not turn its wheel). Unlocking clears the alarm. Metric: m.
    """

    ID = "theft_displacement_while_locked"
    PARAMS: ClassVar = {"rolling_level": int, "wheel_min_kmh": float, "max_hdop": float, "min_sats": int}
    SIGNALS = (n.LAT, n.LON, n.WHEEL_SPEED, n.HDOP, n.SATS)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        if not ctx.locked:
            mem["anchor"] = None
            return Observation(0, 0.0, True)
        p = self.p
        pos = sample.position()
        fix = pos if pos is not None and sample.gnss_good(p["max_hdop"], p["min_sats"]) else None
        if fix is not None and mem.get("anchor") is None:
            mem["anchor"] = [fix[0], fix[1]]
        wheel = sample.num(n.WHEEL_SPEED)
        rolling = wheel is not None and wheel >= p["wheel_min_kmh"]
        anchor = mem.get("anchor")
        if fix is not None and anchor is not None:
            moved = distance_m(anchor[0], anchor[1], fix[0], fix[1])
            obs = self.grade(moved, {"rolling": rolling})
            if rolling:
                return Observation(max(obs.level, p["rolling_level"]), moved, False, obs.detail)
            return obs
        if wheel is None:
            return None
        return Observation(p["rolling_level"] if rolling else 0, None, False, {"rolling": rolling})


class CrashOrFall(Rule):
    """A deceleration no brake can produce, from riding speed to a standstill, and the vehicle stays down.

    Impact: between two samples at most `max_interval_s` apart, wheel or GNSS speed falls from >= `min_speed_kmh`
    to <= `still_kmh` at >= `decel_ms2` (a two-wheeler's tyres brake at ~6 m/s² at most, so 7 m/s² means it hit
    something or fell). Afterwards the metric is how long it has stayed still (GNSS speed, else wheel speed,
    <= `still_kmh`); moving on ends the episode. Limits: without an accelerometer, a fall at walking speed and a
    crash between samples farther apart than `max_interval_s` are invisible (an IMU signal is proposed in
    docs/RULES.md). Metric: seconds still since the impact.
    """

    ID = "crash_or_fall"
    PARAMS: ClassVar = {"decel_ms2": float, "min_speed_kmh": float, "still_kmh": float, "max_interval_s": float}
    SIGNALS = (n.WHEEL_SPEED, n.GNSS_SPEED)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        p = self.p
        wheel, gnss = sample.num(n.WHEEL_SPEED), sample.num(n.GNSS_SPEED)
        if wheel is None and gnss is None:
            return None
        ts = sample.ts
        prev_ts = mem.get("ts")
        if prev_ts is not None and 0 < ts - prev_ts <= p["max_interval_s"] * 1000:
            dt = (ts - prev_ts) / 1000
            for now, before in ((wheel, mem.get("wheel")), (gnss, mem.get("gnss"))):
                if now is None or before is None:
                    continue
                if (
                    before >= p["min_speed_kmh"]
                    and now <= p["still_kmh"]
                    and (before - now) / 3.6 / dt >= p["decel_ms2"]
                ):
                    mem["impact"] = ts
                    mem["impact_from_kmh"] = before
                    mem["impact_decel_ms2"] = round((before - now) / 3.6 / dt, 1)
        mem["ts"], mem["wheel"], mem["gnss"] = ts, wheel, gnss
        impact = mem.get("impact")
        if impact is None:
            return Observation(0, 0.0, True)
        speed = gnss if gnss is not None else wheel
        if speed is not None and speed > p["still_kmh"]:
            mem["impact"] = None
            return Observation(0, 0.0, True)
        still_s = (ts - impact) / 1000
        detail = {"from_kmh": mem.get("impact_from_kmh"), "decel_ms2": mem.get("impact_decel_ms2")}
        return self.grade(still_s, detail)


class GnssCutOrJamming(Rule):
    """GNSS collapses while the wheel says the vehicle is riding: antenna cut, jammer or spoofing countermeasure.

    Counts riding time (wheel speed >= `moving_kmh`) without a usable fix (no position, no fix, fewer than
    `lost_sats` satellites or HDOP above `lost_hdop`); a usable fix resets it. Parking in a garage does not count
    (the wheel stands), a tunnel is shorter than the L1 time at riding speed. Metric: riding seconds without GNSS.
    """

    ID = "gnss_cut_or_jamming"
    PARAMS: ClassVar = {"moving_kmh": float, "lost_hdop": float, "lost_sats": int, "max_interval_s": float}
    SIGNALS = (n.WHEEL_SPEED, n.LAT, n.LON, n.FIX_MODE, n.HDOP, n.SATS)

    def observe(self, mem: Mem, sample: Sample, ctx: VehicleContext) -> Observation | None:
        wheel = sample.num(n.WHEEL_SPEED)
        if wheel is None:
            return None
        p = self.p
        ts = sample.ts
        prev_ts = mem.get("ts")
        mem["ts"] = ts
        if not sample.gnss_lost(p["lost_hdop"], p["lost_sats"]):
            mem["lost_s"] = 0.0
            return Observation(0, 0.0, True)
        lost_s = mem.get("lost_s", 0.0)
        if wheel >= p["moving_kmh"] and prev_ts is not None and 0 < ts - prev_ts <= p["max_interval_s"] * 1000:
            lost_s += (ts - prev_ts) / 1000
        mem["lost_s"] = lost_s
        return self.grade(lost_s, {"wheel_kmh": wheel})
