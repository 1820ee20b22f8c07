"""The operator queries, run against every backend (the `make_store` fixture of the time-series suite): fleet
snapshot with its filters, downsampled tracks, daily aggregates in a time zone. Same assertions for both."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.errors import QueryError, UnknownSignalError
from cloud_ingest.tsstore import (
    GNSS_SPEED,
    MAX_GAP_MS,
    PACK_CURRENT,
    PACK_TEMP_MAX,
    PACK_VOLTAGE,
    BBox,
    ChargingSession,
    TimeSeriesStore,
    TrackPoint,
    day_bounds,
)
from protocol import Batch
from tests import test_tsstore as suite
from tests.test_tsstore import BEIDOU, LAT, LON, SATS, SOC, StoreFactory

# The time-series suite's fixtures: every test here runs on SQLite and on a real InfluxDB.
make_store = suite.make_store
store = suite.store

SPEED = GNSS_SPEED
A, B, C = "LZHSNAP0000000001", "LZHSNAP0000000002", "LZHSNAP0000000003"


# -- fleet snapshot ---------------------------------------------------------------------------------------------


def _fleet(store: TimeSeriesStore) -> None:
    store.write_many(
        [
            # A: a fix, then BMS-only samples (in a garage), then a half position; SOC last seen before the end.
            (A, Batch([1000, 2000], {LAT: [31.20, 31.21], LON: [121.40, 121.41], SPEED: [12.5, 14.0]})),
            (A, Batch([3000, 4000], {SOC: [80.0, 79.5], SATS: [0, None], BEIDOU: [False, True]})),
            (A, Batch([5000], {LAT: [31.3]})),
            # B: never had a fix.
            (B, Batch([1500], {SOC: [50.0]})),
            # C: in Chongqing, silent since t = 500.
            (C, Batch([100, 500], {LAT: [29.56, 29.57], LON: [106.55, 106.56], SOC: [20.0, None]})),
        ]
    )


def test_snapshot_is_the_last_known_state_of_every_vehicle(store: TimeSeriesStore) -> None:
    assert store.fleet_snapshot([SOC]) == []
    _fleet(store)
    snap = {e.vin: e for e in store.fleet_snapshot([SOC, SPEED, SATS, BEIDOU])}
    assert list(snap) == [A, B, C]  # ordered by VIN
    a = snap[A]
    assert a.ts == 5000
    assert a.values == {SOC: 79.5, SPEED: 14.0, SATS: 0, BEIDOU: True}
    assert type(a.values[SATS]) is int and type(a.values[BEIDOU]) is bool and type(a.values[SPEED]) is float
    assert a.position == (2000, 31.21, 121.41)  # the half position at 5000 is not a position
    assert snap[B].ts == 1500 and snap[B].values == {SOC: 50.0} and snap[B].position is None
    assert snap[C].ts == 500 and snap[C].values == {SOC: 20.0} and snap[C].position == (500, 29.57, 106.56)
    for vin, entry in snap.items():
        assert entry.position == store.latest_position(vin)
    assert store.fleet_snapshot()[0].values == {}  # no signals asked: newest time and position only


def test_snapshot_ignores_older_data_arriving_late_and_merges_redeliveries(store: TimeSeriesStore) -> None:
    _fleet(store)
    # A backfilled spool (older samples) must not roll the snapshot back...
    store.write_many([(A, Batch([500, 2500], {SOC: [99.0, 98.0], LAT: [1.0, 1.5], LON: [2.0, 2.5]}))])
    # ...while a newer value does move it, and a redelivery of the newest sample changes nothing.
    store.write_many([(C, Batch([600], {SOC: [19.0]})), (C, Batch([600], {SOC: [19.0]}))])
    snap = {e.vin: e for e in store.fleet_snapshot([SOC])}
    assert snap[A].ts == 5000 and snap[A].values == {SOC: 79.5} and snap[A].position == (2500, 1.5, 2.5)
    assert snap[C].ts == 600 and snap[C].values == {SOC: 19.0} and snap[C].position == (500, 29.57, 106.56)


def test_snapshot_survives_a_restart_and_a_late_backfill(make_store: StoreFactory) -> None:
    first = make_store()
    _fleet(first)
    first.close()
    again = make_store()  # another process, or this one restarted
    # A spool drains late: older than the newest sample, newer than some values. Neither backend rolls the
    # vehicle's time or position back. (Which values it takes differs: SQLite compares per value, InfluxDB's
    # state after a restart only takes values newer than the newest sample — docs/STORAGE.md.)
    again.write_many([(A, Batch([2500, 4500], {SOC: [99.0, 98.0], SPEED: [1.0, 2.0]}))])
    a = again.fleet_snapshot([SOC, SPEED])[0]
    assert a.vin == A and a.ts == 5000 and a.position == (2000, 31.21, 121.41)
    again.write_many([(A, Batch([6000], {SOC: [70.0], LAT: [31.4], LON: [121.5]}))])
    a = again.fleet_snapshot([SOC, SPEED])[0]
    assert (a.ts, a.values[SOC], a.position) == (6000, 70.0, (6000, 31.4, 121.5))


def test_snapshot_filters(store: TimeSeriesStore) -> None:
    _fleet(store)

    def vins(**filters: Any) -> list[str]:
        return [e.vin for e in store.fleet_snapshot([SOC], **filters)]

    assert vins(vins=[C, A, "LZHNOTHERE0000001", "bad vin, \\ "]) == [A, C]
    assert vins(vins=[]) == []
    shanghai = BBox(min_lat=30.0, min_lon=120.0, max_lat=32.0, max_lon=122.0)
    assert vins(bbox=shanghai) == [A]
    assert vins(bbox=BBox(29.57, 106.56, 29.57, 106.56)) == [C]  # edges are inside
    assert vins(bbox=BBox(-90, -180, 90, 180)) == [A, C]  # B has no position
    assert vins(stale_before_ms=1500) == [C]  # newest sample strictly before
    assert vins(seen_since_ms=1500) == [A, B]
    assert vins(seen_since_ms=1000, stale_before_ms=5000, vins=[A, B]) == [B]
    with pytest.raises(UnknownSignalError):
        store.fleet_snapshot(["No.Such"])
    with pytest.raises(QueryError):
        BBox(10, 0, 0, 1)


# -- track ------------------------------------------------------------------------------------------------------

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def _ride(store: TimeSeriesStore, vin: str = A) -> None:
    """10 minutes at 1 Hz going north; no fix in minute 5 (a tunnel), no speed in minute 7."""
    ts = [T0 + 1000 * i for i in range(600)]
    lat: list[Any] = [30.0 + i * 1e-4 for i in range(600)]
    lon: list[Any] = [120.0 + i * 1e-5 for i in range(600)]
    speed: list[Any] = [float(i % 50) for i in range(600)]
    for i in range(300, 360):
        lat[i] = lon[i] = None
    for i in range(420, 480):
        speed[i] = None
    store.write_many([(vin, Batch(ts, {LAT: lat, LON: lon, SPEED: speed, SOC: [50.0] * 600}))])


def test_track_keeps_the_last_fix_and_the_top_speed_of_each_bucket(store: TimeSeriesStore) -> None:
    _ride(store)
    track = store.track(A, T0, T0 + 599_999, 60_000)
    assert [p.ts for p in track] == [T0 + 60_000 * k for k in range(10) if k != 5]
    first = track[0]
    assert first == TrackPoint(T0, 30.0 + 59e-4, 120.0 + 59e-5, 49.0, 60)
    by_ts = {p.ts: p for p in track}
    assert by_ts[T0 + 420_000].max_speed is None and by_ts[T0 + 420_000].samples == 60
    assert by_ts[T0 + 540_000].lat == 30.0 + 599e-4
    # Buckets start at `start`, not at a round minute; the range is inclusive at both ends.
    shifted = store.track(A, T0 + 30_000, T0 + 90_000, 60_000)
    assert [(p.ts, p.samples) for p in shifted] == [(T0 + 30_000, 60), (T0 + 90_000, 1)]
    assert shifted[0].lat == 30.0 + 89e-4 and shifted[1].lat == 30.0 + 90e-4
    # One bucket for the whole ride.
    (whole,) = store.track(A, T0 - 3_600_000, T0 + 3_600_000, 7_200_001)
    assert whole.samples == 540 and whole.lat == 30.0 + 599e-4 and whole.max_speed == 49.0
    assert store.track(B, T0, T0 + 600_000, 1000) == []
    assert store.track(A, T0 + 10**7, T0 + 2 * 10**7, 10**6) == []


def test_track_refuses_what_it_cannot_answer(store: TimeSeriesStore) -> None:
    with pytest.raises(QueryError):
        store.track(A, 0, 10_000_000, 1)  # 10 M buckets
    with pytest.raises(QueryError):
        store.track(A, 0, 10, 0)
    with pytest.raises(QueryError):
        store.track(A, 10, 0, 1)


_coords = st.floats(-80, 80, allow_nan=False)


@st.composite
def _samples(draw: st.DrawFn) -> list[tuple[int, float | None, float | None, float | None]]:
    stamps = sorted(draw(st.sets(st.integers(0, 600).map(lambda s: T0 + 1000 * s), min_size=1, max_size=40)))
    return [
        (t, draw(st.none() | _coords), draw(st.none() | _coords), draw(st.none() | st.floats(0, 400))) for t in stamps
    ]


_vins = iter(range(10**9))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=_samples(),
    start=st.integers(-100, 700).map(lambda s: T0 + 1000 * s),
    span=st.integers(0, 800_000),
    bucket=st.integers(1000, 300_000),
)
def test_track_matches_a_reference_downsampling(
    store: TimeSeriesStore,
    rows: list[tuple[int, float | None, float | None, float | None]],
    start: int,
    span: int,
    bucket: int,
) -> None:
    vin = f"LZHTRACK{next(_vins):09d}"
    ts = [r[0] for r in rows]
    store.write_many(
        [(vin, Batch(ts, {LAT: [r[1] for r in rows], LON: [r[2] for r in rows], SPEED: [r[3] for r in rows]}))]
    )
    end = start + span
    buckets: dict[int, list[tuple[int, float | None, float | None, float | None]]] = {}
    for r in rows:
        if start <= r[0] <= end:
            buckets.setdefault((r[0] - start) // bucket, []).append(r)
    expected = []
    for k, rs in sorted(buckets.items()):
        lats = [r[1] for r in rs if r[1] is not None]
        lons = [r[2] for r in rs if r[2] is not None]
        speeds = [r[3] for r in rs if r[3] is not None]
        if lats and lons:
            expected.append(TrackPoint(start + k * bucket, lats[-1], lons[-1], max(speeds, default=None), len(lats)))
    got = store.track(vin, start, end, bucket)
    assert got == expected
    assert all(start <= p.ts <= end for p in got)


# -- daily aggregates -------------------------------------------------------------------------------------------

SH = ZoneInfo("Asia/Shanghai")
DAY = date(2026, 3, 10)


def _local(hh: int, mm: int, ss: int = 0, day: date = DAY) -> int:
    return int(datetime(day.year, day.month, day.day, hh, mm, ss, tzinfo=SH).timestamp() * 1000)


def _day_of_riding_and_charging(store: TimeSeriesStore) -> None:
    prev_evening = _local(23, 59, 55, date(2026, 3, 9))
    ride = [_local(8, 0) + 1000 * i for i in range(600)]
    lone = _local(9, 10)  # alone an hour later: nothing to integrate it with
    charge = [_local(20, 0) + 10_000 * i for i in range(181)]  # 20:00:00 .. 20:30:00
    unplugged = _local(20, 30, 10)
    night = [_local(23, 50) + 10_000 * i for i in range(121)]  # 23:50 .. 00:10 next day
    n = len(night)
    store.write_many(
        [
            (
                A,
                Batch(
                    [prev_evening], {SPEED: [50.0], PACK_VOLTAGE: [50.0], PACK_CURRENT: [-20.0], PACK_TEMP_MAX: [60.0]}
                ),
            ),
            (
                A,
                Batch(
                    ride,
                    {
                        SPEED: [30.0] * 600,
                        PACK_VOLTAGE: [50.0] * 600,
                        PACK_CURRENT: [-10.0] * 600,
                        PACK_TEMP_MAX: [35.0] * 600,
                        LAT: [31.0] * 600,
                    },
                ),
            ),
            (A, Batch([lone], {SPEED: [20.0]})),
            (A, Batch(charge, {PACK_VOLTAGE: [54.0] * 181, PACK_CURRENT: [5.0] * 181, PACK_TEMP_MAX: [30.0] * 181})),
            (A, Batch([unplugged], {PACK_VOLTAGE: [54.0], PACK_CURRENT: [0.0]})),
            (
                A,
                Batch(
                    night,
                    {
                        PACK_VOLTAGE: [54.0] * n,
                        PACK_CURRENT: [5.0] * n,
                        PACK_TEMP_MAX: [70.0 if t >= _local(0, 0, 0, date(2026, 3, 11)) else 31.0 for t in night],
                    },
                ),
            ),
        ]
    )


def test_daily_aggregates_in_asia_shanghai(store: TimeSeriesStore) -> None:
    _day_of_riding_and_charging(store)
    d = store.daily(A, DAY, "Asia/Shanghai")
    assert (d.start_ms, d.end_ms) == (_local(0, 0), _local(0, 0, 0, date(2026, 3, 11)))
    assert d.start_ms == int(datetime(2026, 3, 9, 16, tzinfo=UTC).timestamp() * 1000)  # local midnight is 16:00Z
    assert d.samples == 600 + 1 + 181 + 1 + 60
    assert d.distance_km == pytest.approx(30.0 * 599 / 3600)  # 599 one-second segments at 30 km/h
    assert d.max_speed_kmh == 30.0
    assert d.energy_used_wh == pytest.approx(500.0 * 599 / 3600)  # 50 V × 10 A out
    # 20:00-20:30 at 270 W, the ramp down to the unplugged sample, 23:50-23:59:50 (the rest is tomorrow's).
    assert d.energy_charged_wh == pytest.approx(135.0 + 270 / 2 * 10 / 3600 + 44.25)
    assert d.charging_sessions == [
        ChargingSession(_local(20, 0), _local(20, 30), pytest.approx(135.0)),  # type: ignore[arg-type]
        ChargingSession(_local(23, 50), _local(23, 59, 50), pytest.approx(44.25)),  # type: ignore[arg-type]
    ]
    assert d.max_battery_temp_c == 35.0  # not yesterday's 60 nor tomorrow's 70

    nxt = store.daily(A, date(2026, 3, 11))  # Asia/Shanghai is the default
    assert nxt.samples == 61 and nxt.distance_km == 0.0 and nxt.energy_used_wh == 0.0
    midnight = _local(0, 0, 0, date(2026, 3, 11))
    assert nxt.charging_sessions == [
        ChargingSession(midnight, midnight + 600_000, pytest.approx(45.0))  # type: ignore[arg-type]
    ]
    assert nxt.max_battery_temp_c == 70.0

    prev = store.daily(A, date(2026, 3, 9))
    assert prev.samples == 1 and prev.max_battery_temp_c == 60.0 and prev.distance_km == 0.0
    # In UTC the day starts eight hours later: the ride (00:00-00:10Z) is still in it, the night is not.
    utc = store.daily(A, DAY, "UTC")
    assert utc.distance_km == pytest.approx(d.distance_km) and utc.samples == 600 + 1 + 181 + 1 + 121


def test_daily_of_an_empty_day_and_a_bad_zone(store: TimeSeriesStore) -> None:
    d = store.daily(A, DAY)
    assert (d.samples, d.distance_km, d.energy_used_wh, d.energy_charged_wh) == (0, 0.0, 0.0, 0.0)
    assert d.charging_sessions == [] and d.max_battery_temp_c is None and d.max_speed_kmh is None
    with pytest.raises(QueryError):
        store.daily(A, DAY, "Mars/Olympus_Mons")


def test_gaps_are_not_integrated() -> None:
    # Pure: the gap rule, at its edge.
    from cloud_ingest.tsstore import compute_daily

    start, end = day_bounds(DAY, "Asia/Shanghai")
    t = start + 1000
    cols: dict[str, list[Any]] = {n: [10.0] * 3 for n in (SPEED, PACK_VOLTAGE, PACK_TEMP_MAX)}
    page = Batch([t, t + MAX_GAP_MS, t + 2 * MAX_GAP_MS + 1], cols | {PACK_CURRENT: [-1.0] * 3})
    d = compute_daily(A, DAY, "Asia/Shanghai", start, end, [page])
    assert d.distance_km == pytest.approx(10.0 * MAX_GAP_MS / 3_600_000)
    assert d.energy_used_wh == pytest.approx(10.0 * MAX_GAP_MS / 3_600_000)
