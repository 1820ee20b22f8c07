"""Helpers shared by the rule tests (tests/test_rules_*.py): a healthy e-bike sample, its context, a feeder.

Thresholds and durations are never copied into the tests: they are read from the loaded rules file, so a test
checks that the engine does what the file says (and a retune does not break the suite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cloud_ingest.rules import (
    AlarmEvent,
    ApprovedBattery,
    EventKind,
    FactoryControllerConfig,
    RuleEngine,
    RulesConfig,
    VehicleContext,
    load_rules,
)
from cloud_ingest.rules import names as n
from cloud_ingest.rules.settings import RuleSettings
from protocol import load_catalogue
from protocol.catalogue import Value

CATALOGUE = load_catalogue()
RULES = load_rules()
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
VIN = "LZHTEST0000000001"
BARCODE = "ZL48V24AH-000001"
CELLS = 13
HOME = (29.5630, 106.5516)  # Chongqing, Yuzhong


def cell(k: int) -> str:
    return f"{n.CELL_PREFIX}{k}"


def probe(k: int) -> str:
    return f"{n.PROBE_PREFIX}{k}"


def healthy(**changes: Value) -> dict[str, Value]:
    """A parked, healthy 13S NMC e-bike with a good fix: every rule is quiet on it."""
    v: dict[str, Value] = {
        n.LAT: HOME[0],
        n.LON: HOME[1],
        n.ALT: 250.0,
        n.GNSS_SPEED: 0.0,
        n.FIX_MODE: 3,
        n.HDOP: 0.9,
        n.SATS: 14,
        n.WHEEL_SPEED: 0.0,
        n.SUPPLY_CURRENT: 0.3,
        n.THROTTLE: 0,
        n.SPEED_LIMIT: 25.0,
        n.WHEEL_SIZE: 16.0,
        n.SOC: 60.0,
        n.SOH: 95.0,
        n.PACK_V: 50.05,
        n.PACK_I: -0.3,
        n.TEMP_MAX: 25.0,
        n.TEMP_MIN: 24.2,
        probe(1): 25.0,
        probe(2): 24.2,
        n.CELL_V_MAX: 3.85,
        n.CELL_V_MIN: 3.85,
        n.NOMINAL_CAPACITY: 24.0,
        n.PROTECTION: 0,
        n.CELL_COUNT: CELLS,
        n.BARCODE: BARCODE,
    }
    for k in range(1, CELLS + 1):
        v[cell(k)] = 3.85
    v.update(changes)
    return v


def set_cells(v: dict[str, Value], volts: list[float]) -> dict[str, Value]:
    """Per-cell voltages plus the BMS's Max/Min/pack voltage consistent with them."""
    for k, x in enumerate(volts, 1):
        v[cell(k)] = x
    v[n.CELL_V_MAX] = max(volts)
    v[n.CELL_V_MIN] = min(volts)
    v[n.PACK_V] = round(sum(volts), 3)
    return v


def context(**changes: Any) -> VehicleContext:
    base: dict[str, Any] = {
        "model": "ebike48",
        "chemistry": "NMC",
        "battery": ApprovedBattery(frozenset({BARCODE}), capacity_ah=24.0, cell_count=CELLS),
        "controller": FactoryControllerConfig(speed_limit_kmh=25.0, wheel_inch=16.0),
        "reporting_interval_s": 5.0,
    }
    base.update(changes)
    return VehicleContext(**base)


def engine(*only: str, config: RulesConfig | None = None) -> RuleEngine:
    cfg = config or RULES
    return RuleEngine(cfg.only(*only) if only else cfg, CATALOGUE)


def settings(rule_id: str, ctx: VehicleContext | None = None, config: RulesConfig | None = None) -> RuleSettings:
    ctx = ctx or context()
    return (config or RULES).settings_for(ctx.model, ctx.chemistry)[rule_id]


class Feeder:
    """Feeds one vehicle's samples to an engine on a clock in seconds since T0 and keeps every event."""

    def __init__(self, eng: RuleEngine, ctx: VehicleContext | None = None, vin: str = VIN) -> None:
        self.eng = eng
        self.ctx = ctx or context()
        self.vin = vin
        self.t = 0.0  # seconds since T0 of the next sample
        self.events: list[AlarmEvent] = []

    def ms(self, t: float) -> int:
        return T0_MS + round(t * 1000)

    def run(self, seconds: float, make: Callable[[float], dict[str, Value]], step_s: float = 1.0) -> list[AlarmEvent]:
        """Samples every `step_s` for `seconds`; `make(t)` builds the values at time t. Returns the new events."""
        new: list[AlarmEvent] = []
        end = self.t + seconds
        while self.t < end - 1e-9:
            new += self.eng.evaluate(self.vin, self.ctx, self.ms(self.t), make(self.t))
            self.t = round(self.t + step_s, 6)
        self.events += new
        return new

    def until(
        self, make: Callable[[float], dict[str, Value]], stop: Callable[[AlarmEvent], bool], limit_s: float
    ) -> AlarmEvent | None:
        """Sample at 1 Hz until an event matches `stop` (returned) or `limit_s` passed (None)."""
        end = self.t + limit_s
        while self.t <= end:
            for e in self.run(1.0, make):
                if stop(e):
                    return e
        return None

    def tick(self, t: float) -> list[AlarmEvent]:
        new = self.eng.tick(self.vin, self.ctx, self.ms(t))
        self.events += new
        return new

    def secs(self, event: AlarmEvent) -> float:
        return (event.ts_ms - T0_MS) / 1000


def kinds(events: Iterable[AlarmEvent]) -> list[tuple[str, int]]:
    return [(e.kind.value, int(e.level)) for e in events]


def of_kind(events: Iterable[AlarmEvent], kind: EventKind) -> list[AlarmEvent]:
    return [e for e in events if e.kind is kind]
