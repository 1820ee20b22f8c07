"""Hazard scenarios end to end: injected faults (simulators/faults.py) → signed envelopes → real Mosquitto → bridge →
ingest (verify, dedupe, store, rules) → the alarm API, held against the faults' ground truth.

Protocol level, simulated clock. Each scenario vehicle is a `FaultedModel` whose samples are what the edge agent
would take from its devices (`AgentView`), batched 30 to an envelope (an agent with `batch_interval_s = 30`) and
sealed with the agent's own `Sealer` — the bytes an agent publishes. Time runs in lockstep rounds of one batch:
every vehicle publishes its batch, the round waits until the pipeline has stored them all, then the alarm
service's clock (the one the offline rule and the deadlines run on) moves to the end of the round and the service
ticks once. So an hour of riding takes seconds, and vehicle time and service time agree as they would live. A
vehicle that is offline keeps its batches (as the agent's spool does) and sends them as backfill when it is back.
The samples are made in a second process, ahead of the rounds: they cost more CPU than ingesting them.

One scenario per fault kind checks that its ground truth reached the store (the telemetry API shows the injected
values) and that every expected alarm was raised at its level by its deadline and cleared after the fault, with
nothing but the allowed side effects besides; near misses — faults just short of a threshold — raise nothing; and
a mixed normal fleet (e-bikes and e-motorcycles, NMC and LFP, couriers and commuters) raises nothing over one
simulated hour. Together the positive scenarios expect every rule of the rules file (docs/RULES.md has the table).
A fault's ground truth may need the cloud to know
something first (the owner locks the vehicle, a pack's production date, a no-charging zone drawn over a stairwell):
its `Action`s are applied through the API before the round they concern.

A scenario vehicle publishes from a minute before its fault's script takes it over and retires once its alarms had
time to clear; what the API says about it is taken then. The world runs past its hour for a scenario that needs
longer (an hour of charging at full); the fleet's alarms are taken at the hour.

`test_crash_through_the_device_chain` runs the same kind of check through the real device chain in real time:
GNSS, JBD BMS and motor controller emulated on ptys → edge agent → Mosquitto → bridge → rules.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_ingest.alarms import AlarmsConfig
from cloud_ingest.rules import load_rules
from edge_agent.agent import EdgeAgent
from edge_agent.batcher import Sealer
from edge_agent.config import AgentConfig
from protocol import DeviceKey, Flags, Kind, encode_batch, load_catalogue
from protocol.batch import batch_from_rows
from simulators.bms_jbd import JbdBmsEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.faults import (
    OVERCURRENT_BIT,
    Action,
    AgentView,
    Fault,
    FaultedModel,
    GroundTruth,
    dump_ground_truth,
    load_ground_truth,
)
from simulators.gnss import GnssEmulator
from simulators.roads import graph_route_for
from tests.conftest import Stack, running_stack, wait_until
from zhilian.broker import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CAT = load_catalogue()
T_SIM0 = 1_767_578_400.0  # 2026-01-05 10:00 China time: mid-morning, no rush hour
ROUND_S = 30  # one batch per vehicle per round: 30 samples at 1 Hz (an agent with batch_interval_s = 30)
FLEET_S = 3600
FLEET_VEHICLES = 10
FAULT_AT = 600.0  # scenario faults start this far into the run (a crash a little off the sample grid)
B = "Powertrain.TractionBattery."


@dataclass
class Scenario:
    name: str
    family: str
    faults: list[Fault]
    variant: str = "ebike48"
    seed: int = 1
    # Published from a minute before the fault's script takes the vehicle over, or from `lead_s` before the fault:
    # the later kinds' scripts set longer scenes (a night parked outdoors, the ride to a swap) than the rules need
    # to see, and their ground truth is graded on the model, not on what was published.
    lead_s: float | None = None
    watch_s: float = 400.0  # a near miss is watched this long after its fault: any late alarm would show

    @property
    def positive(self) -> bool:
        return self.family == "fault"


NEW: dict[str, Any] = {"lead_s": 150.0, "watch_s": 120.0}


def _f(kind: str, duration: float, offset: float = 0.0, **params: Any) -> Fault:
    start = T_SIM0 + FAULT_AT + offset
    return Fault(kind, start, start + duration, params)


SCENARIOS = [
    # One per injected fault kind.
    Scenario("thermal_runaway", "fault", [_f("thermal_runaway", 60)]),
    Scenario("thermal_runaway_precursor", "fault", [_f("thermal_runaway_precursor", 240)], seed=2),
    Scenario("cell_imbalance", "fault", [_f("cell_imbalance", 240)], seed=3),
    Scenario("internal_short", "fault", [_f("internal_short", 660)], seed=4),
    Scenario("speed_limiter_tampering", "fault", [_f("speed_limiter_tampering", 300)], seed=5),
    Scenario("wheel_size_tampering", "fault", [_f("wheel_size_tampering", 360)], seed=6),
    Scenario("unbound_battery_swap", "fault", [_f("unbound_battery_swap", 300)], seed=7),
    Scenario("theft", "fault", [_f("theft", 300)], seed=8),
    Scenario("crash", "fault", [_f("crash", 40, offset=0.4)], variant="emoto72", seed=9),
    Scenario("gnss_jamming", "fault", [_f("gnss_jamming", 200)], seed=10),
    Scenario("offline", "fault", [_f("offline", 120, interval_s=ROUND_S)], seed=11),
    # One near miss per fault family: close to a threshold, and nothing may fire.
    Scenario("near_thermal", "thermal", [_f("thermal_runaway_precursor", 300, rate_c_per_min=1.5)], seed=12),
    Scenario("near_cells_spread", "cells", [_f("cell_imbalance", 240, delta_mv=110.0)], seed=13),
    Scenario("near_cells_short", "cells", [_f("internal_short", 600, fall_mv=10.0, rate_mv_per_min=2.0)], seed=14),
    Scenario(
        "near_tampering", "tampering", [_f("speed_limiter_tampering", 300, limit_kmh=26.5, reconfigure=False)], seed=15
    ),
    Scenario("near_swap", "battery", [_f("unbound_battery_swap", 300, bound=True)], seed=16),
    Scenario("near_theft", "theft", [_f("theft", 60, mode="nudged")], seed=17),
    Scenario("near_crash", "crash", [_f("crash", 40, offset=0.4, decel_ms2=6.0)], variant="emoto72", seed=18),
    Scenario("near_gnss", "gnss", [_f("gnss_jamming", 60)], seed=19),
    Scenario("near_offline", "offline", [_f("offline", 60, interval_s=ROUND_S)], seed=20),
    # The rules no fault above reaches, one fault kind each, and a near miss each. Their ground truth grades the
    # model itself, during and after the fault, so a shorter lead-in and watch do.
    Scenario("hot_spot", "fault", [_f("hot_spot", 600)], seed=53, **NEW),
    Scenario("cold_charging", "fault", [_f("cold_charging", 300)], seed=22, **NEW),
    Scenario("overcharge", "fault", [_f("overcharge", 600)], seed=43, **NEW),
    Scenario("over_discharged_pack", "fault", [_f("over_discharged_pack", 300)], seed=48, **NEW),
    Scenario("bms_reset", "fault", [_f("bms_reset", 300)], seed=24, **NEW),
    Scenario("bms_overcurrent", "fault", [_f("bms_overcurrent", 600)], seed=40, **NEW),
    Scenario("pack_end_of_life", "fault", [_f("pack_end_of_life", 420)], seed=30, **NEW),
    # An hour at full takes the world a few rounds past its hour: plugged in 150 s after the world starts.
    Scenario("charger_no_cutoff", "fault", [_f("charger_no_cutoff", 3660, offset=150 - FAULT_AT)], seed=32, watch_s=60),
    Scenario("forbidden_charging", "fault", [_f("forbidden_charging", 300)], seed=34, **NEW),
    Scenario("pushed_indoors", "fault", [_f("pushed_indoors", 300)], seed=37, **NEW),
    Scenario("near_hot_spot", "thermal", [_f("hot_spot", 600, r_contact_ohm=0.04)], seed=53, **NEW),
    Scenario("near_cold_charging", "charging", [_f("cold_charging", 300, ambient_c=-0.5)], seed=26, **NEW),
    Scenario("near_overcharge", "charging", [_f("overcharge", 600, charger_v_per_cell=4.22)], seed=47, **NEW),
    Scenario("near_over_discharge", "cells", [_f("over_discharged_pack", 300, depth_pct=2.0)], seed=49, **NEW),
    Scenario("near_bms_reset", "battery", [_f("bms_reset", 300, offset=15)], seed=24, **NEW),
    Scenario("near_overcurrent", "battery", [_f("bms_overcurrent", 600, ocp_a=24.0)], seed=46, **NEW),
    Scenario("near_end_of_life", "battery", [_f("pack_end_of_life", 180)], seed=31, **NEW),
    # A trickle just under the rule's charge current: after the charger's own taper, never "charging" again.
    Scenario(
        "near_no_cutoff", "charging", [_f("charger_no_cutoff", 600, offset=150 - FAULT_AT, trickle_a=0.15)], seed=33
    ),
    Scenario(
        "near_forbidden_charging",
        "charging",
        [_f("forbidden_charging", 300, zone_offset_m=35.0)],
        seed=35,
        **NEW,
    ),
    Scenario("near_pushed_indoors", "motion", [_f("pushed_indoors", 300, push_s=12.0, floors=0)], seed=38, **NEW),
    # A wheel within the tolerance of the factory record (another tyre): neither config nor speed rules fire.
    Scenario("near_config", "tampering", [_f("wheel_size_tampering", 360, configured_inch=16.2)], seed=39, **NEW),
]


def _vin(n: int) -> str:
    return f"LZHSCN{n:011d}"


def _key(vin: str) -> DeviceKey:
    # Derived from the VIN, so the generator process and the test process hold the same keys.
    return DeviceKey.from_seed(hashlib.sha256(f"zhilian-scenario/{vin}".encode()).digest())


@dataclass(frozen=True)
class VehicleSpec:
    """Everything a process needs to rebuild one simulated vehicle."""

    vin: str
    seed: int
    variant: str
    faults: tuple[Fault, ...]
    until: float  # unix s: it stops publishing after this (its scenario is over)
    rider: str = "courier"
    chemistry: str = "NMC"
    since: float = T_SIM0  # unix s: it publishes from this round on

    def model(self) -> FaultedModel:
        return FaultedModel(
            graph_route_for(self.seed),
            self.seed,
            T_SIM0,
            self.variant,
            faults=self.faults,
            rider=self.rider,
            chemistry=self.chemistry,
        )


def _round_up(t: float) -> int:
    return int(T_SIM0) + math.ceil((t - T_SIM0) / ROUND_S) * ROUND_S


def _specs() -> tuple[list[VehicleSpec], list[VehicleSpec], dict[str, list[GroundTruth]]]:
    scenarios = []
    all_truths: dict[str, list[GroundTruth]] = {}
    for n, sc in enumerate(SCENARIOS):
        model = FaultedModel(graph_route_for(sc.seed), sc.seed, T_SIM0, sc.variant, faults=sc.faults)
        truths = all_truths[_vin(n)] = model.ground_truth(_vin(n))
        horizon = max(f.end for f in sc.faults) + sc.watch_s
        for t in truths:
            horizon = max([horizon, *(e.clear_by_ms / 1000 + ROUND_S for e in t.expected if e.clear_by_ms)])
        takeover = model.takes_over_at() - 60.0 if sc.lead_s is None else min(f.start for f in sc.faults) - sc.lead_s
        since = max(int(T_SIM0), _round_up(takeover - ROUND_S))
        spec = VehicleSpec(_vin(n), sc.seed, sc.variant, tuple(sc.faults), _round_up(horizon), since=since)
        scenarios.append(spec)
    # A mixed fleet: e-bikes and e-motorcycles, NMC and LFP packs, couriers riding and commuters parked and
    # charging at work.
    fleet = [
        VehicleSpec(
            _vin(1000 + i),
            100 + i,
            "emoto72" if i % 4 == 3 else "ebike48",
            (),
            T_SIM0 + FLEET_S,
            rider="commuter" if i % 3 == 2 else "courier",
            chemistry="LFP" if i % 5 == 1 else "NMC",
        )
        for i in range(FLEET_VEHICLES)
    ]
    return scenarios, fleet, all_truths


class SimVehicle:
    """A protocol-level vehicle: the agent's samples of a (faulted) model, sealed as the agent seals them."""

    def __init__(self, spec: VehicleSpec) -> None:
        self.spec = spec
        self.vin = spec.vin
        self.model = spec.model()
        self.view = AgentView(self.model)
        self.key = _key(spec.vin)
        self.sealer = Sealer(spec.vin, self.key, boot=1)
        self.held: list[bytes] = []  # encoded bodies spooled while offline

    def round(self, t0: int, t1: int) -> list[tuple[str, bytes]]:
        """Sample [t0, t1) at 1 Hz; the envelopes to publish at t1 (none while offline, the backlog after)."""
        rows = []
        online = True
        for t in range(t0, t1):
            ts, values, state = self.view.sample(float(t))
            rows.append((ts, values))
            online = state.online
        self.held.append(encode_batch(batch_from_rows(rows), CAT))
        if not online:
            return []
        out = []
        backlog, self.held = self.held, []
        for k, body in enumerate(backlog):
            flags = Flags.BACKFILL if k < len(backlog) - 1 else Flags.NONE
            sealed = self.sealer.seal_body(body, ROUND_S, t1 * 1000, Kind.TELEMETRY, flags)
            out.append((sealed.topic, sealed.payload))
        return out


