"""Deployment artefacts: the example agent config loads and documents every key; nested [sampling]/[precheck]
tables; config errors stop `zhilian agent run` at start; the systemd unit carries its hardening."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, ConfigError
from edge_agent.precheck import PrecheckConfig
from edge_agent.sampling import CaptureConfig, StateRules

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "agent.example.toml"
UNIT = ROOT / "deploy" / "systemd" / "zhilian-agent.service"
SOC = "Powertrain.TractionBattery.StateOfCharge"


def _documented_keys(text: str) -> set[str]:
    """Keys set or shown commented out (`# key = ...`) anywhere in the file, and table names."""
    keys = set(re.findall(r"^\s*#?\s*([a-z_][a-z0-9_]*)\s*=", text, flags=re.MULTILINE))
    for table in re.findall(r"^\[([^\]]+)\]", text, flags=re.MULTILINE):
        keys.update(table.split("."))
    return keys


def test_example_config_loads_and_documents_every_field() -> None:
    cfg = AgentConfig.from_toml(EXAMPLE)
    assert cfg.vin == "LZHEB0A12P0000001" and cfg.state_dir == Path("/var/lib/zhilian/agent")
    assert set(cfg.sampling.profiles) >= {"parked", "riding", "charging"}
    assert cfg.sampling.profiles["riding"].rule(SOC).deadband == 1.0
    assert cfg.precheck.enabled and cfg.precheck.chemistry == "nmc"
    documented = _documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    nested = [AgentConfig, StateRules, CaptureConfig, PrecheckConfig]
    missing = {f"{cls.__name__}.{f.name}" for cls in nested for f in fields(cls) if f.name not in documented}
    assert not missing, f"deploy/agent.example.toml does not document: {sorted(missing)}"
    text = EXAMPLE.read_text(encoding="utf-8")
    for key in ("default_period_s", "default_deadband", "period_s", "deadband", "levels", "hysteresis", "window_s"):
        assert re.search(rf"\b{key}\s*=", text), key  # per-signal rules are inline tables


def test_example_values_are_the_defaults_where_the_example_does_not_need_another() -> None:
    cfg = AgentConfig.from_toml(EXAMPLE)
    assert cfg.sampling.state == StateRules() and cfg.sampling.capture == CaptureConfig()
    defaults = PrecheckConfig()
    assert cfg.precheck.rules() == defaults.rules()
    assert (cfg.precheck.debounce_s, cfg.precheck.clear_s) == (defaults.debounce_s, defaults.clear_s)


@pytest.mark.parametrize("nested", [False, True])
def test_sampling_and_precheck_tables_are_read_at_top_level_or_inside_agent(tmp_path: Path, nested: bool) -> None:
    prefix = "agent." if nested else ""
    p = tmp_path / "agent.toml"
    p.write_text(
        '[agent]\nvin = "LZHTEST0000000001"\nkey_file = "/k"\nstate_dir = "/s"\n'
        f"[{prefix}sampling.profiles.riding]\ndefault_period_s = 2.0\n"
        f'[{prefix}precheck]\nchemistry = "lfp"\n'
    )
    cfg = AgentConfig.from_toml(p)
    assert cfg.sampling.profiles["riding"].default_period_s == 2.0
    assert cfg.precheck.cell_overvoltage.levels[0] == 3.65


def test_without_sampling_tables_the_defaults_apply(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text('vin = "LZHTEST0000000001"\nkey_file = "/k"\nstate_dir = "/s"\n')
    cfg = AgentConfig.from_toml(p)
    assert cfg.sampling.profiles == {} and cfg.precheck == PrecheckConfig()


def test_a_misspelt_signal_fails_the_start(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8").replace(
        '"Powertrain.TractionBattery.StateOfHealth" = { period_s = 600.0 }',
        '"Powertrain.TractionBattery.StateOfHeath" = { period_s = 600.0 }',
    )
    p = tmp_path / "agent.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="StateOfHeath"):
        AgentConfig.from_toml(p)
    # The command refuses it before touching keys, ports or the broker, with the reason and exit status 2.
    proc = subprocess.run(
        [sys.executable, "-m", "zhilian", "agent", "run", "--config", str(p)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "StateOfHeath" in proc.stdout + proc.stderr


def _unit_directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_runs_the_agent_restarting_and_hardened() -> None:
    d = _unit_directives()
    assert d["ExecStart"] == ["/opt/zhilian/bin/zhilian agent run --config /etc/zhilian/agent.toml"]
    assert d["Restart"] == ["always"] and d["User"] == ["zhilian"]
    assert d["NoNewPrivileges"] == ["yes"] and d["ProtectSystem"] == ["strict"]
    assert AgentConfig.from_toml(EXAMPLE).state_dir == Path(d["ReadWritePaths"][0])
    assert d["DevicePolicy"] == ["closed"] and "char-ttyS rw" in d["DeviceAllow"]
    assert d["MemoryMax"] and "PrivateDevices" not in d  # PrivateDevices would hide the serial ports
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    proc = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    # The only complaint allowed is the one about this machine: the agent is not installed under /opt/zhilian.
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln and "/opt/zhilian/bin/zhilian" not in ln]
    assert not problems, problems
