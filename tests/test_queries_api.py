"""The operator query routes (cloud_ingest/routes_queries.py) over a real service: fleet snapshot, track, daily,
rollups, and the vehicle list's positions coming from one snapshot query; hostile parameters never give a 5xx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from cloud_ingest.db import Role
from cloud_ingest.retention import RetentionConfig
from cloud_ingest.routes_queries import SnapshotOut
from cloud_ingest.service import IngestService
from cloud_ingest.tsstore import GNSS_SPEED, PACK_CURRENT, PACK_VOLTAGE
from protocol import Batch, DeviceKey
from zhilian.influx import InfluxProcess

A, B, UNREGISTERED = "LZHAPIQ0000000001", "LZHAPIQ0000000002", "LZHAPIQ0000000009"
LAT, LON = "CurrentLocation.Latitude", "CurrentLocation.Longitude"
SOC = "Powertrain.TractionBattery.StateOfCharge"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z = 08:00 in Asia/Shanghai


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


class Service:
    def __init__(self, tmp: Path, **options: Any) -> None:
        self.svc = IngestService.open(tmp, hazard_rules=False, **options)
        self.client = TestClient(self.svc.app)
        self.viewer = {"X-API-Key": self.svc.registry.create_api_key(Role.VIEWER, "dash")}
        key = DeviceKey.from_seed(b"\x07" * 32)
        for vin in (A, B):
            self.svc.registry.register_device(vin, key.public_raw)
        ride = [T0 + 1000 * i for i in range(120)]
        self.svc.store.write_many(
            [
                (
                    A,
                    Batch(
                        ride,
                        {
                            LAT: [31.2 + i * 1e-4 for i in range(120)],
                            LON: [121.4] * 120,
                            GNSS_SPEED: [float(i % 40) for i in range(120)],
                            SOC: [80.0] * 120,
                            PACK_VOLTAGE: [50.0] * 120,
                            PACK_CURRENT: [-10.0] * 120,
                        },
                    ),
                ),
                (B, Batch([T0 - 3_600_000], {SOC: [12.5]})),  # B: an hour earlier, never a fix
            ]
        )

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params={k: v for k, v in params.items() if v is not None}, headers=self.viewer)

    def close(self) -> None:
        self.client.close()
        self.svc.close()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Service]:
    s = Service(tmp_path)
    yield s
    s.close()


def test_routes_need_a_viewer_key(api: Service) -> None:
    for path in ("/v1/fleet/snapshot", f"/v1/vehicles/{A}/track", f"/v1/vehicles/{A}/daily?date=2026-01-01"):
        assert api.client.get(path).status_code == 401, path


def test_fleet_snapshot_route(api: Service) -> None:
    r = api.get("/v1/fleet/snapshot")
    assert r.status_code == 200
    body = r.json()
    SnapshotOut.model_validate(body)  # the hand-made JSON is what the documented model says
    assert body["count"] == 2 and [v["vin"] for v in body["vehicles"]] == [A, B]
    a, b = ({**v, "values": dict(zip(body["signals"], v["values"], strict=True))} for v in body["vehicles"])
    assert a["values"][SOC] == 80.0 and a["values"][GNSS_SPEED] == 39.0 and a["values"]["Speed"] is None
    assert a["position"] == {"lat": pytest.approx(31.2 + 119e-4), "lon": 121.4, "ts": "2026-01-01T00:01:59Z"}
    assert b["position"] is None and b["ts"] == "2025-12-31T23:00:00Z"
    assert {k: v for k, v in b["values"].items() if v is not None} == {SOC: 12.5}

    only = api.get("/v1/fleet/snapshot", signals=f"{LAT},{SOC}", vins=f"{B},{UNREGISTERED}").json()
    assert only["signals"] == [LAT, SOC] and [(v["vin"], v["values"]) for v in only["vehicles"]] == [(B, [None, 12.5])]
    assert [v["vin"] for v in api.get("/v1/fleet/snapshot", bbox="121,31,122,32").json()["vehicles"]] == [A]
    assert api.get("/v1/fleet/snapshot", bbox="0,0,1,1").json()["count"] == 0
    assert [v["vin"] for v in api.get("/v1/fleet/snapshot", stale_since=_iso(T0)).json()["vehicles"]] == [B]
    assert [v["vin"] for v in api.get("/v1/fleet/snapshot", seen_since=_iso(T0)).json()["vehicles"]] == [A]
    for bad in ({"signals": "No.Such"}, {"bbox": "1,2,3"}, {"bbox": "10,0,0,1"}, {"bbox": "a,b,c,d"}):
        assert api.get("/v1/fleet/snapshot", **bad).status_code == 422, bad
    too_many = ",".join(f"LZHMANY{i:010d}" for i in range(1001))
    assert api.get("/v1/fleet/snapshot", vins=too_many).status_code == 422


def test_vehicle_list_positions_come_from_the_snapshot(api: Service) -> None:
    vehicles = {v["vin"]: v for v in api.get("/v1/vehicles").json()}
    assert vehicles[A]["position"] == {"lat": pytest.approx(31.2 + 119e-4), "lon": 121.4, "ts": "2026-01-01T00:01:59Z"}
    assert vehicles[B]["position"] is None
    assert api.get("/v1/vehicles", offset=10).json() == []


def test_track_route(api: Service) -> None:
    r = api.get(f"/v1/vehicles/{A}/track", **{"from": _iso(T0), "to": _iso(T0 + 119_999), "points": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bucket_ms"] == 30_000 and len(body["points"]) == 4
    first = body["points"][0]
    assert first["ts"] == "2026-01-01T00:00:00Z" and first["samples"] == 30 and first["max_speed_kmh"] == 29.0
    assert first["lat"] == pytest.approx(31.2 + 29e-4)
    by_interval = api.get(f"/v1/vehicles/{A}/track", **{"from": _iso(T0), "to": _iso(T0 + 119_999), "interval": 60})
    assert [p["samples"] for p in by_interval.json()["points"]] == [60, 60]
    # Default range: the 24 hours before `to`.
    assert len(api.get(f"/v1/vehicles/{A}/track", to=_iso(T0 + 3_600_000)).json()["points"]) >= 1
    assert api.get(f"/v1/vehicles/{UNREGISTERED}/track").status_code == 404
    assert api.get(f"/v1/vehicles/{A}/track", **{"from": _iso(T0 + 1), "to": _iso(T0)}).status_code == 422
    tiny = {"from": _iso(T0), "to": _iso(T0 + 86_400_000), "interval": 0.001}
    assert api.get(f"/v1/vehicles/{A}/track", **tiny).status_code == 422  # 86 M buckets
    assert api.get(f"/v1/vehicles/{A}/track", points=0).status_code == 422


def test_daily_route(api: Service) -> None:
    r = api.get(f"/v1/vehicles/{A}/daily", date="2026-01-01")
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["tz"] == "Asia/Shanghai" and d["start"] == "2025-12-31T16:00:00Z" and d["end"] == "2026-01-01T16:00:00Z"
    assert d["samples"] == 120
    expected_km = sum((i % 40 + (i + 1) % 40) / 2 for i in range(119)) / 3600  # 1 s trapezoids
    assert d["distance_km"] == pytest.approx(expected_km) and d["max_speed_kmh"] == 39.0
    assert d["energy_used_wh"] == pytest.approx(500 * 119 / 3600) and d["charging_sessions"] == []
    assert api.get(f"/v1/vehicles/{A}/daily", date="2026-01-01", tz="UTC").json()["samples"] == 120
    assert api.get(f"/v1/vehicles/{A}/daily", date="2025-12-31").json()["samples"] == 0
    assert api.get(f"/v1/vehicles/{A}/daily", date="2026-01-01", tz="No/Where").status_code == 422
    assert api.get(f"/v1/vehicles/{A}/daily", date="yesterday").status_code == 422
    assert api.get(f"/v1/vehicles/{A}/daily").status_code == 422
    assert api.get(f"/v1/vehicles/{UNREGISTERED}/daily", date="2026-01-01").status_code == 404


def test_rollup_route_with_and_without_retention(api: Service, tmp_path: Path) -> None:
    assert api.get(f"/v1/vehicles/{A}/rollup").status_code == 404  # this service keeps no rollups
    kept = Service(tmp_path / "kept", retention=RetentionConfig())
    try:
        # The maintenance thread starts with the service and rolls up everything written so far.
        assert kept.svc.maintenance is not None
        deadline = time.monotonic() + 30
        while kept.svc.maintenance.runs < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        kept.svc.store.rollup(T0 - 3_600_000, T0 + 120_000)  # the writes may have come after its first run
        r = kept.get(f"/v1/vehicles/{A}/rollup", **{"from": _iso(T0), "to": _iso(T0 + 60_000), "signals": SOC})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "vin": A,
            "signals": [SOC],
            "timestamps": ["2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z"],
            "samples": [60, 60],
            "means": {SOC: [80.0, 80.0]},
        }
        bad = kept.get(f"/v1/vehicles/{A}/rollup", signals="Powertrain.TractionBattery.Barcode")
        assert bad.status_code == 422
    finally:
        kept.close()
    assert kept.svc.maintenance is not None and not kept.svc.maintenance._thread.is_alive()


def test_snapshot_route_on_influx(influxd: InfluxProcess, influx_database: str, tmp_path: Path) -> None:
    s = Service(tmp_path, influx_url=influxd.url, influx_db=influx_database)
    try:
        body = s.get("/v1/fleet/snapshot", signals=SOC).json()
        assert [(v["vin"], v["values"]) for v in body["vehicles"]] == [(A, [80.0]), (B, [12.5])]
        vehicles = {v["vin"]: v["position"] for v in s.get("/v1/vehicles").json()}
        assert vehicles[A]["ts"] == "2026-01-01T00:01:59Z" and vehicles[B] is None
        assert (
            s.get(f"/v1/vehicles/{A}/track", **{"from": _iso(T0), "to": _iso(T0 + 119_999), "points": 2}).json()[
                "points"
            ][1]["samples"]
            == 60
        )
    finally:
        s.close()


# -- never a 5xx --------------------------------------------------------------------------------------------------

_text = st.text(max_size=40)
_when = st.one_of(
    st.none(), _text, st.datetimes().map(lambda d: d.isoformat()), st.integers().map(str), st.just("9999-12-31")
)
_num = st.one_of(st.none(), _text, st.integers().map(str), st.floats().map(str))
_vin = st.one_of(st.sampled_from([A, B, UNREGISTERED]), st.text(min_size=1, max_size=30))


def _ok(status: int) -> bool:
    return status < 500


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    signals=st.one_of(st.none(), _text, st.lists(st.sampled_from([LAT, SOC, "X.Y", ""])).map(",".join)),
    vins=st.one_of(st.none(), _text, st.lists(_vin, max_size=5).map(",".join)),
    bbox=st.one_of(
        st.none(), _text, st.lists(st.floats(), min_size=4, max_size=4).map(lambda f: ",".join(map(str, f)))
    ),
    stale=_when,
    seen=_when,
)
def test_snapshot_never_5xx(
    api: Service, signals: str | None, vins: str | None, bbox: str | None, stale: str | None, seen: str | None
) -> None:
    r = api.get("/v1/fleet/snapshot", signals=signals, vins=vins, bbox=bbox, stale_since=stale, seen_since=seen)
    assert _ok(r.status_code), r.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vin=_vin, start=_when, end=_when, points=_num, interval=_num)
def test_track_never_5xx(
    api: Service, vin: str, start: str | None, end: str | None, points: str | None, interval: str | None
) -> None:
    params = {"from": start, "to": end, "points": points, "interval": interval}
    r = api.get(f"/v1/vehicles/{quote(vin, safe='')}/track", **params)
    assert _ok(r.status_code), r.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vin=_vin,
    day=st.one_of(st.none(), _text, st.dates().map(str)),
    tz=st.one_of(
        st.none(), _text, st.sampled_from(["UTC", "Asia/Shanghai", "America/St_Johns", "../etc", "Etc/GMT+14"])
    ),
)
def test_daily_never_5xx(api: Service, vin: str, day: str | None, tz: str | None) -> None:
    r = api.get(f"/v1/vehicles/{quote(vin, safe='')}/daily", date=day, tz=tz)
    assert _ok(r.status_code), r.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vin=_vin, start=_when, end=_when, signals=st.one_of(st.none(), _text, st.just(SOC)), limit=_num)
def test_rollup_never_5xx(
    api: Service, vin: str, start: str | None, end: str | None, signals: str | None, limit: str | None
) -> None:
    params = {"from": start, "to": end, "signals": signals, "limit": limit}
    r = api.get(f"/v1/vehicles/{quote(vin, safe='')}/rollup", **params)
    assert _ok(r.status_code), r.text


_MS = st.integers(-(2**40), 253_402_300_799_999)
_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.text()
)


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.text(min_size=1), max_size=4, unique=True),
    rows=st.lists(
        st.tuples(
            st.text(min_size=1),
            _MS,
            st.lists(_VALUE, min_size=4, max_size=4),
            st.none() | st.tuples(_MS, st.floats(-90, 90), st.floats(-180, 180)),
        ),
        max_size=5,
    ),
)
def test_the_hand_made_snapshot_is_the_json_pydantic_writes(names: list[str], rows: list[Any]) -> None:
    from cloud_ingest.routes_queries import snapshot_json
    from cloud_ingest.tsstore import FleetEntry

    entries = [
        FleetEntry(vin, ts, {n: v for n, v in zip(names, values, strict=False) if v is not None}, pos)
        for vin, ts, values, pos in rows
    ]
    body = snapshot_json(names, entries)
    assert json.loads(body) == json.loads(SnapshotOut.model_validate_json(body).model_dump_json())
    # Times byte for byte as pydantic writes them (`Z`, microseconds only when there are any).
    for e, v in zip(entries, json.loads(body)["vehicles"], strict=True):
        assert v["ts"] == json.loads(
            TypeAdapter(datetime).dump_json(datetime.fromtimestamp(0, UTC) + timedelta(milliseconds=e.ts))
        )
