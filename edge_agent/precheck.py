"""Sans-I/O edge hazard pre-check: raises alerts from raw samples before any batching.

The cloud's rules see the data a batch interval late; a battery that is running away thermally must not wait for
that. Each rule watches one measure of the raw samples and maps it onto levels 1..3 by thresholds:

  over_temperature.<name>   a temperature above its tiers (battery, controller, motor by default)
  temperature_rise.<name>   how fast a temperature climbs, in degC/s over a sliding window (GB 38031 treats
                            >= 1 degC/s as a thermal-runaway sign; that is level 3 by default)
  cell_overvoltage          the highest cell voltage above its tiers (per chemistry)
  cell_undervoltage         the lowest cell voltage below its tiers (per chemistry)

One condition is one episode: the alert is RAISED once the measure has stayed at level >= 1 for `debounce_s`,
ESCALATED (at once) each time it reaches a higher level, and CLEARED once, after the measure has stayed beyond the
level-1 threshold by the rule's hysteresis for `clear_s`. A reading that wobbles around a threshold therefore
neither floods the uplink nor hides the condition. Levels never step down inside an episode: the highest level
reached is what the episode was.

Time is the sample's timestamp in ms; nothing here reads a clock or does I/O. The wire form of alerts (a columnar
batch in an ALERT envelope) is `alert_rows`, described in firmware_specs/ALERTS.md.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.config import ConfigError
from protocol.catalogue import Catalogue, SignalType

log = logging.getLogger("zhilian.agent.precheck")

Value = float | int | bool | str
RULE_SIGNAL = "Telematics.EdgeAlert.Rule"
LEVEL_SIGNAL = "Telematics.EdgeAlert.Level"
MAX_LEVEL = 3


class AlertState(enum.StrEnum):
    RAISED = "raised"
    ESCALATED = "escalated"
    CLEARED = "cleared"


@dataclass(frozen=True, slots=True)
class Alert:
    rule: str
    level: int  # 1..3; for CLEARED, the highest level the episode reached
    state: AlertState
    ts_ms: int
    measure: float  # what was compared with the thresholds: a temperature, a rate (degC/s) or a voltage
    values: Mapping[str, Value]  # the readings of the sample that raised, escalated or cleared it


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    """Levels by the value of one signal: `levels[i]` is where level i+1 begins (above, or below if not `above`)."""

    signal: str
    levels: tuple[float, ...]
    hysteresis: float
    above: bool = True


@dataclass(frozen=True, slots=True)
class RiseRule:
    """Levels by how fast one signal climbs (units per second) over the last `window_s`."""

    signal: str
    levels: tuple[float, ...]
    hysteresis: float
    window_s: float = 10.0


# Cell voltage tiers per chemistry (V): over-voltage above, under-voltage below. NMC cells are full at 4.20 V
# and damaged past ~4.35 V or below ~2.5 V; LFP cells are full at 3.65 V and sit flat near 3.2-3.3 V.
CHEMISTRIES: dict[str, tuple[ThresholdRule, ThresholdRule]] = {
    "nmc": (
        ThresholdRule("Powertrain.TractionBattery.CellVoltage.Max", (4.25, 4.30, 4.35), 0.05),
        ThresholdRule("Powertrain.TractionBattery.CellVoltage.Min", (3.00, 2.80, 2.50), 0.10, above=False),
    ),
    "lfp": (
        ThresholdRule("Powertrain.TractionBattery.CellVoltage.Max", (3.65, 3.75, 3.85), 0.05),
        ThresholdRule("Powertrain.TractionBattery.CellVoltage.Min", (2.70, 2.50, 2.20), 0.10, above=False),
    ),
}


def _default_over_temperature() -> dict[str, ThresholdRule]:
    return {
        "battery": ThresholdRule("Powertrain.TractionBattery.Temperature.Max", (55.0, 60.0, 65.0), 3.0),
        "controller": ThresholdRule("Powertrain.ElectricMotor.ControllerTemperature", (85.0, 95.0, 105.0), 5.0),
        "motor": ThresholdRule("Powertrain.ElectricMotor.Temperature", (120.0, 140.0, 160.0), 5.0),
    }


def _default_rise() -> dict[str, RiseRule]:
    # Only the pack: motors legitimately heat by tenths of a degree per second under load; packs do not.
    return {"battery": RiseRule("Powertrain.TractionBattery.Temperature.Max", (0.1, 0.3, 1.0), 0.05, 10.0)}


@dataclass(frozen=True, slots=True)
class PrecheckConfig:
    enabled: bool = True
    chemistry: str = "nmc"
    debounce_s: float = 2.0
    clear_s: float = 5.0
    over_temperature: Mapping[str, ThresholdRule] = field(default_factory=_default_over_temperature)
    temperature_rise: Mapping[str, RiseRule] = field(default_factory=_default_rise)
    cell_overvoltage: ThresholdRule = CHEMISTRIES["nmc"][0]
    cell_undervoltage: ThresholdRule = CHEMISTRIES["nmc"][1]

    def rules(self) -> dict[str, ThresholdRule | RiseRule]:
        out: dict[str, ThresholdRule | RiseRule] = {}
        out.update({f"over_temperature.{k}": r for k, r in self.over_temperature.items()})
        out.update({f"temperature_rise.{k}": r for k, r in self.temperature_rise.items()})
        out["cell_overvoltage"] = self.cell_overvoltage
        out["cell_undervoltage"] = self.cell_undervoltage
        return out

    def validate(self, catalogue: Catalogue) -> None:
        for rule_id, rule in self.rules().items():
            if rule.signal not in catalogue:
                raise ConfigError(f"precheck {rule_id}: unknown signal {rule.signal!r} (not in the catalogue)")
            if catalogue.by_name(rule.signal).type not in (SignalType.FLOAT, SignalType.INT):
                raise ConfigError(f"precheck {rule_id}: signal {rule.signal!r} is not numeric")


class _Episode:
    """Debounce, escalation and hysteresis of one rule; fed a level (0..3) and whether the measure is clear."""

    __slots__ = ("_clear_ms", "_debounce_ms", "clear_since", "level", "pending_since")

    def __init__(self, debounce_ms: int, clear_ms: int) -> None:
        self._debounce_ms = debounce_ms
        self._clear_ms = clear_ms
        self.level = 0  # 0 while no episode is open
        self.pending_since: int | None = None
        self.clear_since: int | None = None

    def step(self, ts_ms: int, level: int, clear: bool) -> AlertState | None:
        if self.level == 0:
            if level == 0:
                self.pending_since = None
                return None
            if self.pending_since is None or ts_ms < self.pending_since:
                self.pending_since = ts_ms
            if ts_ms - self.pending_since < self._debounce_ms:
                return None
            self.level, self.pending_since, self.clear_since = level, None, None
            return AlertState.RAISED
        if level > self.level:
            self.level, self.clear_since = level, None
            return AlertState.ESCALATED
        if not clear:
            self.clear_since = None
            return None
        if self.clear_since is None or ts_ms < self.clear_since:
            self.clear_since = ts_ms
        if ts_ms - self.clear_since < self._clear_ms:
            return None
        self.clear_since = None
        return AlertState.CLEARED


def _level(levels: tuple[float, ...], measure: float, above: bool) -> int:
    if above:
        return sum(1 for t in levels if measure >= t)
    return sum(1 for t in levels if measure <= t)


class Precheck:
    def __init__(self, config: PrecheckConfig, catalogue: Catalogue) -> None:
        config.validate(catalogue)
        self.config = config
        debounce_ms, clear_ms = round(config.debounce_s * 1000), round(config.clear_s * 1000)
        self._rules = config.rules() if config.enabled else {}
        self._episodes = {rule_id: _Episode(debounce_ms, clear_ms) for rule_id in self._rules}
        # Bounded by age (window) and by count, whatever the sample rate.
        self._history: dict[str, deque[tuple[int, float]]] = {
            rule_id: deque(maxlen=2048) for rule_id, r in self._rules.items() if isinstance(r, RiseRule)
        }
        self.raised = 0
        self.cleared = 0

    @property
    def active(self) -> dict[str, int]:
        """Open episodes: rule id → level."""
        return {rule_id: ep.level for rule_id, ep in self._episodes.items() if ep.level}

    def update(self, ts_ms: int, values: Mapping[str, Value]) -> list[Alert]:
        """Check one raw sample; returns the alerts it raised, escalated or cleared (usually none)."""
        alerts: list[Alert] = []
        for rule_id, rule in self._rules.items():
            raw = values.get(rule.signal)
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
                continue  # not in this sample: the episode keeps its state until the signal reports again
            if isinstance(rule, RiseRule):
                rate = self._rate(rule_id, rule, ts_ms, float(raw))
                if rate is None:
                    continue
                measure, above = rate, True
            else:
                measure, above = float(raw), rule.above
            episode = self._episodes[rule_id]
            level = _level(rule.levels, measure, above)
            edge = rule.levels[0] - rule.hysteresis if above else rule.levels[0] + rule.hysteresis
            clear = measure < edge if above else measure > edge
            state = episode.step(ts_ms, level, clear)
            if state is None:
                continue
            peak = episode.level
            if state is AlertState.CLEARED:
                episode.level = 0
                self.cleared += 1
            elif state is AlertState.RAISED:
                self.raised += 1
            alert = Alert(rule_id, peak, state, ts_ms, measure, {rule.signal: raw})
            log.warning(
                "edge alert %s", state.value, extra={"rule": rule_id, "level": peak, "measure": measure, "ts_ms": ts_ms}
            )
            alerts.append(alert)
        return alerts

    def _rate(self, rule_id: str, rule: RiseRule, ts_ms: int, value: float) -> float | None:
        history = self._history[rule_id]
        if history and ts_ms < history[-1][0]:
            history.clear()  # the clock stepped back: a rate across the step would be meaningless
        history.append((ts_ms, value))
        window_ms = round(rule.window_s * 1000)
        while history and history[0][0] < ts_ms - window_ms:
            history.popleft()
        t0, v0 = history[0]
        # Half a window at least, so one noisy pair of readings a few ms apart cannot look like a runaway.
        if ts_ms - t0 < window_ms / 2:
            return None
        return (value - v0) / ((ts_ms - t0) / 1000)


def alert_rows(alerts: list[Alert]) -> list[tuple[int, dict[str, Value]]]:
    """The alerts of one sample as batch rows (firmware_specs/ALERTS.md): rule, level (0 = cleared) and the
    triggering readings. Rows are 1 ms apart so that each alert keeps its own (vin, ts) row in the cloud store."""
    rows: list[tuple[int, dict[str, Value]]] = []
    for i, a in enumerate(sorted(alerts, key=lambda a: (a.ts_ms, a.rule))):
        row: dict[str, Value] = {RULE_SIGNAL: a.rule, LEVEL_SIGNAL: 0 if a.state is AlertState.CLEARED else a.level}
        row.update(a.values)
        rows.append((a.ts_ms + i, row))
    return rows


# --- parsing the [precheck] table --------------------------------------------------------------------------------


def _number(table: dict[str, Any], key: str, where: str, default: float) -> float:
    value = table.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}.{key} must be a finite number >= 0, got {value!r}")
    return float(value)


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return dict(value)


def _levels(table: dict[str, Any], where: str, default: tuple[float, ...], above: bool) -> tuple[float, ...]:
    raw = table.pop("levels", list(default))
    if (
        not isinstance(raw, list)
        or not 1 <= len(raw) <= MAX_LEVEL
        or not all(not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) for v in raw)
    ):
        raise ConfigError(f"{where}.levels must be 1 to {MAX_LEVEL} numbers (the thresholds of levels 1, 2, 3)")
    levels = tuple(float(v) for v in raw)
    ordered = all((a < b) if above else (a > b) for a, b in itertools.pairwise(levels))
    if not ordered:
        raise ConfigError(f"{where}.levels must be strictly {'increasing' if above else 'decreasing'}")
    return levels


def _signal(table: dict[str, Any], where: str, default: str | None) -> str:
    value = table.pop("signal", default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.signal must be a catalogue signal name")
    return value


def _done(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"unknown keys in {where}: {sorted(table)}")


def _threshold(raw: object, where: str, default: ThresholdRule | None, above: bool) -> ThresholdRule:
    table = _table(raw, where)
    rule = ThresholdRule(
        signal=_signal(table, where, default.signal if default else None),
        levels=_levels(table, where, default.levels if default else (), above),
        hysteresis=_number(table, "hysteresis", where, default.hysteresis if default else 0.0),
        above=above,
    )
    _done(table, where)
    return rule


def _rise(raw: object, where: str) -> RiseRule:
    table = _table(raw, where)
    d = _default_rise()["battery"]
    rule = RiseRule(
        signal=_signal(table, where, None),
        levels=_levels(table, where, d.levels, True),
        hysteresis=_number(table, "hysteresis", where, d.hysteresis),
        window_s=_number(table, "window_s", where, d.window_s),
    )
    if rule.window_s <= 0:
        raise ConfigError(f"{where}.window_s must be positive")
    _done(table, where)
    return rule


def parse_precheck(raw: object, catalogue: Catalogue | None = None) -> PrecheckConfig:
    """Build a PrecheckConfig from the TOML `[precheck]` table; raises ConfigError (names checked if `catalogue`).

    A given `over_temperature` or `temperature_rise` table replaces the default rules of that kind entirely;
    cell thresholds not given come from the chemistry's preset."""
    table = _table(raw, "precheck")
    d = PrecheckConfig()
    enabled = table.pop("enabled", d.enabled)
    if not isinstance(enabled, bool):
        raise ConfigError("precheck.enabled must be true or false")
    chemistry = table.pop("chemistry", d.chemistry)
    if chemistry not in CHEMISTRIES:
        raise ConfigError(f"precheck.chemistry must be one of {sorted(CHEMISTRIES)}, got {chemistry!r}")
    over_v, under_v = CHEMISTRIES[chemistry]
    over_t = d.over_temperature
    if "over_temperature" in table:
        over_t = {
            name: _threshold(r, f"precheck.over_temperature.{name}", None, True)
            for name, r in _table(table.pop("over_temperature"), "precheck.over_temperature").items()
        }
    rise = d.temperature_rise
    if "temperature_rise" in table:
        rise = {
            name: _rise(r, f"precheck.temperature_rise.{name}")
            for name, r in _table(table.pop("temperature_rise"), "precheck.temperature_rise").items()
        }
    config = PrecheckConfig(
        enabled=enabled,
        chemistry=chemistry,
        debounce_s=_number(table, "debounce_s", "precheck", d.debounce_s),
        clear_s=_number(table, "clear_s", "precheck", d.clear_s),
        over_temperature=over_t,
        temperature_rise=rise,
        cell_overvoltage=_threshold(table.pop("cell_overvoltage", {}), "precheck.cell_overvoltage", over_v, True),
        cell_undervoltage=_threshold(table.pop("cell_undervoltage", {}), "precheck.cell_undervoltage", under_v, False),
    )
    _done(table, "precheck")
    if catalogue is not None:
        config.validate(catalogue)
    return config


__all__ = [
    "CHEMISTRIES",
    "LEVEL_SIGNAL",
    "RULE_SIGNAL",
    "Alert",
    "AlertState",
    "Precheck",
    "PrecheckConfig",
    "RiseRule",
    "ThresholdRule",
    "alert_rows",
    "parse_precheck",
]
