"""Battery rules with their own measurement: a positive stream (raises at the right level within the stated time,
escalates, updates the peak, clears with hysteresis) and negative near-threshold streams for each.

Threshold-only battery rules (over-temperature, probe difference, cell spread, cell over/under-voltage, SOH,
charging temperature/over-voltage) are covered by the ladder in test_rules_engine.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from cloud_ingest.rules import ApprovedBattery, EventKind
from cloud_ingest.rules import names as n
from cloud_ingest.rules.battery_state import MS_PER_YEAR
from protocol.catalogue import Value
from tests.test_rules_support import BARCODE, CELLS, T0_MS, Feeder, context, engine, healthy, kinds, of_kind, set_cells
from tests.test_rules_support import settings as rule_settings

Make = Callable[[float], dict[str, Value]]


def _raised_at(f: Feeder, kind: EventKind = EventKind.RAISED) -> list[tuple[float, int]]:
    return [(f.secs(e), int(e.level)) for e in f.events if e.kind is kind]


# -- thermal runaway (GB 38031-2020 Annex C) -------------------------------------------------------------------


def _runaway(start_temp: float, rate: float, drop_cell: bool, rise_for_s: float = 1e9) -> Make:
    """Flat until t=9, then rising at `rate` °C/s for `rise_for_s`; cell 1 collapses from t=11 if `drop_cell`."""

    def make(t: float) -> dict[str, Value]:
        temp = start_temp + rate * min(max(0.0, t - 9), rise_for_s)
        v = healthy(**{n.TEMP_MAX: round(temp, 1)})
        return set_cells(v, [2.6 if drop_cell and t >= 11 else 3.85] + [3.85] * (CELLS - 1))

    return make


def test_thermal_runaway_on_voltage_drop_raises_once_the_rise_held_over_3_s_then_clears() -> None:
    p = rule_settings("thermal_runaway").params
    s = rule_settings("thermal_runaway")
    assert (p["rate_c_per_s"], p["rate_hold_s"], p["voltage_drop_pct"]) == (1.0, 3.0, 25.0)  # GB 38031 C.5
    f = Feeder(engine("thermal_runaway"))
    f.run(20, _runaway(30.0, 1.5, drop_cell=True))
    # The rise began at the 9 s sample; at 13 s it has held 4 s (> 3 s) with the cell 32 % down.
    assert _raised_at(f) == [(13.0, p["level"])]
    raised = of_kind(f.events, EventKind.RAISED)[0]
    assert raised.detail["voltage_drop_pct"] > 25.0
    updates = of_kind(f.events, EventKind.UPDATED)
    assert updates and all(b.peak > a.peak for a, b in itertools.pairwise(updates))  # type: ignore[operator]
    # Back under the clear temperature and not rising: cleared after the clear duration.
    start = f.t
    cleared = f.until(lambda t: healthy(**{n.TEMP_MAX: 40.0}), lambda e: e.kind is EventKind.CLEARED, 1000)
    assert cleared is not None
    assert f.secs(cleared) - start == s.clear_duration_ms / 1000
    assert cleared.peak == max(e.value for e in f.events if e.value is not None)


def test_thermal_runaway_on_maximum_temperature_without_voltage_drop() -> None:
    f = Feeder(engine("thermal_runaway"))
    f.run(30, _runaway(52.0, 1.2, drop_cell=False))
    # 52 + 1.2 × (t − 9) reaches the 60 °C maximum at t = 16 (60.4 °C); the rise has held since 9 s.
    assert _raised_at(f) == [(16.0, 3)]


@pytest.mark.parametrize(
    ("label", "make"),
    [
        ("rise held exactly 3 s, not more", _runaway(30.0, 1.5, drop_cell=True, rise_for_s=3.0)),
        ("0.9 °C/s past the maximum with the cell down", _runaway(30.0, 0.9, drop_cell=True)),
        ("2 °C/s without voltage drop below the maximum", _runaway(20.0, 2.0, drop_cell=False, rise_for_s=10.0)),
    ],
)
def test_thermal_runaway_near_misses_raise_nothing(label: str, make: Make) -> None:
    assert Feeder(engine("thermal_runaway")).run(50, make) == [], label


# -- thermal runaway precursor -----------------------------------------------------------------------------------


def _ramp(per_min: float, current: float = -0.3, start: float = 32.0, until_s: float = 1e9) -> Make:
    def make(t: float) -> dict[str, Value]:
        temp = start + per_min / 60 * min(t, until_s)
        return healthy(**{n.TEMP_MAX: round(temp, 1), n.PACK_I: current})

    return make


def test_precursor_raises_l1_then_escalates_at_a_steady_rise_at_rest_and_clears_when_it_stops() -> None:
    s = rule_settings("thermal_runaway_precursor")
    p = s.params
    l1, l2, l3 = s.levels
    assert l1 is not None and l2 is not None and l3 is not None
    # A rise a little over L2: the filtered rate passes L1 well before L2, so L1 is raised first.
    per_min = l2 + (l3 - l2) / 8
    f = Feeder(engine("thermal_runaway_precursor"))
    f.run(300, _ramp(per_min, until_s=300))
    raised, escalated = _raised_at(f), _raised_at(f, EventKind.ESCALATED)
    # Graded after the warm-up; L1 needs its duration on top (the filtered rate is past L1 by then).
    first = p["warmup_s"] + s.duration_ms[0] / 1000
    assert len(raised) == 1 and raised[0][1] == 1
    assert first <= raised[0][0] <= first + 5
    assert [lvl for _, lvl in escalated] == [2]
    assert escalated[0][0] <= p["warmup_s"] + p["tau_s"] * 2 + s.duration_ms[1] / 1000
    up = of_kind(f.events, EventKind.ESCALATED)[0]
    assert up.peak == up.value  # the peak follows the metric on escalation
    # The rise stops: the filtered rate decays under `clear`, then the clear duration runs.
    plateau = f.t
    f.run(900, _ramp(per_min, until_s=300))
    cleared = of_kind(f.events, EventKind.CLEARED)
    assert len(cleared) == 1
    decay_s = p["tau_s"] * 2.4  # per_min × e^(−t/τ) < clear: t = τ·ln(per_min / clear) ≈ 2.4 τ here
    assert f.secs(cleared[0]) - plateau <= decay_s + s.clear_duration_ms / 1000 + 10


@pytest.mark.parametrize(
    ("label", "make"),
    [
        ("a rise just under L1 at rest", _ramp(1.5)),
        ("a fast rise under load (explained by I²R)", _ramp(6.0, current=-20.0)),
        ("a fast rise below the minimum temperature", _ramp(6.0, start=0.0, until_s=240)),
        ("one glitching probe reading", lambda t: healthy(**{n.TEMP_MAX: 60.0 if t == 200 else 35.0})),
    ],
)
def test_precursor_near_misses_raise_nothing(label: str, make: Make) -> None:
    assert Feeder(engine("thermal_runaway_precursor")).run(600, make) == [], label


# -- suspected internal short --------------------------------------------------------------------------------


def _pack(fall_mv_per_s: float, cell_no: int = 5, current: float = -0.3, all_cells: bool = False) -> Make:
    """Cells at 3.901..3.913 V (cell 7 is the median); from t=300 cell `cell_no` (or all) falls steadily."""

    def make(t: float) -> dict[str, Value]:
        fall = fall_mv_per_s * max(0.0, t - 300) / 1000
        volts = [3.900 + k * 0.001 - (fall if all_cells or k == cell_no else 0.0) for k in range(1, CELLS + 1)]
        return set_cells(healthy(**{n.PACK_I: current}), volts)

    return make


def test_internal_short_one_cell_falling_at_rest_raises_escalates_and_clears_after_a_new_rest() -> None:
    s = rule_settings("internal_short_suspected")
    assert s.params["settle_s"] == 300.0 and s.levels == (15.0, 30.0, 60.0)  # the arithmetic below
    f = Feeder(engine("internal_short_suspected"))
    f.run(1600, _pack(0.05))
    # Baseline at 300 s; 0.05 mV/s: 15 mV at 600 s (+300 s → L1), 30 mV at 900 s (+120 s → L2),
    # 60 mV at 1500 s (+60 s → L3).
    # (±1 s: whether the float fall reaches e.g. 30.000 mV on the very sample is rounding luck.)
    assert _raised_at(f) == [(pytest.approx(900.0, abs=1), 1)]
    assert _raised_at(f, EventKind.ESCALATED) == [(pytest.approx(1020.0, abs=1), 2), (pytest.approx(1560.0, abs=1), 3)]
    assert of_kind(f.events, EventKind.RAISED)[0].detail == {"cell": 5}
    assert of_kind(f.events, EventKind.UPDATED)
    # Charged (the rest is interrupted), then a new rest: the new baseline shows no further fall → clears.
    f.run(60, lambda t: healthy(**{n.PACK_I: 5.0}))
    low = _pack(0.0)(0)
    low[n.CELL_V_MIN] = low[n.CELL_V_MIN] - 0.065  # type: ignore[operator]
    low[f"{n.CELL_PREFIX}5"] = low[f"{n.CELL_PREFIX}5"] - 0.065  # type: ignore[operator]
    start = f.t
    f.run(s.params["settle_s"] + s.clear_duration_ms / 1000 + 5, lambda t: low)
    cleared = of_kind(f.events, EventKind.CLEARED)
    assert len(cleared) == 1
    assert f.secs(cleared[0]) - start == s.params["settle_s"] + s.clear_duration_ms / 1000


def test_internal_short_takes_a_new_baseline_when_another_pack_is_swapped_in_at_rest() -> None:
    s = rule_settings("internal_short_suspected")
    l1 = s.levels[0]
    assert l1 is not None
    f = Feeder(engine("internal_short_suspected"))
    first = _pack(0.0)
    f.run(400, lambda t: {**first(t), n.BARCODE: "PACK-A"})  # rested: baseline of pack A taken at 300 s
    # Pack B, swapped in without a current above the rest threshold: its cell 5 sits 2 x L1 lower than A's did.
    other = _pack(0.0)(0)
    other[f"{n.CELL_PREFIX}5"] = other[f"{n.CELL_PREFIX}5"] - 2 * l1 / 1000  # type: ignore[operator]
    other[n.BARCODE] = "PACK-B"
    f.run(1200, lambda t: other)
    assert f.events == []  # compared with pack A's baseline this would have raised at L2
    # Without a barcode change the same step is a falling cell.
    g = Feeder(engine("internal_short_suspected"))
    g.run(400, lambda t: {**first(t), n.BARCODE: "PACK-A"})
    g.run(1200, lambda t: {**other, n.BARCODE: "PACK-A"})
    assert _raised_at(g)


@pytest.mark.parametrize(
    ("label", "make"),
    [
        ("every cell falls together (relaxation)", _pack(0.05, all_cells=True)),
        ("one cell falls 14 mV at rest", _pack(14 / 1300)),
        ("one cell falls while riding", _pack(0.1, current=-15.0)),
    ],
)
def test_internal_short_near_misses_raise_nothing(label: str, make: Make) -> None:
    assert Feeder(engine("internal_short_suspected")).run(1600, make) == [], label


# -- SOC jump --------------------------------------------------------------------------------------------------


def test_soc_jump_raises_at_once_escalates_updates_and_clears_after_quiet() -> None:
    s = rule_settings("soc_jump")
    socs = {10: 67.0, 20: 79.0, 30: 57.0, 40: 81.0}  # jumps of 7, 12, 22, 24 %

    last = 60.0

    def make(t: float) -> dict[str, Value]:
        nonlocal last
        last = socs.get(int(t), last)
        return healthy(**{n.SOC: last})

    f = Feeder(engine("soc_jump"))
    f.run(45, make)
    assert kinds(f.events) == [("raised", 1), ("escalated", 2), ("escalated", 3), ("updated", 3)]
    assert [f.secs(e) for e in f.events] == [10.0, 20.0, 30.0, 40.0]
    assert f.events[-1].peak == pytest.approx(24.0, abs=0.01)
    f.run(s.clear_duration_ms / 1000 + 5, make)
    cleared = of_kind(f.events, EventKind.CLEARED)
    assert [f.secs(e) for e in cleared] == [41.0 + s.clear_duration_ms / 1000]


def test_soc_jump_near_misses_raise_nothing() -> None:
    f = Feeder(engine("soc_jump"))
    # 4.9 % at rest.
    f.run(20, lambda t: healthy(**{n.SOC: 60.0 if t < 10 else 64.9}))
    # 1C charging for ten minutes: ~1.7 %/min is what the current explains.
    f.run(600, lambda t: healthy(**{n.SOC: 64.9 + (t - 20) * 100 / 3600, n.PACK_I: 24.0}))
    # A battery swap at a cabinet: new barcode, new SOC.
    f.run(10, lambda t: healthy(**{n.SOC: 95.0, n.BARCODE: "ZL48V24AH-000777"}))
    # A reading after a gap longer than max_interval_s is not compared.
    f.t += rule_settings("soc_jump").params["max_interval_s"] + 10
    f.run(10, lambda t: healthy(**{n.SOC: 50.0, n.BARCODE: "ZL48V24AH-000777"}))
    assert f.events == []


# -- repeated BMS protection -------------------------------------------------------------------------------------


def test_repeated_protection_trips_raise_escalate_and_clear_when_the_window_empties() -> None:
    s = rule_settings("bms_protection_repeated")
    window = s.params["window_s"]
    f = Feeder(engine("bms_protection_repeated"))
    # Cell over-voltage protection trips for one sample every 30 s, ten times (t = 0 … 270).
    f.run(300, lambda t: healthy(**{n.PROTECTION: 1 if t % 30 == 0 else 0}))
    assert _raised_at(f) == [(60.0, 1)]  # third trip
    assert _raised_at(f, EventKind.ESCALATED) == [(120.0, 2), (270.0, 3)]  # fifth, tenth
    assert f.events[0].detail["protections"] == ["cell_overvoltage"]
    assert _raised_at(f, EventKind.UPDATED) == [(90.0, 1), (150.0, 2), (180.0, 2), (210.0, 2), (240.0, 2)]
    f.run(window, lambda t: healthy())
    assert _raised_at(f, EventKind.CLEARED) == [(270.0 + window, 3)]


def test_protection_near_misses_raise_nothing() -> None:
    f = Feeder(engine("bms_protection_repeated"))
    trips = {0, 300, 700}  # never three within 600 s
    f.run(900, lambda t: healthy(**{n.PROTECTION: 0b100 if t in trips else 0}))
    # One protection held on for twenty minutes is one trip.
    f.run(1200, lambda t: healthy(**{n.PROTECTION: 0b10}))
    assert f.events == []


# -- battery ageing: service life ----------------------------------------------------------------------------------


def _aged(chemistry: str, years_ago: float, marked: float | None = None) -> Feeder:
    battery = ApprovedBattery(
        frozenset({BARCODE}),
        24.0,
        CELLS,
        manufactured_ms=T0_MS - round(years_ago * MS_PER_YEAR),
        service_life_years=marked,
    )
    return Feeder(engine("battery_ageing"), context(chemistry=chemistry, battery=battery))


def test_battery_past_its_default_service_life_raises_at_the_service_life_level() -> None:
    s = rule_settings("battery_ageing")
    f = _aged("NMC", 3.5)
    f.run(s.duration_ms[1] / 1000 + 10, lambda t: healthy())
    assert _raised_at(f) == [(s.duration_ms[1] / 1000, s.params["service_life_level"])]
    assert f.events[0].detail == {"service_life_expired": True}


@pytest.mark.parametrize(
    ("chemistry", "years_ago", "marked"), [("LFP", 3.5, None), ("NMC", 3.5, 6.0), ("NMC", 2.9, None)]
)
def test_battery_within_its_service_life_raises_nothing(chemistry: str, years_ago: float, marked: float | None) -> None:
    f = _aged(chemistry, years_ago, marked)
    assert f.run(400, lambda t: healthy()) == []


def test_service_life_alarm_clears_once_a_new_pack_is_recorded_when_the_bms_reports_no_soh() -> None:
    s = rule_settings("battery_ageing")
    f = _aged("NMC", 3.5)
    no_soh = {k: v for k, v in healthy().items() if k != n.SOH}
    f.run(s.duration_ms[1] / 1000 + 10, lambda t: no_soh)
    assert _raised_at(f) == [(s.duration_ms[1] / 1000, s.params["service_life_level"])]
    # The pack is replaced and the new one's production date recorded in the profile.
    f.ctx = context(chemistry="NMC", battery=ApprovedBattery(frozenset({BARCODE}), 24.0, CELLS, T0_MS, None))
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 5, lambda t: no_soh)
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def test_where_soh_was_reported_samples_without_it_do_not_clear_a_low_soh_alarm() -> None:
    s = rule_settings("battery_ageing")
    l2 = s.levels[1]
    assert l2 is not None
    f = _aged("NMC", 1.0)
    low = healthy(**{n.SOH: l2 - 1})
    no_soh = {k: v for k, v in healthy().items() if k != n.SOH}
    f.run(s.duration_ms[1] / 1000 + 10, lambda t: low)
    assert _raised_at(f)
    f.run(s.clear_duration_ms / 1000 + 60, lambda t: no_soh)
    assert of_kind(f.events, EventKind.CLEARED) == []


# -- battery–vehicle mismatch --------------------------------------------------------------------------------------


def test_battery_mismatch_raises_on_unbound_pack_escalates_on_more_cells_and_clears_when_fixed() -> None:
    s = rule_settings("battery_vehicle_mismatch")
    f = Feeder(engine("battery_vehicle_mismatch"))
    f.run(10, lambda t: healthy(**{n.BARCODE: "ZL48V24AH-424242"}))
    assert _raised_at(f) == [(0.0, s.params["level"])]
    assert "not bound" in f.events[0].detail["reasons"][0]
    start = f.t
    f.run(40, lambda t: healthy(**{n.BARCODE: "ZL48V24AH-424242", n.CELL_COUNT: 16}))
    assert _raised_at(f, EventKind.ESCALATED) == [(start + s.duration_ms[2] / 1000, s.params["more_cells_level"])]
    # The bound pack is back but the voltage says more than 13 cells: still open.
    f.run(30, lambda t: healthy(**{n.PACK_V: 62.0}))
    assert of_kind(f.events, EventKind.CLEARED) == []
    start = f.t
    f.run(s.clear_duration_ms / 1000 + 5, lambda t: healthy())
    assert [f.secs(e) for e in of_kind(f.events, EventKind.CLEARED)] == [start + s.clear_duration_ms / 1000]


def test_battery_mismatch_near_misses_raise_nothing() -> None:
    f = Feeder(engine("battery_vehicle_mismatch"))
    # 8 % less capacity than approved (ageing, BMS relearning), a full pack at 4.2 V per cell.
    f.run(120, lambda t: healthy(**{n.NOMINAL_CAPACITY: 22.1, n.PACK_V: 54.6}))
    # Without an approved battery on record there is nothing to compare with.
    g = Feeder(engine("battery_vehicle_mismatch"), context(battery=None))
    g.run(60, lambda t: healthy(**{n.BARCODE: "ANY", n.CELL_COUNT: 20}))
    assert f.events == [] and g.events == []


# -- charging long after full ---------------------------------------------------------------------------------------


def test_charging_after_full_raises_after_an_hour_escalates_and_clears_when_unplugged() -> None:
    s = rule_settings("charging_after_full")
    l1, l2 = s.levels[0], s.levels[1]
    assert l1 is not None and l2 is not None
    f = Feeder(engine("charging_after_full"))
    f.run(600, lambda t: healthy(**{n.SOC: 80 + t / 30, n.PACK_I: 4.0}), step_s=10)  # reaches 99 % at 570 s
    full_at = 570.0
    f.run(l2 * 3600 + 60, lambda t: healthy(**{n.SOC: 100.0, n.PACK_I: 0.5}), step_s=10)
    assert _raised_at(f) == [(full_at + l1 * 3600, 1)]
    assert _raised_at(f, EventKind.ESCALATED) == [(full_at + l2 * 3600, 2)]
    assert of_kind(f.events, EventKind.UPDATED)
    f.run(20, lambda t: healthy(**{n.SOC: 100.0, n.PACK_I: 0.0}), step_s=10)
    assert len(of_kind(f.events, EventKind.CLEARED)) == 1


def test_charging_after_full_near_misses_raise_nothing() -> None:
    f = Feeder(engine("charging_after_full"))
    f.run(5 * 3600, lambda t: healthy(**{n.SOC: 100.0, n.PACK_I: 0.15}), step_s=10)  # taper below 0.2 A
    f.run(5 * 3600, lambda t: healthy(**{n.SOC: 98.0, n.PACK_I: 2.0}), step_s=10)  # not full yet
    assert f.events == []
