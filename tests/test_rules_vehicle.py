"""Vehicle rules — where and how it moves, tampering, charging zones, connectivity: a positive stream and negative
near-threshold streams for each, and simulated normal rides of both variants through every rule.

The speed limiter is a threshold rule; its ladder (levels, durations, peak, hysteresis) is in
test_rules_engine.py, its riding-specific negatives here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from cloud_ingest.rules import ApprovedBattery, EventKind, FactoryControllerConfig, VehicleContext
from cloud_ingest.rules import names as n
from protocol.catalogue import Value
from tests.test_rules_support import (
    CATALOGUE,
    HOME,
    RULES,
    Feeder,
    cell,
    context,
    engine,
    healthy,
    of_kind,
    probe,
)
from tests.test_rules_support import settings as rule_settings

Make = Callable[[float], dict[str, Value]]
M_PER_DEG_LAT = 111_195.0


def _raised_at(f: Feeder, kind: EventKind = EventKind.RAISED) -> list[tuple[float, int]]:
    return [(f.secs(e), int(e.level)) for e in f.events if e.kind is kind]


def _no_fix(**changes: Value) -> dict[str, Value]:
    """A sample with the receiver blind: no position, no fix (what the agent sends indoors or with a cut antenna)."""
    v = healthy(**changes)
    for name in (n.LAT, n.LON, n.ALT, n.GNSS_SPEED, n.HDOP):
        v.pop(name, None)
    v[n.FIX_MODE] = 1
    v[n.SATS] = 0
    return v


def _north(metres: float) -> float:
    return HOME[0] + metres / M_PER_DEG_LAT


# -- charging inside a no-charging zone -------------------------------------------------------------------------


def _zones(lat: float, lon: float) -> set[str]:
    inside = abs(lat - HOME[0]) < 0.0005 and abs(lon - HOME[1]) < 0.0005  # ≈ a 110 m × 100 m residential block
    return {"no_charging"} if inside else set()


def test_charging_in_a_no_charging_zone_raises_after_its_duration_with_the_last_fix_and_clears_on_unplug() -> None:
    s = rule_settings("charging_in_no_charging_zone")
    f = Feeder(engine("charging_in_no_charging_zone"), context(zones_at=_zones))
    f.run(30, lambda t: healthy())  # parked in the courtyard, good fix
    start = f.t
    f.run(s.duration_ms[1] / 1000 + 30, lambda t: _no_fix(**{n.PACK_I: 3.0}))  # carried up, charging, no fix
    assert _raised_at(f) == [(start + s.duration_ms[1] / 1000, s.params["level"])]
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 10, lambda t: _no_fix(**{n.PACK_I: -0.3}))
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def test_charging_zone_near_misses_raise_nothing() -> None:
    s = rule_settings("charging_in_no_charging_zone")
    f = Feeder(engine("charging_in_no_charging_zone"), context(zones_at=_zones))
    # Charging at the charging shed 300 m north of the block.
    f.run(3600, lambda t: healthy(**{n.LAT: _north(300), n.PACK_I: 3.0}), step_s=10)
    # Parked inside the zone, not charging.
    f.run(3600, lambda t: healthy(), step_s=10)
    # Plugged in inside, unplugged before the duration.
    f.run(s.duration_ms[1] / 1000 - 10, lambda t: healthy(**{n.PACK_I: 3.0}))
    f.run(30, lambda t: healthy())
    # Charging with only a fix older than position_max_age_s: where it is is unknown.
    f.run(s.params["position_max_age_s"] + 60, lambda t: _no_fix(), step_s=10)
    f.run(300, lambda t: _no_fix(**{n.PACK_I: 3.0}))
    assert f.events == []


# -- speed limiter (riding-specific negatives) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "changes"),
    [
        ("coasting downhill, motor off", {n.GNSS_SPEED: 35.0, n.SUPPLY_CURRENT: 0.2}),
        ("fast but HDOP too poor to trust", {n.GNSS_SPEED: 35.0, n.SUPPLY_CURRENT: 12.0, n.HDOP: 2.5}),
        ("fast but too few satellites", {n.GNSS_SPEED: 35.0, n.SUPPLY_CURRENT: 12.0, n.SATS: 4}),
        ("no fix at all", {n.GNSS_SPEED: 35.0, n.SUPPLY_CURRENT: 12.0, n.FIX_MODE: 1}),
    ],
)
def test_speed_limiter_needs_powered_overspeed_on_a_good_fix(label: str, changes: dict[str, Value]) -> None:
    assert Feeder(engine("speed_limiter_tampering")).run(120, lambda t: healthy(**changes)) == [], label


def test_speed_limiter_short_burst_is_not_sustained() -> None:
    s = rule_settings("speed_limiter_tampering")
    burst = min(d for d in s.duration_ms if d) / 1000 - 1
    f = Feeder(engine("speed_limiter_tampering"))
    f.run(burst, lambda t: healthy(**{n.GNSS_SPEED: 45.0, n.SUPPLY_CURRENT: 20.0}))
    f.run(60, lambda t: healthy(**{n.GNSS_SPEED: 22.0, n.SUPPLY_CURRENT: 8.0}))
    assert f.events == []


# -- wheel-size tampering ---------------------------------------------------------------------------------------


def _riding(gnss: float, wheel: float, **changes: Value) -> dict[str, Value]:
    return healthy(**{n.GNSS_SPEED: gnss, n.WHEEL_SPEED: wheel, n.SUPPLY_CURRENT: 8.0, n.PACK_I: -8.0, **changes})


def test_wheel_size_tampering_raises_escalates_and_clears() -> None:
    s = rule_settings("wheel_size_tampering")
    p = s.params
    f = Feeder(engine("wheel_size_tampering"))
    # 16-inch wheel configured as 14-inch: the controller under-reads by 12.5 %.
    f.run(150, lambda t: _riding(30.0, 30.0 * 14 / 16))
    # Graded once the window holds min_distance_m (≈ 31 s at 30 km/h with τ = 60 s), then L1's duration.
    ready = -p["tau_s"] * math.log(1 - p["min_distance_m"] / (30 / 3.6 * p["tau_s"]))
    assert _raised_at(f) == [(pytest.approx(math.ceil(ready) + s.duration_ms[0] / 1000, abs=1), 1)]
    assert f.events[0].value == pytest.approx(12.5, abs=0.01)
    # Configured as 10-inch: 37.5 % — escalates through L2 to L3 as the window fills with the new ratio.
    f.run(300, lambda t: _riding(30.0, 30.0 * 10 / 16))
    assert [lvl for _, lvl in _raised_at(f, EventKind.ESCALATED)] == [2, 3]
    assert of_kind(f.events, EventKind.UPDATED)
    # Restored: the discrepancy decays below `clear`, then the clear duration.
    f.run(400, lambda t: _riding(30.0, 30.0))
    assert len(of_kind(f.events, EventKind.CLEARED)) == 1


def _stop_and_go(t: float) -> float:
    """Wheel speed of a 60 s cycle: accelerate 8 s to 30 km/h, cruise 37 s, brake 5 s, stand 10 s."""
    c = t % 60
    if c < 8:
        return 30 * c / 8
    if c < 45:
        return 30.0
    if c < 50:
        return 30 * (50 - c) / 5
    return 0.0


@pytest.mark.parametrize(
    ("label", "make"),
    [
        ("worn tyre, 7 % under-read", lambda t: _riding(30.0, 30.0 * 0.93)),
        ("stop-and-go with the GNSS speed a second late", lambda t: _riding(_stop_and_go(t - 1), _stop_and_go(t))),
        ("wild GNSS speed on poor fixes", lambda t: _riding(45.0, 25.0, **{n.HDOP: 4.0})),
        ("walking pace", lambda t: _riding(8.0, 5.0)),
    ],
)
def test_wheel_size_near_misses_raise_nothing(label: str, make: Make) -> None:
    assert Feeder(engine("wheel_size_tampering")).run(1200, make) == [], label


# -- controller configuration vs factory ---------------------------------------------------------------------------


def test_controller_config_mismatch_raises_escalates_on_a_raised_limit_and_clears_when_restored() -> None:
    p = rule_settings("controller_config_mismatch").params
    f = Feeder(engine("controller_config_mismatch"))
    f.run(5, lambda t: healthy(**{n.WHEEL_SIZE: 14.0}))
    f.run(5, lambda t: healthy(**{n.WHEEL_SIZE: 14.0, n.SPEED_LIMIT: 35.0}))
    f.run(5, lambda t: healthy(**{n.WHEEL_SIZE: 14.0, n.SPEED_LIMIT: 45.0}))
    f.run(5, lambda t: healthy())
    assert _raised_at(f) == [(0.0, p["level"])]
    assert _raised_at(f, EventKind.ESCALATED) == [(5.0, p["raised_limit_level"])]
    assert [(f.secs(e), e.peak) for e in of_kind(f.events, EventKind.UPDATED)] == [(10.0, 45.0)]
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [15.0]
    assert "wheel size 14.0" in f.events[0].detail["reasons"][0]


def test_controller_config_near_misses_raise_nothing() -> None:
    f = Feeder(engine("controller_config_mismatch"))
    f.run(30, lambda t: healthy(**{n.SPEED_LIMIT: 25.4, n.WHEEL_SIZE: 16.2}))
    g = Feeder(engine("controller_config_mismatch"), context(controller=None))
    g.run(30, lambda t: healthy(**{n.SPEED_LIMIT: 45.0}))
    h = Feeder(engine("controller_config_mismatch"), context(controller=FactoryControllerConfig(None, None)))
    h.run(30, lambda t: healthy(**{n.SPEED_LIMIT: 45.0}))
    assert f.events == g.events == h.events == []


# -- suspected elevator entry --------------------------------------------------------------------------------------


def test_elevator_entry_push_indoors_then_a_storey_up_raises_escalates_and_clears_outdoors() -> None:
    s = rule_settings("elevator_entry_suspected")
    p = s.params
    f = Feeder(engine("elevator_entry_suspected"))
    f.run(30, lambda t: healthy())  # parked outside, good fix, 250 m altitude
    start = f.t
    pushed = {n.WHEEL_SPEED: 3.0, n.SUPPLY_CURRENT: 0.2, n.THROTTLE: 0}
    f.run(40, lambda t: _no_fix(**pushed))  # pushed into the lobby
    assert _raised_at(f) == [(start + s.duration_ms[0] / 1000, p["push_level"])]
    f.run(40, lambda t: _no_fix())  # in the lift
    start = f.t
    upstairs = {n.LAT: _north(10), n.ALT: 274.0, n.FIX_MODE: 3, n.HDOP: 6.0, n.SATS: 5, n.WHEEL_SPEED: 2.0}
    f.run(30, lambda t: healthy(**upstairs))  # a corridor by a window: a poor fix, eight storeys up
    assert _raised_at(f, EventKind.ESCALATED) == [(start + s.duration_ms[1] / 1000, p["vertical_level"])]
    assert of_kind(f.events, EventKind.ESCALATED)[0].detail["altitude_change_m"] == pytest.approx(24.0)
    f.run(600, lambda t: _no_fix())  # parked in the flat
    assert of_kind(f.events, EventKind.CLEARED) == []
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 10, lambda t: healthy())  # back outside
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def test_elevator_near_misses_raise_nothing() -> None:
    s = rule_settings("elevator_entry_suspected")
    walk = {n.WHEEL_SPEED: 4.0, n.SUPPLY_CURRENT: 0.2, n.THROTTLE: 0}
    # Pushed along an open street: the sky is visible.
    f = Feeder(engine("elevator_entry_suspected"))
    f.run(300, lambda t: healthy(**{n.LAT: _north(t), n.GNSS_SPEED: 4.0, **walk}))
    # Pushed into a ground-floor shed for less than the push duration, then parked there for half an hour.
    f.run(s.duration_ms[0] / 1000 - 5, lambda t: _no_fix(**walk))
    f.run(1800, lambda t: _no_fix(), step_s=5)
    # An urban canyon while riding: poor fixes with the altitude jumping, far from the last good fix.
    f.run(30, lambda t: healthy(**{n.LAT: _north(1000), n.GNSS_SPEED: 25.0, n.WHEEL_SPEED: 25.0}))
    f.run(
        120,
        lambda t: healthy(
            **{
                n.LAT: _north(1100 + 7 * t),
                n.ALT: 230 + 20 * (t % 2),
                n.HDOP: 6.0,
                n.SATS: 5,
                n.GNSS_SPEED: 25.0,
                n.WHEEL_SPEED: 25.0,
            }
        ),
    )
    assert f.events == []


# -- theft / displacement while locked ------------------------------------------------------------------------------


def test_theft_rolling_then_carried_away_raises_escalates_and_clears_on_unlock() -> None:
    s = rule_settings("theft_displacement_while_locked")
    locked = context(locked=True)
    f = Feeder(engine("theft_displacement_while_locked"), locked)
    f.run(30, lambda t: healthy())  # locked where it was parked: the anchor
    start = f.t
    # Pushed away at walking pace, then loaded on a van (the wheel stops, the position runs).
    f.run(30, lambda t: healthy(**{n.LAT: _north(1.2 * (t - start)), n.WHEEL_SPEED: 4.0}))
    assert _raised_at(f) == [(start + s.duration_ms[0] / 1000, s.params["rolling_level"])]
    van = f.t

    def carried(t: float) -> dict[str, Value]:
        return healthy(**{n.LAT: _north(36 + 10 * (t - van)), n.GNSS_SPEED: 36.0})

    f.run(60, carried)
    escalated = _raised_at(f, EventKind.ESCALATED)
    assert [lvl for _, lvl in escalated] == [2, 3]
    # 36 m + 10 m/s: 50 m at +2 s, 300 m at +27 s (rounded up to the sample), plus each level's duration.
    assert escalated[0][0] == van + 2 + s.duration_ms[1] / 1000
    assert escalated[1][0] == van + 27 + s.duration_ms[2] / 1000
    assert of_kind(f.events, EventKind.UPDATED)
    # The owner unlocks it (recovered): cleared after the clear duration.
    f.ctx = context(locked=False)
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 5, lambda t: healthy())
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def test_theft_near_misses_raise_nothing() -> None:
    s = rule_settings("theft_displacement_while_locked")
    rng = random.Random(3)
    f = Feeder(engine("theft_displacement_while_locked"), context(locked=True))
    # Parked GNSS wander of ±20 m for half an hour.
    f.run(1800, lambda t: healthy(**{n.LAT: _north(rng.uniform(-20, 20)), n.LON: HOME[1] + rng.uniform(-2e-4, 2e-4)}))
    # A multipath outlier 80 m off, shorter than the duration.
    f.run(s.duration_ms[1] / 1000 - 2, lambda t: healthy(**{n.LAT: _north(80)}))
    # Poor fixes 200 m off do not count.
    f.run(60, lambda t: healthy(**{n.LAT: _north(200), n.HDOP: 4.0}))
    # The owner unlocks and rides away.
    g = Feeder(engine("theft_displacement_while_locked"), context(locked=False))
    g.run(120, lambda t: healthy(**{n.LAT: _north(8 * t), n.WHEEL_SPEED: 28.0}))
    assert f.events == g.events == []


# -- crash or fall ----------------------------------------------------------------------------------------------


def test_crash_raises_when_the_vehicle_stays_down_escalates_with_time_and_clears_when_riding_on() -> None:
    s = rule_settings("crash_or_fall")
    l1, l2, l3 = s.levels
    f = Feeder(engine("crash_or_fall"))
    f.run(20, lambda t: healthy(**{n.WHEEL_SPEED: 30.0, n.GNSS_SPEED: 30.0}))
    impact = f.t  # 30 km/h → 0 within one second: 8.3 m/s²
    f.run(l3 + 70, lambda t: healthy())
    assert _raised_at(f) == [(impact + l1, 1)]
    assert _raised_at(f, EventKind.ESCALATED) == [(impact + l2, 2), (impact + l3, 3)]
    assert f.events[0].detail == {"from_kmh": 30.0, "decel_ms2": 8.3}
    # The peak (seconds down) is reported again every update_step after the last escalation.
    step = s.update_step
    assert [f.secs(e) for e in of_kind(f.events, EventKind.UPDATED)] == [impact + l2 + step, impact + l3 + step]
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 5, lambda t: healthy(**{n.WHEEL_SPEED: 12.0, n.GNSS_SPEED: 12.0}))
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def _brake(from_kmh: float, seconds: float, step_s: float = 1.0) -> Feeder:
    f = Feeder(engine("crash_or_fall"))
    f.run(20, lambda t: healthy(**{n.WHEEL_SPEED: from_kmh, n.GNSS_SPEED: from_kmh}), step_s=step_s)
    start = f.t

    def braking(t: float) -> dict[str, Value]:
        v = max(0.0, from_kmh * (1 - (t - start + step_s) / seconds))
        return healthy(**{n.WHEEL_SPEED: v, n.GNSS_SPEED: v})

    f.run(300, braking, step_s=step_s)
    return f


def test_crash_near_misses_raise_nothing() -> None:
    assert _brake(30.0, 2.0).events == []  # emergency stop: 4.2 m/s²
    assert _brake(25.0, 1.0).events == []  # 6.9 m/s², just under the impact threshold
    assert _brake(30.0, 5.0, step_s=5.0).events == []  # samples too far apart to tell
    f = Feeder(engine("crash_or_fall"))  # a knock, back up and riding within two seconds
    f.run(20, lambda t: healthy(**{n.WHEEL_SPEED: 30.0, n.GNSS_SPEED: 30.0}))
    f.run(2, lambda t: healthy())
    f.run(60, lambda t: healthy(**{n.WHEEL_SPEED: 15.0, n.GNSS_SPEED: 15.0}))
    assert f.events == []


# -- GNSS antenna cut or jamming -------------------------------------------------------------------------------------


def test_gnss_loss_while_riding_raises_escalates_and_clears_with_the_fix() -> None:
    s = rule_settings("gnss_cut_or_jamming")
    l1, l2 = s.levels[0], s.levels[1]
    assert l1 is not None and l2 is not None
    f = Feeder(engine("gnss_cut_or_jamming"))
    f.run(10, lambda t: _riding(20.0, 20.0))
    last_fix = f.t - 1
    f.run(l2 + 30, lambda t: _no_fix(**{n.WHEEL_SPEED: 20.0}))
    assert _raised_at(f) == [(last_fix + l1, 1)]
    assert _raised_at(f, EventKind.ESCALATED) == [(last_fix + l2, 2)]
    assert [f.secs(e) for e in of_kind(f.events, EventKind.UPDATED)] == [
        last_fix + l1 + s.update_step,
        last_fix + l1 + 2 * s.update_step,
        last_fix + l1 + 3 * s.update_step,
    ]
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 5, lambda t: _riding(20.0, 20.0))
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def test_gnss_loss_near_misses_raise_nothing() -> None:
    l1 = rule_settings("gnss_cut_or_jamming").levels[0]
    assert l1 is not None
    f = Feeder(engine("gnss_cut_or_jamming"))
    f.run(10, lambda t: _riding(25.0, 25.0))
    f.run(l1 - 5, lambda t: _no_fix(**{n.WHEEL_SPEED: 25.0}))  # a tunnel
    f.run(60, lambda t: _riding(25.0, 25.0))
    f.run(3600, lambda t: _no_fix(), step_s=5)  # an underground garage, parked
    f.run(600, lambda t: _riding(25.0, 25.0, **{n.HDOP: 6.0, n.SATS: 6}))  # urban canyon: poor but usable
    assert f.events == []


# -- offline ----------------------------------------------------------------------------------------------------


def test_offline_raises_past_three_reporting_intervals_escalates_and_clears_with_the_next_sample() -> None:
    s = rule_settings("vehicle_offline")
    l1, l2 = s.levels[0], s.levels[1]
    assert l1 == 3.0 and l2 is not None
    ctx = context(reporting_interval_s=5.0)
    f = Feeder(engine("vehicle_offline"), ctx)
    f.run(60, lambda t: healthy(), step_s=5)
    last = f.t - 5
    assert f.tick(last + 14.9) == []
    assert [(e.kind, e.level) for e in f.tick(last + 15)] == [(EventKind.RAISED, 1)]
    assert f.tick(last + 200) == []
    assert [(e.kind, e.level) for e in f.tick(last + l2 * 5)] == [(EventKind.ESCALATED, 2)]
    back = last + l2 * 5 + 100
    f.t = back
    cleared = f.run(1, lambda t: healthy())
    assert [(e.kind, f.secs(e)) for e in cleared] == [(EventKind.CLEARED, back)]


def test_offline_near_misses_raise_nothing() -> None:
    f = Feeder(engine("vehicle_offline"), context(reporting_interval_s=5.0))
    for _ in range(100):
        f.run(5, lambda t: healthy(), step_s=5)
        f.tick(f.t + 9)  # the newest sample is ≤ 14 s old when the service looks
    assert f.events == []


# -- simulated normal rides through every rule --------------------------------------------------------------------


def _simulated_ride(variant: str, seconds: int, seed: int) -> tuple[Feeder, dict[str, int]]:
    from simulators.bms_jbd import JbdBmsEmulator
    from simulators.controller_uart import ControllerEmulator
    from simulators.route import route_for
    from simulators.vehicle import VehicleModel

    t0 = 1_767_225_600.0
    model = VehicleModel(route_for(seed), seed=seed, start_time=t0, variant=variant)
    bms, ctl = JbdBmsEmulator(model), ControllerEmulator(model)
    ctx = VehicleContext(
        model=variant,
        chemistry="NMC",
        battery=ApprovedBattery(frozenset({bms.barcode}), bms.nominal_ah, bms.cells),
        controller=FactoryControllerConfig(model.variant.speed_limit_kmh, model.variant.wheel_inch),
        zones_at=_zones,
    )
    f = Feeder(engine(), ctx)

    def sample(t: float) -> dict[str, Value]:
        state = model.state_at(t0 + t)
        v: dict[str, Value] = {
            n.LAT: state.lat,
            n.LON: state.lon,
            n.ALT: state.altitude_m,
            n.GNSS_SPEED: round(state.speed_kmh, 2),
            n.FIX_MODE: 3,
            n.HDOP: 0.9,
            n.SATS: 14,
            n.BARCODE: bms.barcode,
        }
        v.update(bms.basic_info(state).signals(CATALOGUE))
        for k, mv in enumerate(bms.cell_millivolts(state), 1):
            v[cell(k)] = mv / 1000
        v.update(ctl.status(state).signals(CATALOGUE))
        v.update(ctl.config().signals(CATALOGUE))
        return v

    f.run(seconds, sample)
    raised: dict[str, int] = {}
    for e in of_kind(f.events, EventKind.RAISED):
        raised[e.rule] = raised.get(e.rule, 0) + 1
    return f, raised


def test_simulated_normal_emoto72_ride_raises_nothing() -> None:
    f, raised = _simulated_ride("emoto72", 1800, seed=1)
    assert raised == {}
    assert f.eng.stats.rule_errors == 0


def test_simulated_normal_ebike48_ride_raises_nothing() -> None:
    # The simulated e-bike keeps to its 25 km/h limiter (GB 17761-2018); riding faster is an injected fault
    # (simulators/faults.py), so a normal ride is quiet — the limiter rule included, whose L1 is 3 km/h above.
    f, raised = _simulated_ride("ebike48", 1800, seed=2)
    assert raised == {}
    assert f.eng.stats.rule_errors == 0
    assert RULES.settings_for("ebike48", "NMC")["speed_limiter_tampering"].levels[0] == 28.0


def test_probe_helper_names_exist_in_the_catalogue() -> None:
    assert probe(1) in CATALOGUE and cell(24) in CATALOGUE
