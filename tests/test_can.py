"""CAN: the DBC profile against the catalogue, the sans-I/O codec (fuzzed), the slcan adapter emulator, and the
CAN source against the vehicle emulator on python-can's virtual bus and over slcan on a real pty."""

from __future__ import annotations

import ast
import asyncio
import math
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import can
import cantools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.devices.can_codec import VARIANTS, CanCodec, CanFrameError, dbc_path, load_database
from edge_agent.devices.can_source import CanSource
from edge_agent.sources import ValueSource
from protocol.catalogue import SignalType, Value, load_catalogue
from simulators.bms_jbd import JbdBmsEmulator
from simulators.can_bus import CanSent, CanVehicleEmulator, within_resolution
from simulators.can_slcan import (
    MAX_LINE,
    SlcanAdapter,
    SlcanError,
    SlcanFrame,
    SlcanLineDecoder,
    encode_frame_line,
    parse_frame_line,
)
from simulators.route import route_for
from simulators.vehicle import VehicleModel

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE = load_catalogue()
CODECS = {v: CanCodec(v) for v in VARIANTS}
B = "Powertrain.TractionBattery."
FAST_SLCAN = {"sleep_after_open": 0.0}  # python-can waits 2 s after opening for adapters that reset on open


# -- the profile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_dbc_frames_follow_the_profile_rules(variant: str) -> None:
    db = load_database(variant)
    for device in ("bms", "controller"):
        assert cantools.database.load_file(str(dbc_path(device, variant)), strict=True).messages
    for msg in db.messages:
        assert not msg.is_extended_frame and msg.frame_id < 0x800, msg.name
        assert msg.length == 8 and msg.cycle_time and msg.cycle_time >= 100, msg.name
        for s in msg.signals:
            assert s.byte_order == "little_endian", (msg.name, s.name)
    codec = CODECS[variant]
    for name, (message, dbc_name) in codec.mapped().items():
        sig = CATALOGUE.by_name(name)  # every mapped name is a catalogue signal ...
        dbc_sig = db.get_message_by_name(message).get_signal_by_name(dbc_name)
        assert (dbc_sig.unit or "") == sig.unit, name  # ... in the catalogue's unit: no conversion downstream
        if sig.min is not None and sig.max is not None:
            # The DBC may promise a narrower range than the catalogue accepts, never a wider one.
            assert sig.min <= dbc_sig.minimum and dbc_sig.maximum <= sig.max, name
        if sig.resolution is not None:
            assert dbc_sig.scale >= sig.resolution - 1e-12, name  # no finer than the catalogue can carry


def test_the_profile_covers_every_bms_and_controller_signal_that_fits_can() -> None:
    wanted = {s.name for s in CATALOGUE if s.source in ("bms", "controller") and s.type is not SignalType.STR}
    assert wanted - set(CODECS["72v"].mapped()) == set()
    # The e-bike profile stops at 18 cells (13S/14S li-ion, 16S LFP); the e-motorcycle one carries all 24.
    missing_48v = wanted - set(CODECS["48v"].mapped())
    assert missing_48v == {f"{B}CellVoltage.Cell{n}" for n in range(19, 25)}


def test_the_written_spec_lists_every_frame_with_its_id_and_period() -> None:
    spec = (ROOT / "firmware_specs" / "CAN.md").read_text(encoding="utf-8")
    headings = [line for line in spec.splitlines() if line.startswith("#### ")]
    for msg in load_database("72v").messages:
        (line,) = [h for h in headings if f"`0x{msg.frame_id:03X}` {msg.name} " in h]
        assert f"every {msg.cycle_time} ms" in line, line
    for name, (message, dbc_name) in CODECS["72v"].mapped().items():
        if not CODECS["72v"].groups(message):  # the multiplexed cells and probes are written as Cell<3g+1> ...
            assert f"`{dbc_name}`" in spec and f"`{name}`" in spec, name


