"""Motor controller: the sans-I/O codec (fuzzed), and the UART source against the emulator on a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.devices.controller import (
    CONFIG_FIXED_LEN,
    MAX_FRAME,
    MAX_PAYLOAD,
    STATUS_LEN,
    TYPE_CONFIG,
    TYPE_READ_CONFIG,
    TYPE_STATUS,
    ControllerConfig,
    ControllerError,
    ControllerFrame,
    ControllerFrameDecoder,
    ControllerRequestDecoder,
    ControllerStatus,
    build_config,
    build_status,
    encode_config_request,
    encode_frame,
    parse_config,
    parse_status,
)
from edge_agent.devices.controller_uart import ControllerSource
from edge_agent.sources import ValueSource
from protocol.catalogue import Value, load_catalogue
from simulators.controller_uart import ControllerEmulator, ControllerSent
from tests.uart_support import connected, replug, ride_model, wait_for

CATALOGUE = load_catalogue()
M = "Powertrain.ElectricMotor."
# The worked examples of CONTROLLER_UART.md.
STATUS_EXAMPLE = bytes.fromhex("3A1011 00EA 00F3 00BA 0067 0181 0209 0081 00 3E 03 F2 0D0A")
CONFIG_EXAMPLE = bytes.fromhex("3A200F 00FA 00A0 17 09 5A4C2D43312E342E32 24 0D0A")


# -- codec ---------------------------------------------------------------------------------------------------


def test_spec_examples() -> None:
    assert encode_config_request() == bytes.fromhex("3A2100210D0A")
    [status_frame, config_frame] = ControllerFrameDecoder().feed(STATUS_EXAMPLE + CONFIG_EXAMPLE)
    assert status_frame.type == TYPE_STATUS and config_frame.type == TYPE_CONFIG
    status = parse_status(status_frame.payload)
    assert encode_frame(TYPE_STATUS, build_status(status)) == STATUS_EXAMPLE
    assert status.fault_names == ["hall sensor", "motor over-temperature"]
    assert status.signals() == {
        "Speed": 23.4,
        M + "Speed": 243,
        M + "PhaseCurrent": 18.6,
        M + "SupplyCurrent": 10.3,
        M + "ControllerTemperature": 38.5,
        M + "Temperature": 52.1,
        M + "FaultCode": 0x81,
        "Chassis.Brake.IsEngaged": False,
        "Chassis.Accelerator.PedalPosition": 62,
        M + "AssistLevel": 3,
    }
    config = parse_config(config_frame.payload)
    assert config == ControllerConfig(25.0, 16.0, 23, "ZL-C1.4.2")
    assert encode_frame(TYPE_CONFIG, build_config(config)) == CONFIG_EXAMPLE
    assert config.signals() == {
        M + "ConfiguredSpeedLimit": 25.0,
        "Chassis.Wheel.Size": 16.0,
        M + "PolePairs": 23,
        M + "FirmwareVersion": "ZL-C1.4.2",
    }
    for name, value in {**status.signals(), **config.signals()}.items():
        sig = CATALOGUE.by_name(name)
        assert sig.source == "controller" and sig.in_range(value)


def test_no_motor_sensor_and_negative_values() -> None:
    status = ControllerStatus(0.0, -12, -4.5, -2.5, -10.2, None, 0, True, 0, 0)
    parsed = parse_status(build_status(status))
    assert parsed == ControllerStatus(0.0, -12, -4.5, -2.5, -10.2, None, 0, True, 0, 0, flags=1)
    values = parsed.signals()
    assert M + "Temperature" not in values  # no thermistor: left out, not sent as 3276.7 °C
    assert values["Chassis.Brake.IsEngaged"] is True and values[M + "SupplyCurrent"] == -2.5


statuses = st.builds(
    ControllerStatus,
    speed_kmh=st.integers(0, 0xFFFF).map(lambda r: r / 10),
    motor_rpm=st.integers(-0x8000, 0x7FFF),
    phase_current_a=st.integers(-0x8000, 0x7FFF).map(lambda r: r / 10),
    supply_current_a=st.integers(-0x8000, 0x7FFF).map(lambda r: r / 10),
    controller_temp_c=st.integers(-0x8000, 0x7FFF).map(lambda r: r / 10),
    motor_temp_c=st.none() | st.integers(-0x8000, 0x7FFE).map(lambda r: r / 10),
    faults=st.integers(0, 0xFFFF),
    brake=st.booleans(),
    throttle_pct=st.integers(0, 100),
    assist_level=st.integers(0, 255),
    flags=st.integers(0, 0xFF).map(lambda f: f & ~1),
)
configs = st.builds(
    ControllerConfig,
    speed_limit_kmh=st.integers(0, 0xFFFF).map(lambda r: r / 10),
    wheel_inch=st.integers(0, 0xFFFF).map(lambda r: r / 10),
    pole_pairs=st.integers(0, 255),
    firmware=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=MAX_PAYLOAD - CONFIG_FIXED_LEN),
)


@given(statuses)
def test_status_round_trips(status: ControllerStatus) -> None:
    payload = build_status(status)
    assert len(payload) == STATUS_LEN
    parsed = parse_status(payload)
    assert parsed == dataclasses.replace(status, flags=status.flags | status.brake)
    assert parse_status(payload + b"\x00\x07") == parsed  # fields later firmware appends are ignored
    [frame] = ControllerFrameDecoder().feed(encode_frame(TYPE_STATUS, payload))
    assert frame == ControllerFrame(TYPE_STATUS, payload)
    for name, value in parsed.signals().items():
        assert CATALOGUE.by_name(name).in_range(value)


@given(configs)
def test_config_round_trips(config: ControllerConfig) -> None:
    payload = build_config(config)
    assert parse_config(payload) == config
    [frame] = ControllerFrameDecoder().feed(encode_frame(TYPE_CONFIG, payload))
    assert parse_config(frame.payload) == config
    for name, value in config.signals().items():
        assert CATALOGUE.by_name(name).in_range(value)


@settings(max_examples=300)
@given(st.binary(max_size=100))
def test_parsers_raise_only_controller_error(payload: bytes) -> None:
    for parse in (parse_status, parse_config):
        with contextlib.suppress(ControllerError):
            parse(payload)


def test_builders_raise_only_controller_error() -> None:
    with pytest.raises(ControllerError):
        build_status(ControllerStatus(7000.0, 0, 0.0, 0.0, 0.0, None, 0, False, 0, 0))
    with pytest.raises(ControllerError):
        build_status(ControllerStatus(float("nan"), 0, 0.0, 0.0, 0.0, None, 0, False, 0, 0))
    with pytest.raises(ControllerError):
        build_status(ControllerStatus(1.0, 0, 0.0, 0.0, 0.0, None, 0, False, 101, 0))
    with pytest.raises(ControllerError):
        build_config(ControllerConfig(25.0, 16.0, 23, "é"))
    with pytest.raises(ControllerError):
        build_config(ControllerConfig(25.0, 16.0, 23, "x" * 59))
    with pytest.raises(ControllerError):
        encode_frame(TYPE_STATUS, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ControllerError):
        parse_status(build_status(ControllerStatus(1.0, 0, 0.0, 0.0, 0.0, None, 0, False, 0, 0))[:-1])


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_decoder_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    for decoder in (ControllerFrameDecoder(), ControllerRequestDecoder()):
        for chunk in chunks:
            decoder.feed(chunk)
            assert decoder.buffered < MAX_FRAME
        assert decoder.counters["bytes"] == sum(map(len, chunks))


@given(st.lists(statuses, min_size=1, max_size=5), st.data())
def test_any_split_points_give_the_same_frames(items: list[ControllerStatus], data: st.DataObject) -> None:
    wire = b"".join(encode_frame(TYPE_STATUS, build_status(s)) for s in items)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    decoder = ControllerFrameDecoder()
    got: list[ControllerFrame] = []
    for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        got.extend(decoder.feed(wire[a:b]))
    assert [parse_status(f.payload) for f in got] == [parse_status(build_status(s)) for s in items]
    assert decoder.counters["garbage"] == 0 and decoder.buffered == 0


@given(st.binary(max_size=200), statuses)
def test_noise_with_a_frame_start_does_not_swallow_the_frame(noise: bytes, status: ControllerStatus) -> None:
    wire = encode_frame(TYPE_STATUS, build_status(status))
    # Noise ending on "3A 10 40" announces 64 payload bytes: the decoder must not wait for them.
    got = ControllerFrameDecoder().feed(noise + b"\x3a\x10\x40" + wire)
    assert got[-1] == ControllerFrame(TYPE_STATUS, wire[3:-3])


def test_bad_checksum_framing_and_echo_are_counted_and_dropped() -> None:
    good = STATUS_EXAMPLE
    corrupt = bytearray(good)
    corrupt[5] ^= 0x01
    unterminated = good[:-1] + b"\x0b"
    too_long = b"\x3a\x10\x41"
    decoder = ControllerFrameDecoder()
    got = decoder.feed(bytes(corrupt) + unterminated + too_long + encode_config_request() + good)
    assert got == [ControllerFrame(TYPE_STATUS, good[3:-3])]
    c = decoder.counters
    assert c["bad_checksum"] == 1 and c["bad_framing"] == 2 and c["unexpected"] == 1 and decoder.buffered == 0
    requests = ControllerRequestDecoder()
    assert requests.feed(b"\x00" + encode_config_request() + good) == [ControllerFrame(TYPE_READ_CONFIG, b"")]
    assert requests.counters["unexpected"] == 1


# -- emulator ↔ source over a pty ----------------------------------------------------------------------------


def _sent(emulator: ControllerEmulator, frame_type: int) -> list[ControllerSent]:
    return [s for s in emulator.log if s.type == frame_type and s.fault == ""]


def _check_against_emulator(values: dict[str, Value], emulator: ControllerEmulator) -> None:
    """The source's status is exactly one the emulator sent, that frame matches the model, config is the config."""
    config_names = {n for n in values if n.endswith(("ConfiguredSpeedLimit", "Size", "PolePairs", "FirmwareVersion"))}
    status = {k: v for k, v in values.items() if k not in config_names}
    match = [s for s in _sent(emulator, TYPE_STATUS) if parse_status(s.payload).signals() == status]
    assert match, "a status the emulator never sent"
    state = match[-1].state
    assert status["Speed"] == pytest.approx(state.speed_kmh, abs=0.05 + 1e-9)
    assert status[M + "ControllerTemperature"] == pytest.approx(state.controller_temp_c, abs=0.05 + 1e-9)
    assert status[M + "Temperature"] == pytest.approx(state.motor_temp_c, abs=0.05 + 1e-9)
    assert status[M + "SupplyCurrent"] == pytest.approx(-state.pack_current_a, abs=0.05 + 1e-9)
    # rpm is the wheel's, for the configured wheel size.
    circumference_m = 3.141592653589793 * emulator.wheel_inch * 0.0254
    assert status[M + "Speed"] == pytest.approx(state.speed_kmh / 3.6 / circumference_m * 60, abs=0.5 + 1e-9)
    assert status[M + "AssistLevel"] == emulator.assist_level
    assert values[M + "ConfiguredSpeedLimit"] == emulator.config().speed_limit_kmh
    assert values["Chassis.Wheel.Size"] == emulator.wheel_inch
    assert values[M + "PolePairs"] == emulator.pole_pairs and values[M + "FirmwareVersion"] == emulator.firmware
    for name, value in values.items():
        assert CATALOGUE.by_name(name).in_range(value)


