"""The control plane without a broker: the command/ack/status codec and its test vectors, the vehicle's gate and
executor (replay cache persisted across restarts), and the cloud's command service and API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.commands import CommandService, load_or_create_cloud_key
from cloud_ingest.db import Role
from cloud_ingest.service import IngestService
from edge_agent.commands import (
    CommandExecutor,
    CommandGate,
    ControlState,
    ControlStateError,
    ControlStateFile,
    Reason,
    load_cloud_keys,
)
from protocol import DeviceKey, Envelope, Flags, Kind, seal_envelope
from protocol.commands import (
    AckStatus,
    Command,
    CommandAck,
    CommandArgsError,
    StatusReport,
    UnknownCommandError,
    check_args,
    decode_ack,
    decode_status,
    encode_ack,
    encode_status,
    parse_command,
    seal_command,
    status_order,
)
from protocol.errors import DecodeError, EncodeError, SignatureError
from protocol.topics import Channel

VECTORS = Path(__file__).resolve().parents[1] / "firmware_specs" / "test_vectors" / "commands_v1.json"
CLOUD = DeviceKey.from_seed(b"\x07" * 32)
OTHER = DeviceKey.from_seed(b"\x08" * 32)
DEVICE = DeviceKey.from_seed(b"\x09" * 32)
TRUSTED = {CLOUD.key_id: CLOUD.public_raw}
VIN = "LZHCMD0000000001"
NOW = 1_767_225_600_000


def _cmd(
    name: str = "lock",
    args: dict[str, Any] | None = None,
    vin: str = VIN,
    issued: int = NOW,
    ttl: int = 60_000,
    cid: bytes | None = None,
    key: DeviceKey = CLOUD,
) -> bytes:
    cid = cid if cid is not None else bytes(16)
    return seal_command(Command(vin, cid, issued, issued + ttl, name, args or {}, key.key_id), key)


# --- test vectors -------------------------------------------------------------------------------------------


def test_code_reproduces_the_command_vectors_byte_for_byte() -> None:
    doc = json.loads(VECTORS.read_text())
    cloud = DeviceKey.from_seed(bytes.fromhex(doc["cloud_key"]["seed_hex"]))
    device = DeviceKey.from_seed(bytes.fromhex(doc["device_key"]["seed_hex"]))
    assert cloud.public_raw.hex() == doc["cloud_key"]["public_key_hex"]
    assert cloud.key_id.hex() == doc["cloud_key"]["key_id_hex"]
    assert len(doc["commands"]) >= 3
    for vec in doc["commands"]:
        inp = vec["input"]
        cmd = Command(
            inp["vin"], bytes.fromhex(inp["command_id_hex"]), inp["issued_ms"], inp["expires_ms"],
            inp["name"], inp["args"], cloud.key_id,
        )  # fmt: skip
        wire = bytes.fromhex(vec["expected"]["command_hex"])
        assert seal_command(cmd, cloud) == wire, inp["name"]
        # Layout promised in COMMANDS.md, checked without our encoder: [signed, sig], signed = ["cmd", 1, ...].
        outer = msgpack.unpackb(wire, raw=False)
        assert wire[0] == 0x92 and len(outer[1]) == 64
        assert msgpack.unpackb(outer[0], raw=False)[:3] == ["cmd", 1, inp["vin"]]
        assert parse_command(wire).verify({cloud.key_id: cloud.public_raw}) == cmd
        check_args(inp["name"], inp["args"])
    ack, st_ = doc["ack"], doc["status"]
    a = ack["input"]
    body = encode_ack(
        CommandAck(bytes.fromhex(a["command_id_hex"]), AckStatus(a["status"]), a["detail"], a["acted_ms"])
    )
    assert body.hex() == ack["expected"]["body_hex"]
    env = Envelope(a["vin"], device.key_id, a["boot"], a["seq"], a["created_ms"], Kind.COMMAND_ACK, Flags.NONE, body)
    assert seal_envelope(env, device).hex() == ack["expected"]["envelope_hex"]
    s = st_["input"]
    body = encode_status(StatusReport(s["online"], s["conn"], s["agent"], s["metrics"]))
    assert body.hex() == st_["expected"]["body_hex"]
    env = Envelope(s["vin"], device.key_id, s["boot"], s["seq"], s["created_ms"], Kind.STATUS, Flags.NONE, body)
    assert seal_envelope(env, device).hex() == st_["expected"]["envelope_hex"]
    assert decode_status(body) == StatusReport(s["online"], s["conn"], s["agent"], s["metrics"])


def test_committed_vectors_are_what_specgen_generates() -> None:
    from zhilian.specgen import build_commands

    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(build_commands()))


# --- codec --------------------------------------------------------------------------------------------------


def test_flipping_any_byte_of_a_command_is_detected() -> None:
    wire = _cmd("set_profile", {"profile": "riding"})
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        try:
            cmd = parse_command(bytes(bad)).verify(TRUSTED)
        except (DecodeError, SignatureError):
            continue
        raise AssertionError(f"flip at {i} went unnoticed: {cmd}")


def test_untrusted_key_and_key_table_mismatch_are_signature_errors() -> None:
    with pytest.raises(SignatureError, match="untrusted"):
        parse_command(_cmd(key=OTHER)).verify(TRUSTED)
    with pytest.raises(SignatureError):
        parse_command(_cmd(key=OTHER)).verify({OTHER.key_id: CLOUD.public_raw})


def test_vocabulary() -> None:
    check_args("lock", {})
    check_args("set_profile", {"profile": "auto"})
    check_args("speed_limit_report", {"interval_s": 0})
    check_args("speed_limit_report", {"interval_s": 86_400})
    with pytest.raises(UnknownCommandError):
        check_args("selfdestruct", {})
    bad: list[tuple[str, dict[str, Any]]] = [
        ("lock", {"x": 1}),
        ("set_profile", {}),
        ("set_profile", {"profile": "Riding"}),
        ("speed_limit_report", {"interval_s": 5}),
        ("speed_limit_report", {"interval_s": True}),
        ("speed_limit_report", {"interval_s": 60.0}),
    ]
    for name, args in bad:
        with pytest.raises(CommandArgsError):
            check_args(name, args)


def test_sealing_refuses_what_the_wire_cannot_carry() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"name": "Lock"}, "name"),
        ({"args": {"x": float("nan")}}, "finite"),
        ({"args": {"x": [1]}}, "type"),
        ({"args": {f"a{i}": i for i in range(17)}}, "args"),
        ({"cid": b"short"}, "command_id"),
    ]
    for kwargs, match in cases:
        with pytest.raises(EncodeError, match=match):
            _cmd(**kwargs)


arg_values = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=64),
)
commands = st.builds(
    Command,
    vin=st.from_regex(r"\A[A-Z0-9]{8,32}\Z"),
    command_id=st.binary(min_size=16, max_size=16),
    issued_ms=st.integers(0, 2**64 - 1),
    expires_ms=st.integers(0, 2**64 - 1),
    name=st.from_regex(r"\A[a-z][a-z0-9_]{0,31}\Z"),
    args=st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9_]{0,31}\Z"), arg_values, max_size=16),
    key_id=st.just(CLOUD.key_id),
)


@given(commands)
def test_command_round_trip(cmd: Command) -> None:
    got = parse_command(seal_command(cmd, CLOUD)).verify(TRUSTED)
    assert got == cmd


@given(st.binary(max_size=3000))
def test_arbitrary_bytes_raise_only_decode_errors(data: bytes) -> None:
    for decode in (parse_command, decode_ack, decode_status):
        with contextlib.suppress(DecodeError):
            decode(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=10) | st.dictionaries(st.text(max_size=10), inner, max_size=10),
    max_leaves=30,
)


@given(msgpack_values, st.binary(max_size=80))
def test_arbitrary_msgpack_structures_raise_only_decode_errors(obj: object, sig: bytes) -> None:
    inner = msgpack.packb(obj, use_bin_type=True)
    for data in (inner, msgpack.packb([inner, sig], use_bin_type=True)):
        for decode in (parse_command, decode_ack, decode_status):
            with contextlib.suppress(DecodeError):
                decode(data)


@given(
    st.binary(min_size=16, max_size=16),
    st.sampled_from(AckStatus),
    st.text(max_size=200),
    st.integers(0, 2**64 - 1),
)
def test_ack_round_trip(cid: bytes, status: AckStatus, detail: str, acted: int) -> None:
    ack = CommandAck(cid, status, detail, acted)
    back = decode_ack(encode_ack(ack))
    # The detail is cut to 200 bytes of UTF-8 at a character boundary (multi-byte text may lose its tail).
    assert len(back.detail.encode()) <= 200 and detail.startswith(back.detail)
    if len(detail.encode()) <= 200:
        assert back == ack
    else:
        assert back == CommandAck(cid, status, back.detail, acted) and len(back.detail.encode()) > 196


metric_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=64),
)  # fmt: skip


@given(
    st.booleans(),
    st.integers(0, 2**64 - 1),
    st.text(max_size=64),
    st.dictionaries(st.from_regex(r"\A[a-z][a-z0-9_]{0,39}\Z"), metric_values, max_size=48),
)
def test_status_round_trip(online: bool, conn: int, agent: str, metrics: dict[str, Any]) -> None:
    report = StatusReport(online, conn, agent, metrics)
    assert decode_status(encode_status(report)) == report


def test_status_order_lets_the_lwt_supersede_its_own_connection_only() -> None:
    lwt = status_order(3, 10, StatusReport(False, 2, "v"))  # sealed first, at connect
    online = [status_order(3, seq, StatusReport(True, 2, "v")) for seq in (11, 12, 500)]
    assert all(o < lwt for o in online)
    assert lwt < status_order(3, 501, StatusReport(True, 3, "v"))  # the next connection's online report
    assert lwt < status_order(4, 0, StatusReport(True, 1, "v"))  # the next boot
    assert status_order(3, 600, StatusReport(False, 2, "v")) > lwt  # clean-shutdown report of the same conn


# --- the vehicle's gate -------------------------------------------------------------------------------------


def test_gate_checks_in_order_and_counts_each_reason() -> None:
    gate = CommandGate(VIN, TRUSTED, skew_ms=1000, horizon_ms=3_600_000, max_seen=3)
    cases = [
        (b"\x00garbage", Reason.MALFORMED, False),
        (_cmd(key=OTHER, cid=b"\x01" * 16), Reason.FORGED, False),
        (_cmd(vin="LZHOTHER00000002", cid=b"\x02" * 16), Reason.MISADDRESSED, False),
        (_cmd(issued=NOW - 120_000, ttl=60_000, cid=b"\x03" * 16), Reason.EXPIRED, True),
        (_cmd(issued=NOW + 60_000, cid=b"\x04" * 16), Reason.BAD_VALIDITY, True),
        (_cmd(ttl=7_200_000, cid=b"\x05" * 16), Reason.BAD_VALIDITY, True),
        (_cmd("selfdestruct", cid=b"\x06" * 16), Reason.UNKNOWN_COMMAND, True),
        (_cmd("set_profile", {"profile": 7}, cid=b"\x07" * 16), Reason.MALFORMED, True),
        (_cmd(cid=b"\x08" * 16), None, True),
        (_cmd(cid=b"\x08" * 16), Reason.REPLAYED, False),
        (_cmd(cid=b"\x09" * 16), Reason.OVERLOADED, True),  # three unexpired nonces remembered: 06, 07, 08
    ]
    for payload, reason, ackable in cases:
        verdict = gate.check(payload, NOW)
        assert (verdict.reason, verdict.ackable) == (reason, ackable), payload[:40]
    counts = gate.counters()
    assert counts["accepted"] == 1
    assert counts["malformed"] == 2 and counts["bad_validity"] == 2
    assert sum(counts.values()) == len(cases)
    # Past expiry + skew the nonces are forgotten: the cache stays bounded by the horizon.
    assert gate.check(_cmd(issued=NOW + 120_000, cid=b"\x0a" * 16), NOW + 120_000).accepted
    assert set(gate.seen) == {b"\x0a" * 16}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16]),
            st.sampled_from(["good", "forged", "other_vin", "garbage"]),
            st.integers(-5 * 60_000, 5 * 60_000),  # issue time offset
            st.integers(0, 10 * 60_000),  # clock advance before the check
        ),
        max_size=25,
    )
)
def test_gate_acts_on_each_command_id_at_most_once(steps: list[tuple[bytes, str, int, int]]) -> None:
    gate = CommandGate(VIN, TRUSTED, skew_ms=5_000, horizon_ms=600_000)
    now, accepted = NOW, list[tuple[bytes, int]]()
    for cid, kind, offset, advance in steps:
        now += advance
        if kind == "garbage":
            payload = cid + b"\xc1"
        else:
            vin = "LZHOTHER00000002" if kind == "other_vin" else VIN
            payload = _cmd(cid=cid, issued=now + offset, vin=vin, key=OTHER if kind == "forged" else CLOUD)
        verdict = gate.check(payload, now)
        if verdict.accepted:
            assert kind == "good"
            cmd = verdict.command
            assert cmd is not None and cmd.issued_ms <= now + 5_000 and now <= cmd.expires_ms + 5_000
            # Accepted again only once the earlier command with this id can no longer pass the expiry check.
            assert all(exp + 5_000 < now for c, exp in accepted if c == cid)
            accepted.append((cid, cmd.expires_ms))
    assert sum(gate.counters().values()) == len(steps)


def _executor(tmp: Path, keys: dict[bytes, bytes] = TRUSTED) -> tuple[CommandExecutor, list[CommandAck], list[str]]:
    store = ControlStateFile(tmp)
    state = store.load()
    acks: list[CommandAck] = []
    events: list[str] = []

    async def snapshot() -> str:
        events.append("snapshot")
        return "snapshot of 3 signals spooled"

    async def send_ack(ack: CommandAck) -> None:
        acks.append(ack)

    executor = CommandExecutor(
        CommandGate(VIN, keys, state.seen),
        state,
        store,
        clock=lambda: NOW / 1000,
        snapshot=snapshot,
        send_ack=send_ack,
        on_change=lambda old, new: events.append(f"{old.profile}->{new.profile},{new.locked}"),
        check=lambda name, args: "unknown profile" if args.get("profile") == "nope" else None,
    )
    return executor, acks, events


def test_executor_acts_acks_and_persists_across_restarts(tmp_path: Path) -> None:
    async def go() -> None:
        ex, acks, events = _executor(tmp_path)
        lock = _cmd("lock", cid=b"\x01" * 16)
        await ex.handle(lock)
        await ex.handle(_cmd("set_profile", {"profile": "riding"}, cid=b"\x02" * 16))
        await ex.handle(_cmd("set_profile", {"profile": "nope"}, cid=b"\x03" * 16))
        await ex.handle(_cmd("snapshot", cid=b"\x04" * 16))
        await ex.handle(_cmd(issued=NOW - 600_000, cid=b"\x05" * 16))  # expired: acked as rejected
        await ex.handle(_cmd(key=OTHER, cid=b"\x06" * 16))  # forged: no ack
        await ex.handle(lock)  # replayed: no ack
        assert [(a.command_id[0], a.status) for a in acks] == [
            (1, AckStatus.DONE),
            (2, AckStatus.DONE),
            (3, AckStatus.REJECTED),
            (4, AckStatus.DONE),
            (5, AckStatus.REJECTED),
        ]
        assert acks[4].detail.startswith("expired")
        assert events == ["None->None,True", "None->riding,True", "snapshot"]
        assert ex.metrics() | {} == {
            "done": 3, "failed": 0, "refused": 1, "accepted": 4, "malformed": 0, "forged": 1, "misaddressed": 0,
            "replayed": 1, "expired": 1, "bad_validity": 0, "overloaded": 0, "unknown_command": 0,
        }  # fmt: skip
        # A restart (a new executor over the same state dir) keeps the state and the replay cache.
        again, acks2, _ = _executor(tmp_path)
        assert (again.state.locked, again.state.profile) == (True, "riding")
        for cid in (1, 2, 3):
            assert (await again.handle(_cmd(cid=bytes([cid]) * 16))).reason is Reason.REPLAYED
        assert acks2 == []
        # An expired command is not remembered (nothing bounds how many arrive): it is rejected again, and acked.
        assert (await again.handle(_cmd(issued=NOW - 600_000, cid=b"\x05" * 16))).reason is Reason.EXPIRED
        assert [a.status for a in acks2] == [AckStatus.REJECTED]
        await again.handle(_cmd("set_profile", {"profile": "auto"}, cid=b"\x07" * 16))
        assert again.state.profile is None

    asyncio.run(go())


def test_a_corrupt_control_state_is_refused_not_reset(tmp_path: Path) -> None:
    path = tmp_path / "control.json"
    for text in ("{", '{"version": 1}', '{"version": 2, "locked": false}', "[]"):
        path.write_text(text)
        with pytest.raises(ControlStateError, match="remove it deliberately"):
            ControlStateFile(tmp_path).load()
    state = ControlState(True, "riding", 60, {b"\x01" * 16: 5})
    assert ControlState.from_json(state.to_json()) == state


def test_cloud_key_file(tmp_path: Path) -> None:
    path = tmp_path / "cloud.keys"
    path.write_text(f"# rotation: old and new\n{base64.b64encode(CLOUD.public_raw).decode()}\n"
                    f"{base64.b64encode(OTHER.public_raw).decode()}  # new\n")  # fmt: skip
    path.chmod(0o644)
    assert load_cloud_keys(path) == {CLOUD.key_id: CLOUD.public_raw, OTHER.key_id: OTHER.public_raw}
    path.chmod(0o666)
    with pytest.raises(ControlStateError, match="writable"):
        load_cloud_keys(path)
    path.chmod(0o644)
    path.write_text("not base64!\n")
    with pytest.raises(ControlStateError, match=":1:"):
        load_cloud_keys(path)


# --- the cloud ----------------------------------------------------------------------------------------------


@pytest.fixture
def cloud(tmp_path: Path, database_url: str) -> Iterator[IngestService]:
    svc = IngestService.open(tmp_path / "ingest", database_url=database_url)
    svc.registry.register_device(VIN, DEVICE.public_raw)
    yield svc
    svc.close()


def _device_msg(kind: Kind, body: bytes, boot: int = 1, seq: int = 0, vin: str = VIN, key: DeviceKey = DEVICE) -> bytes:
    return seal_envelope(Envelope(vin, key.key_id, boot, seq, NOW, kind, Flags.NONE, body), key)


def test_cloud_key_is_created_once_with_0600(tmp_path: Path) -> None:
    a = load_or_create_cloud_key(tmp_path)
    b = load_or_create_cloud_key(tmp_path)
    assert a.public_raw == b.public_raw
    assert (tmp_path / "cloud_command.key").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["cloud_command.key"]


def _flip_last(raw: bytes) -> bytes:
    # Always a different last signature byte (overwriting it with a constant left it unchanged 1 time in 256).
    return raw[:-1] + bytes([raw[-1] ^ 1])


def test_outbox_leases_acks_and_states(cloud: IngestService) -> None:
    svc: CommandService = cloud.commands
    rec = svc.issue(VIN, "lock", {}, ttl_s=60)
    assert rec.state == "pending"
    first = svc.claim_pending(10, lease_s=30)
    assert [c.command_id for c in first] == [rec.command_id]
    assert svc.claim_pending(10, lease_s=30) == []  # leased: another worker does not get it
    cmd = parse_command(first[0].payload).verify({svc.key.key_id: svc.public_key})
    assert (cmd.vin, cmd.name) == (VIN, "lock")
    svc.release(first[0].command_id, retry_in_s=0)
    time.sleep(0.01)
    assert len(svc.claim_pending(10, lease_s=30)) == 1  # released: eligible again
    svc.mark_sent(rec.command_id)
    assert svc.get(rec.command_id).state == "sent"  # type: ignore[union-attr]
    ack = encode_ack(CommandAck(bytes.fromhex(rec.command_id), AckStatus.DONE, "locked", NOW))
    unknown = encode_ack(CommandAck(b"\x00" * 16, AckStatus.DONE, "", 1))
    results = svc.ingest_control_many(
        [
            (VIN, Channel.CMD_ACK, _device_msg(Kind.COMMAND_ACK, ack, seq=1)),
            (VIN, Channel.CMD_ACK, _device_msg(Kind.COMMAND_ACK, ack, seq=1)),  # redelivery
            (VIN, Channel.CMD_ACK, _device_msg(Kind.COMMAND_ACK, ack, seq=2, key=OTHER)),
            (VIN, Channel.CMD_ACK, _flip_last(_device_msg(Kind.COMMAND_ACK, ack, seq=2))),
            (VIN, Channel.CMD_ACK, _device_msg(Kind.STATUS, ack, seq=3)),
            (VIN, Channel.CMD_ACK, _device_msg(Kind.COMMAND_ACK, b"\x93", seq=4)),
            ("LZHOTHER00000002", Channel.CMD_ACK, _device_msg(Kind.COMMAND_ACK, ack, seq=5)),
            (VIN, Channel.CMD_ACK, _device_msg(Kind.COMMAND_ACK, unknown)),
        ]
    )  # fmt: skip
    assert [(r.outcome, r.reason) for r in results] == [
        ("stored", None),
        ("duplicate", None),
        ("rejected", "unknown_key"),
        ("rejected", "bad_signature"),
        ("rejected", "wrong_kind"),
        ("rejected", "bad_body"),
        ("rejected", "vin_mismatch"),
        ("rejected", "unknown_command"),
    ]
    got = svc.get(rec.command_id)
    assert got is not None and (got.state, got.ack_status, got.ack_detail) == ("acked", "done", "locked")
    assert svc.claim_pending(10, lease_s=30) == []
    with pytest.raises(Exception, match="unknown vehicle"):
        svc.issue("LZHNOBODY0000001", "lock", {})
    with pytest.raises(Exception, match="interval_s"):
        svc.issue(VIN, "speed_limit_report", {"interval_s": 3})


def test_an_ack_for_another_vehicles_command_is_rejected(cloud: IngestService) -> None:
    other = DeviceKey.from_seed(b"\x0b" * 32)
    cloud.registry.register_device("LZHOTHER00000002", other.public_raw)
    rec = cloud.commands.issue(VIN, "unlock", {})
    ack = encode_ack(CommandAck(bytes.fromhex(rec.command_id), AckStatus.DONE, "", NOW))
    msg = _device_msg(Kind.COMMAND_ACK, ack, vin="LZHOTHER00000002", key=other)
    [res] = cloud.commands.ingest_control_many([("LZHOTHER00000002", Channel.CMD_ACK, msg)])
    assert (res.outcome, res.reason) == ("rejected", "misaddressed_ack")
    assert cloud.commands.get(rec.command_id).state == "pending"  # type: ignore[union-attr]


def test_only_a_newer_status_replaces_the_stored_one(cloud: IngestService) -> None:
    svc = cloud.commands

    def status(online: bool, conn: int, boot: int, seq: int, rss: int = 1) -> tuple[str, Channel, bytes]:
        body = encode_status(StatusReport(online, conn, "0.1.0", {"rss_kb": rss}))
        return (VIN, Channel.STATUS, _device_msg(Kind.STATUS, body, boot=boot, seq=seq))

    lwt = status(False, conn=1, boot=2, seq=5)
    steps = [
        (status(True, 1, 2, 6), "stored", True),
        (status(True, 1, 2, 9), "stored", True),
        (status(True, 1, 2, 7), "stale", True),  # reordered
        (lwt, "stored", False),  # the LWT, sealed before the online reports, still wins
        (lwt, "duplicate", False),  # retained copy at the next subscribe
        (status(True, 1, 2, 12), "stale", False),  # a late online report of the dead connection
        (status(True, 2, 2, 13), "stored", True),  # reconnected
        (status(True, 5, 1, 99), "stale", True),  # an earlier boot
    ]
    for item, outcome, online in steps:
        [res] = svc.ingest_control_many([item])
        assert res.outcome == outcome
        latest = svc.latest_status(VIN)
        assert latest is not None and latest.online is online
    assert svc.latest_status("LZHNOBODY0000001") is None


class _Api:
    def __init__(self, svc: IngestService) -> None:
        self.svc = svc
        self.client = TestClient(svc.app)
        self.operator = {"Authorization": f"Bearer {svc.registry.create_api_key(Role.OPERATOR, 'ops')}"}
        self.viewer = {"X-API-Key": svc.registry.create_api_key(Role.VIEWER, "dash")}


@pytest.fixture
def api(cloud: IngestService) -> Iterator[_Api]:
    a = _Api(cloud)
    yield a
    a.client.close()


def test_command_api(api: _Api) -> None:
    c = api.client
    key = c.get("/v1/cloud-key", headers=api.viewer).json()
    assert base64.b64decode(key["public_key"]) == api.svc.commands.public_key
    assert c.post(f"/v1/vehicles/{VIN}/commands", json={"name": "lock"}, headers=api.viewer).status_code == 403
    r = c.post(f"/v1/vehicles/{VIN}/commands", json={"name": "lock", "ttl_s": 30}, headers=api.operator)
    assert r.status_code == 202, r.text
    cid = r.json()["command_id"]
    body = {"name": "set_profile", "args": {"profile": "riding"}}
    assert c.post(f"/v1/vehicles/{VIN}/commands", json=body, headers=api.operator).status_code == 202
    for bad in (
        {"name": "selfdestruct"},
        {"name": "lock", "args": {"x": 1}},
        {"name": "speed_limit_report", "args": {"interval_s": 1}},
        {"name": "lock", "ttl_s": 10**9},
    ):
        assert c.post(f"/v1/vehicles/{VIN}/commands", json=bad, headers=api.operator).status_code == 422, bad
    assert (
        c.post("/v1/vehicles/LZHNOBODY0000001/commands", json={"name": "lock"}, headers=api.operator).status_code == 404
    )
    listed = c.get(f"/v1/vehicles/{VIN}/commands", headers=api.viewer).json()
    assert sorted(x["name"] for x in listed) == ["lock", "set_profile"]
    assert {x["command_id"] for x in listed} >= {cid} and all(
        x["state"] == "pending" and x["ack"] is None for x in listed
    )
    assert c.get(f"/v1/vehicles/{VIN}/status", headers=api.viewer).status_code == 404
    body_ = encode_status(StatusReport(True, 1, "0.1.0", {"rss_kb": 31000, "spool_depth": 2}))
    api.svc.commands.ingest_control_many([(VIN, Channel.STATUS, _device_msg(Kind.STATUS, body_))])
    got = c.get(f"/v1/vehicles/{VIN}/status", headers=api.viewer).json()
    assert got["online"] is True and got["metrics"] == {"rss_kb": 31000, "spool_depth": 2}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"name": st.sampled_from(["lock", "set_profile", "speed_limit_report", "snapshot", "x"])},
            optional={"args": st.dictionaries(st.text(max_size=40), json_values, max_size=4), "ttl_s": json_values},
        ),
    ),
    vin=st.one_of(st.just(VIN), st.text(max_size=40)),
)
def test_command_endpoints_never_fail_on_hostile_input(api: _Api, body: Any, vin: str) -> None:
    from urllib.parse import quote

    path = f"/v1/vehicles/{quote(vin, safe='')}"
    r = api.client.post(f"{path}/commands", json=body, headers=api.operator)
    assert r.status_code in (202, 404, 405, 422), (r.status_code, r.text)
    for suffix in ("/commands", "/status"):
        assert api.client.get(f"{path}{suffix}", headers=api.viewer).status_code in (200, 404, 405, 422)