def test_variants_differ_where_the_physics_does() -> None:
    e_bike, e_moto = (load_database(v) for v in ("48v", "72v"))

    def rng(db: cantools.database.Database, message: str, signal: str) -> tuple[float, float, float]:
        s = db.get_message_by_name(message).get_signal_by_name(signal)
        return s.minimum, s.maximum, s.scale

    assert rng(e_moto, "BMS_Pack", "PackVoltage")[1] > rng(e_bike, "BMS_Pack", "PackVoltage")[1] >= 4.2 * 16
    assert rng(e_moto, "BMS_Pack", "PackCurrent")[1] > 3 * rng(e_bike, "BMS_Pack", "PackCurrent")[1]
    assert rng(e_moto, "BMS_Pack", "PackCurrent")[2] > rng(e_bike, "BMS_Pack", "PackCurrent")[2]  # coarser scaling
    assert rng(e_moto, "MC_Motion", "WheelSpeed")[1] > rng(e_bike, "MC_Motion", "WheelSpeed")[1]
    assert rng(e_moto, "MC_Motion", "MotorSpeed")[1] > rng(e_bike, "MC_Motion", "MotorSpeed")[1]
    assert len(CODECS["72v"].groups("BMS_CellVoltages")) * 3 == 24 > len(CODECS["48v"].groups("BMS_CellVoltages")) * 3


# -- the codec -----------------------------------------------------------------------------------------------


def _fresh(variant: str) -> CanCodec:
    """A codec with zeroed counters, without parsing the DBC files again."""
    return CanCodec(variant, database=CODECS[variant].database)


KNOWN_IDS = sorted({CODECS["48v"].frame_id(m) for m in CODECS["48v"].messages})


@settings(max_examples=400, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    arbitration_id=st.one_of(st.sampled_from(KNOWN_IDS), st.integers(0, (1 << 29) - 1)),
    extended=st.booleans(),
    data=st.binary(max_size=64),
)
def test_decode_of_arbitrary_frames_raises_only_its_own_error(
    variant: str, arbitration_id: int, extended: bool, data: bytes
) -> None:
    codec = _fresh(variant)
    try:
        reading = codec.decode(arbitration_id, data, extended=extended)
    except CanFrameError:
        assert codec.counters["bad_frames"] == 1
        return
    if reading is None:
        assert codec.counters["unknown_id"] == 1
        return
    for name, value in reading.values.items():
        assert CATALOGUE.by_name(name).in_range(value), (name, value)


def _value_for(codec: CanCodec, message: str, dbc_name: str, draw: st.DrawFn) -> Value:
    s = codec.database.get_message_by_name(message).get_signal_by_name(dbc_name)
    sig = CATALOGUE.by_name(s.dbc.attributes["ZhilianSignal"].value)
    if sig.type is SignalType.BOOL:
        return draw(st.booleans())
    if sig.type is SignalType.INT:
        return draw(st.integers(round(s.minimum), round(s.maximum)))
    return draw(st.floats(s.minimum, s.maximum, allow_nan=False))


@st.composite
def _frames(draw: st.DrawFn) -> tuple[str, str, int | None, dict[str, Value]]:
    variant = draw(st.sampled_from(VARIANTS))
    codec = CODECS[variant]
    message = draw(st.sampled_from(codec.messages))
    groups = codec.groups(message)
    group = draw(st.sampled_from(groups)) if groups else None
    msg = codec.database.get_message_by_name(message)
    values: dict[str, Value] = {}
    for s in msg.signals:
        if s.is_multiplexer or (s.multiplexer_ids and group not in s.multiplexer_ids):
            continue
        values[s.dbc.attributes["ZhilianSignal"].value] = _value_for(codec, message, s.name, draw)
    return variant, message, group, values


@settings(max_examples=300, deadline=None)
@given(frame=_frames())
def test_encode_then_decode_round_trips_within_the_dbc_resolution(
    frame: tuple[str, str, int | None, dict[str, Value]],
) -> None:
    variant, message, group, values = frame
    codec = _fresh(variant)
    frame_id, data = codec.encode(message, values, group)
    assert len(data) == 8
    # cantools, on its own, reads what we wrote ...
    msg = codec.database.get_message_by_frame_id(frame_id)
    plain = msg.decode(data, decode_choices=False)
    for name, (m, dbc_name) in codec.mapped().items():
        if m == message and name in values:
            assert plain[dbc_name] == pytest.approx(
                float(values[name]), abs=msg.get_signal_by_name(dbc_name).scale / 2 + 1e-9
            )
    # ... and so does our decoder, under catalogue names.
    reading = codec.decode(frame_id, data)
    assert reading is not None and reading.message == message and reading.group == group
    assert set(reading.values) == set(values)
    for name, value in values.items():
        assert within_resolution(codec, name, reading.values[name], value), (name, reading.values[name], value)
    assert codec.counters == {"frames": 1, "unknown_id": 0, "bad_frames": 0, "out_of_range": 0}


