"""Sans-I/O parts of the edge agent: batcher, sealer, boot counter, config (the spool: test_spool.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.batcher import Batcher, Sealer
from edge_agent.bootcount import BootCounterError, next_boot
from edge_agent.config import AgentConfig, ConfigError
from protocol import DeviceKey, decode_batch, encode_batch, load_catalogue, parse_envelope

CAT = load_catalogue()
KEY = DeviceKey.from_seed(b"\x01" * 32)


def test_batcher_builds_columns_and_counts_unknown_signals() -> None:
    b = Batcher(CAT)
    b.add(1000, {"Speed": 10.0, "Bogus.Signal": 1})
    b.add(2000, {"Speed": 11.0, "Powertrain.TractionBattery.StateOfCharge": 80.0})
    batch = b.drain()
    assert batch is not None and b.drain() is None
    assert batch.timestamps == [1000, 2000]
    assert batch.columns == {"Speed": [10.0, 11.0], "Powertrain.TractionBattery.StateOfCharge": [None, 80.0]}
    assert b.unknown_signals == {"Bogus.Signal": 1}


def test_batcher_merges_same_instant_and_never_reorders() -> None:
    b = Batcher(CAT)
    b.add(2000, {"Speed": 1.0})
    b.add(2000, {"Powertrain.ElectricMotor.Speed": 100})
    b.add(1500, {"Speed": 2.0})  # clock stepped back: clamped, merged into the last sample
    batch = b.drain()
    assert batch is not None
    assert batch.timestamps == [2000]
    assert batch.columns["Speed"] == [2.0]


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=200), st.integers(1, 50))
def test_batcher_is_bounded_and_counts_drops(times: list[int], bound: int) -> None:
    b = Batcher(CAT, max_samples=bound)
    for t in sorted(set(times)):
        b.add(t, {"Speed": 1.0})
    assert len(b) <= bound
    assert len(b) + b.dropped == len(set(times))


def test_sealer_numbers_messages_strictly_increasing_and_signs_them() -> None:
    s = Sealer("LZHTEST0000000001", KEY, boot=4)
    b = Batcher(CAT)
    seqs = []
    for i in range(3):
        b.add(i * 1000, {"Speed": float(i)})
        batch = b.drain()
        assert batch is not None
        sealed = s.seal_body(encode_batch(batch, CAT), len(batch), now_ms=5000)
        env = parse_envelope(sealed.payload).verify(KEY.public_raw)
        assert (env.boot, env.seq) == (4, sealed.seq)
        assert decode_batch(env.body, CAT).batch.columns["Speed"] == [float(i)]
        seqs.append(sealed.seq)
    assert seqs == [0, 1, 2]
    assert sealed.topic == "ev/LZHTEST0000000001/telemetry"


def test_boot_counter_increments_durably_and_refuses_garbage(tmp_path: Path) -> None:
    assert [next_boot(tmp_path) for _ in range(3)] == [1, 2, 3]
    assert (tmp_path / "boot_counter").read_text().strip() == "3"
    (tmp_path / "boot_counter").write_text("garbage")
    with pytest.raises(BootCounterError):
        next_boot(tmp_path)


def test_agent_config_from_toml(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('[agent]\nvin = "LZHTEST0000000001"\nkey_file = "/k"\nstate_dir = "/s"\nbatch_interval_s = 2.0\n')
    cfg = AgentConfig.from_toml(p, broker_port=1999)
    assert cfg.batch_interval_s == 2.0 and cfg.broker_port == 1999 and cfg.key_file == Path("/k")
    p.write_text('[agent]\nvin = "X"\nnot_a_key = 1\n')
    with pytest.raises(ConfigError, match="not_a_key"):
        AgentConfig.from_toml(p)