def test_source_delivers_what_the_emulator_sent() -> None:
    async def run() -> None:
        emulator = ControllerEmulator(ride_model(5), period_s=0.05, tamper_speed_limit_kmh=45.0)
        async with connected(emulator, partial(ControllerSource, config_poll_s=0.3, timeout_s=0.2)) as source:
            _: ValueSource = source
            await wait_for(lambda: source.counters["config_responses"] >= 3, 5.0)
            await wait_for(lambda: source.counters["status_frames"] >= 10, 5.0)
            values = source.read(time.time())
        _check_against_emulator(values, emulator)
        assert values[M + "ConfiguredSpeedLimit"] == 45.0  # the derestricted controller shows itself
        c = source.counters
        assert c["bad_frames"] == c["config_timeouts"] == c["parse_errors"] == c["garbage_bytes"] == 0
        # A request written just before stop() may not have been read by the emulator yet.
        assert emulator.config_reads <= c["config_requests"] <= emulator.config_reads + 1
        # Nothing stale: once the source stopped reading, its values age out.
        assert source.read(time.time() + source.stale_after_s + 0.5) == {}

    asyncio.run(run())


def test_source_rides_through_noise_bad_checksums_and_truncation() -> None:
    async def run() -> None:
        emulator = ControllerEmulator(
            ride_model(8), period_s=0.03, noise=24, bad_checksum_every=5, truncate_every=7, motor_sensor=True
        )
        async with connected(emulator, partial(ControllerSource, config_poll_s=0.2, timeout_s=0.1)) as source:
            await wait_for(lambda: source.counters["status_frames"] >= 40, 8.0)
            await wait_for(lambda: source.counters["config_responses"] >= 2, 8.0)
            await wait_for(lambda: len(source.read(time.time())) == 14, 5.0)
            values = source.read(time.time())
        _check_against_emulator(values, emulator)
        c = source.counters
        faults = [s.fault for s in emulator.log]
        assert faults.count("bad_checksum") >= 5 and faults.count("truncated") >= 3
        assert c["bad_frames"] >= faults.count("bad_checksum")
        assert c["garbage_bytes"] > 0 and c["parse_errors"] == 0
        good = len([s for s in emulator.log if s.fault == "" and s.type == TYPE_STATUS])
        # Every intact status frame sent before the source stopped was delivered (the last few may be in flight).
        assert good - 3 <= c["status_frames"] <= good

    asyncio.run(run())


