"""The signal catalogue: one machine-readable file names every signal once.

The file lives in `firmware_specs/signals.toml` (package data).  Everything that needs to know about a signal —
its wire id, type, unit, range, resolution, source device — asks a `Catalogue` loaded from that file.
"""

from __future__ import annotations

import enum
import math
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from protocol.errors import CatalogueError

_NAME_RE = re.compile(r"^[A-Z][A-Za-z0-9]*(\.[A-Z][A-Za-z0-9]*)*$")
_SOURCES = frozenset({"gnss", "bms", "controller", "agent"})
MAX_WIRE_ID = 65535

Value = float | int | bool | str


class SignalType(enum.StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    STR = "str"


@dataclass(frozen=True, slots=True)
class Signal:
    name: str
    id: int
    type: SignalType
    unit: str
    source: str
    description: str = ""
    min: float | None = None
    max: float | None = None
    resolution: float | None = None

    @property
    def decimals(self) -> int:
        """Decimal places that the resolution can express (0 for non-float signals)."""
        if self.resolution is None or self.resolution >= 1:
            return 0
        return max(0, -math.floor(math.log10(self.resolution) + 1e-9))

    @property
    def column(self) -> str:
        """A storage-friendly identifier derived from the name (dots become underscores, lower case)."""
        return "s_" + self.name.replace(".", "_").lower()

    def in_range(self, value: Value) -> bool:
        """True when `value` has this signal's type and lies inside its valid range."""
        if self.type is SignalType.BOOL:
            return isinstance(value, bool)
        if self.type is SignalType.STR:
            return isinstance(value, str)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.type is SignalType.INT and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)

    def invalid_indices(self, values: Sequence[Value | None]) -> list[int]:
        """Indices of the values `in_range` refuses (None is no value, not an invalid one). A numeric signal with a
        finite range takes one comparison chain per value: NaN fails it, infinities fall outside the range."""
        lo, hi = self.min, self.max
        if (
            self.type in (SignalType.FLOAT, SignalType.INT)
            and lo is not None
            and hi is not None
            and math.isfinite(lo)
            and math.isfinite(hi)
        ):
            types: tuple[type, ...] = (int,) if self.type is SignalType.INT else (int, float)
            return [
                i
                for i, v in enumerate(values)
                if v is not None and not (type(v) in types and lo <= v <= hi)  # type: ignore[operator]
            ]
        return [i for i, v in enumerate(values) if v is not None and not self.in_range(v)]


class Catalogue:
    """An immutable, indexed set of signals."""

    def __init__(self, signals: Iterable[Signal], version: int = 1) -> None:
        self.version = version
        self._by_name: dict[str, Signal] = {}
        self._by_id: dict[int, Signal] = {}
        for sig in signals:
            if sig.name in self._by_name:
                raise CatalogueError(f"duplicate signal name {sig.name!r}")
            if sig.id in self._by_id:
                raise CatalogueError(f"duplicate wire id {sig.id} ({sig.name!r} and {self._by_id[sig.id].name!r})")
            self._by_name[sig.name] = sig
            self._by_id[sig.id] = sig

    def __iter__(self) -> Iterator[Signal]:
        return iter(sorted(self._by_id.values(), key=lambda s: s.id))

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def by_name(self, name: str) -> Signal:
        try:
            return self._by_name[name]
        except KeyError:
            raise CatalogueError(f"unknown signal {name!r}") from None

    def by_id(self, wire_id: int) -> Signal | None:
        return self._by_id.get(wire_id)

    def names(self) -> list[str]:
        return [s.name for s in self]

    def from_source(self, source: str) -> list[Signal]:
        return [s for s in self if s.source == source]


def _signal_from_table(row: Mapping[str, Any]) -> Signal:
    try:
        name = row["name"]
        wire_id = row["id"]
        typ = SignalType(row["type"])
        unit = row.get("unit", "")
        source = row["source"]
    except KeyError as exc:
        raise CatalogueError(f"signal entry {dict(row)!r} lacks field {exc.args[0]!r}") from None
    except ValueError as exc:
        raise CatalogueError(f"signal {row.get('name')!r}: {exc}") from None
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CatalogueError(f"signal name {name!r} is not a dotted VSS-style name")
    if not isinstance(wire_id, int) or isinstance(wire_id, bool) or not 1 <= wire_id <= MAX_WIRE_ID:
        raise CatalogueError(f"signal {name!r}: wire id must be an integer in 1..{MAX_WIRE_ID}")
    if source not in _SOURCES:
        raise CatalogueError(f"signal {name!r}: unknown source {source!r}")
    lo = row.get("min")
    hi = row.get("max")
    resolution = row.get("resolution")
    if typ in (SignalType.FLOAT, SignalType.INT) and (lo is None or hi is None or lo > hi):
        raise CatalogueError(f"signal {name!r}: numeric signals need min <= max")
    if typ is SignalType.FLOAT:
        if not isinstance(resolution, int | float) or resolution <= 0:
            raise CatalogueError(f"signal {name!r}: float signals need a positive resolution")
        resolution = float(resolution)
    elif resolution is not None:
        raise CatalogueError(f"signal {name!r}: only float signals carry a resolution")
    return Signal(
        name=name,
        id=wire_id,
        type=typ,
        unit=str(unit),
        source=source,
        description=str(row.get("description", "")),
        min=None if lo is None else float(lo) if typ is SignalType.FLOAT else lo,
        max=None if hi is None else float(hi) if typ is SignalType.FLOAT else hi,
        resolution=resolution,
    )


def parse_catalogue(text: str) -> Catalogue:
    """Parse catalogue TOML text (see firmware_specs/signals.toml for the format)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogueError(f"catalogue is not valid TOML: {exc}") from None
    rows = doc.get("signal")
    if not isinstance(rows, list) or not rows:
        raise CatalogueError("catalogue has no [[signal]] entries")
    version = doc.get("catalogue_version", 1)
    if not isinstance(version, int):
        raise CatalogueError("catalogue_version must be an integer")
    return Catalogue((_signal_from_table(r) for r in rows), version=version)


def default_catalogue_path() -> Path:
    return Path(str(resources.files("firmware_specs").joinpath("signals.toml")))


@cache
def _load_default() -> Catalogue:
    return parse_catalogue(default_catalogue_path().read_text(encoding="utf-8"))


def load_catalogue(path: str | Path | None = None) -> Catalogue:
    """Load a catalogue file; without a path, the one shipped in firmware_specs (cached)."""
    if path is None:
        return _load_default()
    return parse_catalogue(Path(path).read_text(encoding="utf-8"))
