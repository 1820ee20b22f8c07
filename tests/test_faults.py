"""Fault injection (simulators/faults.py): each fault is windowed, does what it says to the state and to the plan,
reaches the devices' output through the emulators, and carries a ground truth consistent with the default rules.

What the rules and the whole chain make of the faults is tests/test_scenarios.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_ingest.rules import load_rules
from edge_agent.devices import controller as ctl
from edge_agent.devices import jbd
from edge_agent.nmea import GnssFix, NmeaDecoder
from protocol import load_catalogue
from simulators.battery import LFP, NMC
from simulators.can_bus import CanVehicleEmulator
from simulators.faults import (
    FAULT_KINDS,
    OVERCURRENT_BIT,
    THRESHOLDS,
    AgentView,
    AmbiguousFault,
    Fault,
    FaultedModel,
    bms_reset_estimate,
    dump_ground_truth,
    hot_spot_excess_c,
    load_ground_truth,
    rule_spec,
    schedule_faults,
    zone_centre,
)
from simulators.gnss import GnssEmulator, no_fix_epoch
from simulators.nmea import RECEIVERS, SkyModel, encode_epoch
from simulators.roads import graph_route_for
from simulators.route import haversine_m
from simulators.vehicle import VehicleState

T0 = 1_767_578_400.0
AT = T0 + 600.0
CAT = load_catalogue()


def _model(*faults: Fault, variant: str = "ebike48", seed: int = 1) -> FaultedModel:
    return FaultedModel(graph_route_for(seed), seed, T0, variant, faults=faults)


def _fault(kind: str, duration: float, **params: object) -> Fault:
    return Fault(kind, AT, AT + duration, dict(params))


# -- thresholds and bookkeeping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "chemistry"), [("ebike48", "NMC"), ("emoto72", "NMC")])
def test_thresholds_are_those_of_the_default_rules_file(model: str, chemistry: str) -> None:
    rules = load_rules().settings_for(model, chemistry)

    def levels(rule: str) -> tuple[float | None, ...]:
        return tuple(x for x in rules[rule].levels if x is not None)

    for rule in (
        "thermal_runaway_precursor",
        "cell_voltage_spread",
        "internal_short_suspected",
        "wheel_size_tampering",
        "crash_or_fall",
        "gnss_cut_or_jamming",
        "vehicle_offline",
    ):
        assert tuple(THRESHOLDS[rule]["levels"]) == levels(rule), rule
    assert tuple(THRESHOLDS["speed_limiter_tampering"]["levels"][model]) == levels("speed_limiter_tampering")
    assert tuple(THRESHOLDS["theft_displacement_while_locked"]["levels"][1:]) == levels(
        "theft_displacement_while_locked"
    )
    for rule in (
        "thermal_runaway_precursor",
        "cell_voltage_spread",
        "internal_short_suspected",
        "wheel_size_tampering",
    ):
        assert tuple(d * 1000 for d in THRESHOLDS[rule]["durations_s"]) == rules[rule].duration_ms, rule
    for rule in ("cell_voltage_spread", "internal_short_suspected", "gnss_cut_or_jamming", "crash_or_fall"):
        assert THRESHOLDS[rule]["clear_duration_s"] * 1000 == rules[rule].clear_duration_ms, rule
    runaway = rules["thermal_runaway"].params
    assert (runaway["level"], runaway["rate_c_per_s"], runaway["max_temp_c"]) == (3, 1.0, 60.0)
    assert rules["crash_or_fall"].params["decel_ms2"] == THRESHOLDS["crash_or_fall"]["decel_ms2"]
    assert rules["internal_short_suspected"].params["settle_s"] == THRESHOLDS["internal_short_suspected"]["settle_s"]
    mismatch = rules["battery_vehicle_mismatch"].params
    assert (mismatch["level"], mismatch["more_cells_level"]) == (2, 3)
    config = rules["controller_config_mismatch"].params
    assert (config["level"], config["raised_limit_level"]) == (2, 3)


def test_rule_specs_are_what_the_rule_engine_resolves() -> None:
    """`rule_spec` reads the default rules file itself; for every rule, model and chemistry (and neither) it gives
    what the engine resolves from the same file."""
    rules = load_rules()
    for model in (None, *rules.models):
        for chemistry in (None, *rules.chemistries):
            for rule, resolved in rules.settings_for(model, chemistry).items():
                spec = rule_spec(rule, model, chemistry)
                assert spec.levels == resolved.levels, (rule, model, chemistry)
                assert spec.clear == resolved.clear, (rule, model, chemistry)
                assert tuple(round(d * 1000) for d in spec.durations_s) == resolved.duration_ms, rule
                assert round(spec.clear_duration_s * 1000) == resolved.clear_duration_ms, rule
                assert spec.params == dict(resolved.params), (rule, model, chemistry)


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Fault("meteor_strike", AT, AT + 1)
    with pytest.raises(ValueError, match="must end after"):
        Fault("crash", AT, AT)
    with pytest.raises(ValueError, match="theft mode"):
        _model(_fault("theft", 60, mode="teleported")).state_at(AT)


# -- what each fault does ---------------------------------------------------------------------------------------


def test_state_modifiers_act_only_in_their_window() -> None:
    faults = [
        _fault("cell_imbalance", 120),
        Fault("gnss_jamming", AT + 400, AT + 460),
        Fault("offline", AT + 600, AT + 660),
    ]
    m = _model(*faults)
    for t in (AT - 30, AT + 200, AT + 470, AT + 700):  # before, after each (imbalance recovers in 60 s)
        assert m.state_at(t) == m.baseline_at(t), t
    assert not m.state_at(AT + 430).gnss_fix and m.state_at(AT + 430).online
    assert not m.state_at(AT + 630).online and m.state_at(AT + 630).gnss_fix


def test_thermal_runaway_heats_one_probe_fast_and_collapses_its_cell() -> None:
    f = _fault("thermal_runaway", 60)
    m = _model(f)
    a, b = m.state_at(AT + 10), m.state_at(AT + 14)
    assert (b.battery_temp_max_c - a.battery_temp_max_c) / 4.0 == pytest.approx(f.param("rate_c_per_s"), rel=0.05)
    k = f.param("cell") - 1
    base = m.baseline_at(AT + 14)
    assert b.cell_voltages_v[k] < 0.25 * base.cell_voltages_v[k]
    assert b.pack_voltage_v == pytest.approx(sum(b.cell_voltages_v))
    hot = m.state_at(AT + 40)
    assert hot.battery_temp_max_c > 60.0 and hot.bms_protection & (1 << 6)  # discharge over-temperature
    assert m.state_at(f.end + 300).battery_temp_max_c < base.battery_temp_max_c + 1.0  # after: cooled


def test_precursor_warms_the_whole_pack_slowly_at_rest() -> None:
    f = _fault("thermal_runaway_precursor", 240, rate_c_per_min=5.0)
    m = _model(f)
    a, b = m.state_at(AT + 60), m.state_at(AT + 180)
    assert a.activity == b.activity == "parked" and abs(b.pack_current_a) < 1.0
    assert (b.battery_temp_max_c - a.battery_temp_max_c) * 0.5 == pytest.approx(5.0, abs=0.3)  # °C/min
    assert max(b.probe_temps_c) - min(b.probe_temps_c) < 5.0  # the whole pack, not a hot spot


def test_internal_short_drains_one_cell_at_rest() -> None:
    f = _fault("internal_short", 600, fall_mv=40.0, rate_mv_per_min=4.0)
    m = _model(f)
    settle = THRESHOLDS["internal_short_suspected"]["settle_s"]
    assert all(m.state_at(AT - k).activity == "parked" for k in range(0, int(settle) + 60, 30))
    k = f.param("cell") - 1
    for dt, fall in ((150, 10.0), (450, 30.0), (600, 40.0)):
        s, base = m.state_at(AT + dt), m.baseline_at(AT + dt)
        assert (base.cell_voltages_v[k] - s.cell_voltages_v[k]) * 1000 == pytest.approx(fall)
    assert m.state_at(f.end + 61) == m.baseline_at(f.end + 61)


def test_speed_limiter_tampering_lifts_the_limit_and_the_configuration() -> None:
    f = _fault("speed_limiter_tampering", 300)
    m = _model(f)
    states = [m.state_at(AT + k) for k in range(300)]
    assert max(s.speed_kmh for s in states) > 30.0
    assert {s.speed_limit_cfg_kmh for s in states} == {40.0}
    assert m.state_at(f.end + 60).speed_kmh <= 25.0 and m.state_at(f.end + 60).speed_limit_cfg_kmh == 0.0
    assert _model(_fault("speed_limiter_tampering", 300, reconfigure=False)).state_at(AT + 10).speed_limit_cfg_kmh == 0


def test_wheel_size_tampering_makes_the_controller_under_read() -> None:
    f = _fault("wheel_size_tampering", 300)
    m = _model(f)
    view = AgentView(m)
    riding = [m.state_at(AT + k) for k in range(0, 300, 5) if m.state_at(AT + k).speed_kmh > 10.0]
    assert riding
    for s in riding:
        status = view.controller.status(s)
        assert status.speed_kmh == pytest.approx(s.speed_kmh * 12.0 / 16.0)
        # The wheel turns as fast as the ground passes: rpm for the real 16-inch wheel.
        assert status.motor_rpm == round(s.speed_kmh / 3.6 / (3.14159265 * 16 * 0.0254) * 60)
    assert view.controller.config(riding[0]).wheel_inch == 12.0
    assert max(s.speed_kmh for s in riding) > 25.0  # what the tampering is for


def test_an_unbound_swap_puts_a_foreign_pack_in_and_the_bms_is_silent_meanwhile() -> None:
    f = _fault("unbound_battery_swap", 300)
    m = _model(f)
    out = m.state_at(AT + 60)
    inside = m.state_at(AT + 200)
    assert not out.battery_present
    assert inside.battery_present and not inside.battery_bound and inside.battery_barcode not in m.bound_barcodes
    back = m.state_at(f.end + 200)
    assert back.battery_bound and back.battery_barcode in m.bound_barcodes
    bms = AgentView(m).bms
    assert bms.pack_of(inside)[0] == inside.battery_barcode
    # The BMS of a pack that is out does not answer at all.
    bms.clock = lambda: AT + 60
    bms._on_data(jbd.encode_read_request(jbd.REG_BASIC_INFO))
    assert bms.absent == 1 and bms.log[-1].fault == "absent"
    more = _model(_fault("unbound_battery_swap", 300, cells=16, nominal_ah=20.0)).state_at(AT + 200)
    assert more.cell_count == 16 and len(more.cell_voltages_v) == 16


@pytest.mark.parametrize("mode", ["ridden", "carried", "nudged"])
def test_theft_moves_a_locked_vehicle(mode: str) -> None:
    f = _fault("theft", 120, mode=mode)
    m = _model(f)
    before = m.state_at(AT - 100)
    assert before.locked and before.speed_kmh == 0.0
    during = [m.state_at(AT + k) for k in range(5, 120, 5)]
    assert all(s.locked for s in during)
    moving = [s for s in during if s.speed_kmh > 0.0]
    assert moving
    if mode == "carried":
        assert all(s.carried and s.motor_rpm == 0 for s in moving)
        assert AgentView(m).controller.status(moving[0]).speed_kmh == 0.0  # the wheel stands
    if mode == "nudged":
        assert max(s.speed_kmh for s in during) <= 0.8
    (truth,) = m.ground_truth("V")
    assert [a.profile for a in truth.actions] == [{"locked": True}, {"locked": False}]
    assert not m.state_at(f.end + 30).locked


def test_a_crash_stops_the_vehicle_within_a_second_and_it_rides_on_after() -> None:
    f = Fault("crash", AT + 0.4, AT + 40.4, {"speed_kmh": 45.0, "decel_ms2": 30.0, "still_s": 40.0})
    m = _model(f, variant="emoto72")
    assert m.state_at(AT).speed_kmh == pytest.approx(45.0)
    assert m.state_at(AT + 1).speed_kmh == 0.0
    assert all(m.state_at(AT + k).speed_kmh == 0.0 for k in range(1, 40))
    assert max(m.state_at(AT + 41 + k).speed_kmh for k in range(60)) > 10.0
    # On a legal e-bike the limiter holds the crash speed to 25 km/h: between 1 Hz samples that is 6.9 m/s² at
    # most, below the rule's 7 m/s² — the ground truth says the rule cannot see it.
    (bike,) = _model(f).ground_truth("V")
    assert bike.expected == () and bike.facts["measurable_decel_ms2"] < THRESHOLDS["crash_or_fall"]["decel_ms2"]


def test_the_chemistries_open_circuit_voltage_goes_on_past_full_and_empty() -> None:
    for chem in (NMC, LFP):
        assert chem.ocv_beyond(50.0) == chem.ocv(50.0)
        assert chem.ocv_beyond(104.0) > chem.ocv_beyond(102.0) > chem.ocv(100.0)
        assert chem.ocv_beyond(-3.0) < chem.ocv_beyond(-1.0) < chem.ocv(0.0)
        assert chem.ocv_beyond(-1000.0) == 0.5  # a dead cell, not a negative voltage
    assert NMC.ocv_beyond(-3.0) == pytest.approx(3.0)
    assert NMC.ocv_beyond(100.0 + 0.15 / NMC.overcharge_v_per_pct) == pytest.approx(4.35)


def test_a_hot_spot_heats_its_probe_with_the_current_and_cools_once_fixed() -> None:
    f = _fault("hot_spot", 900)
    m = _model(f, seed=25)
    n = m.faults.index(f)
    # First order in I²R: never hotter than the hottest current could make it, rising while ridden.
    peak_i = max(abs(m.baseline_at(AT + k).pack_current_a) for k in range(900))
    limit = peak_i**2 * f.num("r_contact_ohm") * f.num("r_th_k_w")
    excess = [hot_spot_excess_c(f, m, n, AT + k) for k in range(0, 901, 30)]
    assert 0.0 == excess[0] < excess[10] < max(excess) < limit
    s, base = m.state_at(AT + 600), m.baseline_at(AT + 600)
    e = hot_spot_excess_c(f, m, n, AT + 600)
    assert s.probe_temps_c[0] == pytest.approx(base.probe_temps_c[0] + e)
    assert s.probe_temps_c[1] == pytest.approx(base.probe_temps_c[1] + f.num("share") * e)
    later = hot_spot_excess_c(f, m, n, f.end + f.num("tau_s"))
    assert later == pytest.approx(hot_spot_excess_c(f, m, n, f.end) / math.e)
    # The same whatever was asked first: the memory is filled second by second from the start.
    fresh = _model(f, seed=25)
    assert hot_spot_excess_c(f, fresh, 0, AT + 600) == e


def test_cold_charging_charges_a_pack_as_cold_as_the_air() -> None:
    f = _fault("cold_charging", 300)
    m = _model(f, seed=22)
    s = m.state_at(AT + 100)
    assert s.activity == "charging" and s.pack_current_a > 0.5
    assert s.battery_temp_max_c == pytest.approx(s.ambient_c, abs=1.5) and s.battery_temp_max_c < -5.0
    after = m.state_at(f.end + 30)
    assert after.activity == "parked" and after.pack_current_a < 0.0


def test_overcharge_pushes_the_cells_past_full_and_they_stay_there_until_ridden_down() -> None:
    f = _fault("overcharge", 600)
    m = _model(f, seed=43)
    before, during = m.state_at(AT - 60), m.state_at(AT + 550)
    assert before.soc_pct == pytest.approx(f.num("soc0"), abs=0.1)
    assert during.pack_current_a == f.num("charger_a") and during.soc_pct == 100.0
    assert during.pack_voltage_v <= f.num("charger_v_per_cell") * len(during.cell_voltages_v) + 1e-9
    assert min(during.cell_voltages_v) > 4.25
    assert during.pack_voltage_v == pytest.approx(sum(during.cell_voltages_v))
    rested = m.state_at(f.end + 30)
    assert rested.pack_current_a < 0.0 and max(rested.cell_voltages_v) > 4.22  # the extra charge is still in
    assert max(m.state_at(f.end + 1800).cell_voltages_v) < 4.2


def test_an_over_discharged_pack_sits_below_empty_while_it_is_in() -> None:
    f = _fault("over_discharged_pack", 300)
    m = _model(f, seed=48)
    inside = m.state_at(AT + 150)
    assert inside.battery_barcode != m.packs[0].barcode and inside.soc_pct == 0.0
    assert max(inside.cell_voltages_v) < NMC.ocv_beyond(-f.num("depth_pct") + 1.5)
    assert not m.state_at(AT).battery_present and not m.state_at(f.end).battery_present  # mid-swap
    back = m.state_at(f.end + 60)
    assert back.battery_barcode == m.packs[0].barcode and min(back.cell_voltages_v) > 3.5
    # Ridden up to the swap and off from the one back: neither pack rests long in the other's place.
    assert any(abs(m.state_at(f.start - k).pack_current_a) > 1.0 for k in range(60, 300))
    assert any(abs(m.state_at(f.end + k).pack_current_a) > 1.0 for k in range(60, 100))


def test_a_bms_reset_under_load_reads_the_soc_low_until_it_recalibrates() -> None:
    f = _fault("bms_reset", 600)
    m = _model(f, seed=24)
    estimate, true = bms_reset_estimate(f, m)
    assert m.baseline_at(AT).pack_current_a < -3.0 and estimate < true - 5.0  # riding: the voltage sags
    for dt in (0.0, 60.0, 400.0):
        s, base = m.state_at(AT + dt), m.baseline_at(AT + dt)
        assert s.soc_pct == pytest.approx(estimate + base.soc_pct - true)
    assert m.state_at(f.end) == m.baseline_at(f.end)


def test_an_undersized_bms_trips_on_hard_accelerations_only_during_the_fault() -> None:
    f = _fault("bms_overcurrent", 600, ocp_a=15.0)
    m = _model(f, seed=40)
    for k in range(-30, 900):
        s = m.state_at(AT + k)
        tripped = bool(s.bms_protection >> OVERCURRENT_BIT & 1)
        assert tripped == (0 <= k <= 600 and -s.pack_current_a >= 15.0), k


def test_a_charger_without_cut_off_keeps_a_trickle_into_the_full_pack() -> None:
    f = Fault("charger_no_cutoff", T0 + 150, T0 + 3810, {})
    m = _model(f, seed=32)
    for dt in (30.0, 1000.0, 3600.0):
        s, base = m.state_at(f.start + dt), m.baseline_at(f.start + dt)
        assert s.pack_current_a >= f.num("trickle_a") and round(s.soc_pct) >= 99
        assert s.pack_voltage_v >= base.pack_voltage_v
    assert m.baseline_at(f.start + 1000).pack_current_a < 0.0  # a sound charger would have stopped long ago
    assert m.state_at(f.end + 30).pack_current_a < 0.0


def test_forbidden_charging_stands_where_the_zone_is_drawn() -> None:
    f = _fault("forbidden_charging", 300)
    m = _model(f, seed=34)
    (truth,) = m.ground_truth("V")
    (action,) = truth.actions
    assert action.geofence is not None and action.geofence["kind"] == "no_charging"
    lat, lon = zone_centre(f, m)
    assert action.geofence["geometry"]["coordinates"] == [lon, lat]
    for k in range(0, 300, 30):
        s = m.state_at(AT + k)
        assert s.charging_place == "forbidden" and s.pack_current_a > 0.5
        assert haversine_m(lat, lon, s.lat, s.lon) < 1.0
    g = _fault("forbidden_charging", 300, zone_offset_m=35.0)
    assert haversine_m(*zone_centre(g, _model(g, seed=34)), lat, lon) == pytest.approx(35.0, rel=1e-3)


def test_pushed_indoors_walks_without_sky_and_without_drive() -> None:
    f = _fault("pushed_indoors", 300)
    m = _model(f, seed=37)
    view = AgentView(m)
    pushed = [m.state_at(AT + k) for k in range(5, 40)]
    assert all(not s.gnss_fix and 3.0 < s.speed_kmh <= 4.0 for s in pushed)
    status = view.controller.status(pushed[10], pushed[9])
    assert status.supply_current_a < 1.0 and status.throttle_pct == 0
    assert m.state_at(AT + 60).speed_kmh == 0.0  # in the lift
    assert m.state_at(f.end + 5).gnss_fix


def test_a_fault_on_its_threshold_refuses_to_guess() -> None:
    # A BMS reset whose jump is exactly the rule's L1 (5 %) and a pack replaced just at the rule's duration.
    with pytest.raises(AmbiguousFault, match="soc_jump"):
        _model(Fault("bms_reset", AT + 33, AT + 633, {}), seed=24).ground_truth("V")
    hold = rule_spec("battery_ageing").durations_s[1]
    with pytest.raises(AmbiguousFault, match="battery_ageing"):
        _model(_fault("pack_end_of_life", hold)).ground_truth("V")


# -- ground truth -----------------------------------------------------------------------------------------------


POSITIVE = {
    "thermal_runaway": (60, "thermal_runaway", 3, "ebike48"),
    "thermal_runaway_precursor": (240, "thermal_runaway_precursor", 2, "ebike48"),
    "cell_imbalance": (240, "cell_voltage_spread", 1, "ebike48"),
    "internal_short": (660, "internal_short_suspected", 2, "ebike48"),
    "wheel_size_tampering": (360, "wheel_size_tampering", 2, "ebike48"),
    "unbound_battery_swap": (300, "battery_vehicle_mismatch", 2, "ebike48"),
    "theft": (300, "theft_displacement_while_locked", 3, "ebike48"),
    "crash": (40, "crash_or_fall", 2, "emoto72"),
    "gnss_jamming": (200, "gnss_cut_or_jamming", 1, "ebike48"),
    "offline": (120, "vehicle_offline", 3, "ebike48"),
}


# The later kinds grade their rules on the model: (duration, seed, params, {rule: level}) of a positive case.
GRADED = {
    "hot_spot": (600, 53, {}, {"probe_temperature_difference": 2, "battery_over_temperature": 1}),
    "cold_charging": (300, 22, {}, {"charging_temperature": 2}),
    "overcharge": (600, 43, {}, {"charging_over_voltage": 2, "cell_over_voltage": 2}),
    "over_discharged_pack": (300, 48, {}, {"cell_under_voltage": 2}),
    "bms_reset": (300, 24, {}, {"soc_jump": 1}),
    "bms_overcurrent": (600, 40, {"ocp_a": 15.0}, {"bms_protection_repeated": 2}),
    "pack_end_of_life": (420, 30, {}, {"battery_ageing": 2}),
    "forbidden_charging": (300, 34, {}, {"charging_in_no_charging_zone": 2}),
    "pushed_indoors": (300, 37, {}, {"elevator_entry_suspected": 1}),
}


@pytest.mark.parametrize("kind", sorted(GRADED))
def test_a_graded_fault_expects_its_rules_in_time_and_cleared_after(kind: str) -> None:
    duration, seed, params, levels = GRADED[kind]
    (truth,) = _model(_fault(kind, duration, **params), seed=seed).ground_truth("LZHTEST0000000001")
    assert {e.rule: e.level for e in truth.expected} == levels
    for exp in truth.expected:
        assert truth.start_ms < exp.by_ms < truth.end_ms + 120_000, exp
        assert exp.clear_by_ms is not None and exp.clear_by_ms > truth.end_ms, exp


def test_a_charger_without_cut_off_expects_the_alarm_an_hour_after_full() -> None:
    f = Fault("charger_no_cutoff", T0 + 150, T0 + 3810, {})
    (truth,) = _model(f, seed=32).ground_truth("V")
    (exp,) = truth.expected
    assert (exp.rule, exp.level) == ("charging_after_full", 1)
    assert f.start + 3600 < exp.by_ms / 1000 < f.start + 3600 + 60
    assert exp.clear_by_ms is not None and f.end < exp.clear_by_ms / 1000 < f.end + 60


@pytest.mark.parametrize("kind", sorted(POSITIVE))
def test_a_fault_expects_its_rule_at_its_level_in_time(kind: str) -> None:
    duration, rule, level, variant = POSITIVE[kind]
    params = {"interval_s": 5.0} if kind == "offline" else {}
    f = Fault(kind, AT + (0.4 if kind == "crash" else 0.0), AT + duration, params)
    (truth,) = _model(f, variant=variant).ground_truth("LZHTEST0000000001")
    (exp,) = [e for e in truth.expected if e.rule == rule]
    # offline: 120 s of silence at a 5 s interval is 24x, past L1 (3x) but far from L2 (720x).
    assert exp.level == (1 if kind == "offline" else level)
    assert truth.start_ms < exp.by_ms < truth.start_ms + 700_000
    assert exp.clear_by_ms is not None and exp.clear_by_ms > truth.end_ms
    assert set(truth.collateral).isdisjoint({e.rule for e in truth.expected})


@pytest.mark.parametrize(
    ("kind", "duration", "params", "seed", "offset"),
    [
        ("thermal_runaway_precursor", 300, {"rate_c_per_min": 1.5}, 1, 0.0),
        ("cell_imbalance", 240, {"delta_mv": 110.0}, 1, 0.0),
        ("internal_short", 600, {"fall_mv": 10.0, "rate_mv_per_min": 2.0}, 1, 0.0),
        ("speed_limiter_tampering", 300, {"limit_kmh": 26.5, "reconfigure": False}, 1, 0.0),
        ("unbound_battery_swap", 300, {"bound": True}, 1, 0.0),
        ("theft", 60, {"mode": "nudged"}, 1, 0.0),
        ("gnss_jamming", 60, {}, 1, 0.0),
        ("offline", 10, {}, 1, 0.0),
        ("thermal_runaway", 60, {"rate_c_per_s": 0.5, "collapse": False}, 1, 0.0),
        ("hot_spot", 600, {"r_contact_ohm": 0.04}, 53, 0.0),
        ("cold_charging", 300, {"ambient_c": -0.5}, 26, 0.0),
        ("overcharge", 600, {"charger_v_per_cell": 4.22}, 47, 0.0),
        ("over_discharged_pack", 300, {"depth_pct": 2.0}, 49, 0.0),
        ("bms_reset", 300, {}, 24, 15.0),
        ("bms_overcurrent", 600, {"ocp_a": 24.0}, 46, 0.0),
        ("pack_end_of_life", 180, {}, 31, 0.0),
        ("forbidden_charging", 300, {"zone_offset_m": 35.0}, 35, 0.0),
        ("pushed_indoors", 300, {"push_s": 12.0, "floors": 0}, 38, 0.0),
        ("wheel_size_tampering", 360, {"configured_inch": 16.2}, 39, 0.0),
        ("charger_no_cutoff", 600, {"trickle_a": 0.15}, 33, -450.0),
    ],
)
def test_a_near_miss_expects_nothing(
    kind: str, duration: float, params: dict[str, object], seed: int, offset: float
) -> None:
    (truth,) = _model(Fault(kind, AT + offset, AT + offset + duration, params), seed=seed).ground_truth("V")
    assert truth.expected == ()


def test_ground_truth_round_trips_through_json() -> None:
    m = _model(_fault("speed_limiter_tampering", 300), Fault("gnss_jamming", AT + 900, AT + 1000))
    truths = m.ground_truth("LZHTEST0000000001")
    text = dump_ground_truth(truths)
    assert load_ground_truth(text) == truths
    assert '"kind": "gnss_jamming"' in text and '"vin": "LZHTEST0000000001"' in text


def test_a_fleet_schedule_is_deterministic_and_leaves_room_to_raise_and_clear() -> None:
    plan = schedule_faults(300, T0, 7200.0, seed=3)
    assert plan == schedule_faults(300, T0, 7200.0, seed=3) != schedule_faults(300, T0, 7200.0, seed=4)
    assert len(plan) == 30
    kinds = [faults[0].kind for _, faults in sorted(plan.items())]
    assert set(kinds) == set(FAULT_KINDS)
    for faults in plan.values():
        (f,) = faults
        assert f.start >= T0 + 600 and f.end <= T0 + 7200 - 1200


# -- through the devices ----------------------------------------------------------------------------------------


def _agent_reference(view: AgentView, states: list[VehicleState], decoder: NmeaDecoder) -> list[dict[str, object]]:
    """What the agent's own decoders and signal mappings make of the same instants (the slow, real path)."""
    sky = SkyModel(view.model.seed)
    rx = RECEIVERS["gn-multi"]
    out: list[dict[str, object]] = []
    previous = None
    for s in states:
        when = datetime.fromtimestamp(s.t, UTC)
        data = (
            b"".join(encode_epoch(s, when, sky.at(s.t), receiver=rx).sentences)
            if s.gnss_fix
            else no_fix_epoch(when, rx.talker)
        )
        (fix,) = decoder.feed(data)
        values: dict[str, object] = dict(fix.signals(CAT))
        if s.battery_present:
            bms = view.bms
            values.update(jbd.parse_basic_info(jbd.build_basic_info(bms.basic_info(s))).signals(CAT))
            cells = jbd.build_cell_voltages([mv / 1000 for mv in bms.cell_millivolts(s)])
            values.update(jbd.cell_voltage_signals(jbd.parse_cell_voltages(cells), CAT))
            values.update(jbd.barcode_signals(bms.pack_of(s)[0], CAT))
        values.update(ctl.parse_status(ctl.build_status(view.controller.status(s, previous))).signals(CAT))
        values.update(ctl.parse_config(ctl.build_config(view.controller.config(s))).signals(CAT))
        previous = s
        out.append(values)
    return out


