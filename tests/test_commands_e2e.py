"""Signed commands and the retained status end to end, against a real Mosquitto with mutual TLS and the ACL:
cloud API → outbox → bridge → ev/{vin}/cmd → agent (verify, act, ack through the spool) → ev/{vin}/cmd/ack → API;
forged, expired, replayed (twice in a row, and after a SIGKILL and restart) and misaddressed commands are rejected
and counted; the status (with self-metrics) and the LWT reach the API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from cloud_ingest.commands import CommandRow, CommandService
from edge_agent.agent import EdgeAgent
from edge_agent.commands import load_cloud_keys
from edge_agent.config import AgentConfig
from protocol import DeviceKey
from protocol.commands import Command, seal_command
from protocol.tls import client_context
from simulators.controller_uart import ControllerEmulator
from simulators.route import route_for
from simulators.vehicle import SyntheticPowertrain, VehicleModel
from tests.conftest import ClientTls, Stack, running_stack, wait_until
from tests.test_tls_acl import VIN_A, VIN_B, Pki, tls_broker, tls_pki  # noqa: F401  (fixtures)
from zhilian.broker import MosquittoProcess
from zhilian.cli import app

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _ctx(files: ClientTls) -> ssl.SSLContext:
    return client_context(files.ca, files.cert, files.key)


@contextlib.asynccontextmanager
async def _cloud(
    tmp_path: Path, broker: MosquittoProcess, certs: Pki
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient]]:
    async with (
        running_stack(tmp_path / "ingest", broker, tls=certs.bridge) as stack,
        httpx.AsyncClient(base_url=stack.api, timeout=10) as http,
    ):
        http.headers["Authorization"] = f"Bearer {stack.admin_key}"
        yield stack, http


async def _register(http: httpx.AsyncClient, key: DeviceKey, tmp_path: Path) -> Path:
    """Register the vehicle, and install the cloud's key as the vehicle's cloud_key_file (as provisioning does)."""
    r = await http.post("/v1/devices", json={"vin": VIN_A, "public_key": base64.b64encode(key.public_raw).decode()})
    assert r.status_code == 201, r.text
    cloud = (await http.get("/v1/cloud-key")).json()
    path = tmp_path / "cloud.keys"
    path.write_text(f"# Zhilian cloud command key {cloud['key_id']}\n{cloud['public_key']}\n")
    path.chmod(0o644)
    return path


async def _status(http: httpx.AsyncClient) -> dict[str, Any] | None:
    r = await http.get(f"/v1/vehicles/{VIN_A}/status")
    return r.json() if r.status_code == 200 else None


async def _command(http: httpx.AsyncClient, command_id: str) -> dict[str, Any]:
    listed: list[dict[str, Any]] = (await http.get(f"/v1/vehicles/{VIN_A}/commands")).json()
    return next(c for c in listed if c["command_id"] == command_id)


async def _issue(http: httpx.AsyncClient, name: str, args: dict[str, Any] | None = None) -> str:
    r = await http.post(f"/v1/vehicles/{VIN_A}/commands", json={"name": name, "args": args or {}})
    assert r.status_code == 202, r.text
    return str(r.json()["command_id"])


async def _acked(http: httpx.AsyncClient, command_id: str, timeout: float = 15) -> dict[str, Any]:
    async def done() -> bool:
        return bool((await _command(http, command_id))["state"] == "acked")

    await wait_until(done, timeout=timeout)
    return (await _command(http, command_id))["ack"]  # type: ignore[no-any-return]


def _payload(service: CommandService, command_id: str) -> bytes:
    with Session(service.engine) as session:
        return bytes(session.scalar(select(CommandRow.payload).where(CommandRow.command_id == command_id)) or b"")


async def _publish_raw(broker: MosquittoProcess, certs: Pki, *payloads: bytes) -> None:
    """Publish as the cloud identity would (the bridge's certificate may write ev/+/cmd), bypassing the outbox."""
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="test-cloud", tls_context=_ctx(certs.bridge), timeout=10
    ) as client:
        for p in payloads:
            await client.publish(f"ev/{VIN_A}/cmd", p, qos=1)


