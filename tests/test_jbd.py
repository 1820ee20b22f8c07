"""JBD BMS: the sans-I/O codec (fuzzed), and the UART source against the emulator on a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.devices.jbd import (
    BASIC_INFO_FIXED_LEN,
    MAX_FRAME,
    REG_BARCODE,
    REG_BASIC_INFO,
    REG_CELL_VOLTAGES,
    JbdError,
    JbdFrame,
    JbdFrameDecoder,
    JbdRequest,
    JbdRequestDecoder,
    barcode_signals,
    build_barcode,
    build_basic_info,
    build_cell_voltages,
    cell_voltage_signals,
    encode_read_request,
    encode_response,
    parse_barcode,
    parse_basic_info,
    parse_cell_voltages,
)
from edge_agent.devices.jbd_uart import JbdBmsSource
from edge_agent.sources import ValueSource
from protocol.catalogue import Value, load_catalogue
from simulators.bms_jbd import JbdAnswer, JbdBmsEmulator
from tests.uart_support import connected, replug, ride_model, wait_for

CATALOGUE = load_catalogue()
P = "Powertrain.TractionBattery."
# The vendor's worked example (JBD protocol V4): a 15s pack at 58.88 V, 0 A, 72 %, two NTCs at 20.3 and 21.5 °C.
VENDOR_RESPONSE = bytes.fromhex("DD03001B1700000002D003E8000020780000000000001048030F020B760B82FBFF77")


# -- codec ---------------------------------------------------------------------------------------------------


def test_vendor_example_frames() -> None:
    assert encode_read_request(REG_BASIC_INFO) == bytes.fromhex("DDA50300FFFD77")
    assert encode_read_request(REG_CELL_VOLTAGES) == bytes.fromhex("DDA50400FFFC77")
    [frame] = JbdFrameDecoder().feed(VENDOR_RESPONSE)
    assert frame.register == REG_BASIC_INFO and frame.ok
    assert encode_response(frame.register, frame.payload) == VENDOR_RESPONSE
    info = parse_basic_info(frame.payload)
    assert (info.voltage_v, info.current_a, info.remaining_ah, info.nominal_ah) == (58.88, 0.0, 7.2, 10.0)
    assert (info.soc_pct, info.cell_count, info.fet_status, info.version) == (72, 15, 3, 0x10)
    assert info.temperatures_c == (20.3, 21.5)
    assert str(info.production_date) == "2016-03-24"
    assert info.signals() == {
        P + "CurrentVoltage": 58.88,
        P + "CurrentCurrent": 0.0,
        P + "StateOfCharge": 72.0,
        P + "RemainingCapacity": 7.2,
        P + "NominalCapacity": 10.0,
        P + "CycleCount": 0,
        P + "ProtectionStatus": 0,
        P + "CellCount": 15,
        P + "Temperature.Max": 21.5,
        P + "Temperature.Min": 20.3,
        P + "Temperature.Probe1": 20.3,
        P + "Temperature.Probe2": 21.5,
    }


def test_signals_use_catalogue_names_units_and_ranges() -> None:
    info = parse_basic_info(VENDOR_RESPONSE[4:-3])
    head = bytearray(VENDOR_RESPONSE[4 : 4 + BASIC_INFO_FIXED_LEN])
    head[2:4] = struct.pack(">h", -1234)  # 12.34 A discharging
    head[16:18] = struct.pack(">H", 0b100_0000_0001)  # cell overvoltage + short circuit
    head[22] = 3
    # An unplugged NTC reads 0 (-273.1 °C): out of range, left out rather than sent.
    info = parse_basic_info(bytes(head) + struct.pack(">3H", 2731 + 350, 0, 2731 - 52))
    values = info.signals()
    assert values[P + "CurrentCurrent"] == -12.34
    assert values[P + "ProtectionStatus"] == 0x401
    assert info.protections == ["cell overvoltage", "short circuit"]
    assert values[P + "Temperature.Probe1"] == 35.0 and values[P + "Temperature.Probe3"] == -5.2
    assert P + "Temperature.Probe2" not in values and P + "Temperature.Min" not in values  # -273.1: dropped
    cells = cell_voltage_signals([3.301 + i / 1000 for i in range(30)])
    assert cells[P + "CellVoltage.Max"] == 3.330 and cells[P + "CellVoltage.Min"] == 3.301
    assert cells[P + "CellVoltage.Cell24"] == 3.324 and P + "CellVoltage.Cell25" not in cells
    assert barcode_signals("ZL-1") == {P + "Barcode": "ZL-1"} and barcode_signals("") == {}
    for name, value in {**values, **cells, **barcode_signals("ZL-1")}.items():
        sig = CATALOGUE.by_name(name)
        assert sig.source == "bms" and sig.in_range(value)


@st.composite
def basic_info_payloads(draw: st.DrawFn) -> bytes:
    ntcs = draw(st.integers(0, 8))
    head = bytearray(draw(st.binary(min_size=BASIC_INFO_FIXED_LEN, max_size=BASIC_INFO_FIXED_LEN)))
    head[22] = ntcs
    return bytes(head) + draw(st.binary(min_size=2 * ntcs, max_size=2 * ntcs))


@given(basic_info_payloads())
def test_basic_info_round_trips(payload: bytes) -> None:
    info = parse_basic_info(payload)
    assert build_basic_info(info) == payload
    assert parse_basic_info(payload + b"\x00\x01") == info  # fields newer firmware appends are ignored
    for name, value in info.signals().items():
        assert CATALOGUE.by_name(name).in_range(value)


@given(st.lists(st.integers(0, 0xFFFF), max_size=127))
def test_cell_voltages_round_trip(millivolts: list[int]) -> None:
    payload = struct.pack(f">{len(millivolts)}H", *millivolts)
    volts = parse_cell_voltages(payload)
    assert volts == [mv / 1000 for mv in millivolts]
    assert build_cell_voltages(volts) == payload


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(lambda s: s.rstrip(" ")))
def test_barcode_round_trips(text: str) -> None:
    assert parse_barcode(build_barcode(text)) == text
    assert parse_barcode(build_barcode(text) + b"\x00" * 3) == text  # trailing register bytes


@given(st.binary(max_size=300))
def test_parsers_raise_only_jbd_error(data: bytes) -> None:
    for parse in (parse_basic_info, parse_cell_voltages, parse_barcode):
        with contextlib.suppress(JbdError):
            parse(data)


def test_parsers_reject_short_and_inconsistent_payloads() -> None:
    with pytest.raises(JbdError):
        parse_basic_info(VENDOR_RESPONSE[4:-5])  # announces 2 NTCs, carries 1
    with pytest.raises(JbdError):
        parse_basic_info(b"\x00" * 10)
    with pytest.raises(JbdError):
        parse_cell_voltages(b"\x0d\x05\x0d")
    for bad in (b"", b"\x05ab", b"\x02\x80\x81"):
        with pytest.raises(JbdError):
            parse_barcode(bad)
    with pytest.raises(JbdError):
        encode_response(REG_BASIC_INFO, b"\x00" * 256)


frames = st.builds(
    JbdFrame,
    register=st.sampled_from([REG_BASIC_INFO, REG_CELL_VOLTAGES, REG_BARCODE, 0x05]),
    status=st.sampled_from([0x00, 0x80]),
    payload=st.binary(max_size=255),
)
quiet_garbage = st.binary(max_size=40).map(lambda b: b.replace(b"\xdd", b""))  # no frame start in it


@settings(max_examples=200)
@given(st.lists(st.tuples(quiet_garbage, frames), max_size=6), st.lists(st.integers(1, 300), max_size=20))
def test_frames_survive_garbage_and_any_split(items: list[tuple[bytes, JbdFrame]], cuts: list[int]) -> None:
    stream = b"".join(g + encode_response(f.register, f.payload, f.status) for g, f in items)
    decoder = JbdFrameDecoder()
    out: list[JbdFrame] = []
    pos = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[pos : pos + cut])
        pos += cut
        assert decoder.buffered < MAX_FRAME
    out += decoder.feed(stream[pos:])
    assert out == [f for _, f in items]
    assert decoder.counters["garbage"] == sum(len(g) for g, _ in items)
    assert decoder.counters["bad_checksum"] == 0


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=600), max_size=8))
def test_decoder_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    for decoder in (JbdFrameDecoder(), JbdRequestDecoder()):
        for chunk in chunks:
            decoder.feed(chunk)
            assert decoder.buffered < MAX_FRAME
        assert decoder.counters["bytes"] == sum(map(len, chunks))


@given(st.binary(max_size=300), frames)
def test_noise_with_a_frame_start_does_not_swallow_the_answer(noise: bytes, frame: JbdFrame) -> None:
    wire = encode_response(frame.register, frame.payload, frame.status)
    # Noise ending on "DD xx yy ff" announces 255 data bytes: the decoder must not wait for them.
    got = JbdFrameDecoder().feed(noise + b"\xdd\x03\x00\xff" + wire)
    assert got[-1] == frame


def test_bad_checksum_and_framing_are_counted_and_dropped() -> None:
    good = encode_response(REG_CELL_VOLTAGES, b"\x0d\x05\x0d\x06")
    corrupt = bytearray(good)
    corrupt[5] ^= 0x01
    unterminated = good[:-1] + b"\x78"
    decoder = JbdFrameDecoder()
    assert decoder.feed(bytes(corrupt) + unterminated + good) == [JbdFrame(REG_CELL_VOLTAGES, 0, good[4:-3])]
    assert decoder.counters["bad_checksum"] == 1 and decoder.counters["bad_framing"] == 1
    assert decoder.buffered == 0


def test_request_decoder_reads_what_the_client_sends() -> None:
    decoder = JbdRequestDecoder()
    got = decoder.feed(b"\x00" + encode_read_request(REG_BARCODE) + VENDOR_RESPONSE)
    assert got == [JbdRequest(0xA5, REG_BARCODE, b"")]
    assert decoder.counters["unexpected"] == 1  # a response-shaped frame on the request line


# -- emulator ↔ source over a pty ----------------------------------------------------------------------------


def _answered(emulator: JbdBmsEmulator, register: int) -> list[JbdAnswer]:
    return [a for a in emulator.log if a.register == register and a.fault == "" and a.status == 0]


def _check_against_emulator(values: dict[str, Value], emulator: JbdBmsEmulator) -> None:
    """What the source reports is exactly one of the emulator's answers, and that answer matches the model."""
    basic = {k: v for k, v in values.items() if "CellVoltage" not in k and not k.endswith("Barcode")}
    cells = {k: v for k, v in values.items() if "CellVoltage" in k}
    match = [a for a in _answered(emulator, REG_BASIC_INFO) if parse_basic_info(a.payload).signals() == basic]
    assert match, "basic info the emulator never sent"
    state = match[-1].state
    assert basic[P + "CurrentVoltage"] == pytest.approx(state.pack_voltage_v, abs=0.005 + 1e-9)
    assert basic[P + "CurrentCurrent"] == pytest.approx(state.pack_current_a, abs=0.005 + 1e-9)
    assert basic[P + "StateOfCharge"] == round(state.soc_pct)
    assert basic[P + "Temperature.Max"] == pytest.approx(state.battery_temp_max_c, abs=0.05 + 1e-9)
    assert basic[P + "CellCount"] == emulator.cells
    match_cells = [
        a
        for a in _answered(emulator, REG_CELL_VOLTAGES)
        if cell_voltage_signals(parse_cell_voltages(a.payload)) == cells
    ]
    assert match_cells, "cell voltages the emulator never sent"
    per_cell = [float(cells[f"{P}CellVoltage.Cell{i}"]) for i in range(1, emulator.cells + 1)]
    # The cells add up to the pack voltage of the same instant, to the millivolt.
    assert sum(per_cell) == pytest.approx(match_cells[-1].state.pack_voltage_v, abs=0.0005 + 1e-9)
    assert 0.002 < max(per_cell) - min(per_cell) < 0.02  # a small, deterministic spread
    assert values[P + "Barcode"] == emulator.barcode
    for name, value in values.items():
        assert CATALOGUE.by_name(name).in_range(value)


