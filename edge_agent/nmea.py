"""Sans-I/O NMEA 0183 decoder: bytes from a GNSS receiver in, one `GnssFix` per navigation epoch out.

The accepted profile — talkers, sentences, fields, epoch and precedence rules — is written down in
firmware_specs/NMEA_PROFILE.md; this module implements it. Checksum verification and field splitting are
pynmea2's; this module decides which sentences make up an epoch and what the epoch means (gpsd's conventions:
fix mode 1/2/3, knots converted to km/h once, here).

Epoch rule. Receivers send a burst of sentences per epoch, several of them stamped with the epoch's UTC time
(RMC, GGA, GNS). A fix is emitted
  * as soon as the epoch has RMC and GGA (or GNS) — no waiting for the next burst when the receiver sends both;
  * or as soon as it has every sentence kind that the two previous epochs had (timed kinds and VTG) — so an
    RMC-only (or GGA+VTG) receiver gets its fixes without delay once its habits are known;
  * otherwise when a sentence with a new time arrives (the previous epoch is then complete by definition),
    or on `flush()`.
Each epoch is emitted at most once. VTG carries no time and belongs to the epoch in progress. GSA and GSV carry
no time either; their satellites form one group per epoch, and a fix uses the current epoch's group if it already
came (SiRF order: GGA, GSA, GSV, RMC) and the previous epoch's otherwise (u-blox order: RMC, GGA, GSA, GSV) —
satellite sets change slowly, so a one-epoch lag in the per-constellation counts is the price of zero latency
for position.

Nothing here raises on input: garbage, truncated lines and bad checksums are counted in `counters` and dropped.
`parse_sentence` is the strict single-line form, which raises `NmeaError` naming the counter it would bump.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import pynmea2

from protocol.catalogue import Catalogue, SignalType, load_catalogue

log = logging.getLogger("zhilian.gnss.nmea")

MAX_LINE = 256  # NMEA says 82 bytes; real receivers exceed it, but nothing sane needs more than this
KMH_PER_KNOT = 1.852
_DAY_MS = 86_400_000

# NMEA 4.11 GNSS system ids (GSA field 18, Quectel's GSV trailer); SBAS has none and gets one of ours.
SYSTEM_UNKNOWN = 0
SYSTEM_GPS = 1
SYSTEM_GLONASS = 2
SYSTEM_GALILEO = 3
SYSTEM_BEIDOU = 4
SYSTEM_QZSS = 5
SYSTEM_NAVIC = 6
SYSTEM_SBAS = 100

# Talker -> system its GSA/GSV satellites belong to. GP and GN say nothing reliable (GP receivers list SBAS and
# QZSS under GP, GN ones everything): their PRN numbering decides. PQ is Quectel's BeiDou/QZSS talker, which names
# the system in a trailing field; without one it is QZSS. GQ (NMEA 4.11) and QZ (older) are QZSS too.
_TALKER_SYSTEM = {
    "GP": SYSTEM_UNKNOWN,
    "GN": SYSTEM_UNKNOWN,
    "GL": SYSTEM_GLONASS,
    "GA": SYSTEM_GALILEO,
    "GB": SYSTEM_BEIDOU,
    "BD": SYSTEM_BEIDOU,
    "GQ": SYSTEM_QZSS,
    "QZ": SYSTEM_QZSS,
    "PQ": SYSTEM_QZSS,
}
SUPPORTED_TALKERS = frozenset(_TALKER_SYSTEM)
_BEIDOU_TALKERS = frozenset({"GB", "BD"})
SUPPORTED_SENTENCES = frozenset({"RMC", "GGA", "GNS", "GSA", "GSV", "VTG", "ZDA"})
_EOL = re.compile(rb"[\r\n]")
_SENTENCE_SHAPE = re.compile(r"\$([A-Z][A-Z0-9]{1,9}),[\x20-\x7e]*")
# Mode indicator letters of RMC (field 12), GNS (per system) and VTG, as GGA fix-quality codes.
_MODE_QUALITY = {"N": 0, "A": 1, "D": 2, "P": 3, "R": 4, "F": 5, "E": 6, "M": 7, "S": 8}

COUNTER_KEYS = (
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
_ERROR_REASONS = frozenset(COUNTER_KEYS[3:])

# Catalogue names of the per-constellation counts, in `ConstellationCounts` field order.
CONSTELLATIONS = (
    ("gps", "GPS", SYSTEM_GPS),
    ("beidou", "BeiDou", SYSTEM_BEIDOU),
    ("glonass", "GLONASS", SYSTEM_GLONASS),
    ("galileo", "Galileo", SYSTEM_GALILEO),
    ("qzss", "QZSS", SYSTEM_QZSS),
)
_RX = "CurrentLocation.GNSSReceiver."


class NmeaError(ValueError):
    """A line that is not an accepted sentence; `reason` is the decoder counter it counts under."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in _ERROR_REASONS:
            raise ValueError(f"unknown NMEA error reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Sentence(NamedTuple):
    """One checksum-verified sentence of the profile: talker ("GN"), kind ("RMC") and its fields as text."""

    talker: str
    kind: str
    fields: list[str]


@dataclass(frozen=True, slots=True)
class ConstellationCounts:
    """Satellites per constellation (SBAS, NavIC and unidentifiable PRNs are in none of them)."""

    gps: int = 0
    beidou: int = 0
    glonass: int = 0
    galileo: int = 0
    qzss: int = 0

    @classmethod
    def of(cls, satellites: set[tuple[int, int]]) -> ConstellationCounts:
        n = [0] * 8  # by NMEA system id; SBAS (100) and NavIC (6) land in no field
        for system, _ in satellites:
            n[system if system < 7 else 7] += 1
        return cls(n[SYSTEM_GPS], n[SYSTEM_BEIDOU], n[SYSTEM_GLONASS], n[SYSTEM_GALILEO], n[SYSTEM_QZSS])


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
    quality: int | None = None  # GGA fix quality 0-8 (GNS/RMC mode letters mapped onto it without GGA)
    pdop: float | None = None
    vdop: float | None = None
    used: ConstellationCounts | None = None  # from GSA; None before the first GSA
    in_view: ConstellationCounts | None = None  # from GSV; None before the first GSV

    def signals(self, catalogue: Catalogue | None = None) -> dict[str, float | int | bool]:
        """This fix under catalogue names, at catalogue resolution; unknown values are left out."""
        cat = catalogue or load_catalogue()
        values: dict[str, float | int | bool | None] = {
            "CurrentLocation.Latitude": self.lat,
            "CurrentLocation.Longitude": self.lon,
            "CurrentLocation.Altitude": self.altitude_m,
            "CurrentLocation.Heading": self.heading_deg,
            _RX + "GroundSpeed": self.speed_kmh,
            _RX + "FixMode": self.mode,
            _RX + "FixQuality": self.quality,
            _RX + "HDOP": self.hdop,
            _RX + "PDOP": self.pdop,
            _RX + "VDOP": self.vdop,
            _RX + "SatellitesUsed": self.satellites_used,
            _RX + "BeiDouInUse": self.beidou_in_use,
        }
        for attr, segment, _ in CONSTELLATIONS:
            if self.used is not None:
                values[f"{_RX}{segment}.SatellitesUsed"] = getattr(self.used, attr)
            if self.in_view is not None:
                values[f"{_RX}{segment}.SatellitesInView"] = getattr(self.in_view, attr)
        out: dict[str, float | int | bool] = {}
        for name, value in values.items():
            # A board may run with an older catalogue: what it does not name cannot go on the wire.
            if value is None or name not in cat:
                continue
            sig = cat.by_name(name)
            if sig.type is SignalType.FLOAT and isinstance(value, float | int) and not isinstance(value, bool):
                value = round(float(value), sig.decimals) + 0.0
            if sig.in_range(value):
                out[name] = value
        return out


def parse_sentence(raw: bytes) -> Sentence:
    """One line starting at its '$' (line end optional) to a `Sentence` of the profile, or `NmeaError`."""
    if len(raw) > MAX_LINE:
        raise NmeaError("overlong", f"{len(raw)} bytes")
    try:
        text = raw.decode("ascii").rstrip()
    except UnicodeDecodeError:
        raise NmeaError("garbage", "not ASCII") from None
    shape = _SENTENCE_SHAPE.fullmatch(text)
    if shape is None:
        raise NmeaError("garbage", "not a sentence")
    address = shape.group(1)
    talker, kind = address[:2], address[2:]
    if len(address) != 5 or talker not in SUPPORTED_TALKERS or kind not in SUPPORTED_SENTENCES:
        # Other proprietary ($P...) sentences, other talkers and kinds we do not use: not worth a parse.
        raise NmeaError("unsupported", address)
    if text[-3:-2] != "*":
        raise NmeaError("missing_checksum", address)  # NMEA makes it optional; over a noisy UART we do not
    try:
        msg = pynmea2.parse(text, check=True)
    except pynmea2.ChecksumError:
        raise NmeaError("bad_checksum", address) from None
    except Exception:
        # pynmea2 raises assorted ValueError/AttributeError subclasses on odd content; none may escape.
        raise NmeaError("malformed", address) from None
    fields = list(msg.data)
    if talker == "PQ":
        # pynmea2 reads "$PQGSV" as a proprietary sentence of maker "QGS" whose first field is the "V".
        if not fields or fields[0] != kind[-1]:
            raise NmeaError("malformed", address)
        del fields[0]
    return Sentence(talker, kind, fields)


@dataclass(slots=True)
class _Gsa:
    """The GSA sentences of one epoch."""

    received: bool = False
    fix_type: int | None = None
    pdop: float | None = None
    hdop: float | None = None
    vdop: float | None = None
    used: set[tuple[int, int]] = field(default_factory=set)  # (system, svid)

    @property
    def beidou_in_use(self) -> bool:
        return any(system == SYSTEM_BEIDOU for system, _ in self.used)


@dataclass(slots=True)
class _Gsv:
    """The GSV sentences of one epoch: every satellite any of them listed, once (signals repeat satellites)."""

    received: bool = False
    in_view: set[tuple[int, int]] = field(default_factory=set)


@dataclass(slots=True)
class _Epoch:
    tod_ms: int
    kinds: set[str] = field(default_factory=set)
    talkers: set[str] = field(default_factory=set)
    emitted: bool = False
    date: tuple[int, int, int] | None = None
    rmc_valid: bool | None = None
    rmc_quality: int | None = None
    gga_quality: int | None = None
    gns_valid: bool | None = None
    gns_quality: int | None = None
    lat: float | None = None
    lon: float | None = None
    rmc_lat: float | None = None
    rmc_lon: float | None = None
    altitude_m: float | None = None
    speed_kmh: float | None = None
    heading_deg: float | None = None
    vtg_speed_kmh: float | None = None
    vtg_heading_deg: float | None = None
    hdop: float | None = None
    satellites: int | None = None


class NmeaDecoder:
    """Feed it bytes as they come off the wire; it returns the fixes they complete."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_KEYS, 0)
        self._buf = bytearray()
        self._epoch: _Epoch | None = None
        # Last date seen (RMC/ZDA) and the time of day it was stamped with, for epochs without their own date.
        self._date: tuple[tuple[int, int, int], int] | None = None
        self._gsa_cur = _Gsa()  # GSA group of the epoch in progress
        self._gsa_prev = _Gsa()  # last complete GSA group before it
        self._gsv_cur = _Gsv()
        self._gsv_prev = _Gsv()
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
            self._reject(NmeaError("garbage", "no '$'"))
            return
        if line[:start].strip(b"$ \t"):
            self.counters["garbage"] += 1
        raw = line[start:]
        if len(raw) > self.max_line:
            self._reject(NmeaError("overlong", f"{len(raw)} bytes"))
            return
        try:
            s = parse_sentence(raw)
        except NmeaError as exc:
            self._reject(exc)
            return
        self.counters["sentences"] += 1
        try:
            self._sentence(s.talker, s.kind, s.fields, fixes)
        except (ValueError, IndexError) as exc:
            self._reject(NmeaError("malformed", f"{s.talker}{s.kind}: {exc}"))

    def _reject(self, exc: NmeaError) -> None:
        self.counters[exc.reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("nmea line dropped", extra={"reason": exc.reason, "detail": str(exc)})

    # -- sentences -----------------------------------------------------------------------------------------

    def _sentence(self, talker: str, kind: str, d: list[str], fixes: list[GnssFix]) -> None:
        if kind == "GSA":
            self._on_gsa(talker, d)
            return
        if kind == "GSV":
            self._on_gsv(talker, d)
            return
        if kind == "ZDA":
            self._on_zda(d)
            return
        if kind == "VTG":
            self._on_vtg(d, fixes)
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
                    self._date = (ep.date, tod)
            ep.rmc_quality = _MODE_QUALITY.get(_field(d, 11)[:1])
        else:  # GGA and GNS share the position/sats/hdop/altitude layout up to field 8
            ep.lat = _angle(_field(d, 1), _field(d, 2), "S")
            ep.lon = _angle(_field(d, 3), _field(d, 4), "W")
            if kind == "GGA":
                q = _field(d, 5)
                ep.gga_quality = int(q) if q.isdigit() else None
            else:
                modes = _field(d, 5)
                ep.gns_valid = bool(modes) and any(c not in "N" for c in modes)
                ep.gns_quality = _gns_quality(modes)
            sats = _field(d, 6)
            if sats.isdigit():
                ep.satellites = max(ep.satellites or 0, int(sats))
            ep.hdop = _dop(_field(d, 7)) if ep.hdop is None else ep.hdop
            alt = _float(_field(d, 8))
            if alt is not None:
                ep.altitude_m = alt
        if not ep.emitted and self._complete(ep):
            self._emit(ep, fixes)

    def _on_vtg(self, d: list[str], fixes: list[GnssFix]) -> None:
        ep = self._epoch
        if ep is None:
            return  # before the first timed sentence there is no epoch it could belong to
        # NMEA 2.3+: course,T,course,M,knots,N,km/h,K[,mode]; NMEA 2.0 has the four numbers without unit letters.
        if _field(d, 1) == "T":
            course, knots, kmh = _float(_field(d, 0)), _float(_field(d, 4)), _float(_field(d, 6))
        else:
            course, knots, kmh = _float(_field(d, 0)), _float(_field(d, 2)), _float(_field(d, 3))
        ep.kinds.add("VTG")
        ep.vtg_heading_deg = None if course is None else course % 360.0
        ep.vtg_speed_kmh = knots * KMH_PER_KNOT if knots is not None else kmh
        if not ep.emitted and self._complete(ep):
            self._emit(ep, fixes)

    def _on_zda(self, d: list[str]) -> None:
        tod = _tod_ms(_field(d, 0))
        day, month, year = _field(d, 1), _field(d, 2), _field(d, 3)
        if tod is None or not (day.isdigit() and month.isdigit() and year.isdigit()):
            return  # a receiver without time yet sends an empty ZDA
        date = _valid_date(int(year), int(month), int(day))
        if date is not None:
            self._date = (date, tod)

    def _on_gsa(self, talker: str, d: list[str]) -> None:
        gsa = self._gsa_cur
        gsa.received = True
        fix_type = _field(d, 1)
        if fix_type in ("1", "2", "3"):
            gsa.fix_type = int(fix_type)
        pdop, hdop, vdop = _dop(_field(d, 14)), _dop(_field(d, 15)), _dop(_field(d, 16))
        if pdop is not None:
            gsa.pdop = pdop
        if hdop is not None:
            gsa.hdop = hdop
        if vdop is not None:
            gsa.vdop = vdop
        # A single-system talker says it all; for GN/GP the NMEA 4.10 system id (field 18) does, when it is one of
        # the defined ids — SiRF writes a float there (e.g. "1.2") that is no system id; else the PRN ranges.
        system = _TALKER_SYSTEM[talker]
        system_id = _field(d, 17)
        if (system == SYSTEM_UNKNOWN or talker == "PQ") and system_id in ("1", "2", "3", "4", "5", "6"):
            system = int(system_id)
        used = gsa.used
        for prn_text in d[2:14]:
            if prn_text and (prn_text.isdigit() or prn_text.strip().isdigit()):  # most slots are empty
                sat = _satellite(system, int(prn_text))
                if sat is not None:
                    used.add(sat)

    def _on_gsv(self, talker: str, d: list[str]) -> None:
        # count,index,in-view, then 4 fields per satellite; NMEA 4.10 appends a signal id, Quectel's PQ talker
        # a signal id and a system id. Those trailers are told apart from satellites by the field count.
        trailer = (len(d) - 3) % 4
        if len(d) < 3 or trailer == 3:
            self.counters["malformed"] += 1
            return
        system = _TALKER_SYSTEM[talker]
        if trailer == 2 and talker == "PQ" and _field(d, len(d) - 1) in ("1", "2", "3", "4", "5", "6"):
            system = int(_field(d, len(d) - 1))
        gsv = self._gsv_cur
        gsv.received = True
        in_view = gsv.in_view
        for prn_text in d[3 : len(d) - trailer : 4]:
            if prn_text and (prn_text.isdigit() or prn_text.strip().isdigit()):
                sat = _satellite(system, int(prn_text))
                if sat is not None:
                    in_view.add(sat)

    # -- epochs --------------------------------------------------------------------------------------------

    def _epoch_for(self, tod: int, fixes: list[GnssFix]) -> _Epoch:
        ep = self._epoch
        if ep is not None and ep.tod_ms == tod:
            return ep
        if ep is not None:
            if not ep.emitted:
                self._emit(ep, fixes)
            self._kinds_history = [*self._kinds_history[-1:], frozenset(ep.kinds)]
        if self._gsa_cur.received:
            self._gsa_prev, self._gsa_cur = self._gsa_cur, _Gsa()
        if self._gsv_cur.received:
            self._gsv_prev, self._gsv_cur = self._gsv_cur, _Gsv()
        self._epoch = _Epoch(tod_ms=tod)
        return self._epoch

    def _complete(self, ep: _Epoch) -> bool:
        if "RMC" in ep.kinds and ("GGA" in ep.kinds or "GNS" in ep.kinds):
            return True
        h = self._kinds_history
        return len(h) == 2 and h[0] == h[1] and bool(h[1]) and h[1] <= ep.kinds

    def _emit(self, ep: _Epoch, fixes: list[GnssFix]) -> None:
        ep.emitted = True
        gsa = self._gsa_cur if self._gsa_cur.received else self._gsa_prev
        have_gsa = gsa.received
        gsv = self._gsv_cur if self._gsv_cur.received else self._gsv_prev

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
        time_ms = None
        date = ep.date or self._date_for(ep.tod_ms)
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
        quality = ep.gga_quality
        if quality is None:
            quality = ep.gns_quality if ep.gns_quality is not None else ep.rmc_quality

        # RMC wins speed and course; VTG stands in for receivers that send no RMC.
        speed = ep.speed_kmh if "RMC" in ep.kinds else ep.vtg_speed_kmh
        heading = ep.heading_deg if "RMC" in ep.kinds else ep.vtg_heading_deg
        fix_ok = mode >= 2
        fixes.append(
            GnssFix(
                time_ms=time_ms,
                mode=mode,
                lat=lat if fix_ok else None,
                lon=lon if fix_ok else None,
                altitude_m=ep.altitude_m if mode == 3 else None,
                speed_kmh=speed if fix_ok else None,
                heading_deg=heading if fix_ok else None,
                hdop=ep.hdop if ep.hdop is not None else (gsa.hdop if have_gsa else None),
                satellites_used=satellites,
                beidou_in_use=beidou if fix_ok or beidou is None else False,
                quality=quality,
                pdop=gsa.pdop if have_gsa else None,
                vdop=gsa.vdop if have_gsa else None,
                used=ConstellationCounts.of(gsa.used) if have_gsa else None,
                in_view=ConstellationCounts.of(gsv.in_view) if gsv.received else None,
            )
        )
        self.counters["fixes"] += 1

    def _date_for(self, tod: int) -> tuple[int, int, int] | None:
        """The date of an epoch without its own (no RMC): the last date seen, moved across midnight if the
        epoch's time of day is more than half a day from the time that date was stamped with."""
        if self._date is None:
            return None
        date, ref_tod = self._date
        delta = tod - ref_tod
        if -_DAY_MS // 2 <= delta <= _DAY_MS // 2:
            return date
        moved = datetime.date(*date) + datetime.timedelta(days=1 if delta < 0 else -1)
        return _valid_date(moved.year, moved.month, moved.day)


def _field(d: list[str], i: int) -> str:
    return d[i].strip() if i < len(d) else ""


def _float(text: str) -> float | None:
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _dop(text: str) -> float | None:
    """A dilution of precision; receivers without a solution write 0.0 (never a real DOP) or nothing."""
    v = _float(text)
    return v if v is not None and v > 0.0 else None


def _gns_quality(modes: str) -> int | None:
    """GNS mode letters (one per system) as a GGA quality: the first system that has a fix says it."""
    if not modes:
        return None
    for c in modes:
        if c != "N" and c in _MODE_QUALITY:
            return _MODE_QUALITY[c]
    return 0 if all(c == "N" for c in modes) else None


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


def _satellite(system: int, prn: int) -> tuple[int, int] | None:
    """(system, number within the system) of a GSA/GSV satellite, or None for a PRN no numbering knows.

    `system` is what the talker or system-id field said; SYSTEM_UNKNOWN (GP/GN talkers) and GPS fall back to the
    PRN ranges receivers use when one talker carries several systems: NMEA 4.0 (GPS 1-32, SBAS 33-64 and
    120-158, GLONASS 65-96, QZSS 193-200), SiRF/MTK BeiDou 201-263, u-blox/gpsd Galileo 301-336 and
    BeiDou 401-463. QZSS 201/202 would read as BeiDou; no such QZSS satellite is in orbit.
    """
    if prn <= 0:
        return None
    if system in (SYSTEM_UNKNOWN, SYSTEM_GPS):
        if prn <= 32:
            return SYSTEM_GPS, prn
        if prn <= 64:
            return SYSTEM_SBAS, prn + 87
        if prn <= 96:
            return SYSTEM_GLONASS, prn - 64
        if 120 <= prn <= 158:
            return SYSTEM_SBAS, prn
        if 193 <= prn <= 200:
            return SYSTEM_QZSS, prn - 192
        if 201 <= prn <= 263:
            return SYSTEM_BEIDOU, prn - 200
        if 301 <= prn <= 336:
            return SYSTEM_GALILEO, prn - 300
        if 401 <= prn <= 463:
            return SYSTEM_BEIDOU, prn - 400
        return None
    # A single-system talker or system id: the system's own numbers, or the extended ones of the same system.
    # Anything else is no satellite of it — which also bounds how many satellites an epoch can collect.
    if system == SYSTEM_GLONASS:
        if 65 <= prn <= 96:
            return SYSTEM_GLONASS, prn - 64
        return (SYSTEM_GLONASS, prn) if prn <= 32 else None
    if system == SYSTEM_GALILEO:
        if 301 <= prn <= 336:
            return SYSTEM_GALILEO, prn - 300
        return (SYSTEM_GALILEO, prn) if prn <= 36 else None
    if system == SYSTEM_BEIDOU:
        if 201 <= prn <= 263 or 401 <= prn <= 463:
            return SYSTEM_BEIDOU, prn % 100
        return (SYSTEM_BEIDOU, prn) if prn <= 63 else None
    if system == SYSTEM_QZSS:
        if 193 <= prn <= 202:
            return SYSTEM_QZSS, prn - 192
        return (SYSTEM_QZSS, prn) if prn <= 10 else None
    # NavIC: counted in the total, in no constellation of the catalogue.
    return (SYSTEM_NAVIC, prn) if system == SYSTEM_NAVIC and prn <= 14 else None
