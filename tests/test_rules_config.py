"""The rules file: everything is validated at load, with a message that names the place."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_ingest.rules import (
    RuleEngine,
    RulesConfigError,
    default_rules_path,
    load_rules,
    parse_rules,
    rules_from_dict,
)
from protocol.catalogue import Catalogue, parse_catalogue
from tests.test_rules_support import CATALOGUE

DEFAULT_DOC = tomllib.loads(default_rules_path().read_text(encoding="utf-8"))


def _doc() -> dict[str, Any]:
    return copy.deepcopy(DEFAULT_DOC)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return change


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]

    return change


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown rule", _set("rules.laser_sharks", {"enabled": True, "source": "x"}), "unknown rule(s) ['laser_sharks']"),
    ("missing rule", _delete("rules.soc_jump"), "lacks rule(s) ['soc_jump']"),
    ("unknown param", _set("rules.soc_jump.params.max_interval_min", 2.0), "rules.soc_jump.params: unknown key(s)"),
    ("missing param", _delete("rules.soc_jump.params.explain_factor"), "params lacks ['explain_factor']"),
    ("unknown key", _set("rules.soc_jump.severity", 3), "rules.soc_jump: unknown key(s) ['severity']"),
    ("param type", _set("rules.crash_or_fall.params.decel_ms2", "fast"), "rules.crash_or_fall.params.decel_ms2"),
    ("int param", _set("rules.speed_limiter_tampering.params.min_sats", 4.5), "min_sats must be an integer"),
    ("level param range", _set("rules.thermal_runaway.params.level", 4), "rules.thermal_runaway.params.level"),
    ("no source", _set("rules.soc_jump.source", " "), "rules.soc_jump.source"),
    ("enabled type", _set("rules.soc_jump.enabled", "yes"), "rules.soc_jump.enabled"),
    (
        "levels out of order",
        _set("rules.battery_over_temperature.levels", {"l1": 60.0, "l2": 55.0}),
        "rules.battery_over_temperature.levels must rise",
    ),
    (
        "below rule order",
        _set("rules.cell_under_voltage.levels", {"l1": 2.5, "l2": 2.8}),
        "rules.cell_under_voltage.levels must fall",
    ),
    ("clear on the wrong side", _set("rules.battery_over_temperature.clear", 52.0), "clear must lie below"),
    ("clear missing", _delete("rules.battery_over_temperature.clear"), "lacks 'clear'"),
    ("unknown level key", _set("rules.battery_over_temperature.levels.l4", 70.0), "levels: unknown key(s) ['l4']"),
    ("no levels", _set("rules.battery_over_temperature.levels", {}), "levels must be a table"),
    (
        "levels on a fixed-level rule",
        _set("rules.thermal_runaway.levels", {"l3": 1.0}),
        "fixed-level rule takes its level(s) from params",
    ),
    ("negative duration", _set("rules.soc_jump.duration_s", -1.0), "rules.soc_jump.duration_s must be >= 0"),
    ("undeclared model", _set("rules.soc_jump.model.ebike36", {"enabled": False}), "model 'ebike36' is not declared"),
    (
        "undeclared chemistry",
        _set("rules.soc_jump.chemistry.LCO", {"enabled": False}),
        "chemistry 'LCO' is not declared",
    ),
    (
        "override may not change the source",
        _set("rules.soc_jump.model.emoto72", {"source": "other"}),
        "rules.soc_jump.model.emoto72: unknown key(s) ['source']",
    ),
    (
        "an override that breaks the order is caught at load",
        _set("rules.battery_over_temperature.chemistry.LFP.levels", {"l1": 70.0}),
        "rules.battery_over_temperature (chemistry LFP).levels must rise",
    ),
    (
        "a model+chemistry combination is validated too",
        # Fine with the base (clear 25 km/h) but not with the e-motorcycle's override (clear 60 km/h).
        _set("rules.speed_limiter_tampering.chemistry.LFP", {"levels": {"l1": 27.0}}),
        "rules.speed_limiter_tampering (model emoto72) (chemistry LFP).clear must lie below",
    ),
    ("engine table", _delete("engine.max_gap_s"), "[engine] lacks max_gap_s"),
    ("engine value", _set("engine.recent_max_age_s", 0), "engine.recent_max_age_s must be positive"),
    ("version", _set("version", 2), "version must be 1"),
    ("models list", _set("models", "ebike48"), "models must be a list"),
]


@pytest.mark.parametrize(("change", "message"), [(c, m) for _, c, m in CASES], ids=[i for i, _, _ in CASES])
def test_invalid_rules_files_are_refused_with_a_clear_message(
    change: Callable[[dict[str, Any]], None], message: str
) -> None:
    doc = _doc()
    change(doc)
    with pytest.raises(RulesConfigError) as exc:
        rules_from_dict(doc)
    assert message in str(exc.value)


def test_default_rules_file_is_valid_and_ships_inside_the_package() -> None:
    path = default_rules_path()
    assert path.is_file()
    assert path.parent.name == "rules" and path.parent.parent.name == "cloud_ingest"
    cfg = load_rules(catalogue=CATALOGUE)
    assert set(cfg.models) == {"ebike48", "emoto72"}
    assert set(cfg.chemistries) == {"NMC", "LFP"}


def test_retuning_needs_no_code_change(tmp_path: Path) -> None:
    text = (
        default_rules_path()
        .read_text(encoding="utf-8")
        .replace("levels = { l1 = 50.0, l2 = 55.0, l3 = 60.0 }", "levels = { l1 = 48.0, l2 = 55.0, l3 = 60.0 }", 1)
    )
    (tmp_path / "rules.toml").write_text(text, encoding="utf-8")
    cfg = load_rules(tmp_path / "rules.toml")
    assert cfg.settings_for("ebike48", "NMC")["battery_over_temperature"].levels[0] == 48.0


def test_invalid_toml_and_missing_file() -> None:
    with pytest.raises(RulesConfigError, match="not valid TOML"):
        parse_rules("version = = 1")
    with pytest.raises(RulesConfigError, match="cannot read rules file"):
        load_rules("/nonexistent/rules.toml")


def _catalogue_without(name: str) -> Catalogue:
    text = Path(__file__).resolve().parents[1].joinpath("firmware_specs", "signals.toml").read_text(encoding="utf-8")
    blocks = text.split("[[signal]]")
    kept = [b for b in blocks if f'name = "{name}"\n' not in b]
    assert len(kept) == len(blocks) - 1
    return parse_catalogue("[[signal]]".join(kept))


def test_a_rule_reading_a_signal_the_catalogue_lacks_fails_the_start() -> None:
    cat = _catalogue_without("Powertrain.TractionBattery.StateOfHealth")
    expected = r"rule 'battery_ageing' reads signal 'Powertrain\.TractionBattery\.StateOfHealth'"
    with pytest.raises(RulesConfigError, match=expected):
        RuleEngine(load_rules(), cat)
    # Disabled, the rule no longer needs it.
    doc = _doc()
    doc["rules"]["battery_ageing"]["enabled"] = False
    RuleEngine(rules_from_dict(doc), cat)
