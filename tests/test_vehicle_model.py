"""The vehicle model's physics and its rider's day: battery chemistry, charging, heat, ageing, the road graph, the
plan (riding, parking, locking, charging, swapping) and scripted segments."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.catalogue import load_catalogue
from simulators.battery import LFP, NMC, ChargeCurve, Charger, Pack, first_order_rise, resistance_factor
from simulators.roads import MAX_GRADE, RouteProfile, chongqing_graph, congestion_factor, graph_route_for
from simulators.route import route_for
from simulators.vehicle import CHARGING_PLACES, VARIANTS, Segment, VehicleModel

T0 = 1_767_578_400.0  # 2026-01-05 10:00 China time
CATALOGUE = load_catalogue()


# -- battery --------------------------------------------------------------------------------------------------------


def test_ocv_curves_rise_and_lfp_sits_on_its_plateau() -> None:
    for chem in (NMC, LFP):
        volts = [chem.ocv(s) for s in range(0, 101)]
        assert all(b > a for a, b in itertools.pairwise(volts)), chem.name
        assert volts[-1] <= chem.cell_charge_v
    # LFP's plateau: 20-80 % within 0.1 V; NMC falls steadily over the same range.
    assert LFP.ocv(80) - LFP.ocv(20) < 0.1 < NMC.ocv(80) - NMC.ocv(20)


@given(soc=st.floats(min_value=0.0, max_value=100.0), lfp=st.booleans())
def test_soc_at_ocv_inverts_ocv(soc: float, lfp: bool) -> None:
    chem = LFP if lfp else NMC
    assert chem.soc_at_ocv(chem.ocv(soc)) == pytest.approx(soc, abs=1e-6)


def test_resistance_rises_in_the_cold_near_empty_and_with_age() -> None:
    base = resistance_factor(25.0, 50.0, 100.0)
    assert base == pytest.approx(1.0)
    assert resistance_factor(0.0, 50.0, 100.0) > 1.5 * base
    assert resistance_factor(25.0, 5.0, 100.0) > 1.3 * base
    assert resistance_factor(25.0, 50.0, 80.0) == pytest.approx(1.4)


def test_first_order_windows_add_up_to_the_whole() -> None:
    # The thermal model sums windows of the past: splitting one must not change the answer.
    whole = first_order_rise(20.0, 1.2, 3000.0, 10.0, 500.0)
    parts = first_order_rise(20.0, 1.2, 3000.0, 10.0, 120.0) + first_order_rise(20.0, 1.2, 3000.0, 120.0, 500.0)
    assert parts == pytest.approx(whole)
    # Forever at P: the steady state P·R_th.
    assert first_order_rise(20.0, 1.2, 3000.0, 0.0, 1e9) == pytest.approx(24.0)


@settings(max_examples=60, deadline=None)
@given(
    soc0=st.floats(min_value=0.0, max_value=99.0),
    current=st.floats(min_value=1.0, max_value=10.0),
    lfp=st.booleans(),
)
def test_cc_cv_charging_fills_the_pack_and_stops(soc0: float, current: float, lfp: bool) -> None:
    chem, cells, cap = (LFP, 15, 20.0) if lfp else (NMC, 13, 24.0)
    curve = ChargeCurve.plan(soc0, Charger(current, cap * 0.02), cap, cells, chem, 0.12)
    times = [curve.t_done * k / 200 for k in range(201)]
    socs = [curve.soc(t) for t in times]
    amps = [curve.current(t) for t in times[:-1]]
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(socs)) and max(socs) <= 100.0
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(amps)) and max(amps) <= current + 1e-9
    assert curve.current(curve.t_done + 1.0) == 0.0
    assert socs[-1] >= min(99.0, max(soc0, 97.0)) - 1e-6  # cut off at C/50: full to within a couple of %
    # Charge counted in Ah is the SOC it added.
    assert curve.charge_ah(curve.t_done) == pytest.approx((socs[-1] - soc0) / 100.0 * cap, abs=1e-6)


def test_packs_age_with_cycles_and_with_time() -> None:
    pack = Pack.draw(random.Random(1), "P-1", NMC, 13, 24.0)
    lfp = Pack.draw(random.Random(1), "P-2", LFP, 15, 20.0)
    assert pack.soh(0.0, 0.0) == pack.soh0_pct
    assert pack.soh(24.0 * 2 * 100, 0.0) == pytest.approx(pack.soh0_pct - 2.0)  # 100 full cycles
    assert pack.soh(0.0, 365.0) == pytest.approx(pack.soh0_pct - NMC.calendar_fade_pct_per_year)
    assert lfp.soh0_pct - lfp.soh(20.0 * 2 * 100, 0.0) < pack.soh0_pct - pack.soh(24.0 * 2 * 100, 0.0)
    assert pack.cycles(24.0 * 2 * 10) == pack.cycles0 + 10
    assert sum(pack.cell_soc_offsets) == pytest.approx(0.0, abs=1e-9)


# -- roads ----------------------------------------------------------------------------------------------------------


def test_the_road_graph_is_a_hilly_peninsula_with_lights() -> None:
    g = chongqing_graph()
    alts = [j.alt_m for j in g.junctions]
    assert min(alts) < 200.0 and max(alts) > 300.0  # river banks to Eling
    assert sum(j.signal for j in g.junctions) >= 10
    assert {r.klass for r in g.roads} == {"arterial", "street", "lane"}
    for j in g.junctions:
        assert 29.54 <= j.lat <= 29.57 and 106.53 <= j.lon <= 106.59
        assert len(g.shortest_path(0, j.id)) >= 1  # one connected network
    assert chongqing_graph() is g


@pytest.mark.parametrize("index", range(6))
def test_graph_tours_are_closed_rides_within_the_grade_limit(index: int) -> None:
    route = graph_route_for(index)
    assert route.waypoints == graph_route_for(index).waypoints  # deterministic
    assert 6_000 < route.length_m < 25_000
    starts = route.segment_starts_m
    n = len(route.waypoints)
    for k in range(n):
        a, b = route.waypoints[k], route.waypoints[(k + 1) % n]
        assert abs(b.alt_m - a.alt_m) / (starts[k + 1] - starts[k]) <= MAX_GRADE + 1e-6
    profile = RouteProfile(route)
    ascent, descent = profile.climb(route.length_m)
    assert ascent == pytest.approx(descent) and ascent > 50.0  # a closed loop climbs what it descends
    assert profile.signal_at and math.isinf(RouteProfile(route_for(0)).caps_kmh[0])


def test_rush_hour_slows_traffic() -> None:
    morning_peak = T0 - 1.75 * 3600  # 08:15 China time
    night = T0 - 7 * 3600  # 03:00
    assert congestion_factor("arterial", night) == 1.0
    assert congestion_factor("arterial", morning_peak) < 0.6 < congestion_factor("lane", morning_peak)


# -- the model ------------------------------------------------------------------------------------------------------


def test_the_e_bike_keeps_to_its_limiter_and_the_motorcycle_rides_faster() -> None:
    bike = VehicleModel(graph_route_for(1), 1, T0)
    moto = VehicleModel(graph_route_for(1), 1, T0, "emoto72")
    bike_speeds = [bike.state_at(T0 + k).speed_kmh for k in range(0, 7200, 3)]
    moto_speeds = [moto.state_at(T0 + k).speed_kmh for k in range(0, 7200, 3)]
    assert max(bike_speeds) <= VARIANTS["ebike48"].max_speed_kmh == 25.0
    assert max(moto_speeds) > 40.0
    assert moto.state_at(T0 + 7200).distance_m > bike.state_at(T0 + 7200).distance_m


def test_climbing_draws_more_than_the_flat_and_descents_draw_little() -> None:
    model = VehicleModel(graph_route_for(2), 2, T0)
    up: list[float] = []
    down: list[float] = []
    for k in range(0, 10_000, 2):
        s = model.state_at(T0 + k)
        if s.activity != "riding" or s.speed_kmh < 15.0:
            continue
        grade = model.route.position_at(s.distance_m).grade
        (up if grade > 0.04 else down if grade < -0.04 else []).append(-s.pack_current_a)
    assert up and down
    assert sum(up) / len(up) > 2.0 * sum(down) / len(down)


def test_the_pack_warms_while_riding_and_cools_to_the_air_when_parked() -> None:
    model = VehicleModel(graph_route_for(3), 3, T0, "emoto72", script=[Segment("park", 7200, 20_000, {"locked": True})])
    riding = model.state_at(T0 + 7199)
    parked = model.state_at(T0 + 19_999)
    assert riding.activity == "riding" and parked.activity == "parked" and parked.locked
    assert riding.battery_temp_max_c > riding.ambient_c + 3.0
    assert riding.motor_temp_c > riding.battery_temp_max_c
    assert abs(parked.battery_temp_max_c - parked.ambient_c) < 1.5
    assert abs(parked.motor_temp_c - parked.ambient_c) < 0.5


def test_a_courier_rides_shifts_parks_locked_swaps_and_charges() -> None:
    seen: dict[str, int] = {}
    places: dict[str, int] = {}
    for seed in range(12):
        model = VehicleModel(graph_route_for(seed), seed, T0)
        days = model.activities(T0 + 3 * 86_400)
        assert days[0][0] == "riding" and days[0][2] - days[0][1] >= 2 * 3600  # the first shift starts at once
        for kind, a, b in days:
            seen[kind] = seen.get(kind, 0) + 1
            s = model.state_at((a + b) / 2)
            assert s.activity in (kind, "parked")  # a charge that finished early leaves the vehicle parked
            if kind == "charging" and model.state_at(a + 60).activity == "charging":
                plugged = model.state_at(a + 60)
                assert plugged.pack_current_a > 0.0 and plugged.speed_kmh == 0.0
                assert plugged.soc_pct > model.state_at(a + 1).soc_pct
                places[plugged.charging_place] = places.get(plugged.charging_place, 0) + 1
            if kind == "parked" and b - a > 3600:
                assert s.locked  # breaks and nights: locked
            if kind == "riding":
                assert not s.locked
        # Days line up: three days, each ending parked overnight.
        assert days[-1][0] in ("parked", "charging")
    assert seen.get("swapping", 0) >= 3 and seen.get("charging", 0) >= 10
    assert set(places) <= set(CHARGING_PLACES) and places.get("home", 0) > places.get("forbidden", 0) >= 1


def test_a_swap_takes_the_pack_out_and_puts_a_charged_bound_one_in() -> None:
    model = VehicleModel(graph_route_for(0), 0, T0)
    _kind, a, b = next(x for x in model.activities(T0 + 86_400) if x[0] == "swapping")
    before, during, after = model.state_at(a - 1), model.state_at((a + b) / 2), model.state_at(b - 1)
    assert not during.battery_present and during.pack_current_a == 0.0
    assert before.battery_present and after.battery_present
    assert before.battery_barcode != after.battery_barcode and after.battery_barcode in model.bound_barcodes
    assert before.soc_pct < 20.0 and after.soc_pct >= 90.0


def test_the_state_is_a_pure_function_of_time() -> None:
    """Asked in any order, a model gives the same state for the same instant (its caches never leak order)."""
    instants = [T0 + k * 7.3 for k in range(400)]
    forward = VehicleModel(graph_route_for(5), 5, T0)
    shuffled = VehicleModel(graph_route_for(5), 5, T0)
    order = list(instants)
    random.Random(1).shuffle(order)
    by_shuffle = {t: shuffled.state_at(t) for t in order}
    assert all(forward.state_at(t) == by_shuffle[t] for t in instants)


def test_lfp_packs_have_more_cells_and_their_own_voltages() -> None:
    model = VehicleModel(graph_route_for(4), 4, T0, chemistry="LFP")
    assert model.cells == 15 and model.nominal_ah == 20.0
    for k in range(0, 3 * 86_400, 97):
        s = model.state_at(T0 + k)
        assert s.chemistry == "LFP" and len(s.cell_voltages_v) == 15
        assert 15 * LFP.cell_cutoff_v - 0.5 <= s.pack_voltage_v <= 15 * LFP.cell_charge_v + 1e-9
        assert max(s.cell_voltages_v) < 3.70  # below the rules' LFP over-voltage alarm


def test_scripted_segments_bend_the_plan_and_must_not_overlap() -> None:
    script = [
        Segment("park", 1000, 1600, {"locked": True}),
        Segment("ride", 1600, 1900, {"limiter_kmh": 35.0, "wish_kmh": (30.0, 34.0)}),
    ]
    model = VehicleModel(graph_route_for(6), 6, T0, script=script)
    assert model.state_at(T0 + 1000).speed_kmh == 0.0  # stopped in time for it
    parked = [model.state_at(T0 + k) for k in range(1000, 1600, 10)]
    assert all(s.activity == "parked" and s.locked and s.speed_kmh == 0.0 for s in parked)
    assert len({(s.lat, s.lon) for s in parked}) == 1
    assert max(model.state_at(T0 + k).speed_kmh for k in range(1600, 1900)) > 25.0
    assert model.state_at(T0 + 2100).activity == "riding"  # and the day goes on
    with pytest.raises(ValueError, match="overlap"):
        VehicleModel(graph_route_for(6), 6, T0, script=[Segment("park", 0, 100), Segment("park", 50, 200)])


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**31),
    index=st.integers(min_value=0, max_value=200),
    variant=st.sampled_from(sorted(VARIANTS)),
    rider=st.sampled_from(["courier", "commuter"]),
    chemistry=st.sampled_from(["NMC", "LFP"]),
    offset=st.floats(min_value=-600.0, max_value=86_400.0 * 3),
)
def test_any_vehicle_rider_and_pack_at_any_time_is_plausible(
    seed: int, index: int, variant: str, rider: str, chemistry: str, offset: float
) -> None:
    model = VehicleModel(graph_route_for(index), seed, T0, variant, rider=rider, chemistry=chemistry)
    s = model.state_at(T0 + offset)
    vt = model.variant
    chem = model.chemistry
    assert 0.0 <= s.speed_kmh <= vt.max_speed_kmh and 0.0 <= s.soc_pct <= 100.0
    assert chem.cell_cutoff_v * model.cells - 0.5 <= s.pack_voltage_v <= chem.cell_charge_v * model.cells + 1e-9
    assert sum(s.cell_voltages_v) == pytest.approx(s.pack_voltage_v)
    assert s.ambient_c - 1.0 <= s.battery_temp_max_c < 50.0  # below the first over-temperature alarm
    assert s.activity in ("riding", "parked", "charging", "swapping")
    assert (s.pack_current_a > 0.0) == (s.activity == "charging")
    for name, value in model.signals(s).items():
        assert CATALOGUE.by_name(name).in_range(value), (name, value)
