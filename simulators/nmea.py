"""NMEA 0183 sentence generation for the GNSS emulator: pure functions from a vehicle state to bytes.

The output imitates a modern multi-GNSS receiver (u-blox M9 / Quectel L76K class) in NMEA 4.10 mode: RMC, GGA,
one GSA per constellation carrying the system-id field, and GSV per constellation. Positions carry five decimals of
minutes (≈ 2 cm), so the catalogue's 1e-7 degree resolution is not limited by the sentence format.

`encode_epoch` also returns a `TruthFix` holding the values exactly as written (after formatting), which is what
a decoder can at best recover; tests compare against that rather than against the unrounded model.
"""

from __future__ import annotations

import calendar
import math
import random
from dataclasses import dataclass
from datetime import datetime

from simulators.vehicle import VehicleState

KNOTS_PER_KMH = 1 / 1.852
GEOID_SEPARATION_M = -28.0  # roughly EGM96 under Chongqing; only echoed in GGA
COURSE_MIN_SPEED_KMH = 1.0  # below this, receivers leave the RMC course field empty (as u-blox does)
MINUTE_UNITS = 100_000  # five decimals of minutes

# NMEA 4.10 GNSS system ids used in GSA field 18.
SYSTEM_GPS = 1
SYSTEM_BEIDOU = 4

_BEIDOU_TALKERS = frozenset({"GB", "BD"})


@dataclass(frozen=True, slots=True)
class SatelliteView:
    system: int  # SYSTEM_GPS or SYSTEM_BEIDOU
    prn: int  # per-system number as NMEA 4.10 writes it (BeiDou 1..63, GPS 1..32)
    elevation_deg: int
    azimuth_deg: int
    snr_dbhz: int | None
    used: bool


@dataclass(frozen=True, slots=True)
class Sky:
    """The satellites in view at one instant."""

    satellites: tuple[SatelliteView, ...]

    def used(self, system: int | None = None) -> list[SatelliteView]:
        return [s for s in self.satellites if s.used and (system is None or s.system == system)]

    def in_view(self, system: int) -> list[SatelliteView]:
        return [s for s in self.satellites if s.system == system]


@dataclass(frozen=True, slots=True)
class _Orbit:
    system: int
    prn: int
    el_mid: float
    el_amp: float
    phase: float
    el_rate: float  # rad/s of the elevation sinusoid
    az0: float
    az_rate: float  # deg/s


_SIDEREAL_HALF_DAY_S = 43_082.0  # GPS orbit; the sky repeats roughly twice a day
# BeiDou GEOs as seen from Chongqing (106.5 E, 29.6 N): C01 140 E, C02 80 E, C03 110.5 E, C04 160 E, C05 58.75 E.
_BEIDOU_GEO: tuple[tuple[int, float, float], ...] = (
    (1, 44.0, 128.0),
    (2, 47.0, 226.0),
    (3, 55.0, 172.0),
    (4, 27.0, 112.0),
    (5, 30.0, 245.0),
)