def test_source_survives_the_port_vanishing(tmp_path: Path) -> None:
    # The agent opens a stable name (as udev's /dev/controller symlink would be); the pty goes and comes back.
    link = tmp_path / "ctrl0"
    model = ride_model(2)
    second = ControllerEmulator(model, period_s=0.05, firmware="FW-B", wheel_inch=20.0)
    source = ControllerSource(str(link), config_poll_s=5.0, timeout_s=0.1, retry_initial_s=0.05, retry_max_s=0.2)
    values = asyncio.run(
        replug(
            link,
            ControllerEmulator(model, period_s=0.05, firmware="FW-A"),
            second,
            source,
            lambda values: values.get(M + "FirmwareVersion") == "FW-A",
            lambda values: values.get(M + "FirmwareVersion") == "FW-B",
        )
    )
    assert values["Chassis.Wheel.Size"] == 20.0
    _check_against_emulator(values, second)


def test_config_is_asked_again_when_the_controller_resumes_after_silence() -> None:
    async def run() -> None:
        emulator = ControllerEmulator(ride_model(3), period_s=0.05)
        source_for = partial(ControllerSource, config_poll_s=60.0, timeout_s=0.2, stale_after_s=0.3)
        async with connected(emulator, source_for) as source:
            await wait_for(lambda: M + "PolePairs" in source.read(time.time()), 5.0)
            assert emulator.config_reads == 1
            assert emulator._task is not None
            emulator._task.cancel()  # the controller goes quiet (rebooting) ...
            await asyncio.sleep(0.5)
            assert source.read(time.time()) == {}
            emulator.pole_pairs = 10  # ... and comes back configured otherwise
            emulator._task = asyncio.get_running_loop().create_task(emulator._stream())
            await wait_for(lambda: source.read(time.time()).get(M + "PolePairs") == 10, 5.0)
            assert emulator.config_reads == 2

    asyncio.run(run())


