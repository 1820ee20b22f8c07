"""The registry on SQLite and PostgreSQL: devices and their keys (rotation, revocation, the key cache), API keys."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from cloud_ingest.db import Device, DeviceKeyRow, DeviceState, Role, create_engine_for, init_db
from cloud_ingest.errors import DeviceConflict, InvalidDeviceError
from cloud_ingest.registry import (
    MAX_ACTIVE_KEYS,
    KeyState,
    Registry,
    UnknownDeviceError,
    UnknownKeyError,
)
from protocol import DeviceKey

VIN = "LZHEB0A12P0000001"
OTHER = "LZHEB0A12P0000002"
KEY_A = DeviceKey.from_seed(b"\x11" * 32)
KEY_B = DeviceKey.from_seed(b"\x12" * 32)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    e = create_engine_for(database_url)
    init_db(e)
    yield e
    e.dispose()


@pytest.fixture
def registry(engine: Engine) -> Registry:
    return Registry(engine)


def count(engine: Engine, model: type) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def test_registration_is_idempotent_and_never_swaps_keys(registry: Registry, engine: Engine) -> None:
    first = registry.register_device(VIN, KEY_A.public_raw, "bike")
    assert (first.vin, first.key_id, first.public_key, first.active) == (VIN, KEY_A.key_id, KEY_A.public_raw, True)
    assert registry.register_device(VIN, KEY_A.public_raw) == first
    with pytest.raises(DeviceConflict):
        registry.register_device(VIN, KEY_B.public_raw)
    for vin, raw in (("bad vin", KEY_A.public_raw), (OTHER, b"short"), (OTHER, "x" * 32)):
        with pytest.raises(InvalidDeviceError):
            registry.register_device(vin, raw)  # type: ignore[arg-type]
    assert count(engine, Device) == 1 and count(engine, DeviceState) == 1 and count(engine, DeviceKeyRow) == 1
    summary = registry.vehicle_summary(VIN)
    assert summary is not None and (summary.label, summary.messages) == ("bike", 0)


def test_rotation_adds_keys_and_revocation_retires_them(registry: Registry) -> None:
    registry.register_device(VIN, KEY_A.public_raw)
    added, created = registry.add_key(VIN, KEY_B.public_raw)
    assert created and added.key_id == KEY_B.key_id and added.active
    again, created_again = registry.add_key(VIN, KEY_B.public_raw)
    assert not created_again and again == added
    assert registry.register_device(VIN, KEY_B.public_raw).key_id == KEY_B.key_id  # any active key re-registers
    assert [k.key_id for k in registry.list_keys(VIN)] == [KEY_A.key_id, KEY_B.key_id]

    revoked = registry.revoke_key(VIN, KEY_A.key_id)
    assert revoked.revoked_at is not None and not revoked.active
    assert registry.revoke_key(VIN, KEY_A.key_id).revoked_at == revoked.revoked_at  # idempotent
    assert [(k.key_id, k.active) for k in registry.list_keys(VIN)] == [(KEY_A.key_id, False), (KEY_B.key_id, True)]
    with pytest.raises(DeviceConflict, match="revoked"):
        registry.add_key(VIN, KEY_A.public_raw)
    with pytest.raises(DeviceConflict, match="revoked"):
        registry.register_device(VIN, KEY_A.public_raw)


def test_unknown_devices_and_keys(registry: Registry) -> None:
    registry.register_device(VIN, KEY_A.public_raw)
    with pytest.raises(UnknownDeviceError):
        registry.add_key(OTHER, KEY_B.public_raw)
    with pytest.raises(UnknownDeviceError):
        registry.list_keys(OTHER)
    with pytest.raises(UnknownDeviceError):
        registry.revoke_key(OTHER, KEY_A.key_id)
    with pytest.raises(UnknownKeyError):
        registry.revoke_key(VIN, KEY_B.key_id)


def test_active_keys_are_bounded(registry: Registry) -> None:
    registry.register_device(VIN, KEY_A.public_raw)
    extra = [DeviceKey.generate() for _ in range(MAX_ACTIVE_KEYS)]
    for key in extra[: MAX_ACTIVE_KEYS - 1]:
        registry.add_key(VIN, key.public_raw)
    with pytest.raises(DeviceConflict, match="active keys"):
        registry.add_key(VIN, extra[-1].public_raw)
    registry.revoke_key(VIN, KEY_A.key_id)
    assert registry.add_key(VIN, extra[-1].public_raw)[1]


def test_lookup_tells_every_state_apart(registry: Registry) -> None:
    registry.register_device(VIN, KEY_A.public_raw)
    registry.add_key(VIN, KEY_B.public_raw)
    assert registry.lookup_key(VIN, KEY_A.key_id).state is KeyState.ACTIVE
    assert registry.lookup_key(VIN, KEY_A.key_id).public_key == KEY_A.public_raw  # from the cache this time
    assert registry.lookup_key(VIN, DeviceKey.generate().key_id).state is KeyState.UNKNOWN_KEY
    assert registry.lookup_key(VIN, b"\x00" * 3).state is KeyState.UNKNOWN_KEY
    assert registry.lookup_key(OTHER, KEY_A.key_id).state is KeyState.UNKNOWN_DEVICE
    registry.revoke_key(VIN, KEY_A.key_id)
    found = registry.lookup_key(VIN, KEY_A.key_id)
    assert (found.state, found.public_key) == (KeyState.REVOKED, None)
    assert registry.lookup_key(VIN, KEY_B.key_id).public_key == KEY_B.public_raw


def test_other_processes_caches_drop_a_revoked_key_within_the_ttl(engine: Engine) -> None:
    """Revocation reaches the revoking registry at once and every other one within its cache TTL."""
    revoker, short, long_ = Registry(engine), Registry(engine, key_cache_ttl_s=0.2), Registry(engine)
    revoker.register_device(VIN, KEY_A.public_raw)
    for r in (revoker, short, long_):
        assert r.lookup_key(VIN, KEY_A.key_id).state is KeyState.ACTIVE
    revoker.revoke_key(VIN, KEY_A.key_id)
    assert revoker.lookup_key(VIN, KEY_A.key_id).state is KeyState.REVOKED
    assert long_.lookup_key(VIN, KEY_A.key_id).state is KeyState.ACTIVE  # the documented staleness bound
    time.sleep(0.3)
    assert short.lookup_key(VIN, KEY_A.key_id).state is KeyState.REVOKED


def test_concurrent_registration_of_one_vin_creates_it_once(engine: Engine) -> None:
    registries = [Registry(engine) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(registries))

    def register(r: Registry) -> None:
        try:
            barrier.wait(timeout=10)
            r.register_device(VIN, KEY_A.public_raw)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert count(engine, Device) == 1 and count(engine, DeviceKeyRow) == 1 and count(engine, DeviceState) == 1


def test_api_keys_and_ping(registry: Registry) -> None:
    plaintext = registry.create_api_key(Role.OPERATOR, "ops")
    assert registry.role_for_key(plaintext) is Role.OPERATOR
    assert registry.role_for_key(plaintext + "x") is None
    assert registry.role_for_key("not-a-key") is None
    with pytest.raises(ValueError):
        registry.create_api_key("root", "x")
    registry.ping()


def test_vehicle_listing_pages_in_vin_order(registry: Registry) -> None:
    vins = [f"LZHEB0A12P{n:07d}" for n in (5, 1, 3, 2, 4)]
    for vin in vins:
        registry.register_device(vin, DeviceKey.generate().public_raw)
    assert [v.vin for v in registry.list_vehicles(limit=2, offset=1)] == sorted(vins)[1:3]
    assert [v.vin for v in registry.list_vehicles()] == sorted(vins)
