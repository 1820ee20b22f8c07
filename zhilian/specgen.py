"""Generates firmware_specs/test_vectors/envelope_v1.json from fixed inputs.

Run once when the wire format deliberately changes (`zhilian spec vectors --write`), review the diff, commit.
The test suite then checks the code against the committed file, and firmware written in C checks itself against
the same file, so both prove they produce identical bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope

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


if __name__ == "__main__":
    print(write())
