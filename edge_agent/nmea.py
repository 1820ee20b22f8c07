"""Sans-I/O NMEA 0183 decoder: bytes from a GNSS receiver in, one `GnssFix` per navigation epoch out.

Framing, checksum verification and field splitting are pynmea2's; this module decides which sentences make up an
epoch and what the epoch means (gpsd's conventions: fix mode 1/2/3, knots converted to km/h once, here).

Epoch rule. Receivers send a burst of sentences per epoch, several of them stamped with the epoch's UTC time
(RMC, GGA, GNS). A fix is emitted
  * as soon as the epoch has RMC and GGA (or GNS) — no waiting for the next burst when the receiver sends both;
  * or as soon as it has every timed sentence kind that the two previous epochs had — so an RMC-only (or GGA-only)
    receiver gets its fixes without delay once its habits are known;
  * otherwise when a sentence with a new time arrives (the previous epoch is then complete by definition),
    or on `flush()`.
Each epoch is emitted at most once. GSA carries no time; its satellites are attributed to the epoch in progress
when it arrives, and a fix uses the current epoch's GSA if it already came (SiRF order: GGA, GSA, RMC) and the
previous epoch's otherwise (u-blox order: RMC, GGA, GSA) — used-satellite sets change slowly, so a one-epoch lag
in BeiDouInUse is the price of zero latency for position.

Nothing here raises on input: garbage, truncated lines and bad checksums are counted in `counters` and dropped.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass, field

import pynmea2

from protocol.catalogue import Catalogue, SignalType, load_catalogue

MAX_LINE = 256  # NMEA says 82 bytes; real receivers exceed it, but nothing sane needs more than this
KMH_PER_KNOT = 1.852
SUPPORTED_TALKERS = frozenset({"GP", "GN", "GB", "BD", "GL", "GA"})
_BEIDOU_TALKERS = frozenset({"GB", "BD"})
_TALKER_SYSTEM = {"GP": 1, "GL": 2, "GA": 3, "GB": 4, "BD": 4}
_SYSTEM_BEIDOU = 4
_HANDLED = frozenset({"RMC", "GGA", "GNS", "GSA", "GSV", "ZDA"})
_EOL = re.compile(rb"[\r\n]")
_SENTENCE_SHAPE = re.compile(r"\$([A-Z][A-Z0-9]{1,9}),[\x20-\x7e]*")
_COUNTER_KEYS = (
    "bytes",
    "sentences",
    "fixes",
    "bad_checksum",
    "missing_checksum",
    "garbage",
    "overlong",
    "unsupported",
    "malformed",
)


@dataclass(frozen=True, slots=True)
class GnssFix:
    """One navigation epoch as the receiver reported it. None means the receiver did not say."""

    time_ms: int | None  # UTC ms since the Unix epoch; None until a date is known (RMC/ZDA)
    mode: int  # gpsd TPV semantics: 0 unknown, 1 no fix, 2 2D, 3 3D
    lat: float | None
    lon: float | None
    altitude_m: float | None
    speed_kmh: float | None
    heading_deg: float | None
    hdop: float | None
    satellites_used: int | None
    beidou_in_use: bool | None  # None: no GSA seen yet and the talker does not imply BeiDou

    def signals(self, catalogue: Catalogue | None = None) -> dict[str, float | int | bool]:
        """This fix under catalogue names, at catalogue resolution; unknown values are left out."""
        cat = catalogue or load_catalogue()
        values: dict[str, float | int | bool | None] = {
            "CurrentLocation.Latitude": self.lat,
            "CurrentLocation.Longitude": self.lon,
            "CurrentLocation.Altitude": self.altitude_m,
            "CurrentLocation.Heading": self.heading_deg,
            "CurrentLocation.GNSSReceiver.GroundSpeed": self.speed_kmh,
            "CurrentLocation.GNSSReceiver.FixMode": self.mode,
            "CurrentLocation.GNSSReceiver.HDOP": self.hdop,
            "CurrentLocation.GNSSReceiver.SatellitesUsed": self.satellites_used,
            "CurrentLocation.GNSSReceiver.BeiDouInUse": self.beidou_in_use,
        }
        out: dict[str, float | int | bool] = {}
        for name, value in values.items():
            if value is None:
                continue
            sig = cat.by_name(name)
            if sig.type is SignalType.FLOAT and isinstance(value, float | int) and not isinstance(value, bool):
                value = round(float(value), sig.decimals) + 0.0
            if sig.in_range(value):
                out[name] = value
        return out


@dataclass(slots=True)
class _Gsa:
    fix_type: int | None = None
    hdop: float | None = None
    used: list[tuple[int, int]] = field(default_factory=list)  # (system, prn); system 0 = unknown

    @property
    def beidou_in_use(self) -> bool:
        return any(system == _SYSTEM_BEIDOU for system, _ in self.used)


@dataclass(slots=True)
class _Epoch:
    tod_ms: int
    kinds: set[str] = field(default_factory=set)
    talkers: set[str] = field(default_factory=set)
    emitted: bool = False
    date: tuple[int, int, int] | None = None
    rmc_valid: bool | None = None
    gga_quality: int | None = None
    gns_valid: bool | None = None
    lat: float | None = None
    lon: float | None = None
    rmc_lat: float | None = None
    rmc_lon: float | None = None
    altitude_m: float | None = None
    speed_kmh: float | None = None
    heading_deg: float | None = None
    hdop: float | None = None
    satellites: int | None = None


class NmeaDecoder:
    """Feed it bytes as they come off the wire; it returns the fixes they complete."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.counters: dict[str, int] = dict.fromkeys(_COUNTER_KEYS, 0)
        self._buf = bytearray()
        self._epoch: _Epoch | None = None
        self._date: tuple[int, int, int] | None = None  # last date seen, for GGA-only epochs
        self._gsa_cur = _Gsa()  # GSA group of the epoch in progress
        self._gsa_prev = _Gsa()  # GSA group of the previous epoch
        self._kinds_history: list[frozenset[str]] = []

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held back for the next feed (never more than `max_line`)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[GnssFix]:
        self.counters["bytes"] += len(data)
        *complete, tail = _EOL.split(data)
        fixes: list[GnssFix] = []
        if complete:
            complete[0] = bytes(self._buf) + complete[0]
            self._buf.clear()
            for line in complete:
                self._line(line, fixes)
        self._hold(tail)
        return fixes

    def discard_partial(self) -> None:
        """Forget a buffered half-line, e.g. after the port was lost and the rest of it with it."""
        self._buf.clear()

    def flush(self) -> list[GnssFix]:
        """End of stream: emit the epoch in progress if it has not been emitted yet."""
        fixes: list[GnssFix] = []
        if self._epoch is not None and not self._epoch.emitted:
            self._emit(self._epoch, fixes)
        return fixes

    # -- framing -------------------------------------------------------------------------------------------

    def _hold(self, tail: bytes) -> None:
        self._buf.extend(tail)
        if len(self._buf) > self.max_line:
            self.counters["overlong"] += 1
            # Resynchronise on the last '$': what follows may still be the start of a good sentence.
            start = self._buf.rfind(b"$")
            if start >= 0 and len(self._buf) - start <= self.max_line:
                del self._buf[:start]
            else:
                self._buf.clear()

    def _line(self, line: bytes, fixes: list[GnssFix]) -> None:
        if not line:
            return
        # A sentence starts at its last '$': earlier bytes are line noise, a "$$" prefix or a sentence cut short
        # by a packet collision.
        start = line.rfind(b"$")
        if start < 0:
            self.counters["garbage"] += 1
            return
        if line[:start].strip(b"$ \t"):
            self.counters["garbage"] += 1
        raw = line[start:]
        if len(raw) > self.max_line:
            self.counters["overlong"] += 1
            return
        try:
            text = raw.decode("ascii").rstrip()
        except UnicodeDecodeError:
            self.counters["garbage"] += 1
            return
        shape = _SENTENCE_SHAPE.fullmatch(text)
        if shape is None:
            self.counters["garbage"] += 1
            return
        address = shape.group(1)
        if len(address) != 5 or address[:2] not in SUPPORTED_TALKERS or address[2:] not in _HANDLED:
            # Proprietary ($P...), other talkers and sentence kinds we do not use: not worth a parse.
            self.counters["unsupported"] += 1
            return
        if text[-3:-2] != "*":
            self.counters["missing_checksum"] += 1  # NMEA makes it optional; over a noisy UART we do not
            return
        try:
            msg = pynmea2.parse(text, check=True)
        except pynmea2.ChecksumError:
            self.counters["bad_checksum"] += 1
            return
        except Exception:
            # pynmea2 raises assorted ValueError/AttributeError subclasses on odd content; none may escape.
            self.counters["malformed"] += 1
            return
        self.counters["sentences"] += 1
        try:
            self._sentence(address[:2], address[2:], list(msg.data), fixes)
        except (ValueError, IndexError):
            self.counters["malformed"] += 1

    # -- sentences -----------------------------------------------------------------------------------------

    def _sentence(self, talker: str, kind: str, d: list[str], fixes: list[GnssFix]) -> None:
        if kind == "GSA":
            self._on_gsa(talker, d)
            return
        if kind == "GSV":
            return  # sky view: nothing in the catalogue needs it yet; accepted so it is not "unsupported"
        if kind == "ZDA":
            if len(d) >= 4 and d[1] and d[2] and d[3]:
                self._date = _valid_date(int(d[3]), int(d[2]), int(d[1]))
            return
        tod = _tod_ms(d[0])
        if tod is None:
            self.counters["malformed"] += 1
            return
        ep = self._epoch_for(tod, fixes)
        ep.kinds.add(kind)
        ep.talkers.add(talker)
        if kind == "RMC":
            ep.rmc_valid = _field(d, 1) == "A"
            ep.rmc_lat = _angle(_field(d, 2), _field(d, 3), "S")
            ep.rmc_lon = _angle(_field(d, 4), _field(d, 5), "W")
            knots = _float(_field(d, 6))
            ep.speed_kmh = None if knots is None else knots * KMH_PER_KNOT
            course = _float(_field(d, 7))
            ep.heading_deg = None if course is None else course % 360.0
            date = _field(d, 8)
            if len(date) == 6 and date.isdigit():
                yy = int(date[4:6])
                ep.date = _valid_date(2000 + yy if yy < 80 else 1900 + yy, int(date[2:4]), int(date[0:2]))
                if ep.date is not None:
                    self._date = ep.date
        else:  # GGA and GNS share the position/sats/hdop/altitude layout up to field 8
            ep.lat = _angle(_field(d, 1), _field(d, 2), "S")
            ep.lon = _angle(_field(d, 3), _field(d, 4), "W")
            if kind == "GGA":
                q = _field(d, 5)
                ep.gga_quality = int(q) if q.isdigit() else None
            else:
                modes = _field(d, 5)
                ep.gns_valid = bool(modes) and any(c not in "N" for c in modes)
            sats = _field(d, 6)
            if sats.isdigit():
                ep.satellites = max(ep.satellites or 0, int(sats))
            ep.hdop = _float(_field(d, 7)) if ep.hdop is None else ep.hdop
            alt = _float(_field(d, 8))
            if alt is not None:
                ep.altitude_m = alt
        if not ep.emitted and self._complete(ep):
            self._emit(ep, fixes)

    def _on_gsa(self, talker: str, d: list[str]) -> None:
        gsa = self._gsa_cur
        fix_type = _field(d, 1)
        if fix_type in ("1", "2", "3"):
            gsa.fix_type = int(fix_type)
        hdop = _float(_field(d, 15))
        if hdop is not None:
            gsa.hdop = hdop
        # A single-system talker says it all; for GN the NMEA 4.10 system id (field 18) does, when it is one of
        # the defined ids — SiRF writes a float there (e.g. "1.2") that is no system id; else the PRN ranges.
        system = _TALKER_SYSTEM.get(talker, 0)
        system_id = _field(d, 17)
        if not system and system_id in ("1", "2", "3", "4", "5", "6"):
            system = int(system_id)
        for prn_text in d[2:14]:
            if prn_text.isdigit():
                prn = int(prn_text)
                gsa.used.append((system or _system_from_prn(prn), prn))

    # -- epochs --------------------------------------------------------------------------------------------

    def _epoch_for(self, tod: int, fixes: list[GnssFix]) -> _Epoch:
        ep = self._epoch
        if ep is not None and ep.tod_ms == tod:
            return ep
        if ep is not None:
            if not ep.emitted:
                self._emit(ep, fixes)
            self._kinds_history = [*self._kinds_history[-1:], frozenset(ep.kinds)]
        if self._gsa_cur.used or self._gsa_cur.fix_type is not None:
            self._gsa_prev, self._gsa_cur = self._gsa_cur, _Gsa()
        self._epoch = _Epoch(tod_ms=tod)
        return self._epoch

    def _complete(self, ep: _Epoch) -> bool:
        if "RMC" in ep.kinds and ("GGA" in ep.kinds or "GNS" in ep.kinds):
            return True
        h = self._kinds_history
        return len(h) == 2 and h[0] == h[1] and bool(h[1]) and h[1] <= ep.kinds

    def _emit(self, ep: _Epoch, fixes: list[GnssFix]) -> None:
        ep.emitted = True
        gsa = self._gsa_cur if (self._gsa_cur.used or self._gsa_cur.fix_type) else self._gsa_prev
        have_gsa = bool(gsa.used) or gsa.fix_type is not None

        verdicts = [
            ep.rmc_valid,
            None if ep.gga_quality is None else ep.gga_quality > 0,
            ep.gns_valid,
        ]
        known = [v for v in verdicts if v is not None]
        if not known:
            mode = 0
        elif not all(known):
            mode = 1
        elif ep.altitude_m is not None:
            mode = 3
        elif have_gsa and gsa.fix_type in (2, 3):
            mode = gsa.fix_type
        else:
            mode = 2

        lat = ep.lat if ep.lat is not None else ep.rmc_lat
        lon = ep.lon if ep.lon is not None else ep.rmc_lon
        # An epoch without RMC borrows the last RMC/ZDA date; a GGA-only receiver is a day behind across
        # midnight until its next ZDA — such receivers send ZDA every epoch in practice.
        date = ep.date or self._date
        time_ms = None
        if date is not None:
            time_ms = calendar.timegm((*date, 0, 0, 0)) * 1000 + ep.tod_ms

        satellites = ep.satellites
        if have_gsa and len(gsa.used) > (satellites or 0) and satellites in (None, 12):
            # GGA's count stops at 12 on NMEA < 4.10 receivers; the per-system GSAs list them all. Below 12 the
            # GGA count is of this very epoch, which a lagging GSA group may not be.
            satellites = len(gsa.used)
        if have_gsa:
            beidou: bool | None = gsa.beidou_in_use
        elif ep.talkers & _BEIDOU_TALKERS:
            beidou = mode >= 2
        else:
            beidou = None

        fix_ok = mode >= 2
        fixes.append(
            GnssFix(
                time_ms=time_ms,
                mode=mode,
                lat=lat if fix_ok else None,
                lon=lon if fix_ok else None,
                altitude_m=ep.altitude_m if mode == 3 else None,
                speed_kmh=ep.speed_kmh if fix_ok else None,
                heading_deg=ep.heading_deg if fix_ok else None,
                hdop=ep.hdop if ep.hdop is not None else (gsa.hdop if have_gsa else None),
                satellites_used=satellites,
                beidou_in_use=beidou if fix_ok or beidou is None else False,
            )
        )
        self.counters["fixes"] += 1