def test_commands_and_status_through_api_broker_and_agent(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811  (fixture imported from test_tls_acl)
    tls_pki: Pki,  # noqa: F811
) -> None:
    asyncio.run(_in_process(tmp_path, tls_broker, tls_pki))


async def _in_process(tmp_path: Path, broker: MosquittoProcess, certs: Pki) -> None:
    key_file = tmp_path / "device.key"
    DeviceKey.generate().save(key_file)
    model = VehicleModel(route_for(3), seed=3, start_time=time.time() - 60)
    # A real controller on a pty, derestricted: its configured speed limit is what speed_limit_report reports.
    controller = ControllerEmulator(model, period_s=0.1, tamper_speed_limit_kmh=45.0)
    await controller.start()
    try:
        await _with_controller(tmp_path, broker, certs, key_file, model, controller)
    finally:
        await controller.stop()


async def _with_controller(
    tmp_path: Path,
    broker: MosquittoProcess,
    certs: Pki,
    key_file: Path,
    model: VehicleModel,
    controller: ControllerEmulator,
) -> None:
    async with _cloud(tmp_path, broker, certs) as (stack, http):
        agent = EdgeAgent(
            AgentConfig(
                vin=VIN_A,
                key_file=key_file,
                state_dir=tmp_path / "agent",
                broker_host=broker.host,
                broker_port=broker.port,
                batch_interval_s=0.5,
                sample_interval_s=0.2,
                status_interval_s=0.5,
                tls_ca=certs.device_a.ca,
                tls_cert=certs.device_a.cert,
                tls_key=certs.device_a.key,
                cloud_key_file=await _register(http, DeviceKey.load(key_file), tmp_path),
                controller_port=controller.port,
            ),
            sources=[SyntheticPowertrain(model, devices=frozenset({"bms"}))],
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            # The retained status arrives with the agent's self-metrics.
            await wait_until(lambda: _has(_status(http), online=True), timeout=15)
            status = await _status(http)
            assert status is not None and status["agent"] and status["boot"] == agent.boot
            m = status["metrics"]
            assert m["rss_kb"] > 1000 and m["cpu_s"] > 0 and m["locked"] is False and m["cmd_accepted"] == 0
            for name in ("spool_depth", "evicted", "reconnects", "fix_age_s", "cpu_pct", "profile"):
                assert name in m

            # Valid commands: acted on, acked, visible through the API.
            lock = await _issue(http, "lock")
            assert (await _acked(http, lock))["status"] == "done"
            assert agent.locked
            snap = await _issue(http, "snapshot")
            ack = await _acked(http, snap)
            assert ack["status"] == "done" and ack["detail"].startswith("snapshot of")
            report = await _issue(http, "speed_limit_report", {"interval_s": 10})
            assert (await _acked(http, report))["status"] == "done"

            async def reported() -> bool:
                s = await _status(http)
                return s is not None and s["metrics"]["speed_limit_kmh"] == 45.0 and s["metrics"]["wheel_in"] > 0

            await wait_until(reported, timeout=15)
            assert agent.commands.state.speed_limit_report_s == 10
            unknown_profile = await _issue(http, "set_profile", {"profile": "racing"})
            ack = await _acked(http, unknown_profile)
            assert ack["status"] == "rejected" and "unknown profile" in ack["detail"]

            # Hostile deliveries on this vehicle's own topic.
            svc = stack.service.commands
            past = CommandService(svc.engine, svc.registry, svc.key, clock=lambda: time.time() - 3600)
            expired = past.issue(VIN_A, "unlock", {}, ttl_s=60).command_id  # in the outbox, expired an hour ago
            intruder = DeviceKey.generate()
            forged = seal_command(
                Command(VIN_A, os.urandom(16), _now_ms(), _now_ms() + 60_000, "unlock", {}, intruder.key_id), intruder
            )
            other = seal_command(
                Command(VIN_B, os.urandom(16), _now_ms(), _now_ms() + 60_000, "unlock", {}, svc.key.key_id), svc.key
            )
            await _publish_raw(broker, certs, forged, _payload(svc, expired), other, _payload(svc, lock))
            gate = agent.commands.gate
            await wait_until(
                lambda: all(gate.rejected[r] == 1 for r in ("forged", "expired", "misaddressed", "replayed")),
                timeout=15,
            )
            assert agent.locked  # the replayed lock did nothing; nothing unlocked the vehicle
            ack = await _acked(http, expired)
            assert ack["status"] == "rejected" and ack["detail"].startswith("expired")
            # A command delivered twice in a row: acted on once.
            unlock = await _issue(http, "unlock")
            assert (await _acked(http, unlock))["status"] == "done"
            await _publish_raw(broker, certs, _payload(svc, unlock))
            await wait_until(lambda: gate.rejected["replayed"] == 2, timeout=15)
            assert not agent.locked
            assert gate.accepted == 5 and sum(gate.rejected.values()) == 5

            # The counts reach the cloud in the status.
            async def counted() -> bool:
                s = await _status(http)
                return s is not None and s["metrics"]["cmd_replayed"] == 2 and s["metrics"]["cmd_forged"] == 1

            await wait_until(counted, timeout=15)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        # A clean stop says offline itself.
        await wait_until(lambda: _has(_status(http), online=False), timeout=10)
        listed = (await http.get(f"/v1/vehicles/{VIN_A}/commands")).json()
        assert {c["state"] for c in listed} == {"acked"}
        assert stack.service.commands.stats().get("cmd/ack:rejected:unknown_command", 0) == 0
        # The report sample reached the time-series store (it bypasses sampling rates and deadbands).
        r = await http.get(
            f"/v1/vehicles/{VIN_A}/telemetry", params={"signals": "Powertrain.ElectricMotor.ConfiguredSpeedLimit"}
        )
        assert 45.0 in r.json()["columns"]["Powertrain.ElectricMotor.ConfiguredSpeedLimit"]


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _has(pending: Any, online: bool) -> bool:
    status = await pending
    return status is not None and status["online"] is online


def test_sigkill_brings_the_lwt_and_a_restart_still_refuses_the_old_command(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811  (fixture imported from test_tls_acl)
    tls_pki: Pki,  # noqa: F811
) -> None:
    asyncio.run(_killed(tmp_path, tls_broker, tls_pki))


async def _killed(tmp_path: Path, broker: MosquittoProcess, certs: Pki) -> None:
    key_file = tmp_path / "device.key"
    DeviceKey.generate().save(key_file)
    async with _cloud(tmp_path, broker, certs) as (stack, http):
        cloud_keys = await _register(http, DeviceKey.load(key_file), tmp_path)
        config = tmp_path / "agent.toml"
        config.write_text(
            "[agent]\n"
            f'vin = "{VIN_A}"\nkey_file = "{key_file}"\nstate_dir = "{tmp_path / "agent"}"\n'
            f'broker_host = "{broker.host}"\nbroker_port = {broker.port}\n'
            f'tls_ca = "{certs.device_a.ca}"\ntls_cert = "{certs.device_a.cert}"\ntls_key = "{certs.device_a.key}"\n'
            f'cloud_key_file = "{cloud_keys}"\nstatus_interval_s = 0.5\nbatch_interval_s = 0.5\n'
        )

        async def spawn() -> asyncio.subprocess.Process:
            with (tmp_path / "agent.log").open("ab") as log:
                return await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "zhilian", "agent", "--config", str(config), "--log-level", "info",
                    cwd=ROOT, stdout=log, stderr=log,
                )  # fmt: skip

        async def status_boot(boot: int, online: bool) -> bool:
            s = await _status(http)
            return s is not None and s["boot"] == boot and s["online"] is online

        proc = await spawn()
        try:
            await wait_until(lambda: status_boot(1, True), timeout=20)
            lock = await _issue(http, "lock")
            assert (await _acked(http, lock))["status"] == "done"
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            # The broker sees the socket die and publishes the LWT: offline, retained.
            await wait_until(lambda: status_boot(1, False), timeout=15)

            proc = await spawn()
            await wait_until(lambda: status_boot(2, True), timeout=20)
            s = await _status(http)
            assert s is not None and s["metrics"]["locked"] is True  # persisted across the kill
            await _publish_raw(broker, certs, _payload(stack.service.commands, lock))

            async def replay_counted() -> bool:
                s = await _status(http)
                return s is not None and s["boot"] == 2 and s["metrics"]["cmd_replayed"] == 1

            await wait_until(replay_counted, timeout=15)
            s = await _status(http)
            assert s is not None and s["metrics"]["cmd_done"] == 0 and s["metrics"]["cmd_accepted"] == 0
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            await wait_until(lambda: status_boot(2, False), timeout=10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def test_a_command_waits_in_the_outbox_until_the_vehicle_has_a_session(
    tmp_path: Path,
    tls_broker: MosquittoProcess,  # noqa: F811  (fixture imported from test_tls_acl)
    tls_pki: Pki,  # noqa: F811
) -> None:
    asyncio.run(_no_session(tmp_path, tls_broker, tls_pki))


async def _no_session(tmp_path: Path, broker: MosquittoProcess, certs: Pki) -> None:
    async with _cloud(tmp_path, broker, certs) as (stack, http):
        await _register(http, DeviceKey.generate(), tmp_path)
        publisher = stack.bridge.commands
        assert publisher is not None
        publisher.poll_interval_s = publisher.retry_s = 0.2
        # Issued with the CLI this time (in a thread: the API serves on this loop).
        cli = ["--api", stack.api, "--api-key", stack.admin_key]
        sent = await asyncio.to_thread(CliRunner().invoke, app, ["cmd", "send", VIN_A, "lock", *cli])
        assert sent.exit_code == 0, sent.output
        command_id = json.loads(sent.output)["command_id"]
        key_file = tmp_path / "cloud-key.txt"
        got_key = await asyncio.to_thread(CliRunner().invoke, app, ["cmd", "cloud-key", "--out", str(key_file), *cli])
        assert got_key.exit_code == 0, got_key.output
        assert load_cloud_keys(key_file) == {stack.service.commands.key.key_id: stack.service.commands.public_key}
        bad = await asyncio.to_thread(CliRunner().invoke, app, ["cmd", "send", VIN_A, "set_profile", *cli])
        assert bad.exit_code == 1 and "422" in bad.output

        async def tried(times: int) -> bool:
            return bool((await _command(http, command_id))["attempts"] >= times)

        # Nobody holds ev/{vin}/cmd: the broker answers "no matching subscribers", so it stays pending and is retried.
        await wait_until(lambda: tried(3), timeout=15)
        assert (await _command(http, command_id))["state"] == "pending" and publisher.released >= 2
        # The vehicle connects (persistent session, as the agent does) and subscribes: the next attempt is taken.
        got: list[bytes] = []
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=f"zl-agent-{VIN_A}",
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=_ctx(certs.device_a),
            timeout=10,
        ) as vehicle:
            await vehicle.subscribe(f"ev/{VIN_A}/cmd", qos=1)

            async def receive() -> None:
                async for message in vehicle.messages:
                    assert isinstance(message.payload, bytes)
                    got.append(message.payload)

            reader = asyncio.create_task(receive())
            try:
                await wait_until(lambda: len(got) == 1, timeout=15)
            finally:
                reader.cancel()
        assert got == [_payload(stack.service.commands, command_id)]
        await wait_until(lambda: _state_is(http, command_id, "sent"), timeout=10)


async def _state_is(http: httpx.AsyncClient, command_id: str, state: str) -> bool:
    return bool((await _command(http, command_id))["state"] == state)
