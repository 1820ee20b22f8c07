"""Hazard rule engine: e-bike-specific rules from a rules file, stateful per vehicle (sans-I/O).

engine = RuleEngine(load_rules(), catalogue)
events = engine.evaluate(vin, ctx, ts_ms, values)   # per sample, in time order
events += engine.tick(vin, ctx, now_ms)              # time-based rules (offline)
saved = engine.export_state(vin)                     # JSON-able; restore_state(vin, saved) after a restart
"""

from cloud_ingest.rules.config import RulesConfig, default_rules_path, load_rules, parse_rules, rules_from_dict
from cloud_ingest.rules.context import ApprovedBattery, FactoryControllerConfig, VehicleContext
from cloud_ingest.rules.engine import EngineStats, RuleEngine
from cloud_ingest.rules.errors import RulesConfigError, RuleStateError
from cloud_ingest.rules.events import AlarmEvent, EventKind, Level
from cloud_ingest.rules.registry import RULES
from cloud_ingest.rules.state import VehicleRuleState

__all__ = [
    "RULES",
    "AlarmEvent",
    "ApprovedBattery",
    "EngineStats",
    "EventKind",
    "FactoryControllerConfig",
    "Level",
    "RuleEngine",
    "RuleStateError",
    "RulesConfig",
    "RulesConfigError",
    "VehicleContext",
    "VehicleRuleState",
    "default_rules_path",
    "load_rules",
    "parse_rules",
    "rules_from_dict",
]
