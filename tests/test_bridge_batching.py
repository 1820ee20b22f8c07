"""The bridge's batching: a call takes what is queued plus what arrives within `linger_s`, up to `max_batch`,
in arrival order, never losing or repeating a message (no broker needed: the queue is fed directly)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker_bridge.bridge import MqttBridge, _Inbound


def _bridge(**kwargs: Any) -> MqttBridge:
    def ingest(_items: Sequence[tuple[str | None, bytes]]) -> list[Any]:
        raise AssertionError("not called: these tests only batch")

    return MqttBridge(ingest, **kwargs)


def _msg(mid: int) -> _Inbound:
    return _Inbound(generation=0, mid=mid, qos=1, claimed_vin="LZHTEST000000001", payload=b"%d" % mid)


def test_messages_arriving_within_the_linger_join_the_batch() -> None:
    async def run() -> list[int]:
        bridge = _bridge(max_batch=4, linger_s=1.0)
        loop = asyncio.get_running_loop()
        for mid in (2, 3, 4):
            loop.call_later(0.01 * mid, bridge._queue.put_nowait, _msg(mid))
        # Returns as soon as the batch is full: the linger is an upper bound, not a delay.
        batch = await asyncio.wait_for(bridge._fill_batch(_msg(1)), 5.0)
        return [m.mid for m in batch]

    assert asyncio.run(run()) == [1, 2, 3, 4]


def test_a_full_queue_gives_max_batch_at_once_and_keeps_the_rest() -> None:
    async def run() -> tuple[list[int], int]:
        bridge = _bridge(max_batch=3, linger_s=1.0)
        for mid in range(2, 7):
            bridge._queue.put_nowait(_msg(mid))
        batch = await asyncio.wait_for(bridge._fill_batch(_msg(1)), 5.0)
        return [m.mid for m in batch], bridge._queue.qsize()

    assert asyncio.run(run()) == ([1, 2, 3], 3)


def test_without_linger_a_batch_is_what_is_queued() -> None:
    async def run() -> list[int]:
        bridge = _bridge(max_batch=10, linger_s=0.0)
        bridge._queue.put_nowait(_msg(2))
        asyncio.get_running_loop().call_later(0.2, bridge._queue.put_nowait, _msg(3))
        batch = await bridge._fill_batch(_msg(1))
        await asyncio.sleep(0.3)
        return [m.mid for m in batch] + [-bridge._queue.qsize()]

    assert asyncio.run(run()) == [1, 2, -1]


@pytest.mark.parametrize("linger", [-0.1, 1.5])
def test_a_linger_outside_0_to_1_s_is_refused(linger: float) -> None:
    with pytest.raises(ValueError, match="linger_s"):
        _bridge(linger_s=linger)


@settings(max_examples=40, deadline=None)
@given(
    gaps_ms=st.lists(st.integers(0, 8), min_size=1, max_size=40),
    max_batch=st.integers(1, 7),
    linger_ms=st.integers(0, 5),
)
def test_batches_carry_every_message_once_in_arrival_order(gaps_ms: list[int], max_batch: int, linger_ms: int) -> None:
    async def run() -> list[list[int]]:
        bridge = _bridge(max_batch=max_batch, linger_s=linger_ms / 1000)

        async def feed() -> None:
            for mid, gap in enumerate(gaps_ms):
                await asyncio.sleep(gap / 1000)
                bridge._queue.put_nowait(_msg(mid))

        feeder = asyncio.create_task(feed())
        batches: list[list[int]] = []
        while sum(map(len, batches)) < len(gaps_ms):
            first = await asyncio.wait_for(bridge._queue.get(), 5.0)
            batch = await bridge._fill_batch(first)
            assert 1 <= len(batch) <= max_batch
            batches.append([m.mid for m in batch])
        await feeder
        assert bridge._queue.empty()
        return batches

    batches = asyncio.run(run())
    assert [mid for batch in batches for mid in batch] == list(range(len(gaps_ms)))