def test_source_delivers_what_the_emulator_answered() -> None:
    async def run() -> None:
        emulator = JbdBmsEmulator(ride_model(5), cells=13, probes=3)
        async with connected(emulator, partial(JbdBmsSource, poll_interval_s=0.1, timeout_s=0.2)) as source:
            _: ValueSource = source
            await wait_for(lambda: source.counters["polls"] >= 4, 5.0)
            values = source.read(time.time())
        assert len([k for k in values if "CellVoltage.Cell" in k]) == 13 and P + "Temperature.Probe3" in values
        _check_against_emulator(values, emulator)
        c = source.counters
        assert c["timeouts"] == c["retries"] == c["bad_frames"] == c["failed_requests"] == 0
        assert c["garbage_bytes"] == 0
        # Nothing stale: once the source stopped polling, its values age out.
        assert source.read(time.time() + 5 * source.poll_interval_s + 0.5) == {}

    asyncio.run(run())


def test_source_rides_through_noise_bad_checksums_truncation_and_wakeup() -> None:
    async def run() -> None:
        emulator = JbdBmsEmulator(
            ride_model(8),
            sleep_after_s=0.15,  # longer than the gap between a poll's requests, shorter than between polls
            noise=24,
            bad_checksum_every=5,
            truncate_every=7,
        )
        source_for = partial(JbdBmsSource, poll_interval_s=0.3, timeout_s=0.1, retries=3)
        async with connected(emulator, source_for) as source:
            await wait_for(lambda: source.counters["polls"] >= 6, 8.0)
            values = source.read(time.time())
        _check_against_emulator(values, emulator)
        c = source.counters
        faults = [a.fault for a in emulator.log]
        assert faults.count("asleep") >= 3  # (nearly) every poll finds the BMS asleep
        assert faults.count("bad_checksum") >= 2 and faults.count("truncated") >= 1
        assert c["bad_frames"] >= faults.count("bad_checksum")
        assert c["timeouts"] >= faults.count("asleep") + faults.count("bad_checksum")
        assert c["timeouts"] == c["retries"] + c["failed_requests"]  # every timeout but a request's last is retried
        assert c["garbage_bytes"] > 0
        # At most three answers in a row fail here (wake-up, then every 5th and 7th adjacent): 3 retries suffice.
        assert c["failed_requests"] == 0

    asyncio.run(run())


