"""Life cycles through the operator API and the ingest pipeline, on SQLite and PostgreSQL: every legal transition,
every illegal one (409), telemetry-driven transitions, battery swaps, health thresholds and the history."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.db import Role
from cloud_ingest.lifecycle import (
    BARCODE,
    BATTERY,
    BATTERY_TRANSITIONS,
    GNSS_SPEED,
    PACK_CURRENT,
    SOH,
    VEHICLE,
    VEHICLE_TRANSITIONS,
    BatteryState,
    Source,
    VehicleState,
)
from cloud_ingest.service import IngestService
from protocol import DeviceKey, Envelope, Flags, Kind, encode_batch, seal_envelope
from protocol.batch import batch_from_rows
from tests.relational import fresh_database

KEY = DeviceKey.from_seed(b"\x51" * 32)
NOW_MS = int(time.time() * 1000)
T0 = NOW_MS - 6 * 3_600_000  # telemetry in these tests happened hours ago; API calls happen now
_serial = itertools.count(1)


def new_vin() -> str:
    return f"LZLC{next(_serial):013d}"


def new_barcode() -> str:
    return f"BT-{next(_serial):08d}"


def api_edges(transitions: Mapping[tuple[Any, Any], frozenset[Source]]) -> list[tuple[Any, Any]]:
    return [edge for edge, who in transitions.items() if Source.API in who]


def path_to(transitions: Mapping[tuple[Any, Any], frozenset[Source]], initial: Any, target: Any) -> list[Any]:
    """The shortest sequence of operator transitions from `initial` to `target` (breadth first)."""
    before: dict[Any, Any] = {initial: None}
    todo = deque([initial])
    while todo:
        state = todo.popleft()
        for frm, to in api_edges(transitions):
            if frm == state and to not in before:
                before[to] = state
                todo.append(to)
    steps = []
    while target != initial:
        steps.append(target)
        target = before[target]
    return steps[::-1]


class Api:
    def __init__(self, svc: IngestService) -> None:
        self.svc = svc
        self.client = TestClient(svc.app)
        self.operator = {"Authorization": f"Bearer {svc.registry.create_api_key(Role.OPERATOR, 'alice')}"}
        self.viewer = {"X-API-Key": svc.registry.create_api_key(Role.VIEWER, "dash")}
        self._seq = itertools.count(1)

    # -- vehicles -------------------------------------------------------------------------------------------

    def new_vehicle(self, state: VehicleState = VehicleState.MANUFACTURED) -> str:
        vin = new_vin()
        self.svc.registry.register_device(vin, KEY.public_raw)
        for step in path_to(VEHICLE_TRANSITIONS, VehicleState.MANUFACTURED, state):
            r = self.move_vehicle(vin, step)
            assert r.status_code == 200, r.text
        return vin

    def vehicle(self, vin: str, **query: int) -> dict[str, Any]:
        r = self.client.get(f"/v1/vehicles/{vin}/lifecycle", params=query, headers=self.viewer)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def move_vehicle(self, vin: str, to: str, note: str | None = None) -> httpx.Response:
        body = {"to": to} if note is None else {"to": to, "note": note}
        return self.client.post(f"/v1/vehicles/{vin}/lifecycle", json=body, headers=self.operator)

    # -- batteries ------------------------------------------------------------------------------------------

    def new_battery(self, state: BatteryState = BatteryState.MANUFACTURED, **data: Any) -> str:
        barcode = new_barcode()
        r = self.client.post("/v1/batteries", json={"barcode": barcode, **data}, headers=self.operator)
        assert r.status_code == 201, r.text
        for step in path_to(BATTERY_TRANSITIONS, BatteryState.MANUFACTURED, state):
            r = self.move_battery(barcode, step)
            assert r.status_code == 200, r.text
        return barcode

    def battery(self, barcode: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/batteries/{barcode}/lifecycle", headers=self.viewer)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def move_battery(self, barcode: str, to: str, vin: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"to": to}
        if to == BatteryState.PAIRED:
            body["vin"] = vin or self.new_vehicle()
        return self.client.post(f"/v1/batteries/{barcode}/lifecycle", json=body, headers=self.operator)

    # -- telemetry ------------------------------------------------------------------------------------------

    def seal(self, vin: str, rows: list[tuple[int, dict[str, Any]]]) -> bytes:
        body = encode_batch(batch_from_rows(rows), self.svc.catalogue)
        return seal_envelope(
            Envelope(vin, KEY.key_id, 1, next(self._seq), rows[0][0], Kind.TELEMETRY, Flags.NONE, body), KEY
        )

    def send(self, vin: str, rows: list[tuple[int, dict[str, Any]]]) -> bytes:
        raw = self.seal(vin, rows)
        result = self.svc.pipeline.ingest_one(vin, raw)
        assert result.outcome == "stored", result
        return raw


def open_api(tmp: Path, url: str, hazard_rules: bool = False) -> Iterator[Api]:
    svc = IngestService.open(tmp, database_url=url, hazard_rules=hazard_rules)
    api = Api(svc)
    try:
        yield api
    finally:
        api.client.close()
        svc.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One service per backend for the whole module: every test works on vehicles and batteries of its own."""
    tmp = tmp_path_factory.mktemp("lifecycle")
    if request.param == "sqlite":
        yield from open_api(tmp, f"sqlite:///{tmp / 'registry.db'}")
        return
    with fresh_database(request.getfixturevalue("postgres_admin")) as url:
        yield from open_api(tmp, url)


