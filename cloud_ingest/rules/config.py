"""The rules file: thresholds, durations, hysteresis and levels per rule, overridable per model and chemistry.

Format (TOML; the default is `default_rules.toml` next to this module, docs/RULES.md explains every rule):

    version = 1
    models = ["ebike48", "emoto72"]          # the vehicle models overrides may name
    chemistries = ["NMC", "LFP"]

    [engine]
    max_gap_s = 30.0                         # see EngineSettings
    recent_max_age_s = 15.0

    [rules.<id>]
    enabled = true
    source = "standard clause or reasoning"
    levels = { l1 = 50.0, l2 = 55.0, l3 = 60.0 }   # threshold rules only; any subset of l1..l3
    clear = 45.0                                   # threshold rules only: the hysteresis side of L1
    duration_s = { l1 = 30.0, l2 = 10.0 }          # or one number for all levels; default 0
    clear_duration_s = 120.0                       # default 0
    update_step = 0.5                              # default 0
    [rules.<id>.params]                            # exactly the rule's parameters (fixed-level rules: *_level)
    [rules.<id>.model.<model>]                     # partial override, same keys except source
    [rules.<id>.chemistry.<chemistry>]             # partial override, applied after the model's

Everything is validated at load: an unknown rule, key, parameter, model or chemistry, a missing rule or parameter,
a wrong type, thresholds out of order or a clear threshold on the wrong side raise `RulesConfigError` naming the
place. Every (model, chemistry) combination is resolved and validated up front, so an override cannot break a
vehicle at run time.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cloud_ingest.rules.errors import RulesConfigError
from cloud_ingest.rules.names import CELL_PREFIX, numbered
from cloud_ingest.rules.registry import RULES
from cloud_ingest.rules.settings import EngineSettings, RuleSettings
from protocol.catalogue import Catalogue

RULES_FILE_VERSION = 1
_TOP_KEYS = frozenset({"version", "models", "chemistries", "engine", "rules"})
_ENGINE_KEYS = ("max_gap_s", "recent_max_age_s")
_OVERRIDE_KEYS = frozenset({"enabled", "levels", "clear", "duration_s", "clear_duration_s", "update_step", "params"})
_RULE_KEYS = _OVERRIDE_KEYS | {"source", "model", "chemistry"}
_LEVEL_KEYS = ("l1", "l2", "l3")

Combo = tuple[str | None, str | None]


@dataclass(frozen=True, slots=True)
class RulesConfig:
    engine: EngineSettings
    models: tuple[str, ...]
    chemistries: tuple[str, ...]
    resolved: Mapping[Combo, Mapping[str, RuleSettings]]
    document: Mapping[str, Any]  # the parsed file, for deriving variants (see `only`)

    def settings_for(self, model: str | None, chemistry: str | None) -> Mapping[str, RuleSettings]:
        """Every rule's settings for a vehicle; an undeclared model or chemistry gets the base values."""
        return self.resolved[self.combo(model, chemistry)]

    def combo(self, model: str | None, chemistry: str | None) -> Combo:
        return (model if model in self.models else None, chemistry if chemistry in self.chemistries else None)

    def only(self, *rule_ids: str) -> RulesConfig:
        """A copy with every other rule disabled (all overrides included): for focused tests and benchmarks."""
        unknown = set(rule_ids) - set(RULES)
        if unknown:
            raise RulesConfigError(f"unknown rules {sorted(unknown)}")
        doc = copy.deepcopy(dict(self.document))
        for rule_id, table in doc["rules"].items():
            keep = rule_id in rule_ids
            table["enabled"] = keep
            for section in ("model", "chemistry"):
                for override in table.get(section, {}).values():
                    if not keep:
                        override.pop("enabled", None)
        return rules_from_dict(doc)

    def check_signals(self, catalogue: Catalogue) -> None:
        """Every signal an enabled rule reads must exist in the catalogue."""
        enabled = {rid for settings in self.resolved.values() for rid, s in settings.items() if s.enabled}
        for rule_id in sorted(enabled):
            for name in RULES[rule_id].SIGNALS:
                if name not in catalogue:
                    raise RulesConfigError(
                        f"rule {rule_id!r} reads signal {name!r}, which the catalogue does not define"
                    )
        if "internal_short_suspected" in enabled and not numbered(catalogue, CELL_PREFIX):
            raise RulesConfigError("rule 'internal_short_suspected' needs per-cell voltage signals in the catalogue")


def default_rules_path() -> Path:
    return Path(str(resources.files("cloud_ingest.rules").joinpath("default_rules.toml")))