class SkyModel:
    """A deterministic sky for one seed: which GPS and BeiDou satellites are up, where, and how loud.

    Orbits are cartoons (sinusoidal elevation, drifting azimuth) — what matters to the decoder is a plausible,
    slowly changing set of PRNs, elevations, azimuths and SNRs.
    """

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"sky-{seed}")
        w = 2 * math.pi / _SIDEREAL_HALF_DAY_S
        orbits: list[_Orbit] = []
        for prn in sorted(rng.sample(range(1, 33), rng.randint(9, 12))):
            orbits.append(_orbit(rng, SYSTEM_GPS, prn, w))
        for prn, el, az in _BEIDOU_GEO:
            orbits.append(_Orbit(SYSTEM_BEIDOU, prn, el, 0.0, 0.0, 0.0, az, 0.0))
        meo_igso = rng.sample(range(6, 11), 3) + rng.sample(range(19, 47), rng.randint(7, 10))
        for prn in sorted(meo_igso):
            orbits.append(_orbit(rng, SYSTEM_BEIDOU, prn, w * 1.11))  # BeiDou MEOs orbit a little faster
        self._orbits = tuple(orbits)

    def at(self, t: float) -> Sky:
        sats: list[SatelliteView] = []
        tick = int(t)
        for o in self._orbits:
            el = o.el_mid + o.el_amp * math.sin(o.phase + o.el_rate * t)
            if el < 5.0:
                continue
            az = (o.az0 + o.az_rate * t) % 360.0
            # A little per-second scintillation, deterministic in (prn, second) so reruns are identical.
            jitter = ((o.prn * 7919 + o.system * 31 + tick * 104_729) % 97) / 97.0 * 4.0 - 2.0
            snr = round(min(50.0, 22.0 + 0.38 * el + jitter))
            # Used-or-not follows elevation alone: a receiver's solution set does not flicker with scintillation.
            used = el >= 20.0
            sats.append(SatelliteView(o.system, o.prn, round(el), round(az) % 360, snr, used))
        # GSA has twelve slots per constellation; a receiver reports its best twelve.
        for system in (SYSTEM_GPS, SYSTEM_BEIDOU):
            best = sorted((s for s in sats if s.system == system and s.used), key=lambda s: -s.elevation_deg)
            for extra in best[12:]:
                sats[sats.index(extra)] = SatelliteView(
                    extra.system, extra.prn, extra.elevation_deg, extra.azimuth_deg, extra.snr_dbhz, False
                )
        return Sky(tuple(sats))


def _orbit(rng: random.Random, system: int, prn: int, w: float) -> _Orbit:
    return _Orbit(
        system=system,
        prn=prn,
        el_mid=rng.uniform(20.0, 55.0),
        el_amp=rng.uniform(8.0, 30.0),
        phase=rng.uniform(0.0, 2 * math.pi),
        el_rate=w,
        az0=rng.uniform(0.0, 360.0),
        az_rate=math.degrees(w) / 4.0 * rng.choice((-1.0, 1.0)),
    )


@dataclass(frozen=True, slots=True)
class TruthFix:
    """What one epoch's sentences say, decoded exactly: the best any decoder can recover."""

    time_ms: int
    lat: float
    lon: float
    altitude_m: float
    speed_kmh: float
    heading_deg: float | None
    hdop: float
    satellites_used: int
    beidou_in_use: bool


@dataclass(frozen=True, slots=True)
class EncodedEpoch:
    sentences: list[bytes]
    truth: TruthFix


def checksum(body: str) -> str:
    """The NMEA checksum of the text between '$' and '*': XOR of its bytes, two upper-case hex digits."""
    c = 0
    for b in body.encode("ascii"):
        c ^= b
    return f"{c:02X}"


def sentence(body: str) -> bytes:
    return f"${body}*{checksum(body)}\r\n".encode("ascii")


def format_angle(value: float, degree_digits: int, hemispheres: str) -> tuple[str, str, float]:
    """(d..dmm.mmmmm, hemisphere, the value those fields denote). Integer arithmetic, so 59.999995' carries."""
    units = round(abs(value) * 60 * MINUTE_UNITS)
    degrees, minute_units = divmod(units, 60 * MINUTE_UNITS)
    whole, frac = divmod(minute_units, MINUTE_UNITS)
    text = f"{degrees:0{degree_digits}d}{whole:02d}.{frac:05d}"
    hemi = hemispheres[0] if value >= 0 else hemispheres[1]
    written = units / (60 * MINUTE_UNITS)
    return text, hemi, written if value >= 0 else -written


def dops(n_used: int, t: float) -> tuple[float, float, float]:
    """(PDOP, HDOP, VDOP), two decimals each: HDOP 0.6-1.5, better with more satellites."""
    wobble = 0.05 * math.sin(t / 37.0)
    hdop = round(min(1.5, max(0.6, 0.5 + 5.0 / max(n_used, 1) + wobble)), 2)
    return round(hdop * 1.7, 2), hdop, round(hdop * 1.4, 2)


