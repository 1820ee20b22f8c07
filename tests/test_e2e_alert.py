"""Edge alerts end to end: a battery whose temperature ramps → the agent's pre-check raises an alert that is spooled
and published at once on ev/{vin}/alert, ahead of any telemetry batch (the batch interval is 30 s), and stored by
the cloud; the level-3 alert also sends the full samples of the seconds before it (triggered capture)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.precheck import LEVEL_SIGNAL, RULE_SIGNAL
from protocol import DeviceKey, Kind, parse_envelope
from tests.conftest import running_stack, wait_until
from zhilian.broker import MosquittoProcess

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
TEMP = "Powertrain.TractionBattery.Temperature.Max"
CELL_MAX = "Powertrain.TractionBattery.CellVoltage.Max"
CELL_MIN = "Powertrain.TractionBattery.CellVoltage.Min"
SOC = "Powertrain.TractionBattery.StateOfCharge"
BATCH_INTERVAL_S = 30.0


class RampingPack:
    """A value source (the BMS's part of a sample) whose pack temperature is steady, then climbs at 2 degC/s."""

    def __init__(self, start: float, steady_s: float = 2.0, rate: float = 2.0) -> None:
        self.start, self.steady_s, self.rate = start, steady_s, rate

    def temperature(self, now: float) -> float:
        return round(30.0 + self.rate * max(0.0, now - self.start - self.steady_s), 1)

    def read(self, now: float) -> dict[str, float]:
        return {TEMP: self.temperature(now), CELL_MAX: 4.05, CELL_MIN: 3.98, SOC: 80.0}


@contextlib.asynccontextmanager
async def _watch(broker: MosquittoProcess, vin: str, key: DeviceKey) -> AsyncIterator[list[Kind]]:
    """The kinds of the vehicle's messages in the order the broker delivered them."""
    kinds: list[Kind] = []
    subscribed = asyncio.Event()

    async def run() -> None:
        async with aiomqtt.Client(broker.host, broker.port, identifier="zl-test-alert-watch") as client:
            await client.subscribe([(f"ev/{vin}/telemetry", 1), (f"ev/{vin}/alert", 1)])
            subscribed.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                env = parse_envelope(message.payload).verify(key.public_raw)
                assert str(message.topic) == f"ev/{vin}/{'alert' if env.kind is Kind.ALERT else 'telemetry'}"
                kinds.append(env.kind)

    task = asyncio.create_task(run())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        yield kinds
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_temperature_ramp_publishes_an_alert_at_once_and_it_reaches_the_store(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    asyncio.run(_scenario(tmp_path, mosquitto))


async def _scenario(tmp_path: Path, broker: MosquittoProcess) -> None:
    vin = "LZHE2EALERT000001"
    key = DeviceKey.generate()
    pack = RampingPack(time.time())
    agent = EdgeAgent(
        AgentConfig(
            vin=vin,
            key_file=tmp_path / "unused.key",
            state_dir=tmp_path / "agent",
            broker_host=broker.host,
            broker_port=broker.port,
            batch_interval_s=BATCH_INTERVAL_S,
            sample_interval_s=0.2,
        ),
        sources=[pack],
        key=key,
    )
    stop = asyncio.Event()
    async with running_stack(tmp_path / "ingest", broker) as stack, _watch(broker, vin, key) as kinds:
        stack.service.registry.register_device(vin, key.public_raw)
        store = stack.service.store
        started = time.monotonic()
        task = asyncio.create_task(agent.run(stop))
        try:

            def alert_rows() -> list[int]:
                got = store.query(vin, 0, 2**62, [RULE_SIGNAL], 1000)
                return [ts for ts, rule in zip(got.timestamps, got.columns[RULE_SIGNAL], strict=True) if rule]

            # The temperature rises at 2 degC/s after 2 s: the rise rule needs 5 s of history plus a 2 s debounce.
            await wait_until(lambda: alert_rows(), timeout=BATCH_INTERVAL_S * 0.6)
            # Well inside the first batch interval: the regular batch is still in the batcher, not sent.
            assert time.monotonic() - started < BATCH_INTERVAL_S and len(agent.batcher) > 0
            await wait_until(lambda: bool(kinds), timeout=10)
            assert kinds[0] is Kind.ALERT, kinds
            # Counted once the ledger committed, a moment after the rows became visible.
            await wait_until(lambda: stack.service.pipeline.stats()["alerts"] >= 1, timeout=10)

            got = store.query(vin, 0, 2**62, [RULE_SIGNAL, LEVEL_SIGNAL, TEMP], 1000)
            rows = [
                (ts, rule, level, temp)
                for ts, rule, level, temp in zip(got.timestamps, *got.columns.values(), strict=True)
                if rule
            ]
            first_ts, rule, level, temp = rows[0]
            assert rule == "temperature_rise.battery" and level == 3
            assert temp == pytest.approx(pack.temperature(first_ts / 1000), abs=0.11)  # ms truncation: one 0.1 step

            # Level 3 triggered a capture: the full samples of the seconds before the alert, one per second, are
            # stored too, before the first regular batch.
            def pre_trigger() -> list[int]:
                before = store.query(vin, 0, first_ts - 1, [TEMP, CELL_MAX, SOC], 1000)
                return before.timestamps

            await wait_until(lambda: len(pre_trigger()) >= 4, timeout=10)
            before = store.query(vin, 0, first_ts - 1, [TEMP, CELL_MAX, SOC], 1000)
            spacing = [b - a for a, b in zip(before.timestamps, before.timestamps[1:], strict=False)]
            assert all(d >= 1000 for d in spacing), spacing
            for ts, t, cell in zip(before.timestamps, before.columns[TEMP], before.columns[CELL_MAX], strict=True):
                assert t == pytest.approx(pack.temperature(ts / 1000), abs=0.11) and cell == 4.05
            assert agent.sampler.captures == 1 and agent.stats.alerts >= 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