def profile_of(spec: VehicleSpec) -> dict[str, Any]:
    """The registration record the rules read: the approved pack(s), the factory controller settings."""
    m = spec.model()
    return {
        "model": m.variant.name,
        "variant": m.variant.name,
        "chemistry": m.chemistry.name,
        "battery_barcodes": sorted(m.bound_barcodes),
        "battery_capacity_ah": m.nominal_ah,
        "battery_cell_count": m.cells,
        "speed_limit_kmh": m.variant.speed_limit_kmh,
        "wheel_inch": m.variant.wheel_inch,
        "locked": False,
        "reporting_interval_s": float(ROUND_S),
    }


def generate(specs: list[VehicleSpec], start: int, end: int, out: Any) -> None:
    """The generator process: every round's envelopes, in order, into the queue `out` (bounded: it waits for the
    test to catch up); then None. Samples cost more than ingesting them, so they are made on the other core."""
    try:
        vehicles = [SimVehicle(s) for s in specs]
        for r in range(start, end, ROUND_S):
            msgs = [m for v in vehicles if v.spec.since <= r < v.spec.until for m in v.round(r, r + ROUND_S)]
            out.put((r, msgs))
        out.put(None)
    except BaseException as exc:  # the test must hear of it, not wait for a round that never comes
        out.put(("error", repr(exc)))
        raise