# --- the transition tables through the API -------------------------------------------------------------------


@pytest.mark.parametrize("edge", api_edges(VEHICLE_TRANSITIONS), ids=lambda e: f"{e[0]}->{e[1]}")
def test_every_legal_vehicle_transition(api: Api, edge: tuple[VehicleState, VehicleState]) -> None:
    frm, to = edge
    vin = api.new_vehicle(frm)
    r = api.move_vehicle(vin, to, note="checked by the test")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["state"] == to
    assert got["next_states"] == [s.value for s in VEHICLE.next_states(to, Source.API)]
    assert (got["activity"] == "parked") is (to is VehicleState.ACTIVE)
    last = got["history"][-1]
    assert (last["event"], last["from_state"], last["to_state"]) == ("transition", frm, to)
    assert last["source"] == "api" and last["actor"] == "operator:alice"
    assert last["note"].startswith("checked by the test")
    assert abs(last["ts_ms"] - time.time() * 1000) < 600_000


@pytest.mark.parametrize("state", list(VehicleState), ids=str)
def test_every_illegal_vehicle_transition_is_409_and_changes_nothing(api: Api, state: VehicleState) -> None:
    vin = api.new_vehicle(state)
    before = api.vehicle(vin)
    legal = [s.value for s in VEHICLE.next_states(state, Source.API)]
    assert before["state"] == state and before["next_states"] == legal
    illegal = [to for to in VehicleState if to.value not in legal]
    assert illegal and state in illegal
    for to in illegal:
        r = api.move_vehicle(vin, to)
        assert r.status_code == 409, (state, to, r.text)
        detail = r.json()["detail"]
        assert (detail["entity"], detail["from"], detail["to"], detail["allowed"]) == ("vehicle", state, to, legal)
        assert f"{state.value} -> {to.value}" in detail["message"]
    for junk in ("parked", "riding", "flying", "", None, 3):
        assert api.move_vehicle(vin, junk).status_code == 422  # type: ignore[arg-type]
    assert api.vehicle(vin) == before


@pytest.mark.parametrize("edge", api_edges(BATTERY_TRANSITIONS), ids=lambda e: f"{e[0]}->{e[1]}")
def test_every_legal_battery_transition(api: Api, edge: tuple[BatteryState, BatteryState]) -> None:
    frm, to = edge
    barcode = api.new_battery(frm)
    vin = api.new_vehicle(VehicleState.REGISTERED) if to is BatteryState.PAIRED else None
    bound = api.battery(barcode)["vin"]
    r = api.move_battery(barcode, to, vin)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["state"] == to
    assert got["next_states"] == [s.value for s in BATTERY.next_states(to, Source.API)]
    moved = [e for e in got["history"] if e["event"] == "transition"][-1]
    assert (moved["from_state"], moved["to_state"], moved["source"]) == (frm, to, "api")
    if to is BatteryState.PAIRED:
        assert got["vin"] == vin and api.vehicle(vin)["battery_barcode"] == barcode
    elif to in (BatteryState.RETIRED, BatteryState.RECYCLED, BatteryState.LOST):
        assert got["vin"] is None  # out of the vehicle
        if bound is not None:
            vehicle = api.vehicle(bound)
            assert vehicle["battery_barcode"] is None
            assert vehicle["history"][-1]["event"] == "unpaired" and vehicle["history"][-1]["related"] == barcode
    else:
        assert got["vin"] == bound