@settings(max_examples=6, deadline=None)
@given(offset=st.integers(min_value=0, max_value=1500), seed=st.integers(min_value=0, max_value=50))
def test_agent_view_is_what_the_agent_decodes(offset: int, seed: int) -> None:
    faults = [Fault("gnss_jamming", T0 + 200, T0 + 230), Fault("unbound_battery_swap", T0 + 600, T0 + 900)]
    m = _model(*faults, seed=seed)
    view = AgentView(m)
    samples = [view.sample(T0 + offset + k) for k in range(40)]
    reference = _agent_reference(AgentView(m), [s for _, _, s in samples], NmeaDecoder())
    for (_, values, _), ref in zip(samples, reference, strict=True):
        assert values == ref


def test_can_bms_leaves_the_bus_while_the_pack_is_out_and_the_config_carries_the_tampering() -> None:
    m = _model(_fault("unbound_battery_swap", 300), Fault("wheel_size_tampering", AT + 1000, AT + 1300))
    emu = CanVehicleEmulator(m)
    messages = emu.codec.messages
    out_of_bay = emu.frames(m.state_at(AT + 60), messages)
    assert out_of_bay and not any(name.startswith("BMS_") for name, _, _ in out_of_bay)
    assert any(name.startswith("BMS_") for name, _, _ in emu.frames(m.state_at(AT + 200), messages))
    tampered = {n: v for _, _, vals in emu.frames(m.state_at(AT + 1100), messages) for n, v in vals.items()}
    assert tampered["Chassis.Wheel.Size"] == 12.0


