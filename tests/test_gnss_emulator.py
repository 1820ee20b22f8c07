"""GNSS emulator on a real pty read by the agent's GnssReader; the vehicle model and route it rides."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.gnss import GnssReader
from edge_agent.nmea import CONSTELLATIONS, GnssFix, NmeaDecoder
from protocol.catalogue import load_catalogue
from simulators.gnss import GnssEmulator
from simulators.route import YUZHONG_LOOP, bearing_deg, haversine_m, route_for
from simulators.vehicle import SyntheticPowertrain, VehicleModel

T0 = 1_763_700_000.0


async def _wait_for(condition: Callable[[], bool], within: float) -> None:
    """Poll `condition` every 20 ms; TimeoutError after `within` seconds."""
    for _ in range(max(1, round(within / 0.02))):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"condition not met within {within} s")


# -- emulator ↔ reader over a pty ----------------------------------------------------------------------------


def test_reader_delivers_what_the_emulator_wrote() -> None:
    async def run() -> tuple[list[GnssFix], GnssEmulator, GnssReader]:
        model = VehicleModel(route_for(4), seed=4, start_time=time.time() - 900)
        emulator = GnssEmulator(model, rate_hz=10.0)
        await emulator.start()
        fixes: list[GnssFix] = []
        reader = GnssReader(emulator.port, 115200, on_fix=fixes.append)
        await reader.start()
        try:
            await _wait_for(lambda: len(fixes) >= 4, 5.0)
        finally:
            await reader.stop()
            await emulator.stop()
        return fixes, emulator, reader

    fixes, emulator, reader = asyncio.run(run())
    truth = {t.time_ms: t for t in emulator.truth}
    # The first fix may lack BeiDouInUse (its GSA follows its GGA); from the second on everything is known.
    for fix in fixes[1:]:
        assert fix.time_ms is not None
        expected = truth[fix.time_ms]  # exact epoch time, on the 100 ms grid
        assert fix.time_ms % 100 == 0
        assert fix.mode == 3
        assert fix.lat == pytest.approx(expected.lat, abs=1e-6)
        assert fix.lon == pytest.approx(expected.lon, abs=1e-6)
        assert fix.altitude_m == pytest.approx(expected.altitude_m, abs=1e-9)
        assert fix.speed_kmh == pytest.approx(expected.speed_kmh, abs=1e-9)
        assert fix.heading_deg == expected.heading_deg
        assert fix.satellites_used == expected.satellites_used
        assert fix.beidou_in_use is expected.beidou_in_use
    assert reader.latest is not None and reader.latest.time_ms == max(f.time_ms or 0 for f in fixes)
    assert reader.decoder.counters["bad_checksum"] == 0
    assert emulator.dropped_epochs == 0


@pytest.mark.parametrize("receiver", ["gn-multi", "quectel-pq", "bd-only"])
def test_reader_delivers_what_a_named_receiver_wrote(receiver: str) -> None:
    async def run() -> tuple[list[GnssFix], GnssEmulator, GnssReader]:
        model = VehicleModel(route_for(6), seed=6, start_time=time.time() - 900)
        emulator = GnssEmulator(model, rate_hz=10.0, receiver=receiver)
        await emulator.start()
        fixes: list[GnssFix] = []
        reader = GnssReader(emulator.port, 115200, on_fix=fixes.append)
        await reader.start()
        try:
            await _wait_for(lambda: len(fixes) >= 4, 5.0)
        finally:
            await reader.stop()
            await emulator.stop()
        return fixes, emulator, reader

    fixes, emulator, reader = asyncio.run(run())
    truths = list(emulator.truth)
    by_time = {t.time_ms: i for i, t in enumerate(truths)}
    systems = {attr: system for attr, _, system in CONSTELLATIONS}
    checked = 0
    # The sky sentences follow the position, so a fix carries the previous epoch's sky; the first fix's may be
    # one the reader caught only the end of.
    for fix in fixes[1:]:
        assert fix.time_ms is not None
        i = by_time[fix.time_ms]
        truth, sky = truths[i], truths[i - 1]
        assert fix.mode == 3 and fix.quality == truth.quality
        assert fix.lat == pytest.approx(truth.lat, abs=1e-9) and fix.speed_kmh == pytest.approx(truth.speed_kmh)
        assert fix.used is not None and fix.in_view is not None
        for attr, system in systems.items():
            assert getattr(fix.used, attr) == sky.used.get(system, 0), attr
            assert getattr(fix.in_view, attr) == sky.in_view.get(system, 0), attr
        assert (fix.pdop, fix.vdop, fix.beidou_in_use) == (sky.pdop, sky.vdop, sky.beidou_in_use)
        checked += 1
    assert checked >= 2
    counters = reader.decoder.counters
    assert counters["unsupported"] == counters["malformed"] == counters["bad_checksum"] == 0
    with pytest.raises(ValueError, match="unknown receiver"):
        GnssEmulator(emulator.model, receiver="no-such-receiver")


def test_reader_reopens_a_port_that_vanished(tmp_path: Path) -> None:
    # The agent opens a stable name (as udev's /dev/gnss0 symlink would be); the pty behind it goes and comes back.
    link = tmp_path / "gnss0"

    async def run() -> GnssReader:
        model = VehicleModel(route_for(1), seed=1, start_time=time.time())
        first = GnssEmulator(model, rate_hz=10.0)
        await first.start()
        link.symlink_to(first.port)
        fixes: list[GnssFix] = []
        reader = GnssReader(str(link), on_fix=fixes.append, retry_initial_s=0.1, retry_max_s=0.2)
        await reader.start()
        try:
            await _wait_for(lambda: len(fixes) >= 2, 5.0)
            await first.stop()  # pty master closed: the reader sees a hang-up
            await _wait_for(lambda: reader.disconnects == 1, 5.0)
            second = GnssEmulator(model, rate_hz=10.0)
            await second.start()
            link.unlink()
            link.symlink_to(second.port)
            seen = len(fixes)
            await _wait_for(lambda: reader.reconnects == 1 and len(fixes) >= seen + 2, 5.0)
            await second.stop()
        finally:
            await reader.stop()
        return reader

    reader = asyncio.run(run())
    assert reader.disconnects >= 1
    assert reader.reconnects == 1


def test_reader_takes_only_baud_rates_gnss_modules_speak(tmp_path: Path) -> None:
    for baud in (4800, 9600, 115200):
        assert GnssReader(str(tmp_path / "gnss0"), baud).baudrate == baud
    for baud in (0, 1200, 14400, 100_000):
        with pytest.raises(ValueError, match="baud rate"):
            GnssReader(str(tmp_path / "gnss0"), baud)


def test_reader_start_tolerates_a_missing_port(tmp_path: Path) -> None:
    async def run() -> GnssReader:
        reader = GnssReader(str(tmp_path / "absent"), retry_initial_s=0.05, retry_max_s=0.1)
        await reader.start()
        await asyncio.sleep(0.3)
        assert not reader.connected
        await reader.stop()
        return reader

    assert asyncio.run(run()).reconnects == 0


def test_nobody_reading_drops_whole_epochs_without_blocking() -> None:
    async def run() -> None:
        model = VehicleModel(route_for(0), seed=0, start_time=T0)
        emulator = GnssEmulator(model, rate_hz=1.0)
        await emulator.start()
        try:
            # Drive the writer directly, far faster than real time, until the pty buffer is full.
            epoch_ms = int(T0 * 1000)
            started = time.monotonic()
            while emulator.dropped_epochs < 3:
                emulator._write_epoch(epoch_ms)
                epoch_ms += 1000
                assert time.monotonic() - started < 5.0, "pty never filled up"
            # Whatever was written is whole sentences, even the epoch that only partly fitted at first.
            slave = emulator._slave
            assert slave is not None
            os.set_blocking(slave, False)
            decoder = NmeaDecoder()
            fixes: list[GnssFix] = []
            idle = 0
            deadline = time.monotonic() + 5.0
            while idle < 10 and time.monotonic() < deadline:
                try:
                    fixes += decoder.feed(os.read(slave, 65536))
                    idle = 0
                except BlockingIOError:
                    idle += 0 if emulator._pending else 1
                await asyncio.sleep(0.005)  # lets the emulator's writer callback finish the pending epoch
            fixes += decoder.flush()
            assert len(fixes) == emulator.epochs_written
            assert decoder.counters["bad_checksum"] == 0
            assert decoder.counters["garbage"] == 0
        finally:
            await emulator.stop()

    asyncio.run(run())


# -- vehicle model and route ---------------------------------------------------------------------------------

CATALOGUE = load_catalogue()


def _check_state_invariants(model: VehicleModel, t: float) -> None:
    s = model.state_at(t)
    assert 29.4 <= s.lat <= 29.7 and 106.4 <= s.lon <= 106.7
    assert 160.0 <= s.altitude_m <= 400.0
    assert 0.0 <= s.speed_kmh <= 45.0
    assert 0.0 <= s.heading_deg < 360.0
    assert 42.0 <= s.pack_voltage_v <= 54.6
    assert 0.0 <= s.soc_pct <= 100.0
    if s.speed_kmh == 0.0 and s.activity != "charging":
        assert -1.0 < s.pack_current_a <= 0.0  # standing at a light or parked: only the idle draw (0 mid-swap)
    signals = model.signals(s)
    for name, value in signals.items():
        assert CATALOGUE.by_name(name).in_range(value), (name, value)


def test_two_hours_of_riding_stay_in_chongqing_and_in_range() -> None:
    for seed in (0, 1, 17):
        model = VehicleModel(route_for(seed), seed=seed, start_time=T0)
        prev = model.state_at(T0)
        stops = 0
        accelerating = drawing = 0
        for dt in range(1, 7200):
            _check_state_invariants(model, T0 + dt)
            cur = model.state_at(T0 + dt)
            # Acceleration an e-bike and its brakes can actually deliver (m/s² over one second).
            assert abs(cur.speed_kmh - prev.speed_kmh) / 3.6 <= 2.5
            assert cur.distance_m >= prev.distance_m
            if cur.speed_kmh == 0.0 and prev.speed_kmh > 0.0:
                stops += 1
            if cur.speed_kmh > 15.0 and cur.speed_kmh > prev.speed_kmh + 1.0:
                accelerating += 1
                drawing += cur.pack_current_a < -2.0  # negative = discharge
            prev = cur
        # Accelerating draws from the pack — except when a steep descent does most of the work.
        assert drawing >= 0.8 * accelerating
        assert stops >= 20, "a city ride stops at lights"
        # 7.5-30 km/h on average: a legal e-bike (25 km/h limiter) with lights and a courier's delivery stops.
        assert 15_000 <= prev.distance_m <= 60_000
        assert model.state_at(T0 + 7200).soc_pct != model.state_at(T0).soc_pct


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**31),
    index=st.integers(min_value=0, max_value=200),
    offset=st.floats(min_value=-600.0, max_value=86_400.0 * 3),
)
def test_any_vehicle_at_any_time_is_plausible(seed: int, index: int, offset: float) -> None:
    model = VehicleModel(route_for(index), seed=seed, start_time=T0)
    _check_state_invariants(model, T0 + offset)


def test_model_is_deterministic_and_powertrain_reads_it() -> None:
    a = VehicleModel(route_for(2), seed=42, start_time=T0)
    b = VehicleModel(route_for(2), seed=42, start_time=T0)
    assert a.state_at(T0 + 1234.5) == b.state_at(T0 + 1234.5)
    assert a.state_at(T0 + 1234.5) != VehicleModel(route_for(2), seed=43, start_time=T0).state_at(T0 + 1234.5)
    values = SyntheticPowertrain(a).read(T0 + 1234.5)
    assert set(values) <= {s.name for s in CATALOGUE.from_source("controller") + CATALOGUE.from_source("bms")}
    # The stand-in covers the controller and the BMS's headline values; cell-level detail (cycle count, cell
    # voltages, barcode, ...) comes from a real BMS protocol — see simulators/bms_jbd.py.
    headline = ("StateOfCharge", "CurrentVoltage", "CurrentCurrent", "Temperature.Max", "StateOfHealth")
    # Likewise for the controller: its headline values (ids 20-23); currents, brake, throttle, config and faults
    # come from the real controller protocol — see simulators/controller_uart.py.
    controller_headline = {s.name for s in CATALOGUE.from_source("controller") if s.id <= 23}
    assert len(controller_headline) == 4 and controller_headline <= set(values)
    assert {f"Powertrain.TractionBattery.{n}" for n in headline} <= set(values)
    for name, value in values.items():
        sig = CATALOGUE.by_name(name)
        assert sig.in_range(value)
        if sig.resolution is not None:
            assert round(float(value), sig.decimals) == value


def test_powertrain_is_cheap_enough_for_a_fleet() -> None:
    fleet = [SyntheticPowertrain(VehicleModel(route_for(i), seed=i, start_time=T0)) for i in range(20)]
    started = time.perf_counter()
    for second in range(50):
        for vehicle in fleet:
            vehicle.read(T0 + second)
    per_read = (time.perf_counter() - started) / 1000
    assert per_read < 1e-3  # 20 vehicles at 1 Hz would use < 2 % of a core


def test_fleet_spreads_out_over_the_loop() -> None:
    starts = [route_for(i).position_at(0.0) for i in range(8)]
    for i, p in enumerate(starts):
        for q in starts[i + 1 :]:
            assert haversine_m(p.lat, p.lon, q.lat, q.lon) > 200.0
    assert route_for(0).waypoints == tuple(reversed(route_for(1).waypoints))


def test_route_geometry() -> None:
    # One minute of latitude is one nautical mile (to within the sphere's approximation).
    assert haversine_m(29.5, 106.5, 29.5 + 1 / 60, 106.5) == pytest.approx(1852.0, rel=0.01)
    assert bearing_deg(29.5, 106.5, 29.6, 106.5) == pytest.approx(0.0, abs=1e-9)
    assert bearing_deg(29.5, 106.5, 29.5, 106.6) == pytest.approx(90.0, abs=0.1)
    route = route_for(0)
    start = route.position_at(0.0)
    assert (start.lat, start.lon) == (YUZHONG_LOOP[0].lat, YUZHONG_LOOP[0].lon)
    again = route.position_at(route.length_m * 3)
    assert again.lat == pytest.approx(start.lat) and again.lon == pytest.approx(start.lon)
    assert 8_000 < route.length_m < 20_000
    for w in YUZHONG_LOOP:
        assert 29.4 <= w.lat <= 29.7 and 106.4 <= w.lon <= 106.7 and 160 <= w.alt_m <= 400
