"""Agent configuration: one dataclass, loadable from a TOML file, overridable from the command line."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration file or value the agent cannot run with."""


@dataclass(slots=True)
class AgentConfig:
    vin: str
    key_file: Path
    state_dir: Path
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    gnss_port: str | None = None
    gnss_baudrate: int = 9600
    # BMS speaking the JBD/Xiaoxiang UART protocol (firmware_specs/BMS_UART.md); None when not fitted.
    bms_port: str | None = None
    bms_baudrate: int = 9600
    bms_poll_interval_s: float = 1.0
    # Motor controller speaking the Zhilian controller UART protocol (firmware_specs/CONTROLLER_UART.md).
    controller_port: str | None = None
    controller_baudrate: int = 9600
    batch_interval_s: float = 5.0
    # Without GNSS epochs (no port, no fix), the sampler falls back to the board clock at this period.
    sample_interval_s: float = 1.0
    # Bounds of the durable spool (state_dir/spool.db); see edge_agent/spool.py for the eviction policy. At a
    # 5 s batch interval 50,000 batches are about three days offline.
    spool_max_rows: int = 50_000
    spool_max_bytes: int = 64 * 1024 * 1024
    publish_timeout_s: float = 10.0
    keepalive_s: int = 30
    # Mutual TLS to the broker (all three or none): the CA that signed the broker's certificate, and this
    # vehicle's client certificate (CN = VIN, which the broker's ACL confines to ev/{vin}/) with its 0600 key.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> AgentConfig:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read agent config {path}: {exc}") from None
        section = doc.get("agent", doc)
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ConfigError(f"unknown agent config keys: {sorted(unknown)}")
        values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        for name in ("key_file", "state_dir", "tls_ca", "tls_cert", "tls_key"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