def test_fields_not_fitted_are_left_out_without_counting_an_error() -> None:
    codec = CanCodec("48v")
    frame_id, data = codec.encode("BMS_CellVoltages", {f"{B}CellVoltage.Cell13": 3.9}, group=4)
    reading = codec.decode(frame_id, data)
    assert reading is not None and reading.values == {f"{B}CellVoltage.Cell13": 3.9}  # cells 14, 15 not fitted
    state = {
        "Powertrain.ElectricMotor.ControllerTemperature": 41.2,
        "Powertrain.ElectricMotor.FaultCode": 0,
        "Chassis.Accelerator.PedalPosition": 30,
        "Powertrain.ElectricMotor.AssistLevel": 2,
        "Chassis.Brake.IsEngaged": False,
    }
    frame_id, data = codec.encode("MC_State", state)  # a motor without thermistor
    reading = codec.decode(frame_id, data)
    assert reading is not None and reading.values == state
    assert codec.counters["out_of_range"] == 0
    # A flag has no "not available" pattern: leaving it out is an error, not a silent "released".
    with pytest.raises(CanFrameError):
        codec.encode("MC_State", {k: v for k, v in state.items() if k != "Chassis.Brake.IsEngaged"})


def test_bad_frames_and_values_are_counted_and_rejected() -> None:
    codec = CanCodec("48v")
    frame_id, data = codec.encode("BMS_CellVoltages", {f"{B}CellVoltage.Cell1": 3.9}, group=0)
    with pytest.raises(CanFrameError):
        codec.decode(frame_id, data[:3])  # wrong DLC
    with pytest.raises(CanFrameError):
        codec.decode(frame_id, bytes([9]) + data[1:])  # no cell group 9 in the e-bike profile
    assert codec.decode(0x7FF, data) is None and codec.decode(frame_id, data, extended=True) is None
    # A reading outside the DBC range that is not the "not fitted" pattern is dropped and counted.
    reading = codec.decode(frame_id, bytes([0, 0x10, 0x27]) + data[3:])  # 10.000 V
    assert reading is not None and f"{B}CellVoltage.Cell1" not in reading.values
    assert codec.counters == {"frames": 1, "unknown_id": 2, "bad_frames": 2, "out_of_range": 1}
    with pytest.raises(CanFrameError):
        codec.encode("BMS_Pack", {f"{B}CurrentVoltage": 200.0})  # beyond the 48 V profile's range
    with pytest.raises(CanFrameError):
        codec.encode("BMS_Pack", {f"{B}CurrentVoltage": float("nan")})
    with pytest.raises(CanFrameError):
        codec.encode("BMS_CellVoltages", {}, group=None)
    with pytest.raises(CanFrameError):
        codec.encode("NoSuchFrame", {})


# -- the slcan adapter's side --------------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=80), max_size=30))
def test_slcan_line_decoder_never_raises_and_stays_bounded(chunks: list[bytes]) -> None:
    decoder = SlcanLineDecoder()
    for chunk in chunks:
        for line in decoder.feed(chunk):
            assert len(line) <= MAX_LINE and line.isascii() and line.isprintable()
        assert len(decoder._buf) <= MAX_LINE


@given(st.lists(st.text(alphabet="tTrOLCSVNFZ0123456789ABCDEFabcdefxyz", max_size=30), max_size=20))
def test_slcan_adapter_answers_any_command_with_ok_error_or_a_reply(lines: list[str]) -> None:
    adapter = SlcanAdapter()
    for line in lines:
        reply = adapter.handle(line)
        assert reply.endswith((b"\r", b"\x07"))
    assert len(adapter.host_frames) <= 100


@given(
    st.builds(
        SlcanFrame,
        arbitration_id=st.integers(0, (1 << 11) - 1),
        data=st.binary(max_size=8),
        extended=st.just(False),
    )
    | st.builds(
        SlcanFrame, arbitration_id=st.integers(0, (1 << 29) - 1), data=st.binary(max_size=8), extended=st.just(True)
    ),
    st.binary(max_size=20),
)
def test_frame_lines_round_trip_and_survive_any_split(frame: SlcanFrame, noise: bytes) -> None:
    line = encode_frame_line(frame)
    assert parse_frame_line(line[:-1].decode()) == frame
    decoder = SlcanLineDecoder()
    got = decoder.feed(noise + b"\r") + [x for i in range(len(line)) for x in decoder.feed(line[i : i + 1])]
    assert line[:-1].decode() in got


