"""The operator API: auth, registration, vehicle/telemetry queries, metrics, OpenAPI, hostile input."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.db import Role
from cloud_ingest.service import IngestService
from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, seal_envelope

VIN = "LZHEB0A12P0000001"
KEY = DeviceKey.from_seed(b"\x05" * 32)
LAT = "CurrentLocation.Latitude"
LON = "CurrentLocation.Longitude"
SOC = "Powertrain.TractionBattery.StateOfCharge"
BEIDOU = "CurrentLocation.GNSSReceiver.BeiDouInUse"
SATS = "CurrentLocation.GNSSReceiver.SatellitesUsed"


class Api:
    def __init__(self, tmp: Path, database_url: str | None = None) -> None:
        self.svc = IngestService.open(tmp, database_url=database_url)
        self.client = TestClient(self.svc.app)
        self.admin = {"Authorization": f"Bearer {self.svc.registry.create_api_key(Role.ADMIN, 'root')}"}
        self.viewer = {"X-API-Key": self.svc.registry.create_api_key(Role.VIEWER, "dash")}

    def register(self, vin: str = VIN, key: DeviceKey = KEY, label: str | None = "test bike") -> Any:
        body = {"vin": vin, "public_key": base64.b64encode(key.public_raw).decode(), "label": label}
        return self.client.post("/v1/devices", json=body, headers=self.admin)

    def ingest(self, seq: int, batch: Batch, vin: str = VIN, key: DeviceKey = KEY) -> None:
        body = encode_batch(batch, self.svc.catalogue)
        raw = seal_envelope(Envelope(vin, key.key_id, 1, seq, 0, Kind.TELEMETRY, Flags.NONE, body), key)
        assert self.svc.pipeline.ingest_one(vin, raw).outcome == "stored"


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    a = Api(tmp_path, database_url)
    yield a
    a.client.close()
    a.svc.close()


def test_missing_or_unknown_key_is_401(api: Api) -> None:
    for headers in ({}, {"X-API-Key": "zk_nope"}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        r = api.client.get("/v1/vehicles", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"


def test_viewer_may_read_but_not_register(api: Api) -> None:
    assert api.client.get("/v1/vehicles", headers=api.viewer).status_code == 200
    body = {"vin": VIN, "public_key": base64.b64encode(KEY.public_raw).decode()}
    assert api.client.post("/v1/devices", json=body, headers=api.viewer).status_code == 403
    assert api.client.post("/v1/api-keys", json={"role": "admin", "name": "x"}, headers=api.viewer).status_code == 403


def test_registration_201_409_422(api: Api) -> None:
    r = api.register()
    assert r.status_code == 201
    assert r.json() == {"vin": VIN, "key_id": KEY.key_id.hex()}
    assert api.register().status_code == 201  # same key again: idempotent
    assert api.register(key=DeviceKey.from_seed(b"\x06" * 32)).status_code == 409
    bad_bodies: list[dict[str, Any]] = [
        {"vin": "bad vin", "public_key": base64.b64encode(KEY.public_raw).decode()},
        {"vin": VIN, "public_key": base64.b64encode(b"short").decode()},
        {"vin": VIN, "public_key": "!!not base64!!"},
        {"vin": VIN},
        {"vin": VIN, "public_key": base64.b64encode(KEY.public_raw).decode(), "label": "x" * 201},
    ]
    for body in bad_bodies:
        assert api.client.post("/v1/devices", json=body, headers=api.admin).status_code == 422, body


def test_latest_and_telemetry_return_what_was_ingested(api: Api) -> None:
    api.register()
    now = int(time.time() * 1000)
    ts = [now - 3000, now - 2000, now - 1000]
    batch = Batch(
        ts,
        {
            LAT: [31.2304, 31.2305, 31.2306],
            LON: [121.4737, None, 121.4739],
            SOC: [80.5, 80.4, 80.3],
            BEIDOU: [True, True, False],
            SATS: [9, 10, 11],
        },
    )
    api.ingest(1, batch)
    r = api.client.get(f"/v1/vehicles/{VIN}/latest", headers=api.viewer)
    assert r.status_code == 200
    latest = r.json()
    assert latest["ts_ms"] == ts[-1]
    assert latest["values"] == {LAT: 31.2306, LON: 121.4739, SOC: 80.3, BEIDOU: False, SATS: 11}

    r = api.client.get(
        f"/v1/vehicles/{VIN}/telemetry", params={"signals": f"{LAT},{LON},{BEIDOU},{SATS}"}, headers=api.viewer
    )
    assert r.status_code == 200
    got = r.json()
    assert got["timestamps_ms"] == ts
    assert got["signals"] == [LAT, LON, BEIDOU, SATS]
    assert got["columns"] == {k: batch.columns[k] for k in (LAT, LON, BEIDOU, SATS)}

    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((now - 2500) / 1000)) + ".500Z"
    r = api.client.get(f"/v1/vehicles/{VIN}/telemetry", params={"start": start, "limit": 1}, headers=api.viewer)
    assert r.json()["timestamps_ms"] == [ts[1]]

    vehicles = api.client.get("/v1/vehicles", headers=api.viewer).json()
    assert len(vehicles) == 1
    v = vehicles[0]
    assert (v["vin"], v["label"], v["messages"], v["samples"]) == (VIN, "test bike", 1, 3)
    assert v["position"]["lat"] == 31.2306 and v["position"]["lon"] == 121.4739
    assert v["last_seen"] is not None

    stats = api.client.get("/v1/ingest/stats", headers=api.viewer).json()
    assert stats["stored"] == 1 and stats["samples"] == 3


def test_query_errors(api: Api) -> None:
    api.register()
    r = api.client.get(f"/v1/vehicles/{VIN}/telemetry", params={"signals": f"{LAT},Foo.Bar,Baz"}, headers=api.viewer)
    assert r.status_code == 422
    assert r.json()["detail"]["unknown"] == ["Foo.Bar", "Baz"]
    assert api.client.get("/v1/vehicles/LZHEB0A12P0000777/telemetry", headers=api.viewer).status_code == 404
    assert api.client.get("/v1/vehicles/LZHEB0A12P0000777/latest", headers=api.viewer).status_code == 404
    assert api.client.get(f"/v1/vehicles/{VIN}/latest", headers=api.viewer).status_code == 404  # no data yet
    params = {"start": "2024-01-02T00:00:00Z", "end": "2024-01-01T00:00:00Z"}
    assert api.client.get(f"/v1/vehicles/{VIN}/telemetry", params=params, headers=api.viewer).status_code == 422
    for limit in ("0", "100001", "x"):
        r = api.client.get(f"/v1/vehicles/{VIN}/telemetry", params={"limit": limit}, headers=api.viewer)
        assert r.status_code == 422


def test_catalogue_api_keys_health_metrics_openapi(api: Api) -> None:
    cat = api.client.get("/v1/catalogue", headers=api.viewer).json()
    assert [s["name"] for s in cat] == api.svc.catalogue.names()
    r = api.client.post("/v1/api-keys", json={"role": "operator", "name": "ops"}, headers=api.admin)
    assert r.status_code == 201 and r.json()["role"] == "operator"
    op = {"Authorization": f"Bearer {r.json()['key']}"}
    assert api.client.get("/v1/ingest/stats", headers=op).status_code == 200
    assert api.client.post("/v1/api-keys", json={"role": "root", "name": "x"}, headers=api.admin).status_code == 422
    assert api.client.get("/healthz").json() == {"status": "ok"}
    api.svc.pipeline.ingest_one(None, b"junk")
    metrics = api.client.get("/metrics").text
    assert 'zhilian_ingest_messages_total{outcome="rejected",reason="malformed"} 1.0' in metrics
    assert 'zhilian_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in metrics
    spec = api.client.get("/openapi.json").json()
    assert {"/v1/devices", "/v1/vehicles", "/v1/vehicles/{vin}/telemetry", "/v1/catalogue"} <= set(spec["paths"])
    assert api.client.get("/docs").status_code == 200


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=50),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=10,
)
_device_bodies = st.one_of(
    _json,
    st.fixed_dictionaries(
        {
            "vin": st.one_of(st.text(max_size=40), st.from_regex(r"[A-Z0-9]{8,32}", fullmatch=True), _json),
            "public_key": st.one_of(
                st.text(max_size=60),
                st.binary(min_size=0, max_size=40).map(lambda b: base64.b64encode(b).decode()),
                _json,
            ),
        },
        optional={"label": st.one_of(st.none(), st.text(max_size=250), _json)},
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_device_bodies)
def test_registration_never_5xx(api: Api, body: Any) -> None:
    r = api.client.post("/v1/devices", json=body, headers=api.admin)
    assert r.status_code in (201, 409, 422), (body, r.text)


_param = st.one_of(st.none(), st.text(max_size=40), st.datetimes().map(lambda d: d.isoformat()), st.integers().map(str))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vin=st.one_of(st.just(VIN), st.text(min_size=1, max_size=40)),
    start=_param,
    end=_param,
    signals=st.one_of(st.none(), st.text(max_size=60), st.lists(st.sampled_from([LAT, SOC, "X.Y", ""])).map(",".join)),
    limit=_param,
)
def test_telemetry_query_never_5xx(
    api: Api, vin: str, start: str | None, end: str | None, signals: str | None, limit: str | None
) -> None:
    if api.svc.registry.get_device(VIN) is None:
        api.register()
    params = {
        k: v for k, v in {"start": start, "end": end, "signals": signals, "limit": limit}.items() if v is not None
    }
    r = api.client.get(f"/v1/vehicles/{quote(vin, safe='')}/telemetry", params=params, headers=api.viewer)
    assert r.status_code < 500, (vin, params, r.text)