def _field(d: list[str], i: int) -> str:
    return d[i].strip() if i < len(d) else ""


def _float(text: str) -> float | None:
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if v == v and abs(v) != float("inf") else None


def _angle(text: str, hemi: str, negative: str) -> float | None:
    """ddmm.mmmm / dddmm.mmmm to signed decimal degrees; None if empty or out of range."""
    v = _float(text)
    if v is None or v < 0 or hemi not in ("N", "S", "E", "W"):
        return None
    degrees = int(v // 100)
    minutes = v - degrees * 100
    if minutes >= 60.0:
        return None
    value = degrees + minutes / 60.0
    limit = 90.0 if hemi in ("N", "S") else 180.0
    if value > limit:
        return None
    return -value if hemi == negative else value


def _tod_ms(text: str) -> int | None:
    """hhmmss[.sss] to milliseconds since midnight."""
    if len(text) < 6 or not text[:6].isdigit():
        return None
    hh, mm = int(text[0:2]), int(text[2:4])
    ss = _float(text[4:])
    if ss is None or hh > 23 or mm > 59 or not 0 <= ss < 61:
        return None
    return (hh * 3600 + mm * 60) * 1000 + round(ss * 1000)


def _valid_date(year: int, month: int, day: int) -> tuple[int, int, int] | None:
    if not (1980 <= year <= 2200 and 1 <= month <= 12) or not 1 <= day <= calendar.monthrange(year, month)[1]:
        return None
    return (year, month, day)


def _system_from_prn(prn: int) -> int:
    """GNSS system from a GN-talker GSA PRN when no system id is given (NMEA 4.0 and vendor ranges)."""
    if 1 <= prn <= 32:
        return 1
    if 65 <= prn <= 96:
        return 2
    if 201 <= prn <= 263 or 401 <= prn <= 463:  # SiRF/MTK (201+) and gpsd-style (401+) BeiDou numbering
        return _SYSTEM_BEIDOU
    if 301 <= prn <= 336:
        return 3
    return 0
