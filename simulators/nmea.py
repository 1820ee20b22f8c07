"""NMEA 0183 sentence generation for the GNSS emulator: pure functions from a vehicle state to bytes.

What a receiver writes is described by a `Receiver`: the talker of its position sentences, which sentences it
sends per epoch and in which order, the constellations it tracks, the talker each constellation's satellites are
listed under, and how it reports the satellites used (GSA per system with the NMEA 4.10 system id, GSA per
system under each system's own talker, or one combined NMEA 4.0 GSA). `RECEIVERS` names the ones the tests and
the demo use — a u-blox M9 class GN receiver (the default), BeiDou-only modules (BD or GB talker), a five-system
NMEA 4.11 receiver, a Quectel-style PQ/GA mix and a legacy NMEA 4.0 receiver. Every talker and sentence kind of
firmware_specs/NMEA_PROFILE.md can be produced.

Positions carry five decimals of minutes (≈ 2 cm), so the catalogue's 1e-7 degree resolution is not limited by
the sentence format. `encode_epoch` also returns a `TruthFix` holding the values exactly as written (after
formatting), which is what a decoder can at best recover; tests compare against that rather than against the
unrounded model.
"""

from __future__ import annotations

import calendar
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from simulators.vehicle import VehicleState

KNOTS_PER_KMH = 1 / 1.852
GEOID_SEPARATION_M = -28.0  # roughly EGM96 under Chongqing; only echoed in GGA/GNS
COURSE_MIN_SPEED_KMH = 1.0  # below this, receivers leave the course field empty (as u-blox does)
MINUTE_UNITS = 100_000  # five decimals of minutes
GSA_SLOTS = 12

# NMEA 4.11 GNSS system ids (GSA field 18).
SYSTEM_GPS = 1
SYSTEM_GLONASS = 2
SYSTEM_GALILEO = 3
SYSTEM_BEIDOU = 4
SYSTEM_QZSS = 5
ALL_SYSTEMS = (SYSTEM_GPS, SYSTEM_GLONASS, SYSTEM_GALILEO, SYSTEM_BEIDOU, SYSTEM_QZSS)

TALKERS = frozenset({"GP", "GN", "GL", "GA", "GB", "BD", "GQ", "QZ", "PQ"})
SENTENCES = frozenset({"RMC", "GGA", "GNS", "VTG", "ZDA", "GSA", "GSV"})
# Talkers that name one constellation (PQ names BeiDou or QZSS in a field of its own).
TALKER_SYSTEMS: dict[str, frozenset[int]] = {
    "GP": frozenset(ALL_SYSTEMS),
    "GN": frozenset(ALL_SYSTEMS),
    "GL": frozenset({SYSTEM_GLONASS}),
    "GA": frozenset({SYSTEM_GALILEO}),
    "GB": frozenset({SYSTEM_BEIDOU}),
    "BD": frozenset({SYSTEM_BEIDOU}),
    "GQ": frozenset({SYSTEM_QZSS}),
    "QZ": frozenset({SYSTEM_QZSS}),
    "PQ": frozenset({SYSTEM_BEIDOU, SYSTEM_QZSS}),
}
_MULTI_TALKERS = frozenset({"GP", "GN"})
# NMEA 4.11 signal ids of the signal each system is listed with: L1 C/A, L1 OF, E1, B1I, L1 C/A.
_SIGNAL_ID = {SYSTEM_GPS: 1, SYSTEM_GLONASS: 1, SYSTEM_GALILEO: 7, SYSTEM_BEIDOU: 1, SYSTEM_QZSS: 1}
# NMEA 4.0 "extended" numbering when one GP/GN sentence carries several systems (SiRF/MTK BeiDou 201+).
_EXTENDED_OFFSET = {SYSTEM_GPS: 0, SYSTEM_GLONASS: 64, SYSTEM_GALILEO: 300, SYSTEM_BEIDOU: 200, SYSTEM_QZSS: 192}
_QUALITY_LETTER = "NADPRFEMS"  # GGA quality 0..8 as the mode letter of RMC/GNS/VTG
GSA_MODES = frozenset({"system-id", "talker", "combined"})


