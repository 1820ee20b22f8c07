"""Device key rotation and revocation: the pipeline, the key endpoints, and `zhilian device ...` against a server."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn
from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cloud_ingest.db import Role
from cloud_ingest.registry import KeyState
from cloud_ingest.service import IngestService
from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, seal_envelope
from zhilian.broker import free_port
from zhilian.cli import app as cli_app
from zhilian.pki import make_ca
from zhilian.serve import _Server

VIN = "LZHEB0A12P0000001"
OLD = DeviceKey.from_seed(b"\x21" * 32)
NEW = DeviceKey.from_seed(b"\x22" * 32)
SOC = "Powertrain.TractionBattery.StateOfCharge"
_SEQ = itertools.count(1)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class Cloud:
    def __init__(self, data_dir: Path, database_url: str | None = None) -> None:
        self.svc = IngestService.open(data_dir, database_url=database_url)
        self.client = TestClient(self.svc.app)
        reg = self.svc.registry
        self.keys = {role: reg.create_api_key(role, role.value) for role in Role}
        self.headers = {role: {"Authorization": f"Bearer {key}"} for role, key in self.keys.items()}

    def close(self) -> None:
        self.client.close()
        self.svc.close()

    def envelope(self, key: DeviceKey, vin: str = VIN) -> bytes:
        seq = next(_SEQ)
        body = encode_batch(Batch([1_700_000_000_000 + seq], {SOC: [50.0]}), self.svc.catalogue)
        return seal_envelope(Envelope(vin, key.key_id, 1, seq, 0, Kind.TELEMETRY, Flags.NONE, body), key)

    def ingest(self, key: DeviceKey, vin: str = VIN) -> tuple[str, str | None]:
        result = self.svc.pipeline.ingest_one(vin, self.envelope(key, vin))
        return result.outcome, result.reason

    def rejected(self, reason: str) -> tuple[int, float]:
        metric = self.svc.pipeline.metrics.get_sample_value(
            "zhilian_ingest_messages_total", {"outcome": "rejected", "reason": reason}
        )
        return self.svc.pipeline.stats()["rejected"].get(reason, 0), metric or 0.0


@pytest.fixture
def cloud(tmp_path: Path, database_url: str) -> Iterator[Cloud]:
    c = Cloud(tmp_path, database_url)
    yield c
    c.close()


def test_rotation_accepts_both_keys_until_the_old_one_is_revoked(cloud: Cloud) -> None:
    cloud.svc.registry.register_device(VIN, OLD.public_raw)
    assert cloud.ingest(OLD) == ("stored", None)
    assert cloud.ingest(NEW) == ("rejected", "unknown_key")  # not added yet

    cloud.svc.registry.add_key(VIN, NEW.public_raw)
    assert cloud.ingest(NEW) == ("stored", None)
    assert cloud.ingest(OLD) == ("stored", None)  # the old key (cached by now) still verifies

    cloud.svc.registry.revoke_key(VIN, OLD.key_id)
    assert cloud.ingest(OLD) == ("rejected", "revoked_key")
    assert cloud.ingest(OLD) == ("rejected", "revoked_key")
    assert cloud.ingest(NEW) == ("stored", None)
    assert cloud.ingest(NEW, vin="LZHEB0A12P0000999") == ("rejected", "unknown_device")
    assert cloud.rejected("revoked_key") == (2, 2.0)
    assert cloud.rejected("unknown_key") == (1, 1.0)
    assert cloud.svc.pipeline.stats()["stored"] == 4
    summary = cloud.svc.registry.vehicle_summary(VIN)
    assert summary is not None and summary.messages == 4


def test_key_endpoints_roles_and_statuses(cloud: Cloud) -> None:
    c, h = cloud.client, cloud.headers
    assert c.post("/v1/devices", json={"vin": VIN, "public_key": b64(OLD.public_raw)}, headers=h[Role.ADMIN]).is_success
    path = f"/v1/devices/{VIN}/keys"

    assert c.get(path).status_code == 401
    assert c.post(path, json={"public_key": b64(NEW.public_raw)}, headers=h[Role.VIEWER]).status_code == 403
    r = c.post(path, json={"public_key": b64(NEW.public_raw)}, headers=h[Role.OPERATOR])
    assert r.status_code == 201
    assert r.json()["key_id"] == NEW.key_id.hex() and r.json()["active"] and r.json()["revoked_at"] is None
    assert c.post(path, json={"public_key": b64(NEW.public_raw)}, headers=h[Role.OPERATOR]).status_code == 200

    listed = c.get(path, headers=h[Role.VIEWER]).json()
    assert [k["key_id"] for k in listed] == [OLD.key_id.hex(), NEW.key_id.hex()]
    assert listed[0]["public_key"] == b64(OLD.public_raw)

    revoke = f"{path}/{OLD.key_id.hex()}/revoke"
    assert c.post(revoke, headers=h[Role.OPERATOR]).status_code == 403
    r = c.post(revoke, headers=h[Role.ADMIN])
    assert r.status_code == 200 and r.json()["active"] is False and r.json()["revoked_at"]
    upper = f"{path}/{OLD.key_id.hex().upper()}/revoke"
    assert c.post(upper, headers=h[Role.ADMIN]).json()["revoked_at"] == r.json()["revoked_at"]  # same key, once
    assert cloud.svc.registry.lookup_key(VIN, OLD.key_id).state is KeyState.REVOKED
    assert c.post(path, json={"public_key": b64(OLD.public_raw)}, headers=h[Role.OPERATOR]).status_code == 409

    other = DeviceKey.generate()
    assert c.post(f"{path}/{other.key_id.hex()}/revoke", headers=h[Role.ADMIN]).status_code == 404
    assert c.post(f"{path}/nothex/revoke", headers=h[Role.ADMIN]).status_code == 422
    unknown = "/v1/devices/LZHEB0A12P0000999/keys"
    assert c.get(unknown, headers=h[Role.VIEWER]).status_code == 404
    assert c.post(unknown, json={"public_key": b64(other.public_raw)}, headers=h[Role.OPERATOR]).status_code == 404
    assert c.post(f"{unknown}/{OLD.key_id.hex()}/revoke", headers=h[Role.ADMIN]).status_code == 404
    for body in ({}, {"public_key": "!!"}, {"public_key": b64(b"short")}, {"public_key": 5}):
        assert c.post(path, json=body, headers=h[Role.OPERATOR]).status_code == 422, body
    spec = c.get("/openapi.json").json()
    assert {"/v1/devices/{vin}/keys", "/v1/devices/{vin}/keys/{key_id}/revoke"} <= set(spec["paths"])


_vins = st.one_of(st.just(VIN), st.from_regex(r"[A-Z0-9]{8,32}", fullmatch=True), st.text(min_size=1, max_size=40))
_key_ids = st.one_of(
    st.just(OLD.key_id.hex()), st.binary(min_size=8, max_size=8).map(bytes.hex), st.text(min_size=1, max_size=30)
)
_bodies = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {
            "public_key": st.one_of(
                st.text(max_size=60),
                st.binary(max_size=40).map(b64),
                st.integers(),
                st.just(b64(DeviceKey.generate().public_raw)),
            )
        }
    ),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(action=st.sampled_from(["list", "add", "revoke"]), vin=_vins, key_id=_key_ids, body=_bodies)
def test_key_endpoints_never_5xx(cloud: Cloud, action: str, vin: str, key_id: str, body: Any) -> None:
    if cloud.svc.registry.get_device(VIN) is None:
        cloud.svc.registry.register_device(VIN, OLD.public_raw)
    path = f"/v1/devices/{quote(vin, safe='')}/keys"
    if action == "list":
        r = cloud.client.get(path, headers=cloud.headers[Role.VIEWER])
    elif action == "add":
        r = cloud.client.post(path, json=body, headers=cloud.headers[Role.OPERATOR])
    else:
        r = cloud.client.post(f"{path}/{quote(key_id, safe='')}/revoke", headers=cloud.headers[Role.ADMIN])
    assert r.status_code in (200, 201, 404, 409, 422), (action, vin, key_id, body, r.text)


# -- `zhilian device ...` against a running server ---------------------------------------------------------------


@contextlib.contextmanager
def serving(svc: IngestService) -> Iterator[str]:
    port = free_port()
    server = _Server(uvicorn.Config(svc.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def zhilian(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, [str(a) for a in args])
    return result.exit_code, result.output


def test_provision_rotate_revoke_through_the_cli(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "cloud")
    out = tmp_path / "board"
    try:
        with serving(cloud.svc) as api:
            admin, operator = cloud.keys[Role.ADMIN], cloud.keys[Role.OPERATOR]
            code, text = zhilian("device", "provision", "--vin", VIN, "--out", out, "--api", api, "--api-key", admin)
            assert code == 0, text
            key_file = out / "device.key"
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            first = DeviceKey.load(key_file)
            assert f"key_id={first.key_id.hex()}" in text and "new_key=True" in text
            assert cloud.ingest(first) == ("stored", None)

            # Re-running (say, after a network failure) reuses the key instead of minting another.
            code, text = zhilian("device", "provision", "--vin", VIN, "--out", out, "--api", api, "--api-key", admin)
            assert code == 0 and "new_key=False" in text, text
            assert DeviceKey.load(key_file).key_id == first.key_id

            code, text = zhilian(
                "device", "rotate-key", "--vin", VIN, "--out", out, "--api", api, "--api-key", operator
            )
            assert code == 0, text
            second = DeviceKey.load(key_file)
            assert second.key_id != first.key_id and not (out / "device.key.next").exists()
            assert f"revoke-key --vin {VIN} --key-id {first.key_id.hex()}" in text
            assert cloud.ingest(first) == ("stored", None) and cloud.ingest(second) == ("stored", None)

            revoke = ("device", "revoke-key", "--vin", VIN, "--key-id", first.key_id.hex(), "--api", api)
            code, text = zhilian(*revoke, "--api-key", operator)
            assert code == 1 and "role" in text, text
            code, text = zhilian(*revoke, "--api-key", admin)
            assert code == 0 and "revoked_at=" in text, text
            assert cloud.ingest(first) == ("rejected", "revoked_key")
            assert cloud.ingest(second) == ("stored", None)

            code, text = zhilian(
                "device", "rotate-key", "--vin", VIN, "--out", out, "--api", api, "--api-key", admin, "--revoke-old"
            )
            assert code == 0, text
            third = DeviceKey.load(key_file)
            assert cloud.ingest(second) == ("rejected", "revoked_key") and cloud.ingest(third) == ("stored", None)
            keys = {k.key_id: k.active for k in cloud.svc.registry.list_keys(VIN)}
            assert keys == {first.key_id: False, second.key_id: False, third.key_id: True}
    finally:
        cloud.close()


def test_provision_failures_are_clear_and_change_nothing(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "cloud")
    try:
        with serving(cloud.svc) as api:
            admin = cloud.keys[Role.ADMIN]
            base = ("device", "provision", "--api", api)
            code, text = zhilian(*base, "--vin", VIN, "--out", tmp_path / "a", "--api-key", "zk_wrong")
            assert code == 1 and "rejected the API key" in text
            code, text = zhilian(*base, "--vin", VIN, "--out", tmp_path / "a", "--api-key", cloud.keys[Role.VIEWER])
            assert code == 1 and "role" in text
            code, text = zhilian(*base, "--vin", "bad vin", "--out", tmp_path / "b", "--api-key", admin)
            assert code == 1 and not (tmp_path / "b").exists()
            assert cloud.svc.registry.get_device(VIN) is None

            assert zhilian(*base, "--vin", VIN, "--out", tmp_path / "a", "--api-key", admin)[0] == 0
            # Another board claiming the same VIN with a key of its own is refused, pointing at rotation.
            code, text = zhilian(*base, "--vin", VIN, "--out", tmp_path / "c", "--api-key", admin)
            assert code == 1 and "rotate-key" in text
            # A key file others can read is refused, not used.
            os.chmod(tmp_path / "a" / "device.key", 0o644)
            code, text = zhilian(*base, "--vin", VIN, "--out", tmp_path / "a", "--api-key", admin)
            assert code == 1 and "chmod 600" in text
            code, text = zhilian(
                "device", "rotate-key", "--vin", VIN, "--out", tmp_path / "x", "--api", api, "--api-key", admin
            )
            assert code == 1 and "provision the device first" in text
        code, text = zhilian(*base, "--vin", VIN, "--out", tmp_path / "d", "--api-key", admin)  # server gone
        assert code == 1 and "cannot reach" in text
    finally:
        cloud.close()


def test_provision_with_tls_identity(tmp_path: Path) -> None:
    cloud = Cloud(tmp_path / "cloud")
    ca = make_ca(tmp_path / "ca")
    try:
        with serving(cloud.svc) as api:
            admin = cloud.keys[Role.ADMIN]
            out = tmp_path / "board"
            code, text = zhilian(
                "device",
                "provision",
                "--vin",
                VIN,
                "--out",
                out,
                "--api",
                api,
                "--api-key",
                admin,
                "--tls-ca-dir",
                tmp_path / "ca",
            )
            assert code == 0, text
            cert = x509.load_pem_x509_certificate((out / f"{VIN}.crt").read_bytes())
            assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == VIN
            assert cert.issuer == ca.certificate.subject
            assert stat.S_IMODE((out / f"{VIN}.key").stat().st_mode) == 0o600

            other = "LZHEB0A12P0000002"
            out2 = tmp_path / "board2"
            code, text = zhilian(
                "device", "provision", "--vin", other, "--out", out2, "--api", api, "--api-key", admin, "--tls-csr"
            )
            assert code == 0, text
            csr = x509.load_pem_x509_csr((out2 / f"{other}.csr").read_bytes())
            assert csr.is_signature_valid
            assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == other
            assert stat.S_IMODE((out2 / f"{other}.key").stat().st_mode) == 0o600
    finally:
        cloud.close()