def encode_epoch(
    state: VehicleState, when: datetime, sky: Sky, talker: str = "GN", beidou_talker: str = "GB"
) -> EncodedEpoch:
    """One epoch of sentences (RMC, GGA, GSA..., GSV...) for `state` at UTC instant `when`, plus their truth.

    talker "GN" reports GPS + BeiDou with one GSA per system; "GB" or "BD" is a BeiDou-only receiver.
    """
    beidou_only = talker in _BEIDOU_TALKERS
    systems = (SYSTEM_BEIDOU,) if beidou_only else (SYSTEM_GPS, SYSTEM_BEIDOU)
    centis = when.microsecond // 10_000
    hms = f"{when.hour:02d}{when.minute:02d}{when.second:02d}.{centis:02d}"
    dmy = f"{when.day:02d}{when.month:02d}{when.year % 100:02d}"
    time_ms = calendar.timegm(when.utctimetuple()) * 1000 + centis * 10

    lat_text, ns, lat = format_angle(state.lat, 2, "NS")
    lon_text, ew, lon = format_angle(state.lon, 3, "EW")
    knots_text = f"{state.speed_kmh * KNOTS_PER_KMH:.3f}"
    speed_kmh = float(knots_text) * 1.852
    heading: float | None = None
    course_text = ""
    if state.speed_kmh >= COURSE_MIN_SPEED_KMH:
        course_text = f"{state.heading_deg % 360.0:.1f}"
        if course_text == "360.0":
            course_text = "0.0"
        heading = float(course_text)
    alt_text = f"{state.altitude_m:.1f}"

    used = [s for s in sky.used() if s.system in systems]
    pdop, hdop, vdop = dops(len(used), state.t)
    out = [
        sentence(f"{talker}RMC,{hms},A,{lat_text},{ns},{lon_text},{ew},{knots_text},{course_text},{dmy},,,A,V"),
        sentence(
            f"{talker}GGA,{hms},{lat_text},{ns},{lon_text},{ew},1,{min(len(used), 99):02d},{hdop:.2f},"
            f"{alt_text},M,{GEOID_SEPARATION_M:.1f},M,,"
        ),
    ]
    for system in systems:
        prns = [f"{s.prn:02d}" for s in sky.used(system)][:12]
        prns += [""] * (12 - len(prns))
        out.append(sentence(f"{talker}GSA,A,3,{','.join(prns)},{pdop:.2f},{hdop:.2f},{vdop:.2f},{system}"))
    for system in systems:
        gsv_talker = talker if beidou_only else ("GP" if system == SYSTEM_GPS else beidou_talker)
        out.extend(_gsv(gsv_talker, sky.in_view(system)))

    truth = TruthFix(
        time_ms=time_ms,
        lat=lat,
        lon=lon,
        altitude_m=float(alt_text),
        speed_kmh=speed_kmh,
        heading_deg=heading,
        hdop=hdop,
        satellites_used=len(used),
        beidou_in_use=any(s.system == SYSTEM_BEIDOU for s in used),
    )
    return EncodedEpoch(out, truth)


def _gsv(talker: str, sats: list[SatelliteView]) -> list[bytes]:
    total = max(1, math.ceil(len(sats) / 4))
    out = []
    for i in range(total):
        fields = []
        for s in sats[i * 4 : i * 4 + 4]:
            snr = "" if s.snr_dbhz is None else f"{s.snr_dbhz:02d}"
            fields.append(f"{s.prn:02d},{s.elevation_deg:02d},{s.azimuth_deg:03d},{snr}")
        body = ",".join([f"{talker}GSV", str(total), str(i + 1), f"{len(sats):02d}", *fields, "1"])
        out.append(sentence(body))  # trailing "1": NMEA 4.10 signal id (GPS L1 C/A, BeiDou B1I)
    return out


def epoch_sentences(
    state: VehicleState,
    talker: str = "GN",
    *,
    when: datetime,
    sky: Sky,
    beidou_talker: str = "GB",
) -> list[bytes]:
    """The sentences of one epoch; see `encode_epoch`."""
    return encode_epoch(state, when, sky, talker, beidou_talker).sentences
