"""Sans-I/O sampling policy: which of a raw sample's values go into the batch.

The agent reads its devices at the source rate (GNSS epochs, or the board-clock sampler); sending every value of
every sample costs airtime and cloud storage for values that did not change. `Sampler.offer` decides per value:

* **Period and deadband.** A signal is included when its own period has elapsed since it was last included, or
  when it moved by more than its deadband (absolute, catalogue units) from the value last included — send on
  change. After every sample the last included value is therefore within the deadband of the true value, and never
  older than the period. Bool and str signals with a deadband count any change as a change. A signal the
  profile does not name follows the profile's defaults; a profile not configured at all sends everything (what an
  agent without a [sampling] section does). Latitude and longitude always travel together.
* **Vehicle state.** The profile follows the vehicle's mode — riding (speed above a threshold), charging (battery
  current above a threshold; positive current flows *into* the pack, as the catalogue defines it), else parked —
  derived from the values themselves. A candidate mode must persist for that mode's dwell time before the switch,
  so a red light does not turn a ride into parking and a noisy current reading does not flap. A commanded override
  (`set_override`) wins over the derived mode until it is lifted.
* **Triggered capture.** `offer(..., trigger=True)` (the agent triggers on a pre-check alert of the capture level)
  switches to full samples every `capture.period_s` for `capture.post_s`, and hands back, once, the samples of the
  `capture.pre_s` before the trigger from a ring buffer that always holds the full raw samples — the 30 s before
  and after a level-3 fault that GB/T 32960.3 asks for. The ring is bounded by count and by age.

Nothing here does I/O or reads a clock: time is the sample's own timestamp (ms), so tests drive it directly.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_agent.config import ConfigError
from protocol.catalogue import Catalogue, SignalType

log = logging.getLogger("zhilian.agent.sampling")

Value = float | int | bool | str
Row = tuple[int, dict[str, Value]]


class VehicleMode(enum.StrEnum):
    PARKED = "parked"
    RIDING = "riding"
    CHARGING = "charging"


@dataclass(frozen=True, slots=True)
class SignalRule:
    """When one signal is sent: at least every `period_s`, and at once when it moved by more than `deadband`."""

    period_s: float
    deadband: float | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    default_period_s: float = 0.0
    default_deadband: float | None = None
    signals: Mapping[str, SignalRule] = field(default_factory=dict)

    def rule(self, name: str) -> SignalRule:
        rule = self.signals.get(name)
        if rule is None:
            return SignalRule(self.default_period_s, self.default_deadband)
        return rule


# Signals that mean nothing apart: when one of a group is sent, the others of the sample go with it (a latitude
# without its longitude is no position).
TOGETHER: tuple[tuple[str, ...], ...] = (("CurrentLocation.Latitude", "CurrentLocation.Longitude"),)

# An unconfigured mode sends every value of every sample: sampling is an opt-in reduction, never a surprise.
PASS_THROUGH = Profile("pass-through")


@dataclass(frozen=True, slots=True)
class StateRules:
    """How the vehicle's mode is derived from its own values."""

    # The first of these present in a sample is the speed; the wheel speed beats GNSS speed, which drifts at rest.
    speed_signals: tuple[str, ...] = ("Speed", "CurrentLocation.GNSSReceiver.GroundSpeed")
    riding_speed_kmh: float = 3.0
    current_signal: str = "Powertrain.TractionBattery.CurrentCurrent"
    charging_current_a: float = 0.5
    riding_dwell_s: float = 3.0
    charging_dwell_s: float = 10.0
    # Long, so that waiting at a red light stays "riding".
    parked_dwell_s: float = 60.0

    def dwell_ms(self, mode: VehicleMode) -> int:
        seconds = {
            VehicleMode.RIDING: self.riding_dwell_s,
            VehicleMode.CHARGING: self.charging_dwell_s,
            VehicleMode.PARKED: self.parked_dwell_s,
        }[mode]
        return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    pre_s: float = 30.0
    post_s: float = 30.0
    period_s: float = 1.0
    # At 10 Hz, 30 s are 300 samples; the bound keeps a faster source from growing the ring without limit.
    ring_max_samples: int = 600
    # Pre-check alerts of this level or above trigger a capture (edge_agent/precheck.py levels 1..3).
    trigger_level: int = 3


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    state: StateRules = field(default_factory=StateRules)
    capture: CaptureConfig = field(default_factory=CaptureConfig)

    def validate(self, catalogue: Catalogue) -> None:
        """Raise ConfigError when a signal name is not in `catalogue` (a typo must fail the start, not sampling)."""
        for profile in self.profiles.values():
            for name in profile.signals:
                _known(catalogue, name, f"sampling profile {profile.name!r}")
        for name in self.state.speed_signals:
            _known(catalogue, name, "sampling.state.speed_signals", numeric=True)
        _known(catalogue, self.state.current_signal, "sampling.state.current_signal", numeric=True)


