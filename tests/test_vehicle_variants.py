"""Vehicle variants: the 48 V e-bike (default, unchanged) and the 72 V e-motorcycle, in the model, in the JBD and
controller emulators that read it, and in the demo fleet's mix."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.devices.controller_uart import ControllerSource
from edge_agent.devices.jbd import REG_BASIC_INFO, REG_CELL_VOLTAGES, parse_basic_info
from edge_agent.devices.jbd_uart import JbdBmsSource
from protocol.catalogue import load_catalogue
from simulators.bms_jbd import JbdBmsEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.route import route_for
from simulators.vehicle import VARIANTS, VehicleModel
from zhilian.fleet import fleet_variant

T0 = 1_763_700_000.0
CATALOGUE = load_catalogue()
P = "Powertrain.TractionBattery."
M = "Powertrain.ElectricMotor."


def test_default_variant_is_the_e_bike_and_explicit_ebike48_is_identical() -> None:
    for seed in (0, 7, 23):
        default = VehicleModel(route_for(seed), seed=seed, start_time=T0)
        explicit = VehicleModel(route_for(seed), seed=seed, start_time=T0, variant="ebike48")
        assert default.variant is VARIANTS["ebike48"]
        for dt in range(0, 3600, 97):
            assert default.state_at(T0 + dt) == explicit.state_at(T0 + dt)
    with pytest.raises(ValueError, match="unknown vehicle variant"):
        VehicleModel(route_for(0), seed=0, start_time=T0, variant="tricycle")


def test_motorcycle_rides_faster_on_a_bigger_pack() -> None:
    for seed in (1, 2, 3):
        bike = VehicleModel(route_for(seed), seed=seed, start_time=T0)
        moto = VehicleModel(route_for(seed), seed=seed, start_time=T0, variant="emoto72")
        bike_states = [bike.state_at(T0 + dt) for dt in range(0, 3600, 2)]
        moto_states = [moto.state_at(T0 + dt) for dt in range(0, 3600, 2)]
        assert max(s.speed_kmh for s in moto_states) > 50.0
        assert max(s.speed_kmh for s in moto_states) <= VARIANTS["emoto72"].max_speed_kmh
        assert moto_states[-1].distance_m > 1.15 * bike_states[-1].distance_m
        for s in moto_states:
            assert 60.0 <= s.pack_voltage_v <= 84.0  # 20S NMC, sagging under 80 A
            assert -80.0 <= s.pack_current_a <= 80.0 / 3
        assert max(s.pack_voltage_v for s in bike_states) <= 54.6
        # It pulls far more current than the e-bike's 30 A controller can.
        assert min(s.pack_current_a for s in moto_states) < -40.0


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**31),
    index=st.integers(min_value=0, max_value=200),
    offset=st.floats(min_value=-600.0, max_value=86_400.0 * 3),
)
def test_any_motorcycle_at_any_time_is_plausible(seed: int, index: int, offset: float) -> None:
    model = VehicleModel(route_for(index), seed=seed, start_time=T0, variant="emoto72")
    s = model.state_at(T0 + offset)
    assert 29.4 <= s.lat <= 29.7 and 106.4 <= s.lon <= 106.7
    assert 0.0 <= s.speed_kmh <= 60.0 and 0.0 <= s.soc_pct <= 100.0
    assert 60.0 <= s.pack_voltage_v <= 84.0
    for name, value in model.signals(s).items():
        assert CATALOGUE.by_name(name).in_range(value), (name, value)


def test_emulators_take_their_configuration_from_the_variant() -> None:
    moto = VehicleModel(route_for(3), seed=3, start_time=T0, variant="emoto72")
    bike = VehicleModel(route_for(3), seed=3, start_time=T0)
    bms, bike_bms = JbdBmsEmulator(moto), JbdBmsEmulator(bike)
    assert (bms.cells, bms.probes, bms.nominal_ah) == (20, 4, 40.0) and bms.barcode.startswith("ZL72V40AH-")
    assert (bike_bms.cells, bike_bms.probes, bike_bms.nominal_ah) == (13, 2, 24.0)
    state = moto.state_at(T0 + 1800)
    assert sum(bms.cell_millivolts(state)) == round(state.pack_voltage_v * 1000)
    assert bms.basic_info(state).cell_count == 20
    ctl, bike_ctl = ControllerEmulator(moto), ControllerEmulator(bike)
    assert (ctl.config().speed_limit_kmh, ctl.config().wheel_inch, ctl.config().pole_pairs) == (60.0, 17.0, 16)
    assert (bike_ctl.config().speed_limit_kmh, bike_ctl.config().wheel_inch) == (25.0, 16.0)
    # Explicit arguments still win over the variant (another pack plugged in, a reconfigured controller).
    assert JbdBmsEmulator(moto, cells=24).cells == 24
    assert ControllerEmulator(moto, speed_limit_kmh=45.0).config().speed_limit_kmh == 45.0
    # Full throttle means the motorcycle controller's own maximum current, not the e-bike's.
    busy = max((moto.state_at(T0 + dt) for dt in range(0, 1800)), key=lambda s: -s.pack_current_a)
    assert -busy.pack_current_a > 30.0
    assert 0 < ctl.status(busy).throttle_pct <= 100


def test_fleet_mixes_variants_by_index() -> None:
    mix = [fleet_variant(i) for i in range(12)]
    assert mix == [fleet_variant(i) for i in range(12)]  # deterministic
    assert [i for i, v in enumerate(mix) if v == "emoto72"] == [3, 7, 11]
    assert set(mix) <= set(VARIANTS)


async def _wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


def test_72v_bms_values_arrive_with_its_own_cell_count_and_voltage_range() -> None:
    async def run() -> None:
        model = VehicleModel(route_for(6), seed=6, start_time=time.time() - 900, variant="emoto72")
        emulator = JbdBmsEmulator(model)
        await emulator.start()
        source = JbdBmsSource(emulator.port, poll_interval_s=0.1, timeout_s=0.3)
        await source.start()
        try:
            await _wait_for(lambda: source.counters["polls"] >= 3 and P + "Barcode" in source.read(time.time()), 8)
            values = source.read(time.time())
        finally:
            await source.stop()
            await emulator.stop()
        assert values[P + "CellCount"] == 20
        raw = [values[f"{P}CellVoltage.Cell{i}"] for i in range(1, 21)]
        assert all(isinstance(v, float) and 3.0 <= v <= 4.2 for v in raw)
        cells = [float(v) for v in raw]
        assert f"{P}CellVoltage.Cell21" not in values
        volt = values[P + "CurrentVoltage"]
        assert isinstance(volt, float) and 60.0 <= volt <= 84.0
        # The values are ones the emulator sent for this 72 V pack: basic info and cells of one answer each.
        sent = [
            parse_basic_info(a.payload).voltage_v for a in emulator.log if a.register == REG_BASIC_INFO and not a.fault
        ]
        assert volt in sent
        cell_answers = [a for a in emulator.log if a.register == REG_CELL_VOLTAGES and not a.fault]
        assert any(abs(sum(cells) - a.state.pack_voltage_v) < 0.0006 for a in cell_answers)
        assert values[P + "NominalCapacity"] == 40.0
        assert P + "Temperature.Probe4" in values and P + "Temperature.Probe5" not in values
        assert str(values[P + "Barcode"]).startswith("ZL72V40AH-")

    asyncio.run(run())


def test_72v_controller_reports_its_own_limits_and_wheel() -> None:
    async def run() -> None:
        model = VehicleModel(route_for(7), seed=7, start_time=time.time() - 900, variant="emoto72")
        emulator = ControllerEmulator(model, period_s=0.05)
        await emulator.start()
        source = ControllerSource(emulator.port, config_poll_s=0.3, timeout_s=0.3)
        await source.start()
        try:
            await _wait_for(lambda: source.counters["config_responses"] >= 1, 8.0)
            await _wait_for(lambda: source.counters["status_frames"] >= 5, 8.0)
            values = source.read(time.time())
        finally:
            await source.stop()
            await emulator.stop()
        assert values[M + "ConfiguredSpeedLimit"] == 60.0
        assert values["Chassis.Wheel.Size"] == 17.0
        assert values[M + "PolePairs"] == 16
        assert 0.0 <= float(values["Speed"]) <= 60.0

    asyncio.run(run())


def test_variants_are_complete_and_consistent() -> None:
    for name, v in VARIANTS.items():
        assert v.name == name
        assert v.cruise_kmh[1] <= v.max_speed_kmh
        assert 1 <= v.cells_in_series <= 24 and 0 <= v.temperature_probes <= 8  # catalogue has 24 cells, 8 probes
        assert CATALOGUE.by_name(P + "CurrentVoltage").in_range(v.max_pack_voltage_v)
        assert CATALOGUE.by_name("Chassis.Wheel.Size").in_range(v.wheel_inch)
