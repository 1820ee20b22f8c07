"""What the rules need to know about a vehicle that its telemetry does not carry.

The service fills a `VehicleContext` from the registry (model, approved battery, factory controller record, lock
state) and from the geofence index; the engine never looks anything up itself.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass, field

# Geofence kinds the rules ask about (the geofence index owns the full list).
ZONE_NO_CHARGING = "no_charging"

ZoneLookup = Callable[[float, float], Set[str]]


@dataclass(frozen=True, slots=True)
class ApprovedBattery:
    """The battery the vehicle was approved with, and the packs bound to its VIN."""

    barcodes: frozenset[str] = frozenset()
    capacity_ah: float | None = None
    cell_count: int | None = None
    manufactured_ms: int | None = None  # production date of the bound pack (unix ms)
    service_life_years: float | None = None  # as marked on the pack; None: the rule's per-chemistry default


@dataclass(frozen=True, slots=True)
class FactoryControllerConfig:
    """The controller configuration recorded at the factory (type approval)."""

    speed_limit_kmh: float | None = None
    wheel_inch: float | None = None


def _no_zones(lat: float, lon: float) -> Set[str]:
    return frozenset()


@dataclass(frozen=True, slots=True)
class VehicleContext:
    model: str | None = None  # e.g. "ebike48", "emoto72" (the rules file declares the known models)
    chemistry: str | None = None  # "NMC" | "LFP"
    battery: ApprovedBattery | None = None
    controller: FactoryControllerConfig | None = None
    locked: bool = False
    reporting_interval_s: float = 5.0
    zones_at: ZoneLookup = field(default=_no_zones)
