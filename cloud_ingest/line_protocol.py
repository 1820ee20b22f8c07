"""InfluxDB line protocol: a sans-I/O encoder (no sockets, no server) for the v1-compatible `/write` endpoint.

    measurement,tag_key=tag_value field_key=field_value,... timestamp

Escaping, as InfluxDB 1.x parses it (and 2.x/3.x accept): measurement names escape comma and space; tag keys,
tag values and field keys escape comma, equals sign and space; string field values are double-quoted with `"` and
`\\` backslash-escaped. Names have no escape for a backslash itself, so a few strings cannot be expressed at all:
a backslash before a comma, equals sign, space, double quote or at the end; control characters (line breaks,
tabs, NUL); empty names and tag values. The encoder refuses those with LineProtocolError instead of writing
something the server would read back differently; the property tests check that everything else round-trips
through a real influxd.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from protocol.catalogue import SignalType, Value

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# InfluxDB's representable instants are int64 nanoseconds minus two sentinels: roughly 1677-09-21 to 2262-04-11.
MIN_TIME_NS = INT64_MIN + 2
MAX_TIME_NS = INT64_MAX - 1
MIN_TIME_MS = -(-MIN_TIME_NS // 1_000_000)
MAX_TIME_MS = MAX_TIME_NS // 1_000_000
# Keys the server rejects as field or tag keys ("invalid field name"/"invalid tag key").
RESERVED_KEYS = frozenset({"time"})

_CONTROL = re.compile("[\x00-\x1f\x7f]")
_BACKSLASH_BEFORE_SEPARATOR = re.compile(r'\\(?=[,= "]|$)')
_MEASUREMENT_ESC = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESC = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_STRING_ESC = str.maketrans({'"': '\\"', "\\": "\\\\"})


class LineProtocolError(ValueError):
    """A name or value the line protocol cannot carry faithfully."""


def _check_name(what: str, s: str) -> None:
    if not s:
        raise LineProtocolError(f"{what} is empty")
    if _CONTROL.search(s):
        # Line breaks end the line, leading tabs are read as separators, and InfluxQL ends a statement at NUL.
        raise LineProtocolError(f"{what} {s[:50]!r} contains a control character")
    if _BACKSLASH_BEFORE_SEPARATOR.search(s):
        # The parser would take it as escaping the separator (or the end of the name) after it, and there is no
        # escape for a backslash itself.
        raise LineProtocolError(f"{what} {s[:50]!r} has a backslash before a separator or at its end")


def measurement(name: str) -> str:
    _check_name("measurement", name)
    if name.startswith("#"):
        raise LineProtocolError(f"measurement {name[:50]!r} would start a comment line")
    return name.translate(_MEASUREMENT_ESC)


def key(what: str, name: str) -> str:
    """A tag key, tag value or field key (`what` names which, for the error message)."""
    _check_name(what, name)
    if what != "tag value" and name in RESERVED_KEYS:
        raise LineProtocolError(f"{what} {name!r} is reserved by InfluxDB")
    return name.translate(_KEY_ESC)


def float_value(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise LineProtocolError(f"{v!r} is not a number")
    f = float(v)
    if not math.isfinite(f):
        raise LineProtocolError(f"{v!r} is not finite")
    return repr(f)  # the shortest text that parses back to the same double


def int_value(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, int):
        raise LineProtocolError(f"{v!r} is not an integer")
    if not INT64_MIN <= v <= INT64_MAX:
        raise LineProtocolError(f"{v} does not fit a signed 64-bit integer")
    return f"{v}i"


def bool_value(v: object) -> str:
    if not isinstance(v, bool):
        raise LineProtocolError(f"{v!r} is not a boolean")
    return "t" if v else "f"


def str_value(v: object) -> str:
    if not isinstance(v, str):
        raise LineProtocolError(f"{v!r} is not a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LineProtocolError(f"string is not encodable as UTF-8: {exc}") from None
    return '"' + v.translate(_STRING_ESC) + '"'


FORMATTERS = {
    SignalType.FLOAT: float_value,
    SignalType.INT: int_value,
    SignalType.BOOL: bool_value,
    SignalType.STR: str_value,
}


def column(typ: SignalType, prefix: str, values: Sequence[Value | None]) -> list[str | None]:
    """`prefix + value` for each value of one column, None where the value is None.

    The common cases are checked inline (ingest formats every value of every sample); anything else goes through
    the per-value formatter, which either handles it (an int in a float column) or raises LineProtocolError.
    """
    if typ is SignalType.FLOAT:
        # x - x == 0.0 exactly for finite x (inf - inf and nan - nan are nan).
        return [
            None if v is None else prefix + (repr(v) if type(v) is float and v - v == 0.0 else float_value(v))
            for v in values
        ]
    if typ is SignalType.INT:
        return [
            None
            if v is None
            else prefix + (f"{v}i" if type(v) is int and INT64_MIN <= v <= INT64_MAX else int_value(v))
            for v in values
        ]
    if typ is SignalType.BOOL:
        return [
            None if v is None else prefix + ("t" if v is True else "f" if v is False else bool_value(v)) for v in values
        ]
    return [None if v is None else prefix + str_value(v) for v in values]


def timestamps_ms(stamps: Sequence[int]) -> list[str]:
    if all(type(t) is int for t in stamps) and (
        not stamps or (min(stamps) >= MIN_TIME_MS and max(stamps) <= MAX_TIME_MS)
    ):
        return [str(t) for t in stamps]
    return [timestamp_ms(t) for t in stamps]  # raises for the first one out of range or not an int


def typed_value(v: Value) -> str:
    """A field value typed by its Python type (bool before int: bool is an int subclass)."""
    if isinstance(v, bool):
        return bool_value(v)
    if isinstance(v, int):
        return int_value(v)
    if isinstance(v, float):
        return float_value(v)
    return str_value(v)


def timestamp_ms(ts: object) -> str:
    if isinstance(ts, bool) or not isinstance(ts, int):
        raise LineProtocolError(f"timestamp {ts!r} is not an integer")
    if not MIN_TIME_MS <= ts <= MAX_TIME_MS:
        raise LineProtocolError(f"timestamp {ts} ms is outside InfluxDB's range (years 1677-2262)")
    return str(ts)


def line(name: str, tags: Mapping[str, str], fields: Mapping[str, Value], ts_ms: int) -> str:
    """One point, fields typed by their Python type, time in ms (write with precision=ms)."""
    if not fields:
        raise LineProtocolError("a point needs at least one field")
    head = measurement(name) + "".join(f",{key('tag key', k)}={key('tag value', v)}" for k, v in sorted(tags.items()))
    body = ",".join(f"{key('field key', k)}={typed_value(v)}" for k, v in fields.items())
    return f"{head} {body} {timestamp_ms(ts_ms)}"


def influxql_identifier(name: str) -> str:
    """A double-quoted InfluxQL identifier (measurement, tag or field key)."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def influxql_string(value: str) -> str:
    """A single-quoted InfluxQL string literal (e.g. a tag value in WHERE)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