class SimClock:
    """The alarm service's clock: vehicle time, moved on by the driver once a round is stored."""

    def __init__(self, t: float) -> None:
        self.ms = round(t * 1000)

    def now_ms(self) -> int:
        return self.ms


class Publisher:
    """One paho client at QoS 1 for every simulated vehicle (the broker here has no per-vehicle ACL)."""

    def __init__(self, broker: MosquittoProcess) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="scenario-publisher")
        self.client.max_inflight_messages_set(200)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()

    def publish(self, messages: list[tuple[str, bytes]]) -> None:
        infos = [self.client.publish(topic, payload, qos=1) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
            if not info.is_published():
                raise AssertionError("the broker did not acknowledge a scenario message within 30 s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Outcome:
    alarms: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # vin -> GET /v1/alarms?vin=
    telemetry: dict[str, dict[str, Any]] = field(default_factory=dict)  # vin -> GET telemetry of its scenario
    truths: dict[str, list[GroundTruth]] = field(default_factory=dict)
    fleet_alarms: list[dict[str, Any]] = field(default_factory=list)
    fleet_samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class _World:
    stack: Stack
    clock: SimClock
    api: httpx.AsyncClient
    admin: dict[str, str]
    operator: dict[str, str]
    viewer: dict[str, str]
    publisher: Publisher


async def _snapshot(w: _World, spec: VehicleSpec, out: Outcome) -> None:
    """What the API says about a scenario vehicle once its scenario is over: its alarms and its telemetry."""
    resp = await w.api.get("/v1/alarms", params={"vin": spec.vin, "limit": 500}, headers=w.viewer)
    assert resp.status_code == 200, resp.text
    out.alarms[spec.vin] = list(resp.json())
    cells = spec.model().cells
    names = [
        B + "Temperature.Max",
        B + "Temperature.Min",
        B + "Temperature.Probe1",
        B + "Temperature.Probe2",
        B + "CellVoltage.Max",
        B + "CellVoltage.Min",
        B + "CurrentVoltage",
        B + "CurrentCurrent",
        B + "StateOfCharge",
        B + "ProtectionStatus",
        B + "Barcode",
        "CurrentLocation.Latitude",
        "CurrentLocation.Longitude",
        "CurrentLocation.GNSSReceiver.GroundSpeed",
        "CurrentLocation.GNSSReceiver.FixMode",
        "Speed",
        "Chassis.Wheel.Size",
        "Powertrain.ElectricMotor.ConfiguredSpeedLimit",
        *(f"{B}CellVoltage.Cell{k}" for k in range(1, cells + 1)),
    ]
    resp = await w.api.get(
        f"/v1/vehicles/{spec.vin}/telemetry",
        params={"start": _iso(spec.since), "end": _iso(spec.until), "signals": ",".join(names), "limit": 100_000},
        headers=w.viewer,
    )
    assert resp.status_code == 200, resp.text
    out.telemetry[spec.vin] = resp.json()


async def _run_world(tmp: Path) -> Outcome:
    scenarios, fleet, truths = _specs()
    out = Outcome(truths=truths)
    actions: dict[int, list[tuple[str, Action]]] = {}
    for vehicle_truths in out.truths.values():
        for truth in vehicle_truths:
            for a in truth.actions:
                # Applied before the round whose samples it concerns (the owner's app is quicker than a round).
                actions.setdefault(_round_up(a.at_ms / 1000), []).append((truth.vin, a))
    # The world runs its hour, and on for a scenario that needs longer (the fleet is done by then).
    start, end = int(T_SIM0), max([int(T_SIM0) + FLEET_S, *(s.until for s in scenarios)])
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue(maxsize=8)
    worker = ctx.Process(target=generate, args=(scenarios + fleet, start, end, queue), daemon=True)
    worker.start()
    broker = MosquittoProcess(tmp / "mosquitto").start()
    clock = SimClock(T_SIM0)
    try:
        options = {"clock": clock.now_ms, "alarms_config": AlarmsConfig(tick_interval_s=300.0)}
        async with running_stack(tmp / "cloud", broker, service_options=options) as stack:
            registry = stack.service.registry
            operator = {"Authorization": f"Bearer {registry.create_api_key('operator', 'scenario-operator')}"}
            publisher = Publisher(broker)
            try:
                async with httpx.AsyncClient(base_url=stack.api, timeout=30) as api:
                    w = _World(
                        stack,
                        clock,
                        api,
                        {"Authorization": f"Bearer {stack.admin_key}"},
                        operator,
                        {"Authorization": f"Bearer {stack.viewer_key}"},
                        publisher,
                    )
                    for spec in scenarios + fleet:
                        await _register(w, spec)
                    await _drive(w, queue, actions, scenarios, fleet, out)
                    out.fleet_samples = len(fleet) * FLEET_S
                    out.rejected = stack.service.pipeline.stats()["rejected"]
            finally:
                publisher.close()
    finally:
        broker.stop()
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()
    return out


async def _register(w: _World, spec: VehicleSpec) -> None:
    public = _key(spec.vin).public_raw
    resp = await w.api.post(
        "/v1/devices",
        headers=w.admin,
        json={"vin": spec.vin, "public_key": base64.b64encode(public).decode(), "label": "scenario"},
    )
    assert resp.status_code in (200, 201), resp.text
    resp = await w.api.put(f"/v1/vehicles/{spec.vin}/profile", json=profile_of(spec), headers=w.operator)
    assert resp.status_code == 200, resp.text


async def _act(w: _World, vin: str, action: Action) -> None:
    if action.profile:
        resp = await w.api.get(f"/v1/vehicles/{vin}/profile", headers=w.operator)
        body = {k: v for k, v in resp.json().items() if k != "vin"} | action.profile
        put = await w.api.put(f"/v1/vehicles/{vin}/profile", json=body, headers=w.operator)
        assert put.status_code == 200, put.text
    if action.geofence is not None:
        resp = await w.api.post("/v1/geofences", json=action.geofence, headers=w.operator)
        assert resp.status_code == 201, resp.text


async def _drive(
    w: _World,
    queue: Any,
    actions: dict[int, list[tuple[str, Action]]],
    scenarios: list[VehicleSpec],
    fleet: list[VehicleSpec],
    out: Outcome,
) -> None:
    """Lockstep rounds as the generator hands them over; a scenario's snapshot once its vehicle retires, the
    fleet's alarms once its hour is over (later, its silence would be the offline rule's business)."""
    pipeline = w.stack.service.pipeline
    alarms = w.stack.service.alarms
    assert alarms is not None
    while True:
        item = await asyncio.to_thread(queue.get, True, 120)
        if item is None:
            assert not actions, f"actions never applied: {actions}"
            return
        if item[0] == "error":
            raise AssertionError(f"the generator failed: {item[1]}")
        r, messages = item
        for vin, action in actions.pop(r, []):
            await _act(w, vin, action)
        before = pipeline.stats()["stored"]
        await asyncio.to_thread(w.publisher.publish, messages)

        def stored(before: int = before, n: int = len(messages)) -> bool:
            s = pipeline.stats()
            return s["stored"] - before >= n or bool(s["rejected"])

        await wait_until(stored, timeout=60, interval=0.005)
        assert not pipeline.stats()["rejected"], pipeline.stats()
        w.clock.ms = (r + ROUND_S) * 1000
        await asyncio.to_thread(alarms.tick_once)
        for spec in scenarios:
            if spec.until == r + ROUND_S:
                await _snapshot(w, spec, out)
        if r + ROUND_S == int(T_SIM0) + FLEET_S:
            for spec in fleet:
                resp = await w.api.get("/v1/alarms", params={"vin": spec.vin, "limit": 500}, headers=w.viewer)
                assert resp.status_code == 200, resp.text
                out.fleet_alarms += resp.json()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    return asyncio.run(_run_world(tmp_path_factory.mktemp("scenarios")))


# -- the checks ---------------------------------------------------------------------------------------------------


def _by_name(name: str) -> tuple[str, Scenario]:
    for n, sc in enumerate(SCENARIOS):
        if sc.name == name:
            return _vin(n), sc
    raise KeyError(name)


def _column(world: Outcome, vin: str, signal: str, t0: float, t1: float) -> list[tuple[float, Any]]:
    doc = world.telemetry[vin]
    col = doc["columns"].get(signal, [])
    return [(ts / 1000, v) for ts, v in zip(doc["timestamps_ms"], col, strict=False) if t0 <= ts / 1000 <= t1]


def _values(world: Outcome, vin: str, signal: str, t0: float, t1: float) -> list[Any]:
    return [v for _, v in _column(world, vin, signal, t0, t1) if v is not None]


def _store_shows_the_fault(world: Outcome, vin: str, truth: GroundTruth) -> None:
    """The values the API returns for the fault's window are the injected ones."""
    t0, t1 = truth.start_ms / 1000, truth.end_ms / 1000
    kind = truth.kind
    if kind == "thermal_runaway":
        assert max(_values(world, vin, B + "Temperature.Max", t0, t1)) >= truth.facts["peak_temp_c"] - 1.0
        assert min(_values(world, vin, B + "CellVoltage.Min", t0, t1)) < 1.5  # the venting cell collapsed
    elif kind == "thermal_runaway_precursor":
        temps = _values(world, vin, B + "Temperature.Max", t0, t1)
        rise = truth.params["rate_c_per_min"] * (t1 - t0) / 60.0
        assert max(temps) - temps[0] == pytest.approx(rise, abs=1.5)
    elif kind == "cell_imbalance":
        spread = [
            hi - lo
            for hi, lo in zip(
                _values(world, vin, B + "CellVoltage.Max", t0 + 60, t1),
                _values(world, vin, B + "CellVoltage.Min", t0 + 60, t1),
                strict=True,
            )
        ]
        assert min(spread) * 1000 >= truth.params["delta_mv"] - 5
    elif kind == "internal_short":
        k = truth.params["cell"]
        cells = [_column(world, vin, f"{B}CellVoltage.Cell{c}", t0 - 60, t1) for c in (k, k % 12 + 1)]
        # The shorted cell against a neighbour: its fall is the injected one, to the millivolt.
        first = cells[0][0][1] - cells[1][0][1]
        last = cells[0][-1][1] - cells[1][-1][1]
        assert (first - last) * 1000 == pytest.approx(truth.facts["fall_mv"], abs=3)
    elif kind == "speed_limiter_tampering":
        assert max(_values(world, vin, "CurrentLocation.GNSSReceiver.GroundSpeed", t0, t1)) >= 32.0
        assert set(_values(world, vin, "Powertrain.ElectricMotor.ConfiguredSpeedLimit", t0 + 5, t1)) == {
            truth.params["limit_kmh"]
        }
    elif kind == "wheel_size_tampering":
        assert set(_values(world, vin, "Chassis.Wheel.Size", t0 + 5, t1)) == {truth.params["configured_inch"]}
        pairs = [
            (w, g)
            for (_, w), (_, g) in zip(
                _column(world, vin, "Speed", t0, t1),
                _column(world, vin, "CurrentLocation.GNSSReceiver.GroundSpeed", t0, t1),
                strict=True,
            )
            if g is not None and w is not None and g > 15
        ]
        assert pairs and all(w / g == pytest.approx(truth.params["configured_inch"] / 16.0, abs=0.02) for w, g in pairs)
    elif kind == "unbound_battery_swap":
        assert truth.facts["barcode"] in _values(world, vin, B + "Barcode", t0, t1)
    elif kind == "theft":
        from simulators.route import haversine_m

        lat = _values(world, vin, "CurrentLocation.Latitude", t0 - 20, t1)
        lon = _values(world, vin, "CurrentLocation.Longitude", t0 - 20, t1)
        moved = max(haversine_m(lat[0], lon[0], a, b) for a, b in zip(lat, lon, strict=True))
        assert moved == pytest.approx(truth.facts["max_displacement_m"], rel=0.05, abs=5)
    elif kind == "crash":
        speeds = _column(world, vin, "CurrentLocation.GNSSReceiver.GroundSpeed", t0 - 3, t0 + 3)
        drops = [a - b for (_, a), (_, b) in itertools.pairwise(speeds)]
        assert max(drops) >= truth.params["speed_kmh"] - 2
    elif kind == "gnss_jamming":
        modes = _values(world, vin, "CurrentLocation.GNSSReceiver.FixMode", t0 + 1, t1 - 1)
        assert modes and set(modes) == {1}
        assert _values(world, vin, "CurrentLocation.Latitude", t0 + 1, t1 - 1) == []
    elif kind == "offline":
        # Nothing was lost: the backlog arrived, one sample a second through the outage.
        stamps = [ts for ts, _ in _column(world, vin, "CurrentLocation.GNSSReceiver.FixMode", t0 - 10, t1 + 10)]
        assert stamps == [t0 - 10 + k for k in range(len(stamps))] and len(stamps) >= t1 - t0 + 20
    elif kind == "hot_spot":
        # The spot's probe runs away from its neighbour, which sees a share of it.
        hottest = max(_values(world, vin, B + "Temperature.Max", t0, t1 + 600))
        assert hottest == pytest.approx(truth.facts["peak_temp_c"], abs=0.3)
        gaps = [
            a - b
            for a, b in zip(
                _values(world, vin, B + "Temperature.Probe1", t0, t1),
                _values(world, vin, B + "Temperature.Probe2", t0, t1),
                strict=True,
            )
        ]
        assert max(gaps) >= (1 - truth.params["share"]) * truth.facts["peak_excess_c"] - 0.3
    elif kind == "cold_charging":
        assert min(_values(world, vin, B + "Temperature.Min", t0, t1)) == pytest.approx(
            truth.facts["coldest_probe_c"], abs=0.2
        )
        assert min(_values(world, vin, B + "CurrentCurrent", t0 + 5, t1 - 5)) >= 0.5  # charging all along
    elif kind == "overcharge":
        assert max(_values(world, vin, B + "CellVoltage.Max", t0, t1 + 60)) == pytest.approx(
            truth.facts["max_cell_v"], abs=0.003
        )
        assert set(_values(world, vin, B + "StateOfCharge", t1 - 60, t1)) == {100.0}
    elif kind == "over_discharged_pack":
        assert min(_values(world, vin, B + "CellVoltage.Min", t0, t1)) == pytest.approx(
            truth.facts["min_cell_v"], abs=0.003
        )
    elif kind == "bms_reset":
        soc = _values(world, vin, B + "StateOfCharge", t0 - 5, t1 + 5)
        assert max(abs(a - b) for a, b in itertools.pairwise(soc)) == round(truth.facts["max_jump_pct"])
    elif kind == "bms_overcurrent":
        bits = [v >> OVERCURRENT_BIT & 1 for v in _values(world, vin, B + "ProtectionStatus", t0 - 5, t1 + 5)]
        assert sum(1 for a, b in itertools.pairwise(bits) if b and not a) == truth.facts["trips"]
    elif kind == "pack_end_of_life":
        # The old pack is out, a new one (another barcode) in.
        before = set(_values(world, vin, B + "Barcode", t1 - 120, t1 - 30))
        after = set(_values(world, vin, B + "Barcode", t1 + 30, t1 + 120))
        assert len(before) == len(after) == 1 and before != after
    elif kind == "charger_no_cutoff":
        assert min(_values(world, vin, B + "CurrentCurrent", t1 - 600, t1 - 5)) >= truth.params["trickle_a"] - 0.01
        assert min(_values(world, vin, B + "StateOfCharge", t1 - 600, t1 - 5)) >= 99.0
    elif kind == "forbidden_charging":
        from simulators.route import haversine_m

        (action,) = truth.actions
        assert action.geofence is not None
        lon, lat = action.geofence["geometry"]["coordinates"]
        spots = zip(
            _values(world, vin, "CurrentLocation.Latitude", t0, t1),
            _values(world, vin, "CurrentLocation.Longitude", t0, t1),
            strict=True,
        )
        assert max(haversine_m(lat, lon, a, b) for a, b in spots) < action.geofence["radius_m"]
        assert min(_values(world, vin, B + "CurrentCurrent", t0 + 5, t1 - 5)) >= 0.5
    elif kind == "pushed_indoors":
        assert set(_values(world, vin, "CurrentLocation.GNSSReceiver.FixMode", t0 + 1, t1 - 1)) == {1}
        walking = _values(world, vin, "Speed", t0 + 5, t0 + truth.params["push_s"] - 5)
        assert walking and all(0.5 < v <= truth.params["walk_kmh"] for v in walking)


@pytest.mark.parametrize("name", [sc.name for sc in SCENARIOS if sc.positive])
def test_injected_fault_reaches_the_store_and_raises_its_alarm(world: Outcome, name: str) -> None:
    vin, _sc = _by_name(name)
    (truth,) = world.truths[vin]
    assert truth.expected, f"{name}: the scenario must expect an alarm (ground truth {truth.facts})"
    _store_shows_the_fault(world, vin, truth)
    alarms = world.alarms[vin]
    for exp in truth.expected:
        found = [a for a in alarms if a["rule"] == exp.rule]
        assert len(found) == 1, (exp.rule, alarms)
        alarm = found[0]
        assert alarm["level"] == exp.level, (exp, alarm)
        assert truth.start_ms - 2 * ROUND_S * 1000 <= alarm["opened_ms"] <= exp.by_ms, (exp, alarm)
        assert exp.clear_by_ms is not None
        assert alarm["cleared_ms"] is not None, (exp, alarm)
        # Cleared after the fault — for the offline alarm, at the vehicle time of its first sample after the
        # raise: the backlog it sends when back shows it was alive all along (only the network was not).
        cleared_after = alarm["opened_ms"] if exp.rule == "vehicle_offline" else truth.end_ms
        assert cleared_after <= alarm["cleared_ms"] <= exp.clear_by_ms, (exp, alarm)
    allowed = {e.rule for e in truth.expected} | set(truth.collateral)
    assert {a["rule"] for a in alarms} <= allowed, alarms


def test_every_rule_is_expected_by_a_scenario(world: Outcome) -> None:
    """docs/RULES.md's table: every rule of the rules file the ingest loads is raised by a positive scenario."""
    expected = {
        e.rule for n, sc in enumerate(SCENARIOS) if sc.positive for t in world.truths[_vin(n)] for e in t.expected
    }
    rules = set(load_rules().settings_for(None, None))
    assert expected == rules, sorted(rules ^ expected)


@pytest.mark.parametrize("name", [sc.name for sc in SCENARIOS if not sc.positive])
def test_near_miss_raises_nothing(world: Outcome, name: str) -> None:
    vin, _ = _by_name(name)
    assert all(not t.expected for t in world.truths[vin])
    assert world.alarms[vin] == []


def test_one_hour_normal_fleet_raises_no_alarm(world: Outcome) -> None:
    assert world.fleet_samples == FLEET_VEHICLES * FLEET_S
    assert world.rejected == {}
    assert world.fleet_alarms == []


def test_ground_truth_survives_json(world: Outcome) -> None:
    truths = [t for ts in world.truths.values() for t in ts]
    assert load_ground_truth(dump_ground_truth(truths)) == truths


# -- through the device chain, in real time ---------------------------------------------------------------------------


def test_crash_through_the_device_chain(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    asyncio.run(_device_chain_crash(tmp_path, mosquitto))


async def _device_chain_crash(tmp_path: Path, broker: MosquittoProcess) -> None:
    """A 72 V e-motorcycle crashes at 55 km/h: GNSS, JBD BMS and controller emulated on ptys, a real edge agent,
    Mosquitto, the bridge and the rules; the alarm must come through the API at its level and clear once the rider
    is riding again."""
    vin = "LZHSCNDEV00000001"
    key_file = tmp_path / "device.key"
    DeviceKey.generate().save(key_file)
    stop = asyncio.Event()
    emulators: list[GnssEmulator | JbdBmsEmulator | ControllerEmulator] = []
    try:
        async with running_stack(tmp_path / "cloud", broker) as stack:
            now = time.time()
            # Off the 1 Hz GNSS grid, so no epoch falls inside the 0.3 s the impact takes; and fast enough that
            # even an epoch lost to a stalled loop (samples 2 s apart) still shows more than the rule's 7 m/s².
            impact = math.floor(now) + 8.4
            crash = Fault("crash", impact, impact + 5.0, {"speed_kmh": 55.0, "decel_ms2": 60.0, "still_s": 5.0})
            model = FaultedModel(graph_route_for(31), 31, now - 300.0, "emoto72", faults=[crash])
            (truth,) = model.ground_truth(vin)
            (expected,) = truth.expected
            gnss = GnssEmulator(model, rate_hz=1.0)
            emulators += [gnss, JbdBmsEmulator(model), ControllerEmulator(model)]
            for emulator in emulators:
                await emulator.start()
            operator = {"Authorization": f"Bearer {stack.service.registry.create_api_key('operator', 'op')}"}
            viewer = {"Authorization": f"Bearer {stack.viewer_key}"}
            agent = EdgeAgent(
                AgentConfig(
                    vin=vin,
                    key_file=key_file,
                    state_dir=tmp_path / "agent",
                    broker_host=broker.host,
                    broker_port=broker.port,
                    gnss_port=gnss.port,
                    bms_port=emulators[1].port,
                    controller_port=emulators[2].port,
                    batch_interval_s=1.0,
                )
            )
            async with httpx.AsyncClient(base_url=stack.api, timeout=10) as api:
                resp = await api.post(
                    "/v1/devices",
                    headers={"Authorization": f"Bearer {stack.admin_key}"},
                    json={"vin": vin, "public_key": base64.b64encode(agent.key.public_raw).decode(), "label": "dev"},
                )
                assert resp.status_code in (200, 201), resp.text
                spec = VehicleSpec(vin, 31, "emoto72", (), now)
                profile = profile_of(spec) | {"reporting_interval_s": 5.0}
                resp = await api.put(f"/v1/vehicles/{vin}/profile", json=profile, headers=operator)
                assert resp.status_code == 200, resp.text
                task = asyncio.create_task(agent.run(stop))
                found: list[dict[str, Any]] = []

                async def alarm(cleared: bool) -> bool:
                    resp = await api.get("/v1/alarms", params={"vin": vin}, headers=viewer)
                    found[:] = resp.json()
                    return any(
                        a["rule"] == expected.rule and (a["cleared_ms"] is not None or not cleared) for a in found
                    )

                await wait_until(lambda: alarm(cleared=False), timeout=60, interval=0.5)
                await wait_until(lambda: alarm(cleared=True), timeout=60, interval=0.5)
                stop.set()
                await asyncio.wait_for(task, timeout=20)
                resp = await api.get(
                    f"/v1/vehicles/{vin}/telemetry",
                    params={
                        "start": _iso(impact - 5),
                        "end": _iso(impact + 5),
                        "signals": "CurrentLocation.GNSSReceiver.GroundSpeed",
                    },
                    headers=viewer,
                )
                speeds = resp.json()["columns"]["CurrentLocation.GNSSReceiver.GroundSpeed"]
    finally:
        stop.set()
        for emulator in emulators:
            await emulator.stop()
    (alarm_out,) = found  # nothing else fired
    assert alarm_out["rule"] == "crash_or_fall" and alarm_out["level"] == expected.level
    assert truth.start_ms <= alarm_out["opened_ms"] <= expected.by_ms
    assert expected.clear_by_ms is not None and truth.end_ms <= alarm_out["cleared_ms"] <= expected.clear_by_ms
    # The store holds the impact as the devices reported it: from full speed to standing between two samples.
    assert any(a >= 54.0 and b <= 2.0 for a, b in itertools.pairwise(s for s in speeds if s is not None))
