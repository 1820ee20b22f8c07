"""The sampling policy (edge_agent/sampling.py): period and deadband per signal, vehicle-mode profiles with dwell,
commanded overrides, and the triggered capture with its pre-trigger ring buffer — all driven by sample timestamps."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.config import ConfigError
from edge_agent.sampling import (
    CaptureConfig,
    Profile,
    Sampler,
    SamplingConfig,
    SignalRule,
    UnknownProfileError,
    VehicleMode,
    parse_sampling,
)
from protocol import load_catalogue

CAT = load_catalogue()
SOC = "Powertrain.TractionBattery.StateOfCharge"
TEMP = "Powertrain.TractionBattery.Temperature.Max"
CURRENT = "Powertrain.TractionBattery.CurrentCurrent"
SPEED = "Speed"
BRAKE = "Chassis.Brake.IsEngaged"


def _sampler(profiles: dict[str, Profile] | None = None, **capture: float) -> Sampler:
    return Sampler(SamplingConfig(profiles=profiles or {}, capture=CaptureConfig(**capture)), CAT)  # type: ignore[arg-type]


def test_without_profiles_every_value_of_every_sample_is_sent() -> None:
    s = _sampler()
    for i in range(5):
        values = {SOC: 80.0, SPEED: 0.0, BRAKE: False}
        assert s.offer(i * 1000, values).values == values


def test_period_and_deadband_per_signal_with_the_profile_default_for_the_rest() -> None:
    parked = Profile("parked", default_period_s=10.0, signals={SOC: SignalRule(period_s=30.0, deadband=1.0)})
    s = _sampler({"parked": parked})
    sent: dict[str, list[int]] = {SOC: [], TEMP: []}
    for i in range(61):
        soc = 80.0 - (1.5 if i >= 7 else 0.0)  # one step larger than the deadband, at 7 s
        out = s.offer(i * 1000, {SOC: soc, TEMP: 25.0, SPEED: 0.0})
        for name in sent:
            if name in out.values:
                sent[name].append(i)
    assert sent[SOC] == [0, 7, 37]  # first, on change, then the 30 s period from the change
    assert sent[TEMP] == [0, 10, 20, 30, 40, 50, 60]  # the profile's default period


def test_bool_and_str_signals_with_a_deadband_are_sent_on_any_change() -> None:
    s = _sampler({"parked": Profile("parked", default_period_s=3600.0, default_deadband=0.0)})
    got = [BRAKE in s.offer(i * 1000, {BRAKE: i in (3, 4), SPEED: 0.0}).values for i in range(7)]
    assert got == [True, False, False, True, False, True, False]


walks = st.lists(st.tuples(st.integers(1, 3000), st.floats(-5.0, 5.0)), min_size=1, max_size=150)


@settings(max_examples=150, deadline=None)
@given(walks, st.floats(0.0, 60.0), st.floats(0.0, 3.0))
def test_deadband_never_hides_a_larger_change_and_the_period_bounds_staleness(
    steps: list[tuple[int, float]], period_s: float, deadband: float
) -> None:
    s = _sampler({"parked": Profile("parked", signals={SOC: SignalRule(period_s, deadband)})})
    ts, value = 0, 50.0
    last_ts, last_value = None, None
    for gap, delta in steps:
        ts += gap
        value = min(100.0, max(0.0, value + delta))
        out = s.offer(ts, {SOC: value, SPEED: 0.0}).values
        if SOC in out:
            last_ts, last_value = ts, out[SOC]
        assert last_ts is not None and isinstance(last_value, float)
        # After every sample the cloud's view is within the deadband of the truth, and younger than the period.
        assert abs(value - last_value) <= deadband
        assert ts - last_ts < round(period_s * 1000) or ts == last_ts


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=200), st.floats(0.5, 60.0), st.data())
def test_without_a_deadband_reports_are_never_closer_than_the_period(
    gaps: list[int], period_s: float, data: st.DataObject
) -> None:
    s = _sampler({"parked": Profile("parked", signals={SOC: SignalRule(period_s, None)})})
    ts, reports = 0, []
    for gap in gaps:
        ts += gap
        soc = data.draw(st.floats(0.0, 100.0))  # wild values: without a deadband, change alone never sends
        if SOC in s.offer(ts, {SOC: soc, SPEED: 0.0}).values:
            reports.append(ts)
    assert reports and reports[0] == gaps[0]
    assert all(b - a >= round(period_s * 1000) for a, b in itertools.pairwise(reports))


def test_a_clock_stepping_back_restarts_the_timers() -> None:
    s = _sampler({"parked": Profile("parked", default_period_s=60.0)})
    assert s.offer(1_000_000, {SOC: 50.0}).values
    assert not s.offer(1_001_000, {SOC: 50.0}).values
    assert s.offer(5_000, {SOC: 50.0}).values == {SOC: 50.0}  # board clock unset: sent, not silenced for years


# --- vehicle mode and overrides ------------------------------------------------------------------------------


def test_mode_follows_speed_and_charging_current_with_dwell() -> None:
    changes: list[str] = []
    s = Sampler(SamplingConfig(), CAT, on_profile_change=changes.append)
    t = 0

    def feed(seconds: int, **values: float) -> None:
        nonlocal t
        for _ in range(seconds):
            s.offer(t, {SPEED: values.get("speed", 0.0), CURRENT: values.get("current", -0.3)})
            t += 1000

    feed(5)
    assert s.active_profile == "parked"
    feed(2, speed=20.0)  # under the 3 s riding dwell
    assert s.active_profile == "parked"
    feed(3, speed=20.0, current=-15.0)  # discharging while riding: negative current is not charging
    assert s.active_profile == "riding"
    feed(45)  # a long red light stays a ride
    assert s.active_profile == "riding"
    feed(20)
    assert s.active_profile == "parked"
    feed(11, current=4.0)  # positive current flows into the pack: charging
    assert s.active_profile == "charging"
    assert changes == ["riding", "parked", "charging"]


@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_mode_never_flaps_faster_than_its_dwell(moving: list[bool]) -> None:
    s = _sampler()
    switches: list[tuple[int, VehicleMode]] = []
    for i, m in enumerate(moving):
        before = s.mode
        s.offer(i * 1000, {SPEED: 25.0 if m else 0.0})
        if before is not None and s.mode != before:
            switches.append((i * 1000, s.mode))  # type: ignore[arg-type]
    for (t0, _), (t1, mode) in itertools.pairwise(switches):
        assert t1 - t0 >= SamplingConfig().state.dwell_ms(mode)


def test_override_wins_until_lifted_and_unknown_profiles_are_refused() -> None:
    changes: list[str] = []
    theft = Profile("theft", default_period_s=1.0)
    s = Sampler(SamplingConfig(profiles={"theft": theft}), CAT, on_profile_change=changes.append)
    s.offer(0, {SPEED: 0.0})
    s.set_override("theft")
    assert s.active_profile == "theft"
    s.set_override("riding")  # a mode name is always a valid override, configured or not
    assert s.active_profile == "riding"
    with pytest.raises(UnknownProfileError):
        s.set_override("thef")
    s.set_override(None)
    assert s.active_profile == "parked"
    assert changes == ["theft", "riding", "parked"]


# --- triggered capture -----------------------------------------------------------------------------------------

FULL = {SOC: 80.0, TEMP: 30.0, SPEED: 0.0, BRAKE: False}
QUIET = {"parked": Profile("parked", default_period_s=3600.0)}  # outside captures, nothing after the first sample


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([100, 200, 250, 500, 1000]), st.integers(0, 40))
def test_trigger_emits_exactly_the_pre_window_and_the_post_window_at_1_s(source_ms: int, before_s: int) -> None:
    s = _sampler(QUIET)
    start = 1_700_000_000_000
    trigger_at = start + 60_000 + before_s * 1000  # the ring has at least 60 s of history
    t = start
    full_ts: list[int] = []
    pre: list[tuple[int, dict[str, float | int | bool | str]]] = []
    while t < trigger_at + 60_000:
        out = s.offer(t, FULL, trigger=t == trigger_at)
        pre += out.pre_trigger
        if t > start and out.values:
            assert out.values == FULL  # inside a capture, samples go out whole
            full_ts.append(t)
        t += source_ms
    assert [ts for ts, _ in pre] == [trigger_at - 1000 * k for k in range(30, 0, -1)]
    assert all(row == FULL for _, row in pre)
    assert full_ts == [trigger_at + 1000 * k for k in range(30)]
    assert s.captures == 1


def test_a_second_trigger_extends_the_capture_without_resending_samples() -> None:
    s = _sampler(QUIET)
    pre, full = [], []
    for i in range(120):
        out = s.offer(i * 1000, FULL, trigger=i in (40, 55))
        pre += [ts for ts, _ in out.pre_trigger]
        if i and out.values:
            full.append(i * 1000)
    assert pre == [i * 1000 for i in range(10, 40)]  # the second trigger's pre-window was already sent whole
    assert full == [i * 1000 for i in range(40, 85)]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 50), st.integers(1, 400), st.sampled_from([50, 100, 1000]))
def test_the_ring_buffer_is_bounded_by_count_and_by_age(ring: int, samples: int, source_ms: int) -> None:
    s = _sampler(QUIET, ring_max_samples=ring)
    for i in range(samples):
        s.offer(i * source_ms, FULL)
        assert s.buffered <= ring
    out = s.offer(samples * source_ms, FULL, trigger=True)
    assert len(out.pre_trigger) <= ring
    assert all(samples * source_ms - ts <= 30_000 for ts, _ in out.pre_trigger)


# --- configuration -----------------------------------------------------------------------------------------------


def test_parse_sampling_reads_profiles_state_and_capture() -> None:
    cfg = parse_sampling(
        {
            "profiles": {
                "riding": {"default_period_s": 1.0, "signals": {SOC: {"period_s": 30, "deadband": 1.0}}},
                "parked": {"default_period_s": 300.0, "default_deadband": 0.5, "signals": {TEMP: {}}},
            },
            "state": {"riding_speed_kmh": 5, "parked_dwell_s": 90},
            "capture": {"pre_s": 20, "post_s": 40, "ring_max_samples": 100},
        },
        CAT,
    )
    assert cfg.profiles["riding"].rule(SOC) == SignalRule(30.0, 1.0)
    assert cfg.profiles["riding"].rule(TEMP) == SignalRule(1.0, None)
    assert cfg.profiles["parked"].rule(TEMP) == SignalRule(300.0, 0.5)  # an empty entry takes the defaults
    assert cfg.state.riding_speed_kmh == 5.0 and cfg.state.parked_dwell_s == 90.0
    assert (cfg.capture.pre_s, cfg.capture.post_s, cfg.capture.ring_max_samples) == (20.0, 40.0, 100)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"profiles": {"riding": {"signals": {"Powertrain.TractionBattery.StateOfCharg": {}}}}}, "unknown signal"),
        ({"profiles": {"riding": {"default_period": 1.0}}}, "unknown keys"),
        ({"profiles": {"riding": {"signals": {SOC: {"period_s": -1}}}}}, "period_s"),
        ({"state": {"speed_signals": [BRAKE]}}, "not numeric"),
        ({"capture": {"ring_max_samples": 1.5}}, "ring_max_samples"),
        ({"capture": {"trigger_level": 0}}, "trigger_level"),
        ({"sample_rate": 1}, "unknown keys"),
    ],
)
def test_bad_sampling_config_fails_with_config_error(table: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_sampling(table, CAT)


def test_latitude_and_longitude_always_travel_together() -> None:
    lat, lon = "CurrentLocation.Latitude", "CurrentLocation.Longitude"
    rules = {lat: SignalRule(3600.0, 0.0005), lon: SignalRule(3600.0, 0.0005)}
    s = _sampler({"parked": Profile("parked", default_period_s=3600.0, signals=rules)})
    assert s.offer(0, {lat: 29.5, lon: 106.5}).values == {lat: 29.5, lon: 106.5}
    assert s.offer(1000, {lat: 29.5001, lon: 106.5}).values == {}
    assert s.offer(2000, {lat: 29.501, lon: 106.5}).values == {lat: 29.501, lon: 106.5}  # only the latitude moved