def test_source_survives_the_port_vanishing(tmp_path: Path) -> None:
    # The agent opens a stable name (as udev's /dev/bms symlink would be); the pty behind it goes and comes back.
    link = tmp_path / "bms0"
    model = ride_model(2)
    source = JbdBmsSource(str(link), poll_interval_s=0.1, timeout_s=0.1, retry_initial_s=0.05, retry_max_s=0.2)
    values = asyncio.run(
        replug(
            link,
            JbdBmsEmulator(model, barcode="PACK-A"),
            JbdBmsEmulator(model, barcode="PACK-B", cells=16),  # another pack was plugged in
            source,
            lambda values: values.get(P + "Barcode") == "PACK-A",
            lambda values: values.get(P + "Barcode") == "PACK-B" and P + "CellVoltage.Cell16" in values,
        )
    )
    assert len([k for k in values if "CellVoltage.Cell" in k]) == 16


# -- stuck values (fault injection) --------------------------------------------------------------------------

stuck_levels = st.fixed_dictionaries(
    {},
    optional={
        "pack_voltage_v": st.floats(30.0, 90.0),
        "pack_current_a": st.floats(-60.0, 30.0),
        "soc_pct": st.floats(0.0, 100.0),
        "battery_temp_max_c": st.floats(-20.0, 80.0),
    },
)


