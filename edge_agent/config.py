"""Agent configuration: one dataclass, loadable from a TOML file, overridable from the command line."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_agent.precheck import PrecheckConfig
    from edge_agent.sampling import SamplingConfig


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
    # BMS and controller on the vehicle's CAN bus (firmware_specs/CAN.md); None when the board has no CAN.
    # Interface: "socketcan" (channel "can0"), "slcan" (channel = the USB-CAN adapter's serial port), "virtual".
    can_interface: str | None = None
    can_channel: str = "can0"
    can_bitrate: int = 250_000
    can_variant: str = "48v"  # DBC profile: "48v" e-bike or "72v" e-motorcycle
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
    # Control plane (edge_agent/commands.py, firmware_specs/COMMANDS.md): a retained status report every
    # status_interval_s; commands verified against the cloud public keys in cloud_key_file (base64 raw Ed25519,
    # one per line; two during a key rotation). Without it every command is rejected as forged.
    status_interval_s: float = 60.0
    cloud_key_file: Path | None = None
    # Commands are accepted up to this far outside their validity window (board vs cloud clock), and refused
    # if they expire further ahead than the horizon, which bounds how long the replay cache remembers them.
    command_clock_skew_s: float = 30.0
    command_max_horizon_s: float = 7 * 86_400.0
    # Reconnects wait a random time in [0, min(reconnect_max_s, reconnect_initial_s * 2^attempt)] (full jitter).
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    # The broker keeps this vehicle's MQTT session (its command subscription and commands sent meanwhile) for
    # this long while the vehicle is offline.
    session_expiry_s: int = 86_400
    # [sampling] and [precheck] tables (edge_agent/sampling.py, edge_agent/precheck.py). The defaults send every
    # value of every sample and run the pre-check with NMC thresholds.
    sampling: SamplingConfig = field(default_factory=lambda: _default_sampling())
    precheck: PrecheckConfig = field(default_factory=lambda: _default_precheck())

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> AgentConfig:
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read agent config {path}: {exc}") from None
        section = dict(doc.get("agent", doc))
        _parse_nested(doc, section)
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ConfigError(f"unknown agent config keys: {sorted(unknown)}")
        values = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        for name in ("key_file", "state_dir", "tls_ca", "tls_cert", "tls_key", "cloud_key_file"):
            if values.get(name) is not None:
                values[name] = Path(values[name])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None


# sampling.py and precheck.py raise this module's ConfigError, so they are imported here only when needed.
def _default_sampling() -> SamplingConfig:
    from edge_agent.sampling import SamplingConfig

    return SamplingConfig()


def _default_precheck() -> PrecheckConfig:
    from edge_agent.precheck import PrecheckConfig

    return PrecheckConfig()


def _parse_nested(doc: dict[str, Any], section: dict[str, Any]) -> None:
    """Replace the [sampling] / [precheck] tables (top level, or inside [agent]) in `section` by their configs.

    Signal names are checked against the shipped catalogue here, so a typo fails the start."""
    from edge_agent.precheck import parse_precheck
    from edge_agent.sampling import parse_sampling
    from protocol import load_catalogue

    for name, parse in (("sampling", parse_sampling), ("precheck", parse_precheck)):
        table = section.pop(name, None)
        if table is None and "agent" in doc:
            table = doc.get(name)
        if table is not None:
            section[name] = parse(table, load_catalogue())
