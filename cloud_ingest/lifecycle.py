"""Vehicle and battery life cycles: explicit state machines, moved by telemetry and by operators (docs/LIFECYCLE.md).

Three layers:

- The machines (`VEHICLE`, `BATTERY`): transition tables mapping (from, to) to who may trigger the transition
  (telemetry, the operator API, or both). `Machine.check` is the one place that decides legality; an illegal
  transition raises `IllegalTransition`, naming from, to and the legal next states (the API's 409).
- `TelemetryTracker.step`: sans-I/O. Given a vehicle's persisted track, the battery tracks it may touch and one
  stored batch, it derives what telemetry implies — first activation, the parked/riding/charging sub-state (with
  hysteresis and dwell times, so a red light does not park a rider), battery swaps from a changed barcode, SOH,
  cycle and service-life thresholds, distance (no odometer signal exists: speed is integrated) and maintenance due —
  and returns the changes to record.
- `LifecycleService`: persistence. It is a `SampleObserver` of the ingest pipeline (its writes commit in the
  ledger's transaction, so a batch moves the machines exactly once) and serves the operator transitions.

Per-vehicle state lives only in the database (`vehicle_lifecycle`, `batteries`), read under a row lock at every
batch: several ingest workers may run, and a ledger transaction retried after a lock conflict re-derives everything
from what committed. History is `lifecycle_events`, one row per change, in the order the machines went through them.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from cloud_ingest import sqltext
from cloud_ingest.db import SQLITE_BEGIN_OPTION, Base, Device
from cloud_ingest.errors import IngestError, StorageError
from protocol import Batch, Catalogue

log = logging.getLogger("zhilian.lifecycle")

# Catalogue signals the tracker reads (checked against the catalogue when a tracker is built).
GNSS_SPEED = "CurrentLocation.GNSSReceiver.GroundSpeed"
WHEEL_SPEED = "Speed"
PACK_CURRENT = "Powertrain.TractionBattery.CurrentCurrent"  # positive = into the battery (charging)
SOH = "Powertrain.TractionBattery.StateOfHealth"
CYCLES = "Powertrain.TractionBattery.CycleCount"
BARCODE = "Powertrain.TractionBattery.Barcode"
SIGNALS: Final = (GNSS_SPEED, WHEEL_SPEED, PACK_CURRENT, SOH, CYCLES, BARCODE)

# A barcode is what the API can address as a path segment: 1-64 printable ASCII characters, no "/" and no space.
BARCODE_RE: Final = re.compile(r"^[!-.0-~]{1,64}$")
MAX_NOTE = 500
MAX_ACTOR = 100
MAX_HISTORY = 10_000
_MS_PER_YEAR = 365.25 * 86_400_000
# PostgreSQL aborts one of two transactions that wait on each other; the loser is retried as a whole.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_MAX_ATTEMPTS = 5


# --- vocabulary ----------------------------------------------------------------------------------------------


class EntityKind(enum.StrEnum):
    VEHICLE = "vehicle"
    BATTERY = "battery"


class Source(enum.StrEnum):
    TELEMETRY = "telemetry"
    API = "api"


class VehicleState(enum.StrEnum):
    MANUFACTURED = "manufactured"
    SOLD = "sold"
    REGISTERED = "registered"
    ACTIVE = "active"
    LOCKED = "locked"
    STOLEN = "stolen"
    IN_REPAIR = "in_repair"
    TRANSFERRED = "transferred"
    EXPIRED = "expired"
    TRADE_IN = "trade_in"
    DEREGISTERED = "deregistered"
    SCRAPPED = "scrapped"


class Activity(enum.StrEnum):
    """Sub-state of an ACTIVE vehicle, derived from telemetry only."""

    PARKED = "parked"
    RIDING = "riding"
    CHARGING = "charging"


class BatteryState(enum.StrEnum):
    MANUFACTURED = "manufactured"
    PAIRED = "paired"
    IN_SERVICE = "in_service"
    WARNING = "warning"
    QUARANTINED = "quarantined"
    INSPECTED = "inspected"
    RETIRED = "retired"
    RECYCLED = "recycled"
    LOST = "lost"


class Chemistry(enum.StrEnum):
    NMC = "NMC"
    NCA = "NCA"
    LMO = "LMO"
    LFP = "LFP"
    LTO = "LTO"
    LEAD_ACID = "lead_acid"


class EventKind(enum.StrEnum):
    TRANSITION = "transition"  # a state of the machine changed
    ACTIVITY = "activity"  # parked / riding / charging changed (vehicle, ACTIVE only)
    PAIRED = "paired"  # a battery was bound to a vehicle; `related` names the other side
    UNPAIRED = "unpaired"  # a battery left a vehicle (swap, retirement, moved to another vehicle)
    MAINTENANCE_DUE = "maintenance_due"  # the distance since the last service reached the interval


_API: Final = frozenset({Source.API})
_BOTH: Final = frozenset({Source.API, Source.TELEMETRY})
V = VehicleState
B = BatteryState

# (from, to) -> who may trigger it. Everything not listed is illegal, self-transitions included.
VEHICLE_TRANSITIONS: Final[Mapping[tuple[VehicleState, VehicleState], frozenset[Source]]] = MappingProxyType(
    {
        (V.MANUFACTURED, V.SOLD): _API,
        (V.SOLD, V.REGISTERED): _API,
        (V.REGISTERED, V.ACTIVE): _BOTH,  # telemetry: the first sample of a registered vehicle
        (V.REGISTERED, V.TRANSFERRED): _API,
        (V.ACTIVE, V.LOCKED): _API,
        (V.ACTIVE, V.STOLEN): _API,
        (V.ACTIVE, V.IN_REPAIR): _API,
        (V.ACTIVE, V.TRANSFERRED): _API,
        (V.ACTIVE, V.EXPIRED): _API,
        (V.ACTIVE, V.TRADE_IN): _API,
        (V.LOCKED, V.ACTIVE): _API,
        (V.LOCKED, V.STOLEN): _API,
        (V.LOCKED, V.IN_REPAIR): _API,
        (V.STOLEN, V.ACTIVE): _API,  # recovered
        (V.STOLEN, V.DEREGISTERED): _API,  # written off
        (V.IN_REPAIR, V.ACTIVE): _API,  # serviced: the maintenance interval starts again
        (V.IN_REPAIR, V.TRADE_IN): _API,  # not worth repairing
        (V.TRANSFERRED, V.REGISTERED): _API,  # registered to the new owner
        (V.EXPIRED, V.REGISTERED): _API,  # renewed
        (V.EXPIRED, V.TRADE_IN): _API,
        (V.EXPIRED, V.DEREGISTERED): _API,
        (V.TRADE_IN, V.DEREGISTERED): _API,
        (V.DEREGISTERED, V.SCRAPPED): _API,
    }
)

BATTERY_TRANSITIONS: Final[Mapping[tuple[BatteryState, BatteryState], frozenset[Source]]] = MappingProxyType(
    {
        (B.MANUFACTURED, B.PAIRED): _BOTH,  # telemetry: its barcode reported by a vehicle; API: bound to a VIN
        (B.MANUFACTURED, B.LOST): _API,
        (B.PAIRED, B.IN_SERVICE): _BOTH,  # telemetry: the first current through it
        (B.PAIRED, B.QUARANTINED): _API,
        (B.PAIRED, B.LOST): _API,
        (B.IN_SERVICE, B.WARNING): _BOTH,  # telemetry: SOH <= 80 % or rated cycle life reached
        (B.IN_SERVICE, B.QUARANTINED): _BOTH,  # telemetry: SOH <= 70 % or past its service life
        (B.IN_SERVICE, B.LOST): _API,
        (B.WARNING, B.IN_SERVICE): _API,  # an operator decides the warning is resolved
        (B.WARNING, B.QUARANTINED): _BOTH,
        (B.WARNING, B.LOST): _API,
        (B.QUARANTINED, B.INSPECTED): _API,
        (B.QUARANTINED, B.LOST): _API,
        (B.INSPECTED, B.IN_SERVICE): _API,  # passed
        (B.INSPECTED, B.RETIRED): _API,  # failed
        (B.RETIRED, B.RECYCLED): _API,
        (B.LOST, B.QUARANTINED): _API,  # found: inspected before any further use
    }
)

# A battery in these states is no longer in a vehicle: the transition releases its binding.
_UNBINDING: Final = frozenset({B.RETIRED, B.RECYCLED, B.LOST})

S = TypeVar("S", VehicleState, BatteryState)


# --- errors --------------------------------------------------------------------------------------------------


class LifecycleError(IngestError):
    """Base of the life-cycle errors."""


class IllegalTransition(LifecycleError):
    """A transition the machine does not allow (from this source): the API answers 409 with these fields."""

    def __init__(self, entity: EntityKind, from_state: str, to_state: str, allowed: list[str], why: str) -> None:
        legal = ", ".join(allowed) if allowed else "none"
        super().__init__(
            f"illegal {entity.value} transition {from_state} -> {to_state}: {why}; "
            f"legal next states from {from_state}: {legal}"
        )
        self.entity = entity
        self.from_state = from_state
        self.to_state = to_state
        self.allowed = allowed


class UnknownVehicleError(LifecycleError):
    """No device is registered under this VIN."""


class UnknownBatteryError(LifecycleError):
    """No battery is known under this barcode."""


class InvalidLifecycleRequest(LifecycleError):
    """A request that is well-formed but cannot be carried out as asked (the API's 422)."""


class BatteryConflict(LifecycleError):
    """A battery is already registered with different data."""


# --- machines ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine(Generic[S]):
    entity: EntityKind
    initial: S
    transitions: Mapping[tuple[S, S], frozenset[Source]]

    def next_states(self, state: S, source: Source) -> list[S]:
        return sorted((to for (frm, to), who in self.transitions.items() if frm == state and source in who), key=_order)

    def allows(self, from_state: S, to_state: S, source: Source) -> bool:
        return source in self.transitions.get((from_state, to_state), frozenset())

    def check(self, from_state: S, to_state: S, source: Source) -> None:
        if self.allows(from_state, to_state, source):
            return
        who = self.transitions.get((from_state, to_state))
        if from_state == to_state:
            why = f"the {self.entity.value} is already {to_state.value}"
        elif who:
            why = "only " + " or ".join(sorted(s.value for s in who)) + " may trigger it"
        else:
            why = "the life cycle has no such step"
        allowed = [s.value for s in self.next_states(from_state, source)]
        raise IllegalTransition(self.entity, from_state.value, to_state.value, allowed, why)


def _order(state: VehicleState | BatteryState) -> int:
    return list(type(state)).index(state)


VEHICLE: Final = Machine(EntityKind.VEHICLE, VehicleState.MANUFACTURED, VEHICLE_TRANSITIONS)
BATTERY: Final = Machine(EntityKind.BATTERY, BatteryState.MANUFACTURED, BATTERY_TRANSITIONS)


# --- settings ------------------------------------------------------------------------------------------------


def _default_rated_cycles() -> Mapping[str, int]:
    # Design cycle life to 80 % capacity, typical datasheet values per chemistry; a registered battery's own
    # `rated_cycles` wins.
    return MappingProxyType({"NMC": 1000, "NCA": 800, "LMO": 800, "LFP": 2000, "LTO": 5000, "lead_acid": 400})


@dataclass(frozen=True, slots=True)
class LifecycleSettings:
    # Sub-state hysteresis: a rider is riding from ride_on_kmh until below ride_off_kmh; a pack is charging from
    # charge_on_a (into the pack) until below charge_off_a. A candidate sub-state must hold for its dwell time.
    ride_on_kmh: float = 5.0
    ride_off_kmh: float = 2.0
    charge_on_a: float = 0.5
    charge_off_a: float = 0.2
    riding_dwell_s: float = 10.0
    charging_dwell_s: float = 30.0
    parked_dwell_s: float = 120.0  # longer than a red light
    # Battery health.
    in_service_current_a: float = 0.5
    soh_warning_pct: float = 80.0
    soh_quarantine_pct: float = 70.0
    rated_cycles: Mapping[str, int] = field(default_factory=_default_rated_cycles)
    fallback_rated_cycles: int = 1000
    # Distance: speed integrated between samples at most odometer_max_gap_s apart; GNSS jitter at rest below
    # odometer_min_kmh counts as standing still.
    service_interval_km: float = 3000.0
    odometer_max_gap_s: float = 30.0
    odometer_min_kmh: float = 1.0

    def dwell_ms(self, activity: Activity) -> float:
        seconds = {
            Activity.RIDING: self.riding_dwell_s,
            Activity.CHARGING: self.charging_dwell_s,
            Activity.PARKED: self.parked_dwell_s,
        }[activity]
        return seconds * 1000.0


# --- sans-I/O tracker ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class VehicleTrack:
    """What the tracker needs to remember about a vehicle between batches (one `vehicle_lifecycle` row)."""

    vin: str
    state: VehicleState = VehicleState.MANUFACTURED
    since_ms: int = 0
    activity: Activity | None = None
    activity_since_ms: int | None = None
    pending: Activity | None = None  # a sub-state seen but not yet held for its dwell time
    pending_since_ms: int | None = None
    battery: str | None = None  # barcode of the pack in the vehicle
    odometer_m: float = 0.0
    next_service_m: float = 0.0
    maintenance_due: bool = False
    last_ts_ms: int | None = None  # newest sample processed; older ones are not replayed into the machines
    speed_ts_ms: int | None = None
    speed_kmh: float | None = None
    current_a: float | None = None


@dataclass(slots=True)
class BatteryTrack:
    barcode: str
    state: BatteryState = BatteryState.MANUFACTURED
    since_ms: int = 0
    vin: str | None = None
    soh_pct: float | None = None  # the last report
    soh_confirmed_pct: float | None = None  # the higher of the last two reports: what the thresholds judge
    cycles: int | None = None
    chemistry: str | None = None
    rated_cycles: int | None = None
    manufactured_ms: int | None = None
    service_life_years: float | None = None

    def expires_ms(self) -> int | None:
        if self.manufactured_ms is None or self.service_life_years is None:
            return None
        return self.manufactured_ms + int(self.service_life_years * _MS_PER_YEAR)


@dataclass(frozen=True, slots=True)
class Change:
    entity: EntityKind
    entity_id: str
    event: EventKind
    from_state: str | None
    to_state: str
    ts_ms: int
    note: str | None = None
    related: str | None = None

    @classmethod
    def mark(
        cls,
        entity: EntityKind,
        entity_id: str,
        event: EventKind,
        state: str,
        ts_ms: int,
        note: str | None,
        related: str | None,
    ) -> Change:
        """An event that leaves the entity's state as it is (pairing, maintenance due)."""
        return cls(entity, entity_id, event, state, state, ts_ms, note, related)


@dataclass(slots=True)
class StepOutcome:
    changes: list[Change] = field(default_factory=list)
    batteries: dict[str, BatteryTrack] = field(default_factory=dict)  # created or changed, by barcode
    released: list[tuple[str, str]] = field(default_factory=list)  # (other vin, barcode) moved into this vehicle
    skipped_rows: int = 0  # samples older than the newest already processed


def clean_barcode(value: object) -> str | None:
    """A reported barcode the life cycle can key a battery by, or None (blank, too long, unprintable)."""
    if not isinstance(value, str):
        return None
    code = value.strip()
    return code if BARCODE_RE.match(code) else None


class TelemetryTracker:
    """Derives life-cycle changes from one vehicle's batches (pure: no clock, no I/O)."""

    def __init__(self, settings: LifecycleSettings | None = None, catalogue: Catalogue | None = None) -> None:
        self.settings = settings if settings is not None else LifecycleSettings()
        if catalogue is not None:
            missing = [name for name in SIGNALS if name not in catalogue]
            if missing:
                raise LifecycleError(f"the catalogue lacks signals the life cycle reads: {', '.join(missing)}")

    def barcodes_in(self, batch: Batch) -> set[str]:
        found: set[str] = set()
        for value in batch.columns.get(BARCODE, ()):
            code = clean_barcode(value)
            if code is not None:
                found.add(code)
        return found

    def step(self, vehicle: VehicleTrack, batteries: dict[str, BatteryTrack], batch: Batch) -> StepOutcome:
        """Apply `batch` to `vehicle` (mutated) and the packs in `batteries` (the bound one and every barcode in
        the batch that is known; unknown ones are created). Returns the changes to record."""
        out = StepOutcome()
        cols = batch.columns
        ts = batch.timestamps
        n = len(ts)
        gnss = cols.get(GNSS_SPEED) or [None] * n
        wheel = cols.get(WHEEL_SPEED) or [None] * n
        current = cols.get(PACK_CURRENT) or [None] * n
        soh = cols.get(SOH) or [None] * n
        cycles = cols.get(CYCLES) or [None] * n
        codes = cols.get(BARCODE) or [None] * n
        for i in sorted(range(n), key=ts.__getitem__):
            t = ts[i]
            if vehicle.last_ts_ms is not None and t < vehicle.last_ts_ms:
                out.skipped_rows += 1
                continue
            code = clean_barcode(codes[i])
            if code is not None and code != vehicle.battery:
                self._swap(vehicle, batteries, code, t, out)
            speed = _number(gnss[i])
            if speed is None:
                speed = _number(wheel[i])
            amps = _number(current[i])
            if speed is not None:
                self._odometer(vehicle, t, speed)
            if amps is not None:
                vehicle.current_a = amps
            vehicle.last_ts_ms = t
            if vehicle.state is VehicleState.REGISTERED:
                self._vehicle_transition(vehicle, VehicleState.ACTIVE, t, out, "first telemetry")
            if vehicle.state is VehicleState.ACTIVE:
                self._activity(vehicle, t, out)
            pack = batteries.get(vehicle.battery) if vehicle.battery is not None else None
            if pack is not None:
                self._battery_sample(pack, t, amps, _number(soh[i]), cycles[i], out)
            self._maintenance(vehicle, t, out)
        return out

    # -- steps ------------------------------------------------------------------------------------------------

    def _maintenance(self, v: VehicleTrack, t: int, out: StepOutcome) -> None:
        if v.maintenance_due or v.next_service_m <= 0 or v.odometer_m < v.next_service_m:
            return
        v.maintenance_due = True
        note = f"odometer {v.odometer_m / 1000:.1f} km reached the service due at {v.next_service_m / 1000:.1f} km"
        out.changes.append(Change(EntityKind.VEHICLE, v.vin, EventKind.MAINTENANCE_DUE, v.state, v.state, t, note))

    def _odometer(self, v: VehicleTrack, t: int, speed: float) -> None:
        s = self.settings
        if speed < s.odometer_min_kmh:
            speed = 0.0
        if v.speed_ts_ms is not None and v.speed_kmh is not None:
            dt_ms = t - v.speed_ts_ms
            if 0 < dt_ms <= s.odometer_max_gap_s * 1000:
                v.odometer_m += (v.speed_kmh + speed) / 2.0 / 3.6 * dt_ms / 1000.0
        v.speed_ts_ms = t
        v.speed_kmh = speed

    def _classify(self, v: VehicleTrack) -> Activity:
        s = self.settings
        ride = s.ride_off_kmh if v.activity is Activity.RIDING else s.ride_on_kmh
        if v.speed_kmh is not None and v.speed_kmh >= ride:
            return Activity.RIDING  # before charging: regenerative braking pushes current into the pack
        charge = s.charge_off_a if v.activity is Activity.CHARGING else s.charge_on_a
        if v.current_a is not None and v.current_a >= charge:
            return Activity.CHARGING
        return Activity.PARKED

    def _activity(self, v: VehicleTrack, t: int, out: StepOutcome) -> None:
        seen = self._classify(v)
        if seen is v.activity:
            v.pending = v.pending_since_ms = None
            return
        if v.pending is not seen or v.pending_since_ms is None:
            v.pending, v.pending_since_ms = seen, t
        since = v.pending_since_ms
        if t - since >= self.settings.dwell_ms(seen):
            # Dated when the new sub-state began, not when its dwell time confirmed it.
            held = f"held {(t - since) / 1000:g} s"
            out.changes.append(Change(EntityKind.VEHICLE, v.vin, EventKind.ACTIVITY, v.activity, seen, since, held))
            v.activity, v.activity_since_ms = seen, since
            v.pending = v.pending_since_ms = None

    def _vehicle_transition(self, v: VehicleTrack, to: VehicleState, t: int, out: StepOutcome, note: str) -> None:
        VEHICLE.check(v.state, to, Source.TELEMETRY)
        out.changes.append(Change(EntityKind.VEHICLE, v.vin, EventKind.TRANSITION, v.state, to, t, note))
        v.state, v.since_ms = to, t
        if to is VehicleState.ACTIVE:
            v.activity, v.activity_since_ms = Activity.PARKED, t
            v.pending = v.pending_since_ms = None

    def _swap(self, v: VehicleTrack, batteries: dict[str, BatteryTrack], code: str, t: int, out: StepOutcome) -> None:
        old = v.battery
        if old is not None:
            previous = batteries.get(old)
            if previous is not None and previous.vin == v.vin:
                previous.vin = None
                out.batteries[old] = previous
                note = f"replaced by {code} in {v.vin}"
                out.changes.append(
                    Change.mark(EntityKind.BATTERY, old, EventKind.UNPAIRED, previous.state, t, note, v.vin)
                )
        pack = batteries.get(code)
        if pack is None:
            pack = batteries[code] = BatteryTrack(code, BatteryState.MANUFACTURED, t)
            note = f"unregistered battery first reported by {v.vin}"
            out.changes.append(Change(EntityKind.BATTERY, code, EventKind.TRANSITION, None, pack.state, t, note, v.vin))
        if pack.vin is not None and pack.vin != v.vin:
            out.released.append((pack.vin, code))
        pack.vin = v.vin
        out.batteries[code] = pack
        v.battery = code
        note = f"replaces {old}" if old is not None else "first battery reported"
        out.changes.append(Change.mark(EntityKind.VEHICLE, v.vin, EventKind.PAIRED, v.state, t, note, code))
        if pack.state is BatteryState.MANUFACTURED:
            self._battery_transition(pack, BatteryState.PAIRED, t, out, f"reported by {v.vin}", v.vin)
        else:
            note = f"reported by {v.vin}"
            if pack.state in _UNBINDING:
                note += f"; a {pack.state.value} battery is back in use"
            out.changes.append(Change.mark(EntityKind.BATTERY, code, EventKind.PAIRED, pack.state, t, note, v.vin))

    def _battery_transition(
        self, b: BatteryTrack, to: BatteryState, t: int, out: StepOutcome, note: str, related: str | None = None
    ) -> None:
        BATTERY.check(b.state, to, Source.TELEMETRY)
        out.changes.append(Change(EntityKind.BATTERY, b.barcode, EventKind.TRANSITION, b.state, to, t, note, related))
        b.state, b.since_ms = to, t
        out.batteries[b.barcode] = b

    def _battery_sample(
        self, b: BatteryTrack, t: int, amps: float | None, soh: float | None, cycles: object, out: StepOutcome
    ) -> None:
        if soh is not None:
            # A threshold counts once two consecutive reports are past it: a BMS re-estimating its SOH can report
            # one odd value, and leaving WARNING takes an operator.
            confirmed = None if b.soh_pct is None else max(b.soh_pct, soh)
            if (soh, confirmed) != (b.soh_pct, b.soh_confirmed_pct):
                b.soh_pct, b.soh_confirmed_pct = soh, confirmed
                out.batteries[b.barcode] = b
        if isinstance(cycles, int) and not isinstance(cycles, bool) and cycles != b.cycles:
            b.cycles = cycles
            out.batteries[b.barcode] = b
        if b.state is BatteryState.PAIRED and amps is not None and abs(amps) >= self.settings.in_service_current_a:
            self._battery_transition(b, BatteryState.IN_SERVICE, t, out, f"first current {amps:.1f} A", b.vin)
        if b.state in (BatteryState.IN_SERVICE, BatteryState.WARNING):
            target, reasons = self.health(b, t)
            if target is not b.state and BATTERY.allows(b.state, target, Source.TELEMETRY):
                self._battery_transition(b, target, t, out, "; ".join(reasons), b.vin)

    def health(self, b: BatteryTrack, t: int) -> tuple[BatteryState, list[str]]:
        """The state a pack's health calls for at time `t`, with the reasons (IN_SERVICE: none)."""
        s = self.settings
        quarantine: list[str] = []
        warning: list[str] = []
        soh = b.soh_confirmed_pct
        if soh is not None and soh <= s.soh_quarantine_pct:
            quarantine.append(f"SOH {soh:g} % <= {s.soh_quarantine_pct:g} %")
        expires = b.expires_ms()
        if expires is not None and t >= expires:
            quarantine.append(f"service life ended {datetime.fromtimestamp(expires / 1000, UTC).date().isoformat()}")
        if quarantine:
            return BatteryState.QUARANTINED, quarantine
        if soh is not None and soh <= s.soh_warning_pct:
            warning.append(f"SOH {soh:g} % <= {s.soh_warning_pct:g} %")
        rated = b.rated_cycles or s.rated_cycles.get(b.chemistry or "", s.fallback_rated_cycles)
        if b.cycles is not None and b.cycles >= rated:
            warning.append(f"{b.cycles} cycles >= rated {rated}")
        if warning:
            return BatteryState.WARNING, warning
        # Leaving WARNING is an operator's call (the transition is API-only): telemetry keeps what it has.
        return b.state, []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


# --- tables --------------------------------------------------------------------------------------------------


def _in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


class VehicleLifecycleRow(Base):
    """A vehicle's life-cycle state and the telemetry-derived track behind its sub-state, battery and distance."""

    __tablename__ = "vehicle_lifecycle"
    __table_args__ = (CheckConstraint(_in("state", VehicleState), name="ck_vehicle_lifecycle_state"),)

    vin: Mapped[str] = mapped_column(String(32), ForeignKey("device.vin"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    since_ms: Mapped[int] = mapped_column(BigInteger)
    activity: Mapped[str | None] = mapped_column(String(16), default=None)
    activity_since_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    pending_activity: Mapped[str | None] = mapped_column(String(16), default=None)
    pending_since_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    battery_barcode: Mapped[str | None] = mapped_column(String(64), default=None)
    odometer_m: Mapped[float] = mapped_column(Float, default=0.0)
    next_service_m: Mapped[float] = mapped_column(Float)
    maintenance_due: Mapped[bool] = mapped_column(Boolean, default=False)
    last_ts_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    speed_ts_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    speed_kmh: Mapped[float | None] = mapped_column(Float, default=None)
    current_a: Mapped[float | None] = mapped_column(Float, default=None)


class BatteryRow(Base):
    """A battery pack, keyed by its barcode: registered through the API or first seen in a vehicle's telemetry."""

    __tablename__ = "batteries"
    __table_args__ = (
        CheckConstraint(_in("state", BatteryState), name="ck_batteries_state"),
        Index("ix_batteries_vin", "vin"),
    )

    barcode: Mapped[str] = mapped_column(String(64), primary_key=True)
    registered: Mapped[bool] = mapped_column(Boolean)  # its data came through the API (not only from telemetry)
    chemistry: Mapped[str | None] = mapped_column(String(16), default=None)
    capacity_ah: Mapped[float | None] = mapped_column(Float, default=None)
    cells: Mapped[int | None] = mapped_column(Integer, default=None)
    rated_cycles: Mapped[int | None] = mapped_column(Integer, default=None)
    manufactured_ms: Mapped[int | None] = mapped_column(BigInteger, default=None)
    service_life_years: Mapped[float | None] = mapped_column(Float, default=None)
    state: Mapped[str] = mapped_column(String(16))
    since_ms: Mapped[int] = mapped_column(BigInteger)
    vin: Mapped[str | None] = mapped_column(String(32), ForeignKey("device.vin"), default=None)
    soh_pct: Mapped[float | None] = mapped_column(Float, default=None)
    soh_confirmed_pct: Mapped[float | None] = mapped_column(Float, default=None)
    cycles: Mapped[int | None] = mapped_column(Integer, default=None)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class LifecycleEventRow(Base):
    """History: one row per change of a vehicle or a battery, in the order the machines went through them (id)."""

    __tablename__ = "lifecycle_events"
    __table_args__ = (
        CheckConstraint(_in("entity_kind", EntityKind), name="ck_lifecycle_events_entity_kind"),
        CheckConstraint(_in("source", Source), name="ck_lifecycle_events_source"),
        Index("ix_lifecycle_events_entity", "entity_kind", "entity_id", "ts_ms"),
    )

    # 64-bit where it matters (PostgreSQL); SQLite autoincrements only an INTEGER primary key (64-bit there anyway).
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    entity_kind: Mapped[str] = mapped_column(String(8))
    entity_id: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(16))
    from_state: Mapped[str | None] = mapped_column(String(16), default=None)
    to_state: Mapped[str] = mapped_column(String(16))
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(10))
    actor: Mapped[str] = mapped_column(String(MAX_ACTOR))
    note: Mapped[str | None] = mapped_column(String(MAX_NOTE), default=None)
    related: Mapped[str | None] = mapped_column(String(64), default=None)


# --- records -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    id: int
    ts_ms: int
    event: str
    from_state: str | None
    to_state: str
    source: str
    actor: str
    note: str | None
    related: str | None

    @classmethod
    def of(cls, r: LifecycleEventRow) -> LifecycleEvent:
        return cls(r.id, r.ts_ms, r.event, r.from_state, r.to_state, r.source, r.actor, r.note, r.related)


@dataclass(frozen=True, slots=True)
class VehicleLifecycle:
    vin: str
    state: VehicleState
    since_ms: int | None  # None: never moved from the initial state
    activity: Activity | None
    activity_since_ms: int | None
    battery_barcode: str | None
    odometer_m: float
    next_service_m: float
    maintenance_due: bool
    next_states: list[VehicleState]  # what an operator may move it to
    history: list[LifecycleEvent]


@dataclass(frozen=True, slots=True)
class BatterySpec:
    barcode: str
    chemistry: Chemistry | None = None
    capacity_ah: float | None = None
    cells: int | None = None
    rated_cycles: int | None = None
    manufactured: date | None = None
    service_life_years: float | None = None


@dataclass(frozen=True, slots=True)
class BatteryRecord:
    barcode: str
    registered: bool
    chemistry: str | None
    capacity_ah: float | None
    cells: int | None
    rated_cycles: int | None
    manufactured: date | None
    service_life_years: float | None
    expires: date | None
    state: BatteryState
    since_ms: int
    vin: str | None
    soh_pct: float | None
    cycles: int | None
    next_states: list[BatteryState]
    history: list[LifecycleEvent]


def _ms_of(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def _day_of(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, UTC).date()


def _now_ms() -> int:
    return int(time.time() * 1000)


# `vehicle_lifecycle`'s columns in `VehicleTrack`'s order (vin first), for the plain-SQL telemetry path.
_TRACK_COLUMNS = (
    "vin",
    "state",
    "since_ms",
    "activity",
    "activity_since_ms",
    "pending_activity",
    "pending_since_ms",
    "battery_barcode",
    "odometer_m",
    "next_service_m",
    "maintenance_due",
    "last_ts_ms",
    "speed_ts_ms",
    "speed_kmh",
    "current_a",
)


@dataclass(slots=True)
class _Tracked:
    """A vehicle row loaded (and locked) by this transaction, and whether its track changed since written."""

    track: VehicleTrack
    dirty: bool = False


def _track_of(v: Sequence[Any]) -> VehicleTrack:
    """A `_TRACK_COLUMNS` row as a track (SQLite gives booleans as 0/1)."""
    return VehicleTrack(
        vin=v[0],
        state=VehicleState(v[1]),
        since_ms=v[2],
        activity=None if v[3] is None else Activity(v[3]),
        activity_since_ms=v[4],
        pending=None if v[5] is None else Activity(v[5]),
        pending_since_ms=v[6],
        battery=v[7],
        odometer_m=float(v[8]),
        next_service_m=float(v[9]),
        maintenance_due=bool(v[10]),
        last_ts_ms=v[11],
        speed_ts_ms=v[12],
        speed_kmh=v[13],
        current_a=v[14],
    )


def _track_params(t: VehicleTrack) -> tuple[Any, ...]:
    """The UPDATE's parameters: every column but vin in `_TRACK_COLUMNS`' order, then vin."""
    return (
        t.state.value,
        t.since_ms,
        None if t.activity is None else t.activity.value,
        t.activity_since_ms,
        None if t.pending is None else t.pending.value,
        t.pending_since_ms,
        t.battery,
        t.odometer_m,
        t.next_service_m,
        t.maintenance_due,
        t.last_ts_ms,
        t.speed_ts_ms,
        t.speed_kmh,
        t.current_a,
        t.vin,
    )


def _battery_track(row: BatteryRow) -> BatteryTrack:
    return BatteryTrack(
        barcode=row.barcode,
        state=BatteryState(row.state),
        since_ms=row.since_ms,
        vin=row.vin,
        soh_pct=row.soh_pct,
        soh_confirmed_pct=row.soh_confirmed_pct,
        cycles=row.cycles,
        chemistry=row.chemistry,
        rated_cycles=row.rated_cycles,
        manufactured_ms=row.manufactured_ms,
        service_life_years=row.service_life_years,
    )


# --- persistence ---------------------------------------------------------------------------------------------

_UPSERTS: dict[str, Callable[..., Any]] = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
# Session.info: what `prepare` loaded for this transaction (vin -> locked row; barcode -> locked pack, None if none).
_ROWS_KEY = "zhilian.lifecycle.rows"
_PACKS_KEY = "zhilian.lifecycle.packs"
R = TypeVar("R")


class LifecycleService:
    """Life cycles over the relational database: the pipeline's observer, operator transitions, battery registry.

    Thread-safe: every call uses its own session; concurrent writers serialise on row locks (PostgreSQL) or on
    SQLite's write lock (BEGIN IMMEDIATE).
    """

    def __init__(
        self,
        engine: Engine,
        settings: LifecycleSettings | None = None,
        catalogue: Catalogue | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        self.engine = engine
        self._write_engine = engine.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        self.tracker = TelemetryTracker(settings, catalogue)
        self.settings = self.tracker.settings
        upsert = _UPSERTS.get(engine.dialect.name)
        if upsert is None:
            raise StorageError(f"life cycles support SQLite and PostgreSQL, not {engine.dialect.name}")
        self._upsert = upsert
        m = self._mark = sqltext.marker(engine)
        self._for_update = sqltext.for_update(engine)
        self._insert_track = (
            "INSERT INTO vehicle_lifecycle (vin, state, since_ms, odometer_m, next_service_m, maintenance_due) "
            f"VALUES ({sqltext.marks(6, m)}) ON CONFLICT (vin) DO NOTHING"
        )
        self._update_track = (
            f"UPDATE vehicle_lifecycle SET {', '.join(f'{c} = {m}' for c in _TRACK_COLUMNS[1:])} WHERE vin = {m}"
        )
        self._m_events = Counter(
            "zhilian_lifecycle_events",
            "Life-cycle changes recorded, by entity, event and source",
            ["entity", "event", "source"],
            registry=metrics if metrics is not None else CollectorRegistry(),
        )

    # -- telemetry (SampleObserver) ---------------------------------------------------------------------------

    def prepare(self, session: Session, by_vin: Mapping[str, Sequence[Batch]]) -> None:
        """Load and lock all of an ingest call's vehicle rows and the packs their batches name, in a few statements
        (rows of vehicles seen for the first time are created), for `observe` to find in `session.info`.

        Vehicle rows are read and written as plain SQL (`VehicleTrack`s, written back by `finish` in one
        executemany), not as ORM objects: loading and flushing a dozen ORM rows per call cost more CPU than the
        statements themselves."""
        rows: dict[str, _Tracked] = session.info.setdefault(_ROWS_KEY, {})
        packs: dict[str, BatteryRow | None] = session.info.setdefault(_PACKS_KEY, {})
        todo = sorted(vin for vin in by_vin if vin not in rows)
        if todo:
            first_ts = {vin: min(b.timestamps[0] for b in by_vin[vin] if b.timestamps) for vin in todo}
            found = self._lock_tracks(session, todo)
            new = [vin for vin in todo if vin not in found]
            if new:
                self._create_tracks(session, [(vin, first_ts[vin]) for vin in new])
                found.update(self._lock_tracks(session, new))
            missing = [vin for vin in todo if vin not in found]
            if missing:
                raise StorageError(f"lifecycle: vehicle rows for {missing[:3]} vanished")
            rows.update(found)
        wanted: set[str] = set()
        for vin, batches in by_vin.items():
            battery = rows[vin].track.battery
            if battery is not None:
                wanted.add(battery)
            for batch in batches:
                wanted |= self.tracker.barcodes_in(batch)
        ask = sorted(wanted - packs.keys())
        for i in range(0, len(ask), 500):
            chunk = ask[i : i + 500]
            # Sorted: two workers locking overlapping packs take them in the same order.
            stmt = select(BatteryRow).where(BatteryRow.barcode.in_(chunk)).order_by(BatteryRow.barcode)
            got = {b.barcode: b for b in session.scalars(stmt.with_for_update())}
            for code in chunk:
                packs[code] = got.get(code)  # None: known not to exist (yet)

    def discard(self, session: Session) -> None:
        """This observer's savepoint was rolled back: the rows `prepare` loaded are expired or gone."""
        session.info.pop(_ROWS_KEY, None)
        session.info.pop(_PACKS_KEY, None)

    def finish(self, session: Session) -> None:
        """Write back the vehicle rows this call's batches changed: one executemany for all of them."""
        rows: dict[str, _Tracked] = session.info.get(_ROWS_KEY, {})
        dirty = sorted((vin, t) for vin, t in rows.items() if t.dirty)
        if not dirty:
            return
        session.connection().exec_driver_sql(self._update_track, [_track_params(t.track) for _, t in dirty])
        for _, t in dirty:
            t.dirty = False

    def observe(self, session: Session, vin: str, batch: Batch) -> None:
        """Move `vin`'s machines by one stored batch, inside the ledger's transaction (`session`)."""
        if not batch.timestamps:
            return
        rows: dict[str, _Tracked] = session.info.setdefault(_ROWS_KEY, {})
        known: dict[str, BatteryRow | None] = session.info.setdefault(_PACKS_KEY, {})
        tracked = rows.get(vin)
        if tracked is None:
            self.prepare(session, {vin: [batch]})
            tracked = rows[vin]
        track = tracked.track
        wanted = self.tracker.barcodes_in(batch)
        if track.battery is not None:
            wanted.add(track.battery)
        ask = sorted(wanted - known.keys())
        if ask:
            # Sorted: two workers locking overlapping packs take them in the same order.
            stmt = select(BatteryRow).where(BatteryRow.barcode.in_(ask)).order_by(BatteryRow.barcode)
            got = {b.barcode: b for b in session.scalars(stmt.with_for_update())}
            for code in ask:
                known[code] = got.get(code)
        packs = {code: b for code in wanted if (b := known[code]) is not None}
        tracks = {code: _battery_track(b) for code, b in packs.items()}
        outcome = self.tracker.step(track, tracks, batch)
        tracked.dirty = True  # written back by `finish`, once per call
        created = False
        for code, pack in outcome.batteries.items():
            stored = packs.get(code)
            if stored is None:
                stored = known[code] = BatteryRow(barcode=code, registered=False, created_ms=pack.since_ms)
                session.add(stored)
                created = True
            stored.state = pack.state.value
            stored.since_ms = pack.since_ms
            stored.vin = pack.vin
            stored.soh_pct = pack.soh_pct
            stored.soh_confirmed_pct = pack.soh_confirmed_pct
            stored.cycles = pack.cycles
        if created:
            session.flush()  # new packs exist before another vehicle's binding to them is released
        changes = list(outcome.changes)
        for other, code in outcome.released:
            note = f"battery moved to {vin}"
            held = rows.get(other)
            if held is None:
                changes.extend(self._release(session, other, code, batch.timestamps[-1], note))
            elif held.track.battery == code:
                # A vehicle of this same call: its row is written back by `finish`, so release it in its track.
                held.track.battery = None
                held.dirty = True
                state = held.track.state.value
                changes.append(
                    Change.mark(EntityKind.VEHICLE, other, EventKind.UNPAIRED, state, batch.timestamps[-1], note, code)
                )
        self._record(session, changes, Source.TELEMETRY, Source.TELEMETRY.value)
        if outcome.skipped_rows:
            log.info(
                "samples older than the vehicle's newest were not replayed into its life cycle",
                extra={"vin": vin, "samples": outcome.skipped_rows},
            )

    # -- vehicles ---------------------------------------------------------------------------------------------

    def vehicle(
        self, vin: str, start_ms: int | None = None, end_ms: int | None = None, limit: int = 1000
    ) -> VehicleLifecycle:
        try:
            with Session(self.engine) as session:
                if session.get(Device, vin) is None:
                    raise UnknownVehicleError(vin)
                row = session.get(VehicleLifecycleRow, vin)
                history = self._history(session, EntityKind.VEHICLE, vin, start_ms, end_ms, limit)
        except SQLAlchemyError as exc:
            raise StorageError(f"lifecycle: {exc}") from exc
        if row is None:  # never moved, never reported: the initial state, nothing tracked yet
            return VehicleLifecycle(
                vin=vin,
                state=VEHICLE.initial,
                since_ms=None,
                activity=None,
                activity_since_ms=None,
                battery_barcode=None,
                odometer_m=0.0,
                next_service_m=self.settings.service_interval_km * 1000,
                maintenance_due=False,
                next_states=VEHICLE.next_states(VEHICLE.initial, Source.API),
                history=history,
            )
        state = VehicleState(row.state)
        return VehicleLifecycle(
            vin=vin,
            state=state,
            since_ms=row.since_ms,
            activity=None if row.activity is None else Activity(row.activity),
            activity_since_ms=row.activity_since_ms,
            battery_barcode=row.battery_barcode,
            odometer_m=row.odometer_m,
            next_service_m=row.next_service_m,
            maintenance_due=row.maintenance_due,
            next_states=VEHICLE.next_states(state, Source.API),
            history=history,
        )

    def transition_vehicle(self, vin: str, to: VehicleState, actor: str, note: str | None = None) -> VehicleLifecycle:
        """An operator's transition; IllegalTransition (nothing changed) unless the machine allows it from the API."""
        now = _now_ms()

        def work(session: Session) -> None:
            if session.get(Device, vin) is None:
                raise UnknownVehicleError(vin)
            row = self._vehicle_row(session, vin, now)
            frm = VehicleState(row.state)
            VEHICLE.check(frm, to, Source.API)
            text = note
            row.state, row.since_ms = to.value, now
            row.pending_activity = row.pending_since_ms = None
            if to is VehicleState.ACTIVE:
                row.activity, row.activity_since_ms = Activity.PARKED.value, now
                if frm is VehicleState.IN_REPAIR:
                    row.maintenance_due = False
                    row.next_service_m = row.odometer_m + self.settings.service_interval_km * 1000
                    text = _join(note, f"serviced; next service at {row.next_service_m / 1000:.1f} km")
            else:
                row.activity = row.activity_since_ms = None
            change = Change(EntityKind.VEHICLE, vin, EventKind.TRANSITION, frm.value, to.value, now, text)
            self._record(session, [change], Source.API, actor)

        self._write(work)
        log.info("vehicle transition", extra={"vin": vin, "to": to.value, "actor": actor})
        return self.vehicle(vin)

    # -- batteries --------------------------------------------------------------------------------------------

    def register_battery(self, spec: BatterySpec, actor: str) -> tuple[BatteryRecord, bool]:
        """Register a pack; returns it and whether it was created. Registering the same data again changes
        nothing; a pack known only from telemetry gets its data; different data for a registered pack is a
        BatteryConflict."""
        if clean_barcode(spec.barcode) != spec.barcode:
            raise InvalidLifecycleRequest("a barcode is 1-64 printable ASCII characters without '/' or spaces")
        now = _now_ms()
        data = {
            "chemistry": None if spec.chemistry is None else spec.chemistry.value,
            "capacity_ah": spec.capacity_ah,
            "cells": spec.cells,
            "rated_cycles": spec.rated_cycles,
            "manufactured_ms": None if spec.manufactured is None else _ms_of(spec.manufactured),
            "service_life_years": spec.service_life_years,
        }

        def work(session: Session) -> bool:
            row = session.get(BatteryRow, spec.barcode, with_for_update=True)
            if row is None:
                # Insert-or-nothing: a pack another worker registered (or telemetry created) meanwhile is not
                # overwritten; it is compared below on the next attempt.
                ins = self._upsert(BatteryRow.__table__).values(
                    barcode=spec.barcode,
                    registered=True,
                    state=BATTERY.initial.value,
                    since_ms=now,
                    created_ms=now,
                    **data,
                )
                stmt = ins.on_conflict_do_nothing(index_elements=["barcode"]).returning(BatteryRow.barcode)
                if session.scalar(stmt) is not None:
                    first = Change(EntityKind.BATTERY, spec.barcode, EventKind.TRANSITION, None, BATTERY.initial, now)
                    self._record(session, [first], Source.API, actor)
                    return True
                row = session.get(BatteryRow, spec.barcode, with_for_update=True, populate_existing=True)
                assert row is not None
            if row.registered:
                current = {k: getattr(row, k) for k in data}
                if current != data:
                    raise BatteryConflict(f"battery {spec.barcode} is already registered with different data")
                return False
            for key, value in data.items():
                setattr(row, key, value)
            row.registered = True
            return False

        created = self._write(work)
        if created:
            log.info("battery registered", extra={"barcode": spec.barcode})
        return self.battery(spec.barcode, history=False), created

    def battery(
        self,
        barcode: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int = 1000,
        history: bool = True,
    ) -> BatteryRecord:
        try:
            with Session(self.engine) as session:
                row = session.get(BatteryRow, barcode)
                if row is None:
                    raise UnknownBatteryError(barcode)
                events = self._history(session, EntityKind.BATTERY, barcode, start_ms, end_ms, limit) if history else []
        except SQLAlchemyError as exc:
            raise StorageError(f"lifecycle: {exc}") from exc
        state = BatteryState(row.state)
        track = _battery_track(row)
        expires = track.expires_ms()
        return BatteryRecord(
            barcode=row.barcode,
            registered=row.registered,
            chemistry=row.chemistry,
            capacity_ah=row.capacity_ah,
            cells=row.cells,
            rated_cycles=row.rated_cycles,
            manufactured=None if row.manufactured_ms is None else _day_of(row.manufactured_ms),
            service_life_years=row.service_life_years,
            expires=None if expires is None else _day_of(expires),
            state=state,
            since_ms=row.since_ms,
            vin=row.vin,
            soh_pct=row.soh_pct,
            cycles=row.cycles,
            next_states=BATTERY.next_states(state, Source.API),
            history=events,
        )

    def transition_battery(
        self, barcode: str, to: BatteryState, actor: str, note: str | None = None, vin: str | None = None
    ) -> BatteryRecord:
        """An operator's transition. Pairing (to=paired) needs the VIN to bind the pack to; retiring, recycling or
        losing a pack releases its vehicle binding. Legality is judged before the request's details (409 first)."""
        now = _now_ms()

        def work(session: Session) -> None:
            row = session.get(BatteryRow, barcode, with_for_update=True)
            if row is None:
                raise UnknownBatteryError(barcode)
            frm = BatteryState(row.state)
            BATTERY.check(frm, to, Source.API)
            if (to is BatteryState.PAIRED) != (vin is not None):
                raise InvalidLifecycleRequest("a vin is given exactly when the battery moves to paired")
            changes = [Change(EntityKind.BATTERY, barcode, EventKind.TRANSITION, frm, to, now, note, vin)]
            if vin is not None:
                if session.get(Device, vin) is None:
                    raise UnknownVehicleError(vin)
                changes += self._bind(session, self._vehicle_row(session, vin, now), row, now)
            elif to in _UNBINDING and row.vin is not None:
                changes += self._release(session, row.vin, barcode, now, f"battery {to.value}")
                row.vin = None
            row.state, row.since_ms = to.value, now
            self._record(session, changes, Source.API, actor)

        self._write(work)
        log.info("battery transition", extra={"barcode": barcode, "to": to.value, "actor": actor})
        return self.battery(barcode)

    # -- helpers ----------------------------------------------------------------------------------------------

    def _bind(self, session: Session, vehicle: VehicleLifecycleRow, pack: BatteryRow, now: int) -> list[Change]:
        """Put `pack` into `vehicle`, taking out the pack it had (the API's pairing)."""
        changes: list[Change] = []
        old = vehicle.battery_barcode
        if old is not None and old != pack.barcode:
            state = session.scalar(
                update(BatteryRow)
                .where(BatteryRow.barcode == old, BatteryRow.vin == vehicle.vin)
                .values(vin=None)
                .returning(BatteryRow.state)
            )
            if state is not None:
                out = f"replaced by {pack.barcode}"
                changes.append(Change.mark(EntityKind.BATTERY, old, EventKind.UNPAIRED, state, now, out, vehicle.vin))
        if pack.vin is not None and pack.vin != vehicle.vin:
            changes += self._release(session, pack.vin, pack.barcode, now, f"battery moved to {vehicle.vin}")
        pack.vin = vehicle.vin
        vehicle.battery_barcode = pack.barcode
        note = f"replaces {old}" if old is not None else None
        changes.append(
            Change.mark(EntityKind.VEHICLE, vehicle.vin, EventKind.PAIRED, vehicle.state, now, note, pack.barcode)
        )
        return changes

    def _release(self, session: Session, vin: str, barcode: str, ts: int, note: str) -> list[Change]:
        """Clear `vin`'s binding to `barcode` if it still has it; the vehicle's unpaired event, if so."""
        state = session.scalar(
            update(VehicleLifecycleRow)
            .where(VehicleLifecycleRow.vin == vin, VehicleLifecycleRow.battery_barcode == barcode)
            .values(battery_barcode=None)
            .returning(VehicleLifecycleRow.state)
        )
        if state is None:
            return []
        return [Change.mark(EntityKind.VEHICLE, vin, EventKind.UNPAIRED, state, ts, note, barcode)]

    def _initial_row(self, vin: str, now: int) -> dict[str, Any]:
        return {
            "vin": vin,
            "state": VEHICLE.initial.value,
            "since_ms": now,
            "odometer_m": 0.0,
            "next_service_m": self.settings.service_interval_km * 1000,
            "maintenance_due": False,
        }

    def _lock_tracks(self, session: Session, vins: Sequence[str]) -> dict[str, _Tracked]:
        """The vehicles' rows as tracks, locked in VIN order (as every worker takes them)."""
        conn = session.connection()
        found: dict[str, _Tracked] = {}
        for chunk in sqltext.chunks(vins, 500):
            sql = (
                f"SELECT {', '.join(_TRACK_COLUMNS)} FROM vehicle_lifecycle WHERE vin IN "
                f"({sqltext.marks(len(chunk), self._mark)}) ORDER BY vin{self._for_update}"
            )
            for values in conn.exec_driver_sql(sql, tuple(chunk)):
                track = _track_of(values)
                found[track.vin] = _Tracked(track)
        return found

    def _create_tracks(self, session: Session, first_seen: Sequence[tuple[str, int]]) -> None:
        """Rows in the initial state for vehicles seen for the first time (devices predate life cycles); a row
        another worker created meanwhile stays as it is."""
        session.connection().exec_driver_sql(
            self._insert_track,
            [
                (r["vin"], r["state"], r["since_ms"], r["odometer_m"], r["next_service_m"], r["maintenance_due"])
                for r in (self._initial_row(vin, now) for vin, now in first_seen)
            ],
        )

    def _vehicle_row(self, session: Session, vin: str, now: int) -> VehicleLifecycleRow:
        """The vehicle's row, locked; created in the initial state on first use (devices predate life cycles)."""
        row = session.get(VehicleLifecycleRow, vin, with_for_update=True)
        if row is not None:
            return row
        ins = self._upsert(VehicleLifecycleRow.__table__).values(**self._initial_row(vin, now))
        session.execute(ins.on_conflict_do_nothing(index_elements=["vin"]))
        row = session.get(VehicleLifecycleRow, vin, with_for_update=True, populate_existing=True)
        if row is None:
            raise StorageError(f"lifecycle: vehicle row for {vin} vanished")
        return row

    def _record(self, session: Session, changes: list[Change], source: Source, actor: str) -> None:
        for c in changes:
            session.add(
                LifecycleEventRow(
                    entity_kind=c.entity.value,
                    entity_id=c.entity_id,
                    event=c.event.value,
                    from_state=c.from_state,
                    to_state=c.to_state,
                    ts_ms=c.ts_ms,
                    source=source.value,
                    actor=actor[:MAX_ACTOR],
                    note=None if c.note is None else c.note[:MAX_NOTE],
                    related=c.related,
                )
            )
            self._m_events.labels(entity=c.entity.value, event=c.event.value, source=source.value).inc()

    @staticmethod
    def _history(
        session: Session, kind: EntityKind, entity_id: str, start_ms: int | None, end_ms: int | None, limit: int
    ) -> list[LifecycleEvent]:
        stmt = select(LifecycleEventRow).where(
            LifecycleEventRow.entity_kind == kind.value, LifecycleEventRow.entity_id == entity_id
        )
        if start_ms is not None:
            stmt = stmt.where(LifecycleEventRow.ts_ms >= start_ms)
        if end_ms is not None:
            stmt = stmt.where(LifecycleEventRow.ts_ms <= end_ms)
        stmt = stmt.order_by(LifecycleEventRow.id).limit(max(1, min(limit, MAX_HISTORY)))
        return [LifecycleEvent.of(r) for r in session.scalars(stmt)]

    def _write(self, work: Callable[[Session], R]) -> R:
        """Run `work` in one write transaction, retried when PostgreSQL breaks a lock cycle by aborting it."""
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
                    return work(session)
            except DBAPIError as exc:
                if getattr(exc.orig, "sqlstate", None) not in _RETRY_SQLSTATES or attempt == _MAX_ATTEMPTS:
                    raise StorageError(f"lifecycle: {exc}") from exc
                log.warning("lifecycle write lost a lock conflict; retrying", extra={"attempt": attempt})
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
            except SQLAlchemyError as exc:
                raise StorageError(f"lifecycle: {exc}") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")


def _join(a: str | None, b: str) -> str:
    return b if not a else f"{a}; {b}"
