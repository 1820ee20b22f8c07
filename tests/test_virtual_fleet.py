"""The protocol-level virtual fleet: its sans-I/O MQTT publisher core, its deterministic generator (the agent's exact
envelopes), and 200 vehicles with their own connections landing every message exactly once in a real ingest."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import decode_batch, load_catalogue, parse_envelope
from simulators.virtual_fleet import (
    CONNACK,
    PINGRESP,
    PUBACK,
    SAMPLES_PER_MESSAGE,
    FleetGenerator,
    MqttProtocolError,
    PacketReader,
    ProtocolFleet,
    connect_packet,
    encode_remaining_length,
    fleet_key,
    fleet_vin,
    publish_packet,
    split_publish,
)
from tests.conftest import running_stack, wait_until
from zhilian.broker import MosquittoProcess

CAT = load_catalogue()
T0 = 1_790_000_000.0

# --- sans-I/O MQTT core ------------------------------------------------------------------------------------------


def _packet(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([(ptype << 4) | flags]) + encode_remaining_length(len(body)) + body


_inbound = st.one_of(
    st.tuples(st.just(PUBACK), st.just(0), st.integers(1, 0xFFFF).map(lambda i: i.to_bytes(2, "big"))),
    st.tuples(st.just(CONNACK), st.just(0), st.sampled_from([b"\x00\x00", b"\x01\x00", b"\x00\x05"])),
    st.tuples(st.just(PINGRESP), st.just(0), st.just(b"")),
    st.tuples(st.just(9), st.just(0), st.binary(min_size=3, max_size=300)),  # SUBACK-sized
)


@given(packets=st.lists(_inbound, max_size=30), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_reader_yields_the_same_packets_however_the_stream_is_cut(
    packets: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(_packet(*p) for p in packets)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    reader = PacketReader()
    got: list[tuple[int, int, bytes]] = []
    for a, b in itertools.pairwise(points):
        got += reader.feed(stream[a:b])
    assert got == packets
    assert reader.buffered == 0


@given(st.binary(max_size=2000))
def test_reader_refuses_garbage_only_with_its_own_error(data: bytes) -> None:
    reader = PacketReader()
    try:
        for i in range(0, len(data), 7):
            reader.feed(data[i : i + 7])
    except MqttProtocolError:
        pass
    assert reader.buffered <= 1024 + 5


def test_reader_refuses_oversized_and_reserved_packets() -> None:
    with pytest.raises(MqttProtocolError):
        PacketReader().feed(b"\x40" + encode_remaining_length(5000))
    with pytest.raises(MqttProtocolError):
        PacketReader().feed(b"\xf0\x00")
    with pytest.raises(MqttProtocolError):
        PacketReader().feed(b"\x40\xff\xff\xff\xff\x01")


@given(n=st.integers(0, 268_435_455))
def test_remaining_length_round_trips(n: int) -> None:
    encoded = encode_remaining_length(n)
    assert 1 <= len(encoded) <= 4
    # The reader's decoding of the same field: a PUBLISH-typed header with that length, body not yet there.
    value, mult = 0, 1
    for byte in encoded:
        value += (byte & 0x7F) * mult
        mult *= 128
    assert value == n


@given(
    vin=st.from_regex(r"[A-Z0-9]{17}", fullmatch=True),
    packet_id=st.integers(1, 0xFFFF),
    payload=st.binary(max_size=3000),
)
def test_publish_packet_splits_back_into_topic_and_payload(vin: str, packet_id: int, payload: bytes) -> None:
    packet = publish_packet(f"ev/{vin}/telemetry".encode(), packet_id, payload)
    assert packet[0] == 0x32  # PUBLISH, QoS 1
    assert split_publish(packet) == (vin, payload)


def test_connect_packet_is_mqtt_311_with_clean_session() -> None:
    packet = connect_packet("vf-LZHVF000000000001", 120)
    assert packet[0] == 0x10
    assert packet[2:10] == b"\x00\x04MQTT\x04\x02"
    assert packet[10:12] == (120).to_bytes(2, "big")


# --- generator ---------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed() -> None:
    a = FleetGenerator(30, seed=5, boot=9).plan(T0, 2.0, 40.0, isolate=True)
    b = FleetGenerator(30, seed=5, boot=9).plan(T0, 2.0, 40.0, isolate=True)
    c = FleetGenerator(30, seed=6, boot=9).plan(T0, 2.0, 40.0, isolate=True)
    assert len(a) == 80
    assert a.packets == b.packets
    assert list(a.due) == list(b.due)
    assert a.packets != c.packets


def test_generator_produces_the_agents_signed_envelopes() -> None:
    gen = FleetGenerator(12, seed=3, boot=4)
    first = gen.plan(T0, 1.0, 24.0, isolate=True)
    second = gen.plan(T0 + 5.0, 1.0, 24.0, isolate=True)
    assert second.first_ms > first.last_ms, "isolated plans never share a time range"
    last_ts: dict[str, int] = {}
    next_seq: dict[str, int] = {}
    for plan in (first, second):
        for due, packet in zip(plan.due, plan.packets, strict=True):
            vin, payload = split_publish(packet)
            signed = parse_envelope(payload)
            env = signed.verify(fleet_key(3, vin).public_raw)
            assert (env.vin, env.boot) == (vin, 4)
            assert env.seq == next_seq.get(vin, 0), "one boot, gap-free sequence numbers"
            next_seq[vin] = env.seq + 1
            batch = decode_batch(env.body, CAT).batch
            assert len(batch) == SAMPLES_PER_MESSAGE
            assert batch.timestamps[-1] == int(due * 1000), "the newest sample is taken when the message is due"
            assert batch.timestamps == sorted(set(batch.timestamps))
            assert batch.timestamps[0] > last_ts.get(vin, -1), "a vehicle's clock only moves forward"
            last_ts[vin] = batch.timestamps[-1]
            assert len(batch.columns) == 13
            for name, values in batch.columns.items():
                assert all(v is not None and CAT.by_name(name).in_range(v) for v in values), name


def test_json_feed_carries_the_same_samples_as_the_signed_one() -> None:
    signed = FleetGenerator(8, seed=2).plan(T0, 1.0, 16.0, isolate=True)
    as_json = FleetGenerator(8, seed=2).plan(T0, 1.0, 16.0, kind="json", isolate=True)
    wire = {s.name: f"s{s.id}" for s in CAT}
    for sp, jp in zip(signed.packets, as_json.packets, strict=True):
        vin, payload = split_publish(sp)
        batch = decode_batch(parse_envelope(payload).envelope.body, CAT).batch
        doc = json.loads(split_publish(jp)[1])
        assert doc["vin"] == vin
        assert [s["t"] for s in doc["samples"]] == batch.timestamps
        for i, sample in enumerate(doc["samples"]):
            assert {wire[n]: col[i] for n, col in batch.columns.items()} == {
                k: v for k, v in sample.items() if k != "t"
            }


def test_injection_overrides_values_from_its_onset() -> None:
    onset_ms = int(T0 * 1000) + 500
    plan = FleetGenerator(4, seed=1).plan(
        T0, 2.0, 8.0, inject={2: (onset_ms, {"Powertrain.TractionBattery.Temperature.Max": 72.0})}
    )
    seen_before = seen_after = False
    for packet in plan.packets:
        vin, payload = split_publish(packet)
        batch = decode_batch(parse_envelope(payload).envelope.body, CAT).batch
        temps = batch.columns["Powertrain.TractionBattery.Temperature.Max"]
        for ts, temp in zip(batch.timestamps, temps, strict=True):
            if vin == fleet_vin(2) and ts >= onset_ms:
                assert temp == 72.0
                seen_after = True
            else:
                assert temp != 72.0
                seen_before = True
    assert seen_before and seen_after


@settings(max_examples=25, deadline=None)
@given(vehicles=st.integers(1, 40), rate=st.floats(1.0, 400.0), seconds=st.floats(0.1, 3.0))
def test_schedule_is_round_robin_at_the_offered_rate(vehicles: int, rate: float, seconds: float) -> None:
    plan = FleetGenerator(vehicles, seed=0).plan(T0, seconds, rate, isolate=True)
    assert len(plan) == int(seconds * rate)
    assert list(plan.vehicle) == [i % vehicles for i in range(len(plan))]
    assert all(T0 <= d < T0 + seconds for d in plan.due)
    assert list(plan.due) == sorted(plan.due)
    for vin_index, packet in zip(plan.vehicle, plan.packets, strict=True):
        topic = split_publish(packet)[0]
        assert topic == fleet_vin(vin_index)


# --- against a real broker and ingest ----------------------------------------------------------------------------


@pytest.mark.integration
def test_200_vehicles_land_every_message_exactly_once(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    vehicles, rate, seconds = 200, 150.0, 2.0

    async def go() -> None:
        gen = FleetGenerator(vehicles, seed=11, boot=2)
        async with running_stack(tmp_path / "ingest", mosquitto) as stack:
            for vin, public_raw in gen.public_keys:
                stack.service.registry.register_device(vin, public_raw)
            fleet = ProtocolFleet(vehicles, mosquitto.host, mosquitto.port)
            await fleet.connect(wave=50)
            try:
                assert fleet.connected == vehicles
                plan = gen.plan(time.time() + 0.2, seconds, rate, isolate=True)
                result = await fleet.run_plan(plan, ack_timeout=30)
                assert (result.sent, result.acked, result.skipped) == (len(plan), len(plan), 0)
                pipeline = stack.service.pipeline
                await wait_until(lambda: pipeline.stats()["stored"] >= len(plan), timeout=120)
                await asyncio.sleep(0.5)  # a duplicate, were there one, would arrive right behind
                stats = pipeline.stats()
                assert stats["stored"] == len(plan)
                assert stats["duplicate"] == 0
                assert stats["rejected"] == {}
                assert stats["samples"] == len(plan) * SAMPLES_PER_MESSAGE
                per_vehicle = {v.vin: v.messages for v in stack.service.registry.list_vehicles(1000)}
                expected = {fleet_vin(i): 0 for i in range(vehicles)}
                for i in plan.vehicle:
                    expected[fleet_vin(i)] += 1
                assert per_vehicle == expected
            finally:
                await fleet.close()

    asyncio.run(go())
