"""One sample as the rules see it: typed, defensive accessors over the values of one instant.

Values come from the pipeline already range-checked against the catalogue, but the engine must survive any input
(a rule that raised would hide every other rule's alarm), so every accessor type-checks and refuses NaN/inf.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from cloud_ingest.rules import names as n
from protocol.catalogue import Value

MAX_TEXT = 64  # longer strings (barcodes, versions) are refused: they would let one sample bloat the state
_FLOAT_INT_LIMIT = 2**1000
_UNSET: Any = object()  # "not computed yet" for the per-sample caches (None is a valid result)


def as_num(v: object) -> float | None:
    """`v` as a finite float, or None (bools, strings, NaN, ±inf and ints beyond float range are not numbers)."""
    if type(v) is float:
        return v if v - v == 0.0 else None  # inf - inf and NaN - NaN are NaN
    if type(v) is int:
        return float(v) if -_FLOAT_INT_LIMIT < v < _FLOAT_INT_LIMIT else None
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


class Sample:
    __slots__ = (
        "_cells",
        "_extremes",
        "_position",
        "_probes",
        "_recent",
        "_recent_max_age",
        "_temps",
        "cell_names",
        "probe_names",
        "ts",
        "values",
    )

    def __init__(
        self,
        ts: int,
        values: Mapping[str, Value],
        recent: Mapping[str, list[Any]],
        recent_max_age_ms: int,
        cell_names: Sequence[tuple[int, str]],
        probe_names: Sequence[tuple[int, str]],
    ) -> None:
        self.ts = ts
        self.values = values
        self._recent = recent
        self._recent_max_age = recent_max_age_ms
        self.cell_names = cell_names
        self.probe_names = probe_names
        self._cells: list[tuple[int, float]] | None = None
        self._probes: list[float] | None = None
        self._temps: tuple[float | None, float | None] | None = None  # (max, min), computed on first use
        self._extremes: tuple[float, float] | None = _UNSET
        self._position: tuple[float, float] | None = _UNSET

    # -- scalar accessors ---------------------------------------------------------------------------------

    def num(self, name: str) -> float | None:
        """The numeric value of `name` in this sample, or None."""
        v = self.values.get(name)
        if type(v) is float:  # the common case, without a call
            return v if v - v == 0.0 else None
        return None if v is None else as_num(v)

    def recent(self, name: str) -> float | None:
        """`name` in this sample, else its last value if it is at most `recent_max_age` old (engine setting)."""
        v = as_num(self.values.get(name))
        if v is not None:
            return v
        entry = self._recent.get(name)
        if entry is not None and self.ts - entry[0] <= self._recent_max_age:
            return as_num(entry[1])
        return None

    def text(self, name: str) -> str | None:
        v = self.values.get(name)
        if isinstance(v, str) and 0 < len(v) <= MAX_TEXT:
            return v
        return None

    def flag(self, name: str) -> bool | None:
        v = self.values.get(name)
        return v if isinstance(v, bool) else None

    # -- derived, computed once per sample -----------------------------------------------------------------

    def cells(self) -> list[tuple[int, float]]:
        """(cell number, volts) of every cell voltage present in this sample."""
        if self._cells is None:
            self._cells = self._numbered(self.cell_names)
        return self._cells

    def probes(self) -> list[float]:
        if self._probes is None:
            self._probes = [v for _, v in self._numbered(self.probe_names)]
        return self._probes

    def _numbered(self, names: Sequence[tuple[int, str]]) -> list[tuple[int, float]]:
        out = []
        get = self.values.get
        for number, name in names:
            v = get(name)
            if v is None:
                continue
            if type(v) is float and v - v == 0.0:  # the common case, without a call
                out.append((number, v))
            else:
                x = as_num(v)
                if x is not None:
                    out.append((number, x))
        return out

    def temp_max(self) -> float | None:
        """Hottest battery temperature: the BMS's own maximum, else the hottest probe present."""
        return (self._temps or self._compute_temps())[0]

    def temp_min(self) -> float | None:
        """Coldest battery temperature: the BMS's own minimum, else the coldest probe present."""
        return (self._temps or self._compute_temps())[1]

    def _compute_temps(self) -> tuple[float | None, float | None]:
        hi, lo = self.num(n.TEMP_MAX), self.num(n.TEMP_MIN)
        if hi is None or lo is None:
            probes = self.probes()
            if probes:
                hi = max(probes) if hi is None else hi
                lo = min(probes) if lo is None else lo
        self._temps = (hi, lo)
        return self._temps

    def cell_extremes(self) -> tuple[float, float] | None:
        """(lowest, highest) cell voltage: from the individual cells when present, else the BMS's Min/Max."""
        if self._extremes is not _UNSET:
            return self._extremes
        cells = self.cells()
        if len(cells) >= 2:
            volts = [v for _, v in cells]
            self._extremes = (min(volts), max(volts))
        else:
            lo, hi = self.num(n.CELL_V_MIN), self.num(n.CELL_V_MAX)
            self._extremes = None if lo is None or hi is None else (lo, hi)
        return self._extremes

    # -- GNSS quality ----------------------------------------------------------------------------------------

    def position(self) -> tuple[float, float] | None:
        if self._position is _UNSET:
            lat, lon = self.num(n.LAT), self.num(n.LON)
            ok = lat is not None and lon is not None and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0
            self._position = (lat, lon) if lat is not None and lon is not None and ok else None
        return self._position

    def gnss_good(self, max_hdop: float, min_sats: float) -> bool:
        """A fix in this sample that is good enough to trust its position and speed."""
        if self.position() is None:
            return False
        mode = self.num(n.FIX_MODE)
        if mode is not None and mode < 2:
            return False
        hdop = self.num(n.HDOP)
        if hdop is None or hdop > max_hdop:
            return False
        sats = self.num(n.SATS)
        return sats is None or sats >= min_sats

    def gnss_lost(self, lost_hdop: float, lost_sats: float) -> bool:
        """No usable fix in this sample: no position (the agent samples without GNSS), no fix, or a collapse."""
        if self.position() is None:
            return True
        mode = self.num(n.FIX_MODE)
        if mode is not None and mode < 2:
            return True
        sats = self.num(n.SATS)
        if sats is not None and sats < lost_sats:
            return True
        hdop = self.num(n.HDOP)
        return hdop is not None and hdop > lost_hdop