@given(st.text(max_size=40) | st.from_regex(r"t[0-7][0-9A-F]{2}[0-8]([0-9A-F]{2}){0,8}", fullmatch=True))
def test_parse_frame_line_raises_only_its_own_error(text: str) -> None:
    try:
        frame = parse_frame_line(text)
    except SlcanError:
        return
    line = encode_frame_line(frame)[:-1].decode()
    assert text[0] == line[0] and text[1:].upper().startswith(line[1:])  # hex digits in either case


def test_the_adapter_answers_the_handshake_python_can_sends() -> None:
    adapter = SlcanAdapter()
    # python-can's slcan open: close, bitrate, (empty) data bitrate, open listen-only; then asks for the version.
    assert [adapter.handle(c) for c in ("C", "S6", "", "L", "V")] == [b"\r", b"\r", b"\r", b"\r", b"V1013\r"]
    assert adapter.is_open and adapter.listen_only and adapter.bitrate == 500_000
    assert adapter.handle("S5") == b"\x07"  # no bitrate change while open
    assert adapter.handle("t1232ABCD") == b"\x07"  # a listen-only adapter does not transmit
    assert adapter.handle("C") == b"\r" and adapter.handle("O") == b"\r"
    assert adapter.handle("t1232ABCD") == b"z\r" and adapter.host_frames[-1] == SlcanFrame(0x123, b"\xab\xcd")


# -- emulator and source -------------------------------------------------------------------------------------


def _model(seed: int) -> VehicleModel:
    return VehicleModel(route_for(seed), seed=seed, start_time=time.time() - 900)