# -- stuck values (fault injection) --------------------------------------------------------------------------

stuck_levels = st.fixed_dictionaries(
    {},
    optional={
        "speed_kmh": st.floats(0.0, 90.0),
        "motor_temp_c": st.floats(-20.0, 150.0),
        "controller_temp_c": st.floats(-20.0, 120.0),
        "pack_current_a": st.floats(-60.0, 30.0),
    },
)


@given(stuck_levels, st.floats(0.0, 7200.0))
def test_stuck_quantities_are_reported_at_their_level_whatever_the_model(levels: dict[str, float], t: float) -> None:
    model = ride_model(4)
    emulator = ControllerEmulator(model, stuck=levels)
    state = model.state_at(model.start_time + t)
    measured = {n: getattr(state, n) for n in ("speed_kmh", "motor_temp_c", "controller_temp_c", "pack_current_a")}
    measured.update(levels)
    status = parse_status(build_status(emulator.status(state)))
    assert status.speed_kmh == pytest.approx(measured["speed_kmh"], abs=0.05 + 1e-9)
    assert status.motor_temp_c == pytest.approx(measured["motor_temp_c"], abs=0.05 + 1e-9)
    assert status.controller_temp_c == pytest.approx(measured["controller_temp_c"], abs=0.05 + 1e-9)
    assert status.supply_current_a == pytest.approx(-measured["pack_current_a"], abs=0.05 + 1e-9)
    # Derived values follow the stuck level: the hub motor's rpm is that of the speed the controller reports.
    circumference_m = 3.141592653589793 * emulator.wheel_inch * 0.0254
    assert status.motor_rpm == round(measured["speed_kmh"] / 3.6 / circumference_m * 60)
    if "speed_kmh" in levels:
        assert not status.brake  # a speed that does not change is no deceleration


