"""Helpers shared by the alarm, rules-pipeline and notification tests (no tests here).

A vehicle sends signed 1 Hz batches of the hottest battery temperature; `battery_over_temperature` (default rules,
ebike48 NMC: L1 50 °C for 30 s, L2 55 °C for 10 s, L3 60 °C for 5 s, clear below 45 °C held 120 s) turns them into
alarms. The alarm service runs on an injected clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud_ingest.alarms import AlarmRow, AlarmsConfig, AlarmTransitionRow, RuleStateRow
from cloud_ingest.notify import NotifyConfig, WebhookConfig
from cloud_ingest.service import IngestService
from protocol import Batch, DeviceKey, Envelope, Flags, Kind, encode_batch, load_catalogue, seal_envelope

CAT = load_catalogue()
KEY = DeviceKey.from_seed(b"\x07" * 32)
T0 = 1_700_000_000_000
TEMP = "Powertrain.TractionBattery.Temperature.Max"
RULE = "battery_over_temperature"
OFFLINE = "vehicle_offline"


def vin_of(n: int) -> str:
    return f"LZHALARM{n:09d}"


class Clock:
    """The alarm service's clock (unix ms), moved by the test."""

    def __init__(self, now_ms: int = T0) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


class Vehicle:
    """Consecutive signed telemetry envelopes of one vehicle: sample i is at T0 + i seconds."""

    def __init__(self, vin: str, key: DeviceKey = KEY, boot: int = 1, t0: int = T0) -> None:
        self.vin = vin
        self.key = key
        self.boot = boot
        self.t0 = t0
        self.seq = 0

    def ts(self, second: float) -> int:
        return self.t0 + int(second * 1000)

    def batch(self, start_s: int, temps: Sequence[float], signal: str = TEMP) -> bytes:
        """One envelope with len(temps) samples, 1 s apart, from second `start_s`."""
        self.seq += 1
        ts = [self.ts(start_s + i) for i in range(len(temps))]
        body = encode_batch(Batch(ts, {signal: list(temps)}), CAT)
        env = Envelope(self.vin, self.key.key_id, self.boot, self.seq, self.t0, Kind.TELEMETRY, Flags.NONE, body)
        return seal_envelope(env, self.key)


def open_service(
    data_dir: Path,
    database_url: str | None,
    clock: Clock,
    webhook: WebhookConfig | None = None,
    notify_config: NotifyConfig | None = None,
    **alarms: Any,
) -> IngestService:
    return IngestService.open(
        data_dir,
        database_url=database_url,
        clock=clock,
        alarms_config=AlarmsConfig(**alarms),
        webhook=webhook,
        notify_config=notify_config,
    )


def ingest(svc: IngestService, *raws: bytes, expect: str = "stored") -> None:
    results = svc.pipeline.ingest_many([(None, raw) for raw in raws])
    assert [r.outcome for r in results] == [expect] * len(raws), results


def alarms_of(svc: IngestService, vin: str, rule: str | None = RULE) -> list[AlarmRow]:
    with Session(svc.engine, expire_on_commit=False) as s:
        stmt = select(AlarmRow).where(AlarmRow.vin == vin).order_by(AlarmRow.id)
        if rule is not None:
            stmt = stmt.where(AlarmRow.rule == rule)
        return list(s.scalars(stmt))


def transitions_of(svc: IngestService, alarm_id: int) -> list[tuple[str | None, str, str]]:
    with Session(svc.engine) as s:
        rows = s.scalars(
            select(AlarmTransitionRow).where(AlarmTransitionRow.alarm_id == alarm_id).order_by(AlarmTransitionRow.id)
        )
        return [(t.from_state, t.to_state, t.actor) for t in rows]


def rule_state_version(svc: IngestService, vin: str) -> int | None:
    with Session(svc.engine) as s:
        return s.scalar(select(RuleStateRow.version).where(RuleStateRow.vin == vin))


def count(svc: IngestService, model: type) -> int:
    with Session(svc.engine) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0
