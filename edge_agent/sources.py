"""The small interface every non-GNSS value source (BMS, motor controller, ...) offers the sampler.

A source keeps its own latest readings (polling its device in its own task if it must) and hands a snapshot of
catalogue-named values on request; the sampler never waits on a device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

Value = float | int | bool | str


class ValueSource(Protocol):
    def read(self, now: float) -> Mapping[str, Value]:
        """Latest values at wall-clock time `now` (unix seconds), keyed by catalogue signal name."""
        ...