@pytest.mark.parametrize("state", list(BatteryState), ids=str)
def test_every_illegal_battery_transition_is_409_and_changes_nothing(api: Api, state: BatteryState) -> None:
    barcode = api.new_battery(state)
    before = api.battery(barcode)
    legal = [s.value for s in BATTERY.next_states(state, Source.API)]
    assert before["next_states"] == legal
    for to in BatteryState:
        if to.value in legal:
            continue
        r = api.move_battery(barcode, to, vin=api.new_vehicle() if to is BatteryState.PAIRED else None)
        assert r.status_code == 409, (state, to, r.text)
        detail = r.json()["detail"]
        assert (detail["entity"], detail["from"], detail["to"], detail["allowed"]) == ("battery", state, to, legal)
    assert api.battery(barcode) == before


def test_requests_the_machines_cannot_carry_out(api: Api) -> None:
    c, op = api.client, api.operator
    assert c.post("/v1/vehicles/LZLCNOBODY0000001/lifecycle", json={"to": "sold"}, headers=op).status_code == 404
    assert c.get("/v1/vehicles/LZLCNOBODY0000001/lifecycle", headers=api.viewer).status_code == 404
    assert c.get("/v1/vehicles/not-a-vin/lifecycle", headers=api.viewer).status_code == 404
    vin = api.new_vehicle()
    assert c.post(f"/v1/vehicles/{vin}/lifecycle", json={"to": "sold"}, headers=api.viewer).status_code == 403
    assert c.post(f"/v1/vehicles/{vin}/lifecycle", json={"to": "sold"}).status_code == 401
    assert c.post(f"/v1/vehicles/{vin}/lifecycle", json={"to": "sold", "x": 1}, headers=op).status_code == 422
    assert c.post(f"/v1/vehicles/{vin}/lifecycle", json={"to": "sold", "note": "a\x00b"}, headers=op).status_code == 422
    barcode = api.new_battery()
    path = f"/v1/batteries/{barcode}/lifecycle"
    assert c.post(path, json={"to": "paired"}, headers=op).status_code == 422  # pairing needs the vehicle
    assert c.post(path, json={"to": "paired", "vin": "LZLCNOBODY0000001"}, headers=op).status_code == 422
    assert c.post(path, json={"to": "lost", "vin": vin}, headers=op).status_code == 422
    assert c.post("/v1/batteries/NOPE/lifecycle", json={"to": "lost"}, headers=op).status_code == 404
    assert c.get("/v1/batteries/NOPE", headers=api.viewer).status_code == 404
    assert c.get(f"/v1/vehicles/{vin}/lifecycle?from_ms=10&to_ms=5", headers=api.viewer).status_code == 422


def test_battery_registration(api: Api) -> None:
    c, op = api.client, api.operator
    barcode = new_barcode()
    data = {
        "barcode": barcode,
        "chemistry": "LFP",
        "capacity_ah": 20.0,
        "cells": 16,
        "manufactured": "2024-03-01",
        "service_life_years": 5,
    }
    r = c.post("/v1/batteries", json=data, headers=op)
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["state"] == "manufactured" and got["registered"] is True and got["expires"] == "2029-03-01"
    assert got["next_states"] == ["paired", "lost"]
    assert c.post("/v1/batteries", json=data, headers=op).status_code == 200  # the same again: nothing changes
    assert c.post("/v1/batteries", json={**data, "cells": 15}, headers=op).status_code == 409
    assert c.get(f"/v1/batteries/{barcode}", headers=api.viewer).json() == got
    history = api.battery(barcode)["history"]
    assert [(e["from_state"], e["to_state"], e["actor"]) for e in history] == [(None, "manufactured", "operator:alice")]
    for bad in (
        {**data, "barcode": "has space"},
        {**data, "barcode": "a/b"},
        {**data, "barcode": "x" * 65},
        {**data, "chemistry": "plutonium"},
        {**data, "capacity_ah": -1},
        {**data, "manufactured": "yesterday"},
    ):
        assert c.post("/v1/batteries", json=bad, headers=op).status_code == 422, bad