def load_rules(path: str | Path | None = None, catalogue: Catalogue | None = None) -> RulesConfig:
    """Load and validate a rules file (default: the packaged one); with a catalogue, check the signals too."""
    p = default_rules_path() if path is None else Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesConfigError(f"cannot read rules file {p}: {exc}") from None
    config = parse_rules(text)
    if catalogue is not None:
        config.check_signals(catalogue)
    return config


def parse_rules(text: str) -> RulesConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesConfigError(f"rules file is not valid TOML: {exc}") from None
    return rules_from_dict(doc)


def rules_from_dict(doc: Mapping[str, Any]) -> RulesConfig:
    """Validate a parsed rules document (the TOML as dicts) and resolve every (model, chemistry)."""
    _no_unknown(doc, _TOP_KEYS, "rules file")
    if doc.get("version") != RULES_FILE_VERSION:
        raise RulesConfigError(f"rules file version must be {RULES_FILE_VERSION}, got {doc.get('version')!r}")
    models = _names(doc.get("models", []), "models")
    chemistries = _names(doc.get("chemistries", []), "chemistries")
    engine = _engine(doc.get("engine"))
    rules = doc.get("rules")
    if not isinstance(rules, Mapping):
        raise RulesConfigError("rules file has no [rules] tables")
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise RulesConfigError(f"unknown rule(s) {unknown}; known: {sorted(RULES)}")
    missing = sorted(set(RULES) - set(rules))
    if missing:
        raise RulesConfigError(f"rules file lacks rule(s) {missing} (set enabled = false to turn one off)")
    for rule_id, table in rules.items():
        _check_rule_table(rule_id, table, models, chemistries)
    combos: list[Combo] = [(m, c) for m in (None, *models) for c in (None, *chemistries)]
    resolved: dict[Combo, dict[str, RuleSettings]] = {}
    for combo in combos:
        resolved[combo] = {rule_id: _resolve(rule_id, rules[rule_id], combo) for rule_id in RULES}
    return RulesConfig(engine, models, chemistries, resolved, copy.deepcopy(dict(doc)))


# -- validation -----------------------------------------------------------------------------------------------