@given(stuck_levels, st.floats(0.0, 7200.0))
def test_stuck_quantities_are_reported_at_their_level_whatever_the_model(levels: dict[str, float], t: float) -> None:
    model = ride_model(4)
    emulator = JbdBmsEmulator(model, cells=16, probes=3, stuck=levels)
    state = model.state_at(model.start_time + t)
    measured = {**{n: getattr(state, n) for n in ("pack_voltage_v", "pack_current_a", "soc_pct")}, **levels}
    measured.setdefault("battery_temp_max_c", state.battery_temp_max_c)
    info = parse_basic_info(build_basic_info(emulator.basic_info(state)))
    assert info.voltage_v == pytest.approx(measured["pack_voltage_v"], abs=0.005 + 1e-9)
    assert info.current_a == pytest.approx(measured["pack_current_a"], abs=0.005 + 1e-9)
    assert info.soc_pct == round(measured["soc_pct"])
    assert max(info.temperatures_c) == pytest.approx(measured["battery_temp_max_c"], abs=0.05 + 1e-9)
    # Derived values follow the stuck level: the cells still add up to the pack the BMS reports.
    assert sum(emulator.cell_millivolts(state)) == round(measured["pack_voltage_v"] * 1000)


def test_source_reads_the_stuck_values_while_the_model_moves_on() -> None:
    async def run() -> None:
        model = ride_model(5)
        emulator = JbdBmsEmulator(model, cells=13, probes=3, stuck={"soc_pct": 3.0, "battery_temp_max_c": 61.5})
        async with connected(emulator, partial(JbdBmsSource, poll_interval_s=0.1, timeout_s=0.2)) as source:
            await wait_for(lambda: source.counters["polls"] >= 4, 5.0)
            frozen = source.read(time.time())
            answered = _answered(emulator, REG_BASIC_INFO)
            # The model itself is nowhere near those levels: what the agent reads comes from the stuck sensor.
            truth = [model.state_at(a.t) for a in answered]
            assert all(round(s.soc_pct) != 3 and s.battery_temp_max_c < 55 for s in truth)
            assert frozen[P + "StateOfCharge"] == 3 and frozen[P + "Temperature.Max"] == 61.5
            probes = [float(frozen[P + f"Temperature.Probe{i}"]) for i in (1, 2, 3)]
            assert max(probes) == 61.5  # the probes follow the stuck hottest one
            _check_against_emulator(frozen, emulator)  # pack voltage and current still follow the model
            # Released while running, and another quantity freezes: the source follows at its next polls.
            emulator.stuck = {"pack_voltage_v": 44.444}

            def cells_sum_mv() -> int:
                values = source.read(time.time())
                return round(sum(float(values.get(f"{P}CellVoltage.Cell{i}", 0)) for i in range(1, 14)) * 1000)

            await wait_for(lambda: source.read(time.time()).get(P + "CurrentVoltage") == 44.44, 5.0)
            await wait_for(lambda: cells_sum_mv() == 44_444, 5.0)  # the cells add up to the stuck pack voltage
            values = source.read(time.time())
        assert values[P + "CurrentVoltage"] == 44.44
        assert values[P + "StateOfCharge"] == round(emulator.log[-1].state.soc_pct) != 3

    asyncio.run(run())
