"""The edge hazard pre-check (edge_agent/precheck.py): tiers, debounce, hysteresis, one raise and one clear per
episode, chemistry presets, the temperature-rise rule, and the alert rows that travel in ALERT envelopes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.config import ConfigError
from edge_agent.precheck import (
    LEVEL_SIGNAL,
    RULE_SIGNAL,
    Alert,
    AlertState,
    Precheck,
    PrecheckConfig,
    alert_rows,
    parse_precheck,
)
from protocol import Batch, decode_batch, encode_batch, load_catalogue
from protocol.batch import batch_from_rows

CAT = load_catalogue()
TEMP = "Powertrain.TractionBattery.Temperature.Max"
CELL_MAX = "Powertrain.TractionBattery.CellVoltage.Max"
CELL_MIN = "Powertrain.TractionBattery.CellVoltage.Min"
CTRL = "Powertrain.ElectricMotor.ControllerTemperature"


def _run(check: Precheck, series: list[dict[str, float]], step_ms: int = 1000) -> list[Alert]:
    alerts: list[Alert] = []
    for i, values in enumerate(series):
        alerts += check.update(i * step_ms, values)
    return alerts


def _normal(temp: float = 30.0) -> dict[str, float]:
    return {TEMP: temp, CELL_MAX: 4.05, CELL_MIN: 3.95, CTRL: 45.0}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-20.0, 54.9), st.floats(3.01, 4.24), st.floats(3.01, 4.24), st.floats(-30.0, 84.9)),
        min_size=1,
        max_size=120,
    ),
)
def test_values_within_limits_raise_nothing(rows: list[tuple[float, float, float, float]]) -> None:
    check = Precheck(PrecheckConfig(temperature_rise={}), CAT)
    series = [{TEMP: t, CELL_MAX: max(a, b), CELL_MIN: min(a, b), CTRL: c} for t, a, b, c in rows]
    assert _run(check, series) == []
    assert check.active == {}


@given(st.lists(st.floats(-0.02, 0.02), min_size=1, max_size=200), st.floats(-10.0, 50.0))
def test_a_slowly_drifting_temperature_raises_nothing(drift: list[float], start: float) -> None:
    check = Precheck(PrecheckConfig(), CAT)
    temp, series = start, []
    for d in drift:  # at most 0.02 degC per second, far below the 0.1 degC/s level-1 rise
        temp += d
        series.append(_normal(temp))
    assert _run(check, series) == []


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 10),
    st.lists(st.floats(55.0, 80.0), min_size=3, max_size=30),
    st.lists(st.floats(52.0, 80.0), max_size=30),
    st.lists(st.floats(-10.0, 51.9), min_size=6, max_size=20),
)
def test_one_episode_raises_once_escalates_upwards_and_clears_once(
    calm: int, hot: list[float], wobble: list[float], cool: list[float]
) -> None:
    # hot: >= 3 s above level 1 (debounce 2 s); wobble: inside the 3 degC hysteresis band or hotter;
    # cool: >= 6 s below the band (clear_s 5 s).
    check = Precheck(PrecheckConfig(temperature_rise={}), CAT)
    temps = [30.0] * calm + hot + wobble + cool
    alerts = [a for a in _run(check, [_normal(t) for t in temps]) if a.rule == "over_temperature.battery"]
    states = [a.state for a in alerts]
    assert states.count(AlertState.RAISED) == 1 and states.count(AlertState.CLEARED) == 1
    assert states[0] is AlertState.RAISED and states[-1] is AlertState.CLEARED
    levels = [a.level for a in alerts[:-1]]
    assert levels == sorted(set(levels)) and levels[0] >= 1 and levels[-1] <= 3
    assert alerts[-1].level == levels[-1]  # the clear reports the highest level the episode reached
    assert check.active == {} and check.raised == check.cleared == 1


def test_tiers_debounce_and_values_of_the_alert() -> None:
    check = Precheck(PrecheckConfig(temperature_rise={}), CAT)
    series = [_normal(30.0), _normal(61.0), _normal(40.0), _normal(56.0), _normal(57.0), _normal(58.0)]
    series += [_normal(66.0), _normal(60.0), _normal(53.0)]
    alerts = _run(check, series)
    # The 1 s spike at 61 degC is shorter than the 2 s debounce; the climb from 56 raises at level 1 after 2 s.
    assert [(a.ts_ms, a.state, a.level) for a in alerts] == [
        (5000, AlertState.RAISED, 1),
        (6000, AlertState.ESCALATED, 3),
    ]
    assert alerts[0].values == {TEMP: 58.0} and alerts[0].measure == 58.0
    assert check.active == {"over_temperature.battery": 3}


@pytest.mark.parametrize(
    ("chemistry", "cell_max", "cell_min", "expected"),
    [
        ("nmc", 4.18, 3.40, set()),
        ("nmc", 4.36, 3.40, {("cell_overvoltage", 3)}),
        ("nmc", 4.10, 2.90, {("cell_undervoltage", 1)}),
        ("lfp", 3.70, 3.20, {("cell_overvoltage", 1)}),
        ("lfp", 3.40, 2.40, {("cell_undervoltage", 2)}),
    ],
)
def test_cell_voltage_thresholds_follow_the_chemistry(
    chemistry: str, cell_max: float, cell_min: float, expected: set[tuple[str, int]]
) -> None:
    check = Precheck(parse_precheck({"chemistry": chemistry}, CAT), CAT)
    alerts = _run(check, [{CELL_MAX: cell_max, CELL_MIN: cell_min}] * 4)
    assert {(a.rule, a.level) for a in alerts} == expected


def test_a_thermal_runaway_rise_reaches_level_3_and_a_warm_up_does_not() -> None:
    check = Precheck(PrecheckConfig(), CAT)
    runaway = _run(check, [_normal(30.0 + 1.5 * i) for i in range(15)])
    rise = [a for a in runaway if a.rule == "temperature_rise.battery"]
    assert rise and rise[0].state is AlertState.RAISED and max(a.level for a in rise) == 3
    assert rise[0].measure == pytest.approx(1.5)
    warm_up = Precheck(PrecheckConfig(), CAT)
    assert _run(warm_up, [_normal(30.0 + 0.05 * i) for i in range(300)]) == []


def test_disabled_precheck_raises_nothing() -> None:
    check = Precheck(parse_precheck({"enabled": False}, CAT), CAT)
    assert _run(check, [_normal(99.0)] * 10) == []


def test_alert_rows_encode_as_a_columnar_batch_with_rule_and_level() -> None:
    check = Precheck(parse_precheck({"debounce_s": 0}, CAT), CAT)
    alerts = check.update(1_700_000_000_000, {TEMP: 70.0, CELL_MAX: 4.4, CELL_MIN: 3.5})
    assert len(alerts) == 2
    body = encode_batch(batch_from_rows(alert_rows(alerts)), CAT)
    got: Batch = decode_batch(body, CAT).batch
    # Two alerts of one sample keep their own rows (1 ms apart), so the cloud's (vin, ts) rows do not merge them.
    assert got.timestamps == [1_700_000_000_000, 1_700_000_000_001]
    assert got.columns[RULE_SIGNAL] == ["cell_overvoltage", "over_temperature.battery"]
    assert got.columns[LEVEL_SIGNAL] == [3, 3]
    assert got.columns[CELL_MAX] == [4.4, None] and got.columns[TEMP] == [None, 70.0]
    cleared = Alert("cell_overvoltage", 2, AlertState.CLEARED, 5, 4.1, {CELL_MAX: 4.1})
    assert alert_rows([cleared]) == [(5, {RULE_SIGNAL: "cell_overvoltage", LEVEL_SIGNAL: 0, CELL_MAX: 4.1})]


def test_parse_precheck_replaces_rule_sets_and_fills_cell_presets() -> None:
    cfg = parse_precheck(
        {
            "chemistry": "lfp",
            "debounce_s": 1,
            "over_temperature": {"pack": {"signal": TEMP, "levels": [50, 55], "hysteresis": 2}},
            "temperature_rise": {},
            "cell_undervoltage": {"levels": [2.8, 2.6, 2.4]},
        },
        CAT,
    )
    assert set(cfg.rules()) == {"over_temperature.pack", "cell_overvoltage", "cell_undervoltage"}
    assert cfg.over_temperature["pack"].levels == (50.0, 55.0)
    assert cfg.cell_overvoltage.levels == (3.65, 3.75, 3.85)
    assert cfg.cell_undervoltage.levels == (2.8, 2.6, 2.4) and cfg.cell_undervoltage.hysteresis == 0.1


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"chemistry": "lead"}, "chemistry"),
        ({"over_temperature": {"x": {"signal": "Powertrain.TractionBattery.Temp", "levels": [1]}}}, "unknown signal"),
        ({"over_temperature": {"x": {"signal": TEMP, "levels": [60, 55]}}}, "increasing"),
        ({"cell_undervoltage": {"levels": [2.5, 2.8]}}, "decreasing"),
        ({"cell_overvoltage": {"levels": [4.2, 4.3, 4.4, 4.5]}}, "1 to 3"),
        ({"over_temperature": {"x": {"signal": "Chassis.Brake.IsEngaged", "levels": [1]}}}, "not numeric"),
        ({"temperature_rise": {"x": {"signal": TEMP, "window_s": 0}}}, "window_s"),
        ({"debounce": 1}, "unknown keys"),
    ],
)
def test_bad_precheck_config_fails_with_config_error(table: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_precheck(table, CAT)