def _no_unknown(table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    extra = sorted(set(table) - set(allowed))
    if extra:
        raise RulesConfigError(f"{where}: unknown key(s) {extra}")


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RulesConfigError(f"{where} must be a list of names")
    if len(set(value)) != len(value):
        raise RulesConfigError(f"{where} lists a name twice")
    return tuple(value)


def _number(value: Any, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RulesConfigError(f"{where} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise RulesConfigError(f"{where} must be >= {minimum}, got {value!r}")
    return float(value)


def _engine(table: Any) -> EngineSettings:
    if not isinstance(table, Mapping):
        raise RulesConfigError("rules file lacks the [engine] table")
    _no_unknown(table, _ENGINE_KEYS, "[engine]")
    values = {}
    for key in _ENGINE_KEYS:
        if key not in table:
            raise RulesConfigError(f"[engine] lacks {key}")
        values[key] = _number(table[key], f"engine.{key}")
        if values[key] <= 0:
            raise RulesConfigError(f"engine.{key} must be positive")
    return EngineSettings(
        max_gap_ms=round(values["max_gap_s"] * 1000), recent_max_age_ms=round(values["recent_max_age_s"] * 1000)
    )


def _check_rule_table(rule_id: str, table: Any, models: tuple[str, ...], chemistries: tuple[str, ...]) -> None:
    where = f"rules.{rule_id}"
    if not isinstance(table, Mapping):
        raise RulesConfigError(f"{where} must be a table")
    _no_unknown(table, _RULE_KEYS, where)
    for key in ("enabled", "source"):
        if key not in table:
            raise RulesConfigError(f"{where} lacks {key!r}")
    source = table["source"]
    if not isinstance(source, str) or not source.strip():
        raise RulesConfigError(f"{where}.source must be a non-empty text (standard clause or reasoning)")
    params = table.get("params", {})
    if not isinstance(params, Mapping):
        raise RulesConfigError(f"{where}.params must be a table")
    missing = sorted(set(RULES[rule_id].PARAMS) - set(params))
    if missing:
        raise RulesConfigError(f"{where}.params lacks {missing}")
    for section, declared in (("model", models), ("chemistry", chemistries)):
        overrides = table.get(section, {})
        if not isinstance(overrides, Mapping):
            raise RulesConfigError(f"{where}.{section} must be a table of overrides")
        for name, override in overrides.items():
            if name not in declared:
                raise RulesConfigError(
                    f"{where}.{section}.{name}: {section} {name!r} is not declared (known: {list(declared)})"
                )
            if not isinstance(override, Mapping):
                raise RulesConfigError(f"{where}.{section}.{name} must be a table")
            _no_unknown(override, _OVERRIDE_KEYS, f"{where}.{section}.{name}")


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _resolve(rule_id: str, table: Mapping[str, Any], combo: Combo) -> RuleSettings:
    model, chemistry = combo
    merged: dict[str, Any] = {k: v for k, v in table.items() if k not in ("model", "chemistry")}
    if model is not None:
        merged = _merge(merged, table.get("model", {}).get(model, {}))
    if chemistry is not None:
        merged = _merge(merged, table.get("chemistry", {}).get(chemistry, {}))
    where = f"rules.{rule_id}"
    if model is not None:
        where += f" (model {model})"
    if chemistry is not None:
        where += f" (chemistry {chemistry})"
    cls = RULES[rule_id]
    enabled = merged["enabled"]
    if not isinstance(enabled, bool):
        raise RulesConfigError(f"{where}.enabled must be true or false")
    params = _params(cls.PARAMS, merged.get("params", {}), where)
    if cls.DIRECTION is None:
        if "levels" in merged or "clear" in merged:
            raise RulesConfigError(f"{where}: a fixed-level rule takes its level(s) from params, not levels/clear")
        levels: tuple[float | None, float | None, float | None] = (None, None, None)
        clear = None
    else:
        levels, clear = _thresholds(merged, cls.DIRECTION, where)
    return RuleSettings(
        id=rule_id,
        enabled=enabled,
        source=merged["source"].strip(),
        levels=levels,
        clear=clear,
        duration_ms=_durations(merged.get("duration_s", 0.0), where),
        clear_duration_ms=round(_number(merged.get("clear_duration_s", 0.0), f"{where}.clear_duration_s", 0.0) * 1000),
        update_step=_number(merged.get("update_step", 0.0), f"{where}.update_step", 0.0),
        params=params,
    )


def _params(schema: Mapping[str, type], given: Any, where: str) -> dict[str, Any]:
    if not isinstance(given, Mapping):
        raise RulesConfigError(f"{where}.params must be a table")
    _no_unknown(given, schema, f"{where}.params")
    out: dict[str, Any] = {}
    for key, typ in schema.items():
        value = given.get(key)
        at = f"{where}.params.{key}"
        if typ is float:
            out[key] = _number(value, at)
        elif typ is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise RulesConfigError(f"{at} must be an integer, got {value!r}")
            if (key == "level" or key.endswith("_level")) and not 1 <= value <= 3:
                raise RulesConfigError(f"{at} must be a level 1..3, got {value!r}")
            out[key] = value
        elif typ is bool:
            if not isinstance(value, bool):
                raise RulesConfigError(f"{at} must be true or false")
            out[key] = value
        elif typ is str:
            if not isinstance(value, str) or not value:
                raise RulesConfigError(f"{at} must be a non-empty text")
            out[key] = value
        else:  # pragma: no cover - a rule declared a parameter type the file format cannot express
            raise RulesConfigError(f"{at}: unsupported parameter type {typ!r}")
    return out


def _thresholds(
    merged: Mapping[str, Any], direction: str, where: str
) -> tuple[tuple[float | None, float | None, float | None], float]:
    table = merged.get("levels")
    if not isinstance(table, Mapping) or not table:
        raise RulesConfigError(f"{where}.levels must be a table with at least one of {list(_LEVEL_KEYS)}")
    _no_unknown(table, _LEVEL_KEYS, f"{where}.levels")
    values = [None if key not in table else _number(table[key], f"{where}.levels.{key}") for key in _LEVEL_KEYS]
    present = [v for v in values if v is not None]
    ordered = sorted(present) if direction == "above" else sorted(present, reverse=True)
    if present != ordered:
        word = "rise" if direction == "above" else "fall"
        raise RulesConfigError(f"{where}.levels must {word} from l1 to l3 (this rule alarms {direction}), got {values}")
    if "clear" not in merged:
        raise RulesConfigError(f"{where} lacks 'clear' (the threshold an open alarm clears at)")
    clear = _number(merged["clear"], f"{where}.clear")
    if direction == "above" and not clear < present[0]:
        raise RulesConfigError(f"{where}.clear must lie below the lowest level ({present[0]}), got {clear}")
    if direction == "below" and not clear > present[0]:
        raise RulesConfigError(f"{where}.clear must lie above the highest level ({present[0]}), got {clear}")
    return (values[0], values[1], values[2]), clear


def _durations(value: Any, where: str) -> tuple[int, int, int]:
    if isinstance(value, Mapping):
        _no_unknown(value, _LEVEL_KEYS, f"{where}.duration_s")
        secs = [_number(value.get(key, 0.0), f"{where}.duration_s.{key}", 0.0) for key in _LEVEL_KEYS]
    else:
        secs = [_number(value, f"{where}.duration_s", 0.0)] * 3
    return round(secs[0] * 1000), round(secs[1] * 1000), round(secs[2] * 1000)