def test_history_is_in_machine_order_and_filters_by_time(api: Api) -> None:
    vin = api.new_vehicle(VehicleState.REGISTERED)
    api.send(vin, [(T0, {GNSS_SPEED: 0.0})])  # telemetry activates it, hours ago
    for to in ("locked", "active", "in_repair", "active"):
        assert api.move_vehicle(vin, to).status_code == 200
    history = api.vehicle(vin)["history"]
    moves = [(e["from_state"], e["to_state"]) for e in history if e["event"] == "transition"]
    assert moves == [
        ("manufactured", "sold"),
        ("sold", "registered"),
        ("registered", "active"),
        ("active", "locked"),
        ("locked", "active"),
        ("active", "in_repair"),
        ("in_repair", "active"),
    ]
    assert [e["id"] for e in history] == sorted(e["id"] for e in history)
    assert history[-1]["note"].startswith("serviced; next service at")
    old = api.vehicle(vin, to_ms=T0 + 60_000)["history"]
    assert [(e["to_state"], e["source"]) for e in old] == [("active", "telemetry")]
    assert old[0]["ts_ms"] == T0 and old[0]["actor"] == "telemetry"
    recent = api.vehicle(vin, from_ms=NOW_MS - 60_000)["history"]
    assert len(recent) == len(history) - 1 and all(e["source"] == "api" for e in recent)
    assert len(api.vehicle(vin, limit=2)["history"]) == 2


# --- telemetry through the pipeline --------------------------------------------------------------------------


@pytest.fixture
def ingest(tmp_path: Path, database_url: str) -> Iterator[Api]:
    # With the hazard rules on: both observers of the pipeline work side by side.
    yield from open_api(tmp_path / "ingest", database_url, hazard_rules=True)


def seconds(start: int, count: int, **values: Any) -> list[tuple[int, dict[str, Any]]]:
    return [(start + i * 1000, dict(values)) for i in range(count)]


def test_first_activation_sub_states_and_distance_from_telemetry(ingest: Api) -> None:
    api = ingest
    unsold = api.new_vehicle()
    api.send(unsold, seconds(T0, 5, **{GNSS_SPEED: 12.0}))
    assert api.vehicle(unsold)["state"] == "manufactured"  # telemetry does not sell or register a vehicle
    vin = api.new_vehicle(VehicleState.REGISTERED)
    api.send(vin, seconds(T0, 3, **{GNSS_SPEED: 0.0}))
    got = api.vehicle(vin)
    assert (got["state"], got["activity"], got["since_ms"]) == ("active", "parked", T0)
    first = got["history"][-1]
    assert (first["from_state"], first["to_state"], first["source"], first["ts_ms"]) == (
        "registered",
        "active",
        "telemetry",
        T0,
    )
    raw = api.send(vin, seconds(T0 + 10_000, 60, **{GNSS_SPEED: 36.0}))
    got = api.vehicle(vin)
    assert got["activity"] == "riding" and got["activity_since_ms"] == T0 + 10_000
    # 40 m over the 8 s from rest (speed interpolated between samples), then 59 s at 10 m/s.
    assert got["odometer_km"] == pytest.approx(0.63, abs=0.001)
    # A redelivered message is a duplicate: the machines do not move twice.
    assert api.svc.pipeline.ingest_one(vin, raw).outcome == "duplicate"
    assert api.vehicle(vin) == got
    api.send(vin, seconds(T0 + 70_000, 200, **{GNSS_SPEED: 0.0, PACK_CURRENT: 0.0}))
    api.send(vin, seconds(T0 + 270_000, 60, **{GNSS_SPEED: 0.0, PACK_CURRENT: 4.0}))
    got = api.vehicle(vin)
    acts = [(e["from_state"], e["to_state"]) for e in got["history"] if e["event"] == "activity"]
    assert acts == [("parked", "riding"), ("riding", "parked"), ("parked", "charging")]
    assert got["activity"] == "charging"