@dataclass(frozen=True, slots=True)
class SampleOut:
    """What one raw sample contributes: `values` for the batch at the sample's time (possibly empty), and
    `pre_trigger`, the full samples before a capture trigger (only on the sample that triggered it)."""

    values: dict[str, Value]
    pre_trigger: list[Row]


class UnknownProfileError(ValueError):
    """An override named a profile that is neither configured nor a vehicle mode."""


class Sampler:
    def __init__(
        self,
        config: SamplingConfig,
        catalogue: Catalogue,
        on_profile_change: Callable[[str], None] | None = None,
    ) -> None:
        config.validate(catalogue)
        self.config = config
        self.on_profile_change = on_profile_change
        cap = config.capture
        self._pre_ms = round(cap.pre_s * 1000)
        self._post_ms = round(cap.post_s * 1000)
        self._capture_period_ms = round(cap.period_s * 1000)
        self._ring: deque[Row] = deque(maxlen=cap.ring_max_samples)
        self._sent: dict[str, tuple[int, Value]] = {}
        self._capture_until_ms: int | None = None
        self._last_full_ms: int | None = None
        self._mode: VehicleMode | None = None
        self._candidate: VehicleMode | None = None
        self._candidate_since_ms = 0
        self._speed: float | None = None
        self._current: float | None = None
        self._override: str | None = None
        # Per profile: signal → (period in ms, deadband), filled as signals appear (the hot path of every sample).
        self._rules_ms: dict[str, dict[str, tuple[int, float | None]]] = {}
        self.captures = 0

    # --- profile ----------------------------------------------------------------------------------------------

    @property
    def mode(self) -> VehicleMode | None:
        """The mode derived from the values (None before the first sample)."""
        return self._mode

    @property
    def active_profile(self) -> str:
        if self._override is not None:
            return self._override
        return (self._mode or VehicleMode.PARKED).value

    def set_override(self, name: str | None) -> None:
        """Force profile `name` (a configured profile or a mode name) regardless of the mode; None lifts it."""
        if name is not None and name not in self.config.profiles and name not in {m.value for m in VehicleMode}:
            raise UnknownProfileError(f"unknown sampling profile {name!r}")
        before = self.active_profile
        self._override = name
        self._announce(before)

    def _profile(self) -> Profile:
        return self.config.profiles.get(self.active_profile, PASS_THROUGH)

    def _announce(self, before: str) -> None:
        after = self.active_profile
        if after != before:
            log.info("sampling profile changed", extra={"from": before, "to": after, "mode": self._mode})
            if self.on_profile_change is not None:
                self.on_profile_change(after)

    def _update_mode(self, ts_ms: int, values: Mapping[str, Value]) -> None:
        rules = self.config.state
        # The last reading is remembered: a sample that lacks it (another source's turn) is no evidence.
        for name in rules.speed_signals:
            speed = _number(values.get(name))
            if speed is not None:
                self._speed = speed
                break
        current = _number(values.get(rules.current_signal))
        if current is not None:
            self._current = current
        if self._speed is not None and self._speed > rules.riding_speed_kmh:
            seen = VehicleMode.RIDING
        elif self._current is not None and self._current > rules.charging_current_a:
            seen = VehicleMode.CHARGING
        else:
            seen = VehicleMode.PARKED
        before = self.active_profile
        if self._mode is None:
            self._mode = self._candidate = seen  # at start, believe the first sample
        elif seen == self._mode:
            self._candidate = seen
        else:
            if seen != self._candidate or ts_ms < self._candidate_since_ms:
                self._candidate, self._candidate_since_ms = seen, ts_ms
            if ts_ms - self._candidate_since_ms >= rules.dwell_ms(seen):
                self._mode = seen
        self._announce(before)

    # --- sampling ---------------------------------------------------------------------------------------------

    def offer(self, ts_ms: int, values: Mapping[str, Value], trigger: bool = False) -> SampleOut:
        """One raw sample at `ts_ms`; `trigger` starts (or extends) a high-rate capture at this sample."""
        pre = self._start_capture(ts_ms) if trigger else []
        self._remember(ts_ms, values)
        self._update_mode(ts_ms, values)
        if self._capture_due(ts_ms):
            out = dict(values)
            self._last_full_ms = ts_ms
        else:
            out = self._by_profile(ts_ms, values)
        for name, value in out.items():
            self._sent[name] = (ts_ms, value)
        return SampleOut(out, pre)

    @property
    def capturing_until_ms(self) -> int | None:
        return self._capture_until_ms

    @property
    def buffered(self) -> int:
        """Raw samples held in the pre-trigger ring buffer."""
        return len(self._ring)

    def _remember(self, ts_ms: int, values: Mapping[str, Value]) -> None:
        if self._ring.maxlen == 0:
            return
        self._ring.append((ts_ms, dict(values)))
        # Later triggers happen at or after this sample, so nothing older than pre_s before it can be needed.
        while self._ring and self._ring[0][0] < ts_ms - self._pre_ms:
            self._ring.popleft()

    def _start_capture(self, ts_ms: int) -> list[Row]:
        self.captures += 1
        end = ts_ms + self._post_ms
        self._capture_until_ms = end if self._capture_until_ms is None else max(self._capture_until_ms, end)
        pre: list[Row] = []
        last = self._last_full_ms
        # Samples already sent in full (an earlier capture) are skipped, so overlapping triggers never resend.
        for t, row in self._ring:
            if ts_ms - self._pre_ms <= t < ts_ms and (last is None or t - last >= self._capture_period_ms):
                pre.append((t, dict(row)))
                last = t
        self._last_full_ms = last
        log.info(
            "high-rate capture triggered",
            extra={"ts_ms": ts_ms, "until_ms": self._capture_until_ms, "pre_samples": len(pre)},
        )
        return pre

    def _capture_due(self, ts_ms: int) -> bool:
        if self._capture_until_ms is None:
            return False
        if ts_ms >= self._capture_until_ms:
            self._capture_until_ms = None
            return False
        last = self._last_full_ms
        return last is None or ts_ms - last >= self._capture_period_ms or ts_ms < last

    def _by_profile(self, ts_ms: int, values: Mapping[str, Value]) -> dict[str, Value]:
        profile = self._profile()
        rules = self._rules_ms.get(profile.name)
        if rules is None:
            rules = self._rules_ms[profile.name] = {}
        default = (round(profile.default_period_s * 1000), profile.default_deadband)
        out: dict[str, Value] = {}
        for name, value in values.items():
            prev = self._sent.get(name)
            if prev is None:
                out[name] = value
                continue
            rule = rules.get(name)
            if rule is None:
                sig = profile.signals.get(name)
                rule = default if sig is None else (round(sig.period_s * 1000), sig.deadband)
                rules[name] = rule
            period_ms, deadband = rule
            elapsed = ts_ms - prev[0]
            # A clock that stepped backwards (GNSS time vs an unset board clock) restarts the timers at once.
            if elapsed < 0 or elapsed >= period_ms or (deadband is not None and _moved(prev[1], value, deadband)):
                out[name] = value
        for group in TOGETHER:
            if any(name in out for name in group):
                out.update({name: values[name] for name in group if name in values})
        return out


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _moved(before: Value, now: Value, deadband: float) -> bool:
    a, b = _number(before), _number(now)
    if a is None or b is None:
        return before != now
    return abs(b - a) > deadband


