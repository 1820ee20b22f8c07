"""Generates firmware_specs/test_vectors/envelope_v1.json and commands_v1.json from fixed inputs.

Run once when the wire format deliberately changes (`zhilian spec vectors --write`), review the diff, commit.
The test suite then checks the code against the committed file, and firmware written in C checks itself against
the same file, so both prove they produce identical bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope
from protocol.commands import AckStatus, Command, CommandAck, StatusReport, encode_ack, encode_status, seal_command

VECTOR_FILE = Path(__file__).resolve().parents[1] / "firmware_specs" / "test_vectors" / "envelope_v1.json"

# Inputs: fixed seeds (never use these keys on a vehicle) and samples chosen to exercise every value type, nil,
# negative numbers, multi-byte deltas and the float scaling rule.
_CASES: list[dict[str, Any]] = [
    {
        "name": "telemetry_two_samples",
        "seed_hex": bytes(range(32)).hex(),
        "vin": "LZHEB0A12P0000001",
        "boot": 7,
        "seq": 42,
        "created_ms": 1_767_225_600_000,
        "kind": "TELEMETRY",
        "flags": 0,
        "timestamps": [1_767_225_598_000, 1_767_225_599_000],
        "columns": {
            "CurrentLocation.Latitude": [29.5577123, 29.5577456],
            "CurrentLocation.Longitude": [106.5771234, 106.5771789],
            "CurrentLocation.GNSSReceiver.FixMode": [3, 3],
            "CurrentLocation.GNSSReceiver.BeiDouInUse": [True, True],
            "Powertrain.TractionBattery.CurrentCurrent": [-12.34, None],
            "Powertrain.TractionBattery.StateOfCharge": [87.5, 87.4],
        },
    },
    {
        "name": "alert_backfill_single_sample",
        "seed_hex": bytes(range(100, 132)).hex(),
        "vin": "CQEB2025TEST00042",
        "boot": 1,
        "seq": 0,
        "created_ms": 1_767_300_000_123,
        "kind": "ALERT",
        "flags": 1,
        "timestamps": [1_767_299_999_900],
        "columns": {
            "Powertrain.TractionBattery.Temperature.Max": [68.9],
            "Speed": [0.0],
        },
    },
]


def build() -> dict[str, Any]:
    catalogue = load_catalogue()
    out = []
    for case in _CASES:
        key = DeviceKey.from_seed(bytes.fromhex(case["seed_hex"]))
        body = encode_batch(Batch(list(case["timestamps"]), dict(case["columns"])), catalogue)
        env = Envelope(
            vin=case["vin"],
            key_id=key.key_id,
            boot=case["boot"],
            seq=case["seq"],
            created_ms=case["created_ms"],
            kind=Kind[case["kind"]],
            flags=Flags(case["flags"]),
            body=body,
        )
        wire = seal_envelope(env, key)
        out.append(
            {
                "input": case,
                "expected": {
                    "public_key_hex": key.public_raw.hex(),
                    "key_id_hex": key.key_id.hex(),
                    "body_hex": body.hex(),
                    "envelope_hex": wire.hex(),
                },
            }
        )
    return {
        "description": "Zhilian envelope v1 test vectors; see firmware_specs/ENVELOPE.md",
        "catalogue_version": catalogue.version,
        "vectors": out,
    }


def write(path: Path = VECTOR_FILE) -> Path:
    path.write_text(json.dumps(build(), indent=2) + "\n", encoding="utf-8")
    return path


# --- control plane (firmware_specs/COMMANDS.md) -----------------------------------------------------------------

COMMAND_VECTOR_FILE = VECTOR_FILE.with_name("commands_v1.json")
_CLOUD_SEED = bytes(range(200, 232))
_DEVICE_SEED = bytes(range(32))  # the device key of the first envelope vector
_VIN = "LZHEB0A12P0000001"
_COMMANDS: list[dict[str, Any]] = [
    {"name": "lock", "args": {}, "command_id_hex": bytes(range(16)).hex()},
    {"name": "set_profile", "args": {"profile": "riding"}, "command_id_hex": bytes(range(16, 32)).hex()},
    {"name": "speed_limit_report", "args": {"interval_s": 60}, "command_id_hex": bytes(range(32, 48)).hex()},
]
_ISSUED_MS = 1_767_225_600_000
_TTL_MS = 300_000


def build_commands() -> dict[str, Any]:
    cloud = DeviceKey.from_seed(_CLOUD_SEED)
    device = DeviceKey.from_seed(_DEVICE_SEED)
    commands = []
    for case in _COMMANDS:
        cmd = Command(
            _VIN,
            bytes.fromhex(case["command_id_hex"]),
            _ISSUED_MS,
            _ISSUED_MS + _TTL_MS,
            case["name"],
            case["args"],
            cloud.key_id,
        )
        commands.append(
            {
                "input": {**case, "vin": _VIN, "issued_ms": _ISSUED_MS, "expires_ms": _ISSUED_MS + _TTL_MS},
                "expected": {"command_hex": seal_command(cmd, cloud).hex()},
            }
        )
    ack: dict[str, Any] = {
        "command_id_hex": bytes(range(16)).hex(),
        "status": "done",
        "detail": "locked",
        "acted_ms": 1_767_225_601_234,
    }
    ack_body = encode_ack(
        CommandAck(bytes.fromhex(ack["command_id_hex"]), AckStatus(ack["status"]), ack["detail"], ack["acted_ms"])
    )
    ack_env = Envelope(_VIN, device.key_id, 7, 43, 1_767_225_601_300, Kind.COMMAND_ACK, Flags.NONE, ack_body)
    status: dict[str, Any] = {
        "online": False,
        "conn": 2,
        "agent": "0.1.0",
        "metrics": {"cpu_pct": 1.25, "fix_age_s": None, "locked": True, "profile": "riding", "rss_kb": 30500},
    }
    status_body = encode_status(StatusReport(status["online"], status["conn"], status["agent"], status["metrics"]))
    status_env = Envelope(_VIN, device.key_id, 7, 44, 1_767_225_602_000, Kind.STATUS, Flags.NONE, status_body)
    return {
        "description": "Zhilian control plane v1 test vectors (commands, ack and status bodies); see COMMANDS.md",
        "cloud_key": {
            "seed_hex": _CLOUD_SEED.hex(),
            "public_key_hex": cloud.public_raw.hex(),
            "key_id_hex": cloud.key_id.hex(),
        },
        "device_key": {
            "seed_hex": _DEVICE_SEED.hex(),
            "public_key_hex": device.public_raw.hex(),
            "key_id_hex": device.key_id.hex(),
        },
        "commands": commands,
        "ack": {
            "input": {**ack, "vin": _VIN, "boot": 7, "seq": 43, "created_ms": 1_767_225_601_300},
            "expected": {"body_hex": ack_body.hex(), "envelope_hex": seal_envelope(ack_env, device).hex()},
        },
        "status": {
            "input": {**status, "vin": _VIN, "boot": 7, "seq": 44, "created_ms": 1_767_225_602_000},
            "expected": {"body_hex": status_body.hex(), "envelope_hex": seal_envelope(status_env, device).hex()},
        },
    }


def write_commands(path: Path = COMMAND_VECTOR_FILE) -> Path:
    path.write_text(json.dumps(build_commands(), indent=2) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write())
    print(write_commands())