@dataclass(frozen=True, slots=True)
class Receiver:
    """How one receiver model writes an epoch (see the module docstring)."""

    talker: str = "GN"  # of RMC, GGA, GNS, VTG, ZDA (and of GSA in "system-id" and "combined" modes)
    systems: tuple[int, ...] = (SYSTEM_GPS, SYSTEM_BEIDOU)
    sentences: tuple[str, ...] = ("RMC", "GGA", "GSA", "GSV")  # epoch order; GSA/GSV expand to one per system
    sat_talkers: Mapping[int, str] = field(default_factory=lambda: {SYSTEM_GPS: "GP", SYSTEM_BEIDOU: "GB"})
    # "system-id": one GSA per system under `talker` with the NMEA 4.10 system id (systems listed under PQ get
    # theirs under PQ, as Quectel does); "talker": one GSA per system under its own talker, no system id (NMEA
    # 4.0, SiRF's GPGSA + BDGSA); "combined": a single GSA of twelve slots under `talker`, extended PRNs.
    gsa: str = "system-id"
    signal_id: bool = True  # NMEA 4.10 GSV trailer
    quality: int = 1  # GGA fix quality written (1 GNSS, 2 DGNSS, ...)

    def __post_init__(self) -> None:
        if self.talker not in TALKERS or not self.systems or not set(self.systems) <= set(ALL_SYSTEMS):
            raise ValueError(f"bad receiver talker/systems: {self.talker!r} {self.systems!r}")
        if not set(self.sentences) <= SENTENCES or len(set(self.sentences)) != len(self.sentences):
            raise ValueError(f"sentences must be distinct kinds of {sorted(SENTENCES)}")
        if self.gsa not in GSA_MODES or not 0 <= self.quality <= 8:
            raise ValueError(f"gsa must be one of {sorted(GSA_MODES)} and quality in 0..8")
        position_systems = TALKER_SYSTEMS[self.talker]
        for system in self.systems:
            sat_talker = self.sat_talkers.get(system, self.talker)
            if system not in TALKER_SYSTEMS[sat_talker]:
                raise ValueError(f"talker {sat_talker!r} cannot list system {system}")
            if self.gsa != "talker" and sat_talker != "PQ" and system not in position_systems:
                raise ValueError(f"talker {self.talker!r} cannot carry the GSA of system {system}")

    def sat_talker(self, system: int) -> str:
        return self.sat_talkers.get(system, self.talker)


RECEIVERS: dict[str, Receiver] = {
    # u-blox M9 / Quectel L76K class in NMEA 4.10 mode restricted to GPS + BeiDou: the emulator's default.
    "gn-gps-beidou": Receiver(),
    # BeiDou-only modules (ATGM332D-class in BDS mode): every sentence under the BeiDou talker.
    "bd-only": Receiver(talker="BD", systems=(SYSTEM_BEIDOU,), sat_talkers={SYSTEM_BEIDOU: "BD"}),
    "gb-only": Receiver(talker="GB", systems=(SYSTEM_BEIDOU,), sat_talkers={SYSTEM_BEIDOU: "GB"}),
    # A five-system NMEA 4.11 receiver: GN position, GSA per system with system ids, GSV per system's talker.
    "gn-multi": Receiver(
        systems=ALL_SYSTEMS,
        sentences=("RMC", "VTG", "GGA", "GSA", "GSV", "ZDA"),
        sat_talkers={
            SYSTEM_GPS: "GP",
            SYSTEM_GLONASS: "GL",
            SYSTEM_GALILEO: "GA",
            SYSTEM_BEIDOU: "GB",
            SYSTEM_QZSS: "GQ",
        },
    ),
    # Quectel EG25/LC29-style: GNS besides GGA, BeiDou and QZSS under the PQ talker, Galileo under GA.
    "quectel-pq": Receiver(
        systems=ALL_SYSTEMS,
        sentences=("GGA", "GNS", "VTG", "RMC", "GSA", "GSV"),
        sat_talkers={
            SYSTEM_GPS: "GP",
            SYSTEM_GLONASS: "GL",
            SYSTEM_GALILEO: "GA",
            SYSTEM_BEIDOU: "PQ",
            SYSTEM_QZSS: "PQ",
        },
    ),
    # SiRF-era NMEA 4.0: SiRF sentence order, one combined GNGSA with BeiDou as 201+, no GSV signal ids, DGNSS.
    "legacy-gn": Receiver(
        systems=(SYSTEM_GPS, SYSTEM_GLONASS, SYSTEM_BEIDOU),
        sentences=("GGA", "GSA", "GSV", "RMC"),
        sat_talkers={SYSTEM_GPS: "GP", SYSTEM_GLONASS: "GL", SYSTEM_BEIDOU: "BD"},
        gsa="combined",
        signal_id=False,
        quality=2,
    ),
}


def legacy_receiver(talker: str = "GN", beidou_talker: str = "GB") -> Receiver:
    """The receiver the emulator's original (talker, beidou_talker) arguments describe."""
    if talker in ("GB", "BD"):
        return Receiver(talker=talker, systems=(SYSTEM_BEIDOU,), sat_talkers={SYSTEM_BEIDOU: talker})
    return Receiver(talker=talker, sat_talkers={SYSTEM_GPS: "GP", SYSTEM_BEIDOU: beidou_talker})