def _known(catalogue: Catalogue, name: str, where: str, numeric: bool = False) -> None:
    if name not in catalogue:
        raise ConfigError(f"{where}: unknown signal {name!r} (not in the catalogue)")
    if numeric and catalogue.by_name(name).type not in (SignalType.FLOAT, SignalType.INT):
        raise ConfigError(f"{where}: signal {name!r} is not numeric")


# --- parsing the [sampling] table --------------------------------------------------------------------------------


def _take_number(table: dict[str, Any], key: str, where: str, default: float | None, *, minimum: float = 0.0) -> Any:
    value = table.pop(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{where}.{key} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return dict(value)


def _no_leftovers(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"unknown keys in {where}: {sorted(table)}")


def _parse_profile(name: str, raw: object) -> Profile:
    where = f"sampling.profiles.{name}"
    table = _table(raw, where)
    period = _take_number(table, "default_period_s", where, 0.0)
    deadband = _take_number(table, "default_deadband", where, None)
    signals: dict[str, SignalRule] = {}
    for sig_name, rule_raw in _table(table.pop("signals", {}), f"{where}.signals").items():
        sig_where = f"{where}.signals.{sig_name}"
        rule = _table(rule_raw, sig_where)
        sig_period = _take_number(rule, "period_s", sig_where, period)
        sig_deadband = _take_number(rule, "deadband", sig_where, deadband)
        _no_leftovers(rule, sig_where)
        signals[sig_name] = SignalRule(sig_period, sig_deadband)
    _no_leftovers(table, where)
    return Profile(name, period, deadband, signals)


def parse_sampling(raw: object, catalogue: Catalogue | None = None) -> SamplingConfig:
    """Build a SamplingConfig from the TOML `[sampling]` table; raises ConfigError (names checked if `catalogue`)."""
    table = _table(raw, "sampling")
    raw_profiles = _table(table.pop("profiles", {}), "sampling.profiles")
    profiles = {name: _parse_profile(name, prof) for name, prof in raw_profiles.items()}
    st = _table(table.pop("state", {}), "sampling.state")
    d = StateRules()
    speed_signals = st.pop("speed_signals", list(d.speed_signals))
    if not isinstance(speed_signals, list) or not all(isinstance(s, str) for s in speed_signals):
        raise ConfigError("sampling.state.speed_signals must be a list of signal names")
    current_signal = st.pop("current_signal", d.current_signal)
    if not isinstance(current_signal, str):
        raise ConfigError("sampling.state.current_signal must be a signal name")
    state = StateRules(
        speed_signals=tuple(speed_signals),
        riding_speed_kmh=_take_number(st, "riding_speed_kmh", "sampling.state", d.riding_speed_kmh),
        current_signal=current_signal,
        charging_current_a=_take_number(st, "charging_current_a", "sampling.state", d.charging_current_a),
        riding_dwell_s=_take_number(st, "riding_dwell_s", "sampling.state", d.riding_dwell_s),
        charging_dwell_s=_take_number(st, "charging_dwell_s", "sampling.state", d.charging_dwell_s),
        parked_dwell_s=_take_number(st, "parked_dwell_s", "sampling.state", d.parked_dwell_s),
    )
    _no_leftovers(st, "sampling.state")
    cap = _table(table.pop("capture", {}), "sampling.capture")
    c = CaptureConfig()
    ring = cap.pop("ring_max_samples", c.ring_max_samples)
    level = cap.pop("trigger_level", c.trigger_level)
    if isinstance(ring, bool) or not isinstance(ring, int) or not 0 <= ring <= 100_000:
        raise ConfigError("sampling.capture.ring_max_samples must be an integer in 0..100000")
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 4:
        raise ConfigError("sampling.capture.trigger_level must be 1..3 (4 = never trigger)")
    capture = CaptureConfig(
        pre_s=_take_number(cap, "pre_s", "sampling.capture", c.pre_s),
        post_s=_take_number(cap, "post_s", "sampling.capture", c.post_s),
        period_s=_take_number(cap, "period_s", "sampling.capture", c.period_s),
        ring_max_samples=ring,
        trigger_level=level,
    )
    _no_leftovers(cap, "sampling.capture")
    _no_leftovers(table, "sampling")
    config = SamplingConfig(profiles, state, capture)
    if catalogue is not None:
        config.validate(catalogue)
    return config


__all__ = [
    "PASS_THROUGH",
    "CaptureConfig",
    "Profile",
    "SampleOut",
    "Sampler",
    "SamplingConfig",
    "SignalRule",
    "StateRules",
    "UnknownProfileError",
    "VehicleMode",
    "parse_sampling",
]
