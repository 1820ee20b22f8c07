"""Bounded in-memory outbox of sealed messages awaiting the broker's PUBACK.

A message leaves only after it was acknowledged.  When full, the oldest telemetry is evicted (alerts only when
nothing else is left) and every eviction is counted.  The durable on-disk spool (kill -9 safe) replaces this in
the store-and-forward milestone; the interface stays.
"""

from __future__ import annotations

import asyncio
from collections import deque

from edge_agent.batcher import Sealed
from protocol import Kind


class Outbox:
    def __init__(self, capacity: int = 1000) -> None:
        if capacity < 1:
            raise ValueError("outbox capacity must be >= 1")
        self._items: deque[Sealed] = deque()
        self._capacity = capacity
        self._nonempty = asyncio.Event()
        self.evicted = 0
        self.acked = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Sealed) -> None:
        if len(self._items) >= self._capacity:
            self._evict_one()
        if item.kind is Kind.ALERT:
            # Alerts jump ahead of telemetry but keep their order among themselves.
            idx = sum(1 for it in self._items if it.kind is Kind.ALERT)
            self._items.insert(idx, item)
        else:
            self._items.append(item)
        self._nonempty.set()

    def _evict_one(self) -> None:
        for i, it in enumerate(self._items):
            if it.kind is not Kind.ALERT:
                del self._items[i]
                self.evicted += 1
                return
        self._items.popleft()
        self.evicted += 1

    async def peek(self, timeout: float) -> Sealed | None:
        """The next message to send, waiting at most `timeout` seconds for one."""
        if not self._items:
            self._nonempty.clear()
            try:
                await asyncio.wait_for(self._nonempty.wait(), timeout)
            except TimeoutError:
                return None
        return self._items[0] if self._items else None

    def ack(self, item: Sealed) -> None:
        """Remove `item` after its PUBACK (it may already have been evicted meanwhile)."""
        if self._items and self._items[0] is item:
            self._items.popleft()
        else:
            try:
                self._items.remove(item)
            except ValueError:
                return
        self.acked += 1