@dataclass(frozen=True, slots=True)
class SatelliteView:
    system: int  # one of ALL_SYSTEMS
    prn: int  # number within the system (GPS 1-32, GLONASS slot 1-24, Galileo 1-36, BeiDou 1-63, QZSS 1-10)
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
# QZSS from Chongqing: the GEO QZS-3 (J07, 127 E) low in the south-east; the IGSOs swing through the east.
_QZSS_GEO = (7, 38.0, 140.0)


class SkyModel:
    """A deterministic sky for one seed: which satellites of the five constellations are up, where, how loud.

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
        # Drawn from a stream of their own so the GPS and BeiDou sky of a seed is what it always was.
        more = random.Random(f"sky-{seed}-glonass-galileo-qzss")
        for prn in sorted(more.sample(range(1, 25), more.randint(6, 9))):
            orbits.append(_orbit(more, SYSTEM_GLONASS, prn, w * 1.06))
        for prn in sorted(more.sample(range(1, 37), more.randint(6, 9))):
            orbits.append(_orbit(more, SYSTEM_GALILEO, prn, w * 0.85))
        prn, el, az = _QZSS_GEO
        orbits.append(_Orbit(SYSTEM_QZSS, prn, el, 0.0, 0.0, 0.0, az, 0.0))
        for prn in (2, 3, 4):
            orbits.append(_orbit(more, SYSTEM_QZSS, prn, w / 2))  # IGSO: one figure-eight a sidereal day
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
        for system in ALL_SYSTEMS:
            best = sorted((s for s in sats if s.system == system and s.used), key=lambda s: -s.elevation_deg)
            for extra in best[GSA_SLOTS:]:
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
    """What one epoch's sentences say, decoded exactly: the best any decoder can recover.

    Values the receiver's sentence set does not carry are still filled in from what it would have written
    (e.g. `altitude_m` without GGA/GNS); the receiver tells which sentences were sent.
    """

    time_ms: int
    lat: float
    lon: float
    altitude_m: float
    speed_kmh: float
    heading_deg: float | None
    hdop: float
    satellites_used: int  # GGA/GNS count; the GSA-listed count when neither is sent
    beidou_in_use: bool
    quality: int = 1
    pdop: float = 0.0
    vdop: float = 0.0
    used: Mapping[int, int] = field(default_factory=dict)  # system -> satellites listed in GSA
    in_view: Mapping[int, int] = field(default_factory=dict)  # system -> satellites listed in GSV


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


def nmea_prn(system: int, prn: int, talker: str, system_id: bool) -> int:
    """The number a sentence of `talker` writes for a satellite: GLONASS always as 65-96 (NMEA); a GP/GN
    sentence without a system id carries several systems and uses the NMEA 4.0 extended numbering."""
    if system == SYSTEM_GLONASS:
        return prn + 64
    if talker in _MULTI_TALKERS and not system_id:
        return prn + _EXTENDED_OFFSET[system]
    return prn


def encode_epoch(
    state: VehicleState,
    when: datetime,
    sky: Sky,
    talker: str = "GN",
    beidou_talker: str = "GB",
    *,
    receiver: Receiver | None = None,
) -> EncodedEpoch:
    """One epoch of sentences for `state` at UTC instant `when`, plus their truth.

    `receiver` says what is written; without one, `talker` "GN" reports GPS + BeiDou with one GSA per system and
    `beidou_talker` GSV, and "GB" or "BD" is a BeiDou-only receiver (the original arguments).
    """
    rx = receiver if receiver is not None else legacy_receiver(talker, beidou_talker)
    tk = rx.talker
    centis = when.microsecond // 10_000
    hms = f"{when.hour:02d}{when.minute:02d}{when.second:02d}.{centis:02d}"
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

    used = [s for s in sky.used() if s.system in rx.systems]
    n_used = min(len(used), 99)
    pdop, hdop, vdop = dops(len(used), state.t)
    letter = _QUALITY_LETTER[rx.quality]
    gsa, listed = _gsa(rx, sky, f"{pdop:.2f},{hdop:.2f},{vdop:.2f}")
    out: list[bytes] = []
    for kind in rx.sentences:
        if kind == "RMC":
            dmy = f"{when.day:02d}{when.month:02d}{when.year % 100:02d}"
            out.append(
                sentence(
                    f"{tk}RMC,{hms},A,{lat_text},{ns},{lon_text},{ew},{knots_text},{course_text},{dmy},,,{letter},V"
                )
            )
        elif kind == "GGA":
            out.append(
                sentence(
                    f"{tk}GGA,{hms},{lat_text},{ns},{lon_text},{ew},{rx.quality},{n_used:02d},{hdop:.2f},"
                    f"{alt_text},M,{GEOID_SEPARATION_M:.1f},M,,"
                )
            )
        elif kind == "GNS":
            # One mode letter per system in NMEA order: GPS, GLONASS, Galileo, BeiDou, QZSS.
            modes = "".join(letter if s in rx.systems else "N" for s in ALL_SYSTEMS)
            out.append(
                sentence(
                    f"{tk}GNS,{hms},{lat_text},{ns},{lon_text},{ew},{modes},{n_used:02d},{hdop:.2f},"
                    f"{alt_text},{GEOID_SEPARATION_M:.1f},,,V"
                )
            )
        elif kind == "VTG":
            kmh = f"{float(knots_text) * 1.852:.3f}"
            out.append(sentence(f"{tk}VTG,{course_text},T,,M,{knots_text},N,{kmh},K,{letter}"))
        elif kind == "ZDA":
            out.append(sentence(f"{tk}ZDA,{hms},{when.day:02d},{when.month:02d},{when.year:04d},00,00"))
        elif kind == "GSA":
            out.extend(gsa)
        else:
            for system in rx.systems:
                out.extend(_gsv(rx.sat_talker(system), system, sky.in_view(system), rx.signal_id))

    truth = TruthFix(
        time_ms=time_ms,
        lat=lat,
        lon=lon,
        altitude_m=float(alt_text),
        speed_kmh=speed_kmh,
        heading_deg=heading,
        hdop=hdop,
        satellites_used=len(used) if {"GGA", "GNS"} & set(rx.sentences) else len(listed),
        beidou_in_use=any(s.system == SYSTEM_BEIDOU for s in listed),
        quality=rx.quality,
        pdop=pdop,
        vdop=vdop,
        used={s: sum(1 for v in listed if v.system == s) for s in rx.systems},
        in_view={s: len(sky.in_view(s)) for s in rx.systems},
    )
    return EncodedEpoch(out, truth)


def _gsa(rx: Receiver, sky: Sky, dop_fields: str) -> tuple[list[bytes], list[SatelliteView]]:
    """The GSA sentences of `rx` and the satellites they list (what a decoder can know to be used)."""
    if rx.gsa == "combined":
        # Twelve slots for every system together: the receiver lists its twelve highest.
        listed = sorted(
            (s for s in sky.used() if s.system in rx.systems), key=lambda s: (-s.elevation_deg, s.system, s.prn)
        )[:GSA_SLOTS]
        prns = [f"{nmea_prn(s.system, s.prn, rx.talker, False):02d}" for s in listed]
        return [_gsa_sentence(rx.talker, prns, dop_fields, None)], listed
    out = []
    listed = []
    for system in rx.systems:
        sats = sky.used(system)[:GSA_SLOTS]
        listed += sats
        sat_talker = rx.sat_talker(system)
        if rx.gsa == "talker":
            talker, system_id = sat_talker, None
        else:
            talker, system_id = ("PQ" if sat_talker == "PQ" else rx.talker), system
        prns = [f"{nmea_prn(system, s.prn, talker, system_id is not None):02d}" for s in sats]
        out.append(_gsa_sentence(talker, prns, dop_fields, system_id))
    return out, listed


def _gsa_sentence(talker: str, prns: list[str], dop_fields: str, system_id: int | None) -> bytes:
    slots = ",".join(prns + [""] * (GSA_SLOTS - len(prns)))
    trailer = "" if system_id is None else f",{system_id}"
    return sentence(f"{talker}GSA,A,3,{slots},{dop_fields}{trailer}")


def _gsv(talker: str, system: int, sats: list[SatelliteView], signal_id: bool) -> list[bytes]:
    total = max(1, math.ceil(len(sats) / 4))
    if talker == "PQ":
        trailer = [str(_SIGNAL_ID[system]), str(system)]  # Quectel: signal id, then the system id
    elif signal_id:
        trailer = [str(_SIGNAL_ID[system])]
    else:
        trailer = []
    out = []
    for i in range(total):
        fields = []
        for s in sats[i * 4 : i * 4 + 4]:
            snr = "" if s.snr_dbhz is None else f"{s.snr_dbhz:02d}"
            prn = nmea_prn(system, s.prn, talker, False)
            fields.append(f"{prn:02d},{s.elevation_deg:02d},{s.azimuth_deg:03d},{snr}")
        out.append(sentence(",".join([f"{talker}GSV", str(total), str(i + 1), f"{len(sats):02d}", *fields, *trailer])))
    return out


def epoch_sentences(
    state: VehicleState,
    talker: str = "GN",
    *,
    when: datetime,
    sky: Sky,
    beidou_talker: str = "GB",
    receiver: Receiver | None = None,
) -> list[bytes]:
    """The sentences of one epoch; see `encode_epoch`."""
    return encode_epoch(state, when, sky, talker, beidou_talker, receiver=receiver).sentences