def test_source_reads_the_stuck_values_while_the_model_moves_on() -> None:
    async def run() -> None:
        model = ride_model(5)
        emulator = ControllerEmulator(model, period_s=0.05, stuck={"speed_kmh": 12.3, "controller_temp_c": 96.0})
        async with connected(emulator, partial(ControllerSource, config_poll_s=0.3, timeout_s=0.2)) as source:
            await wait_for(lambda: source.counters["status_frames"] >= 10, 5.0)
            await wait_for(lambda: M + "PolePairs" in source.read(time.time()), 5.0)
            frozen = source.read(time.time())
            emulator.stuck = {}  # the sensor recovers: the source follows the model again
            sent_frozen = _sent(emulator, TYPE_STATUS)
            await wait_for(lambda: source.read(time.time()).get(M + "ControllerTemperature") != 96.0, 5.0)
            recovered = source.read(time.time())
        # The model itself is elsewhere: what the agent read comes from the stuck sensors.
        truth = [model.state_at(s.t) for s in sent_frozen]
        assert all(abs(s.speed_kmh - 12.3) > 1 and s.controller_temp_c < 80 for s in truth)
        assert frozen["Speed"] == 12.3 and frozen[M + "ControllerTemperature"] == 96.0
        assert frozen["Chassis.Brake.IsEngaged"] is False
        _check_against_emulator(frozen, emulator)  # rpm from the stuck speed; current and motor temperature live
        _check_against_emulator(recovered, emulator)
        assert float(recovered[M + "ControllerTemperature"]) < 80

    asyncio.run(run())