async def _wait_for(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


def assert_values_were_sent(codec: CanCodec, sent: Iterable[CanSent], values: Mapping[str, Value]) -> int:
    """Every frame's worth of `values` equals, within the DBC resolution, one frame the emulator sent whole.

    Returns how many frames' worth were checked.
    """
    by_frame: dict[tuple[str, int | None], list[CanSent]] = {}
    for s in sent:
        if s.fault == "":
            by_frame.setdefault((s.message, s.group), []).append(s)
    checked = 0
    for message in codec.messages:
        for group in codec.groups(message) or [None]:
            got = {n: values[n] for n in codec.signals(message, group) if n in values}
            if not got:
                continue
            candidates = by_frame.get((message, group), [])
            assert any(
                set(got) == set(s.values) and all(within_resolution(codec, n, v, s.values[n]) for n, v in got.items())
                for s in candidates
            ), (message, group, got, candidates[-3:])
            checked += 1
    return checked


@pytest.mark.parametrize("variant", VARIANTS)
def test_source_on_the_virtual_bus_delivers_what_the_emulator_sent(variant: str) -> None:
    async def run() -> None:
        channel = f"zl-test-{uuid.uuid4().hex}"
        kind = {"48v": "ebike48", "72v": "emoto72"}[variant]
        model = VehicleModel(route_for(4), seed=4, start_time=time.time() - 900, variant=kind)
        bms = JbdBmsEmulator(model, probes=5 if variant == "48v" else None)  # 13S/5 probes; 20S/4 probes
        emulator = CanVehicleEmulator(model, channel=channel, bms=bms)
        assert emulator.variant == variant
        source = CanSource("virtual", channel, variant=variant)
        _: ValueSource = source
        codec = source.codec
        await source.start()
        await emulator.start()
        sent_names = {n for _, _, v in emulator.frames(bms.model.state_at(time.time()), codec.messages) for n in v}
        try:
            await _wait_for(lambda: set(source.read(time.time())) == sent_names, 10.0)
            values = source.read(time.time())
        finally:
            await emulator.stop()
            await source.stop()
        cells = sorted(int(k.rsplit("Cell", 1)[1]) for k in values if "CellVoltage.Cell" in k)
        probes = [k for k in values if "Temperature.Probe" in k]
        assert cells == list(range(1, bms.cells + 1)) and len(probes) == bms.probes
        assert values[B + "CellCount"] == bms.cells
        frames = 7 + math.ceil(bms.cells / 3) + math.ceil(bms.probes / 3)  # plain ones + cell groups + probe groups
        assert assert_values_were_sent(codec, emulator.log, values) == frames
        assert sum(float(values[f"{B}CellVoltage.Cell{n}"]) for n in cells) == pytest.approx(
            float(values[B + "CurrentVoltage"]), abs=0.011 * len(cells)
        )
        c = source.counters
        assert c["bad_frames"] == c["unknown_id"] == c["out_of_range"] == c["garbled_lines"] == 0
        assert emulator.unencodable == 0  # the vehicle kind's physics fits its profile's ranges
        # Nothing stale: once the devices went quiet, their values age out (the slowest frame is 1 s, 5 periods).
        assert source.read(time.time() + 5.5) == {}

    asyncio.run(run())


_bus_messages = st.builds(
    lambda arbitration_id, extended, data, kind: can.Message(
        arbitration_id=arbitration_id if extended else arbitration_id & 0x7FF,
        is_extended_id=extended,
        data=data,
        is_remote_frame=kind == "remote",
        is_error_frame=kind == "error",
    ),
    arbitration_id=st.one_of(st.sampled_from(KNOWN_IDS), st.integers(0, (1 << 29) - 1)),
    extended=st.booleans(),
    data=st.binary(max_size=8),
    kind=st.sampled_from(["data"] * 8 + ["remote", "error"]),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(_bus_messages, min_size=1, max_size=60))
def test_source_counts_every_frame_whatever_the_bus_carries(messages: list[can.Message]) -> None:
    async def run() -> None:
        channel = f"zl-test-{uuid.uuid4().hex}"
        source = CanSource("virtual", channel, recv_timeout_s=0.05)
        await source.start()
        sender = can.Bus(interface="virtual", channel=channel)
        try:
            await _wait_for(lambda: source.connected, 5.0)
            for msg in messages:
                sender.send(msg, timeout=1.0)
            seen = ("frames", "unknown_id", "bad_frames", "ignored_frames")
            await _wait_for(lambda: sum(source.counters[k] for k in seen) == len(messages), 5.0)
            values = source.read(time.time())
        finally:
            sender.shutdown()
            await source.stop()
        for name, value in values.items():
            assert CATALOGUE.by_name(name).in_range(value), (name, value)
        assert source.counters["disconnects"] == 0

    asyncio.run(run())


def test_source_drops_frames_of_the_wrong_length_and_keeps_going() -> None:
    async def run() -> None:
        channel = f"zl-test-{uuid.uuid4().hex}"
        emulator = CanVehicleEmulator(_model(6), channel=channel, bad_dlc_every=4)
        source = CanSource("virtual", channel)
        await source.start()
        await emulator.start()
        try:
            await _wait_for(lambda: source.counters["bad_frames"] >= 5 and source.counters["frames"] >= 40, 10.0)
            values = source.read(time.time())
        finally:
            await emulator.stop()
            await source.stop()
        assert assert_values_were_sent(source.codec, emulator.log, values) >= 8
        assert source.counters["bad_frames"] <= sum(s.fault == "bad_dlc" for s in emulator.log)

    asyncio.run(run())


def test_stuck_devices_keep_talking_with_frozen_values() -> None:
    async def run() -> None:
        channel = f"zl-test-{uuid.uuid4().hex}"
        emulator = CanVehicleEmulator(_model(7), channel=channel)
        source = CanSource("virtual", channel)
        await source.start()
        await emulator.start()
        try:
            await _wait_for(lambda: "Speed" in source.read(time.time()), 10.0)
            stuck_at = emulator.stuck_at = time.time() - 30
            frames_per_instant = len(emulator.frames(emulator.model.state_at(stuck_at), source.codec.messages))

            def all_stuck() -> bool:
                # Every frame's worth of values the source holds comes from the frozen instant (1 s frames too).
                stuck = [s for s in emulator.log if s.t == stuck_at]
                try:
                    return assert_values_were_sent(source.codec, stuck, source.read(time.time())) == frames_per_instant
                except AssertionError:
                    return False

            await _wait_for(all_stuck, 10.0)
            first = source.read(time.time())
            frames = source.counters["frames"]
            await _wait_for(lambda: source.counters["frames"] >= frames + 30, 10.0)
            second = source.read(time.time())
        finally:
            await emulator.stop()
            await source.stop()
        assert first == second and "Speed" in first
        assert all(s.t == stuck_at for s in list(emulator.log)[-30:])

    asyncio.run(run())


def test_python_can_slcan_reads_the_emulated_adapter_on_a_pty() -> None:
    async def run() -> None:
        emulator = CanVehicleEmulator(_model(3), transport="slcan")
        await emulator.start()

        def host() -> tuple[tuple[int | None, int | None], list[can.Message]]:
            bus = can.Bus(interface="slcan", channel=emulator.port, bitrate=250_000, listen_only=True, **FAST_SLCAN)
            try:
                version = bus.get_version(2.0)
                got: list[can.Message] = []
                deadline = time.monotonic() + 10
                while len(got) < 30 and time.monotonic() < deadline:
                    msg = bus.recv(0.5)
                    if msg is not None:
                        got.append(msg)
                return version, got
            finally:
                bus.shutdown()

        try:
            version, got = await asyncio.to_thread(host)
        finally:
            await emulator.stop()
        assert version == (10, 13)
        assert len(got) >= 30
        codec = CanCodec("48v")
        for msg in got:
            reading = codec.decode(msg.arbitration_id, msg.data, extended=msg.is_extended_id)
            assert reading is not None
            assert assert_values_were_sent(codec, emulator.log, reading.values) == 1
        adapter = emulator._slcan
        assert adapter is not None and adapter.adapter.listen_only and not adapter.adapter.is_open  # closed at exit

    asyncio.run(run())


def test_source_over_slcan_survives_garbled_lines_and_the_adapter_vanishing(tmp_path: Path) -> None:
    # The agent opens a stable name (as udev's /dev/can-adapter symlink would be); the pty goes and comes back.
    link = tmp_path / "slcan0"
    ptys_before = _open_ptys()

    async def run() -> None:
        emulator = CanVehicleEmulator(_model(9), transport="slcan", garble_every=5)
        await emulator.start()
        link.symlink_to(emulator.port)
        source = CanSource(
            "slcan", str(link), bus_options=FAST_SLCAN, retry_initial_s=0.05, retry_max_s=0.2, recv_timeout_s=0.1
        )
        await source.start()
        try:
            await _wait_for(lambda: "Speed" in source.read(time.time()), 10.0)
            # All three kinds of garbage, the non-ASCII one (which needs slcan's line buffer flushed) included.
            await _wait_for(lambda: source.counters["garbled_lines"] >= 6, 10.0)
            frames = source.counters["frames"]
            await _wait_for(lambda: source.counters["frames"] >= frames + 20, 10.0)
            values = source.read(time.time())
            assert assert_values_were_sent(source.codec, emulator.log, values) >= 8
            emulator.unplug()
            await _wait_for(lambda: source.counters["disconnects"] == 1, 5.0)
            assert source.read(time.time()) == {}  # nothing of devices that may not be there any more
            link.unlink()
            await asyncio.sleep(0.3)  # a few failed reopens while the adapter is missing
            assert not source.connected
            link.symlink_to(emulator.replug())
            await _wait_for(lambda: "Speed" in source.read(time.time()), 10.0)
            values = source.read(time.time())
        finally:
            await source.stop()
            await emulator.stop()
        assert source.counters["reconnects"] == 1 and source.counters["open_failures"] >= 1
        assert assert_values_were_sent(source.codec, emulator.log, values) >= 1
        assert not any(t.name.startswith("can:") for t in threading.enumerate())

    asyncio.run(run())
    assert _open_ptys() == ptys_before  # no pty left open, of the vanished adapter or of the emulator


def _open_ptys() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += str(fd.readlink()).startswith(("/dev/pts/", "/dev/ptmx"))
        except OSError:
            continue  # closed while we looked
    return count


def test_source_start_tolerates_a_missing_adapter_and_stops_promptly(tmp_path: Path) -> None:
    async def run() -> None:
        source = CanSource("slcan", str(tmp_path / "absent"), retry_initial_s=0.05, retry_max_s=0.1)
        await source.start()
        await asyncio.sleep(0.3)
        assert not source.connected and source.read(time.time()) == {}
        await source.stop()
        assert source.counters["open_failures"] >= 2 and source.counters["reconnects"] == 0

    asyncio.run(run())
    with pytest.raises(ValueError):
        CanSource("no-such-interface", "can0")
    with pytest.raises(ValueError):
        CanSource("virtual", "x", variant="36v")


# -- python-can and cantools stay off boards without CAN -----------------------------------------------------


def test_agent_imports_load_neither_python_can_nor_cantools() -> None:
    code = (
        "import sys\n"
        "import edge_agent.agent, edge_agent.config, edge_agent.gnss, edge_agent.devices\n"
        "import edge_agent.devices.jbd_uart, edge_agent.devices.controller_uart\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('can', 'cantools'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_only_the_can_modules_of_the_agent_import_python_can_or_cantools() -> None:
    offenders = []
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            if any(n.split(".")[0] in ("can", "cantools") for n in names) and not path.name.startswith("can_"):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