def test_battery_swap_is_detected_by_a_changed_barcode(ingest: Api) -> None:
    api = ingest
    vin = api.new_vehicle(VehicleState.REGISTERED)
    api.send(vin, [(T0, {BARCODE: "PACK-A", PACK_CURRENT: -5.0})])
    a = api.battery("PACK-A")
    assert (a["registered"], a["state"], a["vin"]) == (False, "in_service", vin)
    assert [(e["from_state"], e["to_state"]) for e in a["history"] if e["event"] == "transition"] == [
        (None, "manufactured"),
        ("manufactured", "paired"),
        ("paired", "in_service"),
    ]
    b_code = api.new_battery(chemistry="NMC")
    api.send(vin, [(T0 + 1000, {BARCODE: b_code, PACK_CURRENT: -3.0})])
    car = api.vehicle(vin)
    assert car["battery_barcode"] == b_code
    assert [(e["event"], e["related"]) for e in car["history"] if e["event"] == "paired"] == [
        ("paired", "PACK-A"),
        ("paired", b_code),
    ]
    a = api.battery("PACK-A")
    assert a["vin"] is None and a["state"] == "in_service"
    assert (a["history"][-1]["event"], a["history"][-1]["related"]) == ("unpaired", vin)
    b = api.battery(b_code)
    assert (b["state"], b["vin"]) == ("in_service", vin)
    # The pack moves on to another vehicle: the first one is left without a battery.
    other = api.new_vehicle(VehicleState.REGISTERED)
    api.send(other, [(T0 + 2000, {BARCODE: b_code})])
    assert api.battery(b_code)["vin"] == other
    car = api.vehicle(vin)
    assert car["battery_barcode"] is None
    assert (car["history"][-1]["event"], car["history"][-1]["related"]) == ("unpaired", b_code)
    # The registered data of the pack survived telemetry's updates; a telemetry-only pack can still be registered.
    assert api.client.get(f"/v1/batteries/{b_code}", headers=api.viewer).json()["chemistry"] == "NMC"
    r = api.client.post("/v1/batteries", json={"barcode": "PACK-A", "cells": 13}, headers=api.operator)
    assert r.status_code == 200 and r.json()["registered"] is True and r.json()["state"] == "in_service"


@pytest.mark.parametrize("taker_first", [False, True], ids=["holder-first", "taker-first"])
def test_a_pack_moving_between_two_vehicles_of_one_ingest_call(ingest: Api, taker_first: bool) -> None:
    """Both vehicles' rows are loaded by the same call: the holder's release must reach its row too (it is
    written back once, at the end of the call), whichever of the two the call processes first (VIN order)."""
    api = ingest
    low, high = sorted([api.new_vehicle(VehicleState.REGISTERED), api.new_vehicle(VehicleState.REGISTERED)])
    holder, taker = (high, low) if taker_first else (low, high)
    code = new_barcode()
    api.send(holder, [(T0, {BARCODE: code, PACK_CURRENT: -5.0})])
    assert api.vehicle(holder)["battery_barcode"] == code
    results = api.svc.pipeline.ingest_many(
        [
            (holder, api.seal(holder, [(T0 + 1000, {PACK_CURRENT: 0.0})])),
            (taker, api.seal(taker, [(T0 + 2000, {BARCODE: code, PACK_CURRENT: -4.0})])),
        ]
    )
    assert [r.outcome for r in results] == ["stored", "stored"]
    assert api.battery(code)["vin"] == taker
    assert api.vehicle(taker)["battery_barcode"] == code
    left = api.vehicle(holder)
    assert left["battery_barcode"] is None
    unpaired = [e for e in left["history"] if e["event"] == "unpaired"]
    assert [(e["related"], e["source"]) for e in unpaired] == [(code, "telemetry")]


