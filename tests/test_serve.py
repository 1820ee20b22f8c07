"""`zhilian serve` as its own process freezes start-up's heap; embedded (the default) it leaves the collector alone."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

from zhilian.serve import serve


async def _serve_until_frozen_or(tmp_path: Path, freeze_heap: bool, seconds: float) -> int:
    before = gc.get_freeze_count()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(tmp_path / "data", with_api=False, with_bridge=False, stop=stop, freeze_heap=freeze_heap)
    )
    try:
        async with asyncio.timeout(seconds):
            # The collector has no event to wait on: poll its freeze count.
            while gc.get_freeze_count() == before and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    except TimeoutError:
        pass
    stop.set()
    await asyncio.wait_for(task, 20)
    return gc.get_freeze_count() - before


def test_serve_freezes_what_start_up_built_only_when_asked(tmp_path: Path) -> None:
    try:
        assert asyncio.run(_serve_until_frozen_or(tmp_path / "embedded", False, 2.0)) == 0
        # The service (catalogue, rules, app) is among what gets frozen: far more than an empty interpreter holds.
        assert asyncio.run(_serve_until_frozen_or(tmp_path / "own", True, 20.0)) > 50_000
    finally:
        gc.unfreeze()