def test_gnss_emulator_writes_no_fix_epochs_while_jammed() -> None:
    async def run() -> list[GnssFix]:
        now = time.time()
        m = FaultedModel(graph_route_for(2), 2, now - 600, faults=[Fault("gnss_jamming", now - 60, now + 60)])
        emu = GnssEmulator(m, rate_hz=4.0)
        await emu.start()
        try:
            await asyncio.sleep(1.2)
            assert emu._slave is not None
            data = os.read(emu._slave, 65536)
        finally:
            await emu.stop()
        assert emu.no_fix_epochs >= 3 and emu.epochs_written == 0
        return NmeaDecoder().feed(data)

    fixes = asyncio.run(run())
    assert len(fixes) >= 2
    assert all(f.mode == 1 and f.lat is None and f.satellites_used == 0 for f in fixes)


def test_bms_reports_the_faulted_cells_probes_and_protection() -> None:
    m = _model(_fault("thermal_runaway", 60))
    bms = AgentView(m).bms
    s = m.state_at(AT + 40)
    info = bms.basic_info(s)
    assert info.protection & (1 << 6) and max(info.temperatures_c) == pytest.approx(s.battery_temp_max_c)
    mv = bms.cell_millivolts(s)
    assert sum(mv) == round(s.pack_voltage_v * 1000)
    assert min(mv) == pytest.approx(min(s.cell_voltages_v) * 1000, abs=2)
    # Stuck sensors (another fault family) still apply on top of a faulted state.
    bms.stuck = {"battery_temp_max_c": 30.0}
    assert max(bms.basic_info(s).temperatures_c) == 30.0
    assert dataclasses.replace(s, battery_present=False).battery_present is False