def test_soh_and_service_life_thresholds_from_telemetry(ingest: Api) -> None:
    api = ingest
    vin = api.new_vehicle(VehicleState.REGISTERED)
    api.send(vin, [(T0, {BARCODE: "PACK-S", PACK_CURRENT: -2.0, SOH: 90.0})])
    assert api.battery("PACK-S")["state"] == "in_service"
    api.send(vin, [(T0 + 1000, {SOH: 79.5})])
    assert api.battery("PACK-S")["state"] == "in_service"  # one report past the threshold: not yet
    api.send(vin, [(T0 + 2000, {SOH: 79.5})])
    got = api.battery("PACK-S")
    assert (got["state"], got["soh_pct"]) == ("warning", 79.5)
    assert got["history"][-1]["note"] == "SOH 79.5 % <= 80 %"
    api.send(vin, [(T0 + 3000, {SOH: 69.0}), (T0 + 4000, {SOH: 68.5})])
    got = api.battery("PACK-S")
    assert got["state"] == "quarantined" and got["history"][-1]["source"] == "telemetry"
    assert got["history"][-1]["note"] == "SOH 69 % <= 70 %"
    # An inspection returns it to service; telemetry quarantines it again while its SOH stays that low.
    for to in ("inspected", "in_service"):
        assert api.move_battery("PACK-S", to).status_code == 200
    api.send(vin, [(T0 + 5000, {SOH: 69.0})])
    assert api.battery("PACK-S")["state"] == "quarantined"
    # Past its marked service life, a pack is quarantined at its first sample in service.
    old = api.new_battery(chemistry="LFP", manufactured="2019-01-01", service_life_years=5)
    car = api.new_vehicle(VehicleState.REGISTERED)
    api.send(car, [(T0, {BARCODE: old, PACK_CURRENT: -1.0, SOH: 97.0})])
    got = api.battery(old)
    assert got["state"] == "quarantined" and got["history"][-1]["note"] == "service life ended 2024-01-01"


# --- hostile input -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=10,
)
states = st.sampled_from([*VehicleState, *BatteryState, "parked", "x"])
texts = st.text(max_size=80)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vin=st.one_of(st.just("REAL"), st.text(max_size=40)),
    barcode=st.one_of(st.just("REAL"), st.text(max_size=70)),
    body=st.one_of(
        json_values,
        st.fixed_dictionaries({"to": states}, optional={"note": texts, "vin": st.one_of(st.just("REAL"), texts)}),
    ),
    battery=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"barcode": texts},
            optional={
                "chemistry": st.sampled_from(["NMC", "LFP", "x"]),
                "capacity_ah": json_values,
                "cells": json_values,
                "manufactured": st.one_of(st.dates().map(str), texts),
                "service_life_years": json_values,
            },
        ),
    ),
    query=st.dictionaries(st.sampled_from(["from_ms", "to_ms", "limit"]), st.integers(-(2**64), 2**64), max_size=3),
)
def test_lifecycle_endpoints_never_fail_on_hostile_input(
    api: Api, vin: str, barcode: str, body: Any, battery: Any, query: dict[str, int]
) -> None:
    real_vin = api.new_vehicle() if vin == "REAL" else vin
    if isinstance(body, dict) and body.get("vin") == "REAL":
        body["vin"] = real_vin
    if barcode == "REAL":
        barcode = api.new_battery()
    v = f"/v1/vehicles/{quote(real_vin, safe='')}/lifecycle"
    b = f"/v1/batteries/{quote(barcode, safe='')}"
    c = api.client
    for r in (
        c.post(v, json=body, headers=api.operator),
        c.get(v, params=query, headers=api.viewer),
        c.post(f"{b}/lifecycle", json=body, headers=api.operator),
        c.get(f"{b}/lifecycle", params=query, headers=api.viewer),
        c.get(b, headers=api.viewer),
        c.post("/v1/batteries", json=battery, headers=api.operator),
    ):
        assert r.status_code < 500, (r.request.method, r.request.url, r.status_code, r.text)
