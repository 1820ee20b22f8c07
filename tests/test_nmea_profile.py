"""The NMEA profile (firmware_specs/NMEA_PROFILE.md), sentence by sentence: hand-written sentences in the formats
real receivers use, per-constellation satellite counts, the epoch and date rules, the strict single-line parser,
and every (talker, sentence) pair the emulator can write, round-tripped through the decoder."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.nmea import (
    CONSTELLATIONS,
    MAX_LINE,
    ConstellationCounts,
    GnssFix,
    NmeaDecoder,
    NmeaError,
    parse_sentence,
)
from protocol.catalogue import Catalogue, load_catalogue
from simulators.nmea import (
    ALL_SYSTEMS,
    RECEIVERS,
    SYSTEM_BEIDOU,
    SYSTEM_GALILEO,
    SYSTEM_GLONASS,
    SYSTEM_GPS,
    SYSTEM_QZSS,
    Receiver,
    SkyModel,
    TruthFix,
    encode_epoch,
)
from simulators.route import route_for
from simulators.vehicle import VehicleModel

T0 = 1_763_700_000.0
CAT = load_catalogue()
RX = "CurrentLocation.GNSSReceiver."


def _nmea(body: str) -> bytes:
    """A sentence with its checksum (XOR of the bytes between '$' and '*'), computed here, not by the emulator."""
    c = 0
    for b in body.encode("ascii"):
        c ^= b
    return f"${body}*{c:02X}\r\n".encode("ascii")


def _ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp() * 1000)


def _deg(dm: str, hemi: str) -> float:
    """ddmm.mmmm as the test's own arithmetic reads it."""
    v = float(dm)
    d = int(v // 100)
    value = d + (v - d * 100) / 60
    return -value if hemi in "SW" else value


def _one_fix(lines: list[str]) -> tuple[GnssFix, NmeaDecoder]:
    dec = NmeaDecoder()
    fixes = dec.feed(b"".join(_nmea(line) for line in lines)) + dec.flush()
    assert len(fixes) == 1, fixes
    assert dec.counters["sentences"] == len(lines)
    for reason in ("bad_checksum", "garbage", "unsupported", "malformed", "missing_checksum"):
        assert dec.counters[reason] == 0, reason
    return fixes[0], dec


def _counts(**kw: int) -> ConstellationCounts:
    return ConstellationCounts(**kw)


# -- table: one epoch per row, hand-written in the formats of the receivers named ------------------------------

TABLE: list[tuple[str, list[str], dict[str, Any]]] = [
    (
        "GP RMC+GGA, NMEA 2.3 (u-blox 6)",
        [
            "GPRMC,092750.000,A,5321.6802,N,00630.3372,W,0.02,31.66,280511,,,A",
            "GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,",
        ],
        {
            "time_ms": _ms(2011, 5, 28, 9, 27, 50),
            "mode": 3,
            "lat": _deg("5321.6802", "N"),
            "lon": _deg("00630.3372", "W"),
            "altitude_m": 61.7,
            "speed_kmh": 0.02 * 1.852,
            "heading_deg": 31.66,
            "hdop": 1.03,
            "satellites_used": 8,
            "quality": 1,
            "pdop": None,
            "used": None,
            "in_view": None,
            "beidou_in_use": None,
        },
    ),
    (
        "GN RMC, VTG, GGA, ZDA (u-blox M8 multi-GNSS)",
        [
            "GNRMC,110827.00,A,4717.11399,N,00833.91590,E,0.004,77.52,091202,,,A",
            "GNVTG,77.52,T,,M,0.004,N,0.008,K,A",
            "GNGGA,110827.00,4717.11399,N,00833.91590,E,1,12,0.99,499.6,M,48.0,M,,",
            "GNZDA,110827.00,09,12,2002,00,00",
        ],
        {
            "time_ms": _ms(2002, 12, 9, 11, 8, 27),
            "mode": 3,
            "lat": _deg("4717.11399", "N"),
            "lon": _deg("00833.91590", "E"),
            "altitude_m": 499.6,
            "speed_kmh": 0.004 * 1.852,
            "heading_deg": 77.52,
            "satellites_used": 12,
            "quality": 1,
        },
    ),
    (
        "BD talker, BeiDou-only module (GSA without system id)",
        [
            "BDGGA,061502.00,2933.12345,N,10633.54321,E,1,07,1.2,250.5,M,-28.0,M,,",
            "BDGSA,A,3,01,02,03,06,09,13,16,,,,,,2.0,1.2,1.6",
            "BDRMC,061502.00,A,2933.12345,N,10633.54321,E,12.5,270.0,150325,,,A",
        ],
        {
            "time_ms": _ms(2025, 3, 15, 6, 15, 2),
            "lat": _deg("2933.12345", "N"),
            "lon": _deg("10633.54321", "E"),
            "speed_kmh": 12.5 * 1.852,
            "heading_deg": 270.0,
            "pdop": 2.0,
            "hdop": 1.2,
            "vdop": 1.6,
            "satellites_used": 7,
            "used": _counts(beidou=7),
            "beidou_in_use": True,
        },
    ),
    (
        "GB talker, NMEA 4.10 BeiDou-only with GSV signal id",
        [
            "GBGGA,235959.50,2934.00000,N,10635.00000,E,1,05,0.90,300.0,M,-28.0,M,,",
            "GBGSA,A,3,06,09,16,37,40,,,,,,,,1.60,0.90,1.30,4",
            "GBGSV,2,1,06,06,55,120,44,09,40,200,41,16,35,300,39,37,60,010,45,1",
            "GBGSV,2,2,06,40,25,090,38,59,10,150,30,1",
            "GBRMC,235959.50,A,2934.00000,N,10635.00000,E,0.000,,311225,,,A,V",
        ],
        {
            "time_ms": _ms(2025, 12, 31, 23, 59, 59) + 500,
            "speed_kmh": 0.0,
            "heading_deg": None,  # empty course field while standing
            "used": _counts(beidou=5),
            "in_view": _counts(beidou=6),
            "pdop": 1.6,
            "vdop": 1.3,
            "beidou_in_use": True,
        },
    ),
    (
        "GA talker RMC/GGA/GSA (Telit PLS83 style Galileo)",
        [
            "GAGGA,043540.00,4807.03800,N,01131.00000,E,1,05,1.10,545.4,M,46.9,M,,",
            "GAGSA,A,3,02,07,08,26,30,,,,,,,,1.90,1.10,1.50,3",
            "GARMC,043540.00,A,4807.03800,N,01131.00000,E,22.4,84.4,040925,,,A,V",
        ],
        {
            "time_ms": _ms(2025, 9, 4, 4, 35, 40),
            "used": _counts(galileo=5),
            "beidou_in_use": False,
            "speed_kmh": 22.4 * 1.852,
        },
    ),
    (
        "GN GNS + ZDA, no RMC (ST Teseo / Trimble style), DGNSS",
        [
            "GNZDA,213712.000,12,02,2026,,",
            "GNGNS,213712.000,4111.59903,N,11156.54809,W,DDNN,13,0.93,01482.5,-016.5,,",
        ],
        {
            "time_ms": _ms(2026, 2, 12, 21, 37, 12),
            "mode": 3,
            "lat": _deg("4111.59903", "N"),
            "lon": _deg("11156.54809", "W"),
            "altitude_m": 1482.5,
            "hdop": 0.93,
            "satellites_used": 13,
            "quality": 2,  # first system's mode letter "D"
            "speed_kmh": None,
        },
    ),
    (
        "GP GGA + NMEA 2.0 VTG without unit letters + ZDA (SiRF II)",
        [
            "GPZDA,201530.00,04,07,2002,00,00",
            "GPGGA,201530.00,3751.6500,S,14507.3600,E,1,06,1.5,30.2,M,-34.0,M,,",
            "GPVTG,054.7,034.4,005.5,010.2",
        ],
        {
            "time_ms": _ms(2002, 7, 4, 20, 15, 30),
            "lat": _deg("3751.6500", "S"),
            "lon": _deg("14507.3600", "E"),
            "speed_kmh": 5.5 * 1.852,
            "heading_deg": 54.7,
        },
    ),
    (
        "GN NMEA 4.11, GSA per system id, GSV per talker, a second signal, SBAS and QZSS",
        [
            "GNGGA,120000.00,2933.46200,N,10634.62000,E,1,11,0.70,245.3,M,-28.0,M,,",
            "GNGSA,A,3,05,13,15,,,,,,,,,,1.30,0.70,1.10,1",
            "GNGSA,A,3,67,68,,,,,,,,,,,1.30,0.70,1.10,2",
            "GNGSA,A,3,04,11,,,,,,,,,,,1.30,0.70,1.10,3",
            "GNGSA,A,3,08,19,22,,,,,,,,,,1.30,0.70,1.10,4",
            "GNGSA,A,3,02,,,,,,,,,,,,1.30,0.70,1.10,5",
            "GPGSV,1,1,04,05,40,100,40,13,50,200,42,15,30,300,38,48,35,210,40,1",  # 48: SBAS, no GPS
            "GPGSV,1,1,02,05,40,100,37,13,50,200,39,8",  # the same satellites on L5: not counted again
            "GLGSV,1,1,03,67,45,050,41,68,30,120,37,77,10,330,,1",
            "GAGSV,1,1,03,04,50,060,43,11,40,160,40,25,12,250,,7",
            "GBGSV,1,1,04,08,60,010,45,19,45,130,42,22,35,240,40,35,08,080,,1",
            "GQGSV,1,1,02,02,30,140,36,07,38,150,39,1",
            "GNRMC,120000.00,A,2933.46200,N,10634.62000,E,10.800,123.4,211125,,,A,V",
        ],
        {
            "time_ms": _ms(2025, 11, 21, 12, 0, 0),
            "satellites_used": 11,
            "pdop": 1.3,
            "hdop": 0.7,
            "vdop": 1.1,
            "used": _counts(gps=3, glonass=2, galileo=2, beidou=3, qzss=1),
            "in_view": _counts(gps=3, glonass=3, galileo=3, beidou=4, qzss=2),
            "beidou_in_use": True,
        },
    ),
    (
        "Quectel PQ talker: PQGSA with system ids, PQGSV with signal and system id (EG25-G)",
        [
            "GPGGA,051347.00,6001.336799,N,03014.169008,E,1,06,0.9,16.5,M,18.0,M,,",
            "GNGSA,A,3,08,10,16,18,27,,,,,,,,1.2,0.9,0.9,1",
            "PQGSA,A,3,12,,,,,,,,,,,,1.2,0.9,0.9,4",
            "PQGSA,A,3,,,,,,,,,,,,,1.2,0.9,0.9,5",
            "PQGSV,2,1,05,04,,,32,12,46,282,30,19,50,092,31,25,17,302,26,0,4",
            "PQGSV,2,2,05,02,08,120,,0,4",
            "PQGSV,1,1,01,03,40,150,35,0,5",
            "GPRMC,051347.00,A,6001.336799,N,03014.169008,E,0.0,0.0,200922,8.4,E,A,V",
        ],
        {
            "time_ms": _ms(2022, 9, 20, 5, 13, 47),
            "lat": _deg("6001.336799", "N"),
            "satellites_used": 6,
            "used": _counts(gps=5, beidou=1),
            "in_view": _counts(beidou=5, qzss=1),
            "beidou_in_use": True,
        },
    ),
    (
        "GN GSA without system id, several systems by PRN range (SiRF/MTK/gpsd numbering)",
        [
            "GNGGA,010203.000,2933.0000,N,10633.0000,E,1,09,1.2,200.0,M,-28.0,M,,",
            "GNGSA,A,3,22,18,14,201,407,302,194,70,,,,,2.5,1.2,2.2",
            "GNRMC,010203.000,A,2933.0000,N,10633.0000,E,0.50,10.0,010426,,,A",
        ],
        {
            "satellites_used": 9,  # GGA's own count wins below 12
            "used": _counts(gps=3, beidou=2, galileo=1, qzss=1, glonass=1),
            "beidou_in_use": True,
            "pdop": 2.5,
            "vdop": 2.2,
        },
    ),
    (
        "no fix yet: RMC void, GGA quality 0",
        [
            "GNRMC,000012.00,V,,,,,,,010126,,,N,V",
            "GNGGA,000012.00,,,,,0,00,99.99,,,,,,",
        ],
        {
            "time_ms": _ms(2026, 1, 1, 0, 0, 12),
            "mode": 1,
            "lat": None,
            "lon": None,
            "altitude_m": None,
            "quality": 0,
            "hdop": 99.99,
            "satellites_used": 0,
        },
    ),
    (
        "RTK fixed GGA (quality 4), RMC mode R",
        [
            "GPRMC,150000.00,A,3723.46587,N,12202.26957,W,0.01,,171124,,,R",
            "GPGGA,150000.00,3723.46587,N,12202.26957,W,4,12,0.60,18.2,M,-32.1,M,1.0,0000",
        ],
        {"quality": 4, "mode": 3, "altitude_m": 18.2, "heading_deg": None},
    ),
    (
        "RMC only with mode D (Meinberg-style RMC receiver): 2D, quality from the mode letter",
        ["GPRMC,120000,A,4742.2100,N,01200.7600,E,0.0,0.0,181223,,,D"],
        {"mode": 2, "quality": 2, "altitude_m": None, "satellites_used": None, "hdop": None},
    ),
]


@pytest.mark.parametrize(("title", "lines", "expected"), TABLE, ids=[row[0] for row in TABLE])
def test_hand_written_sentences(title: str, lines: list[str], expected: dict[str, Any]) -> None:
    fix, _ = _one_fix(lines)
    for attr, want in expected.items():
        got = getattr(fix, attr)
        if isinstance(want, float):
            assert got == pytest.approx(want, abs=1e-9), attr
        else:
            assert got == want, attr
    for name, value in fix.signals(CAT).items():
        assert CAT.by_name(name).in_range(value), name


def test_beidou_talkers_gb_and_bd_mean_the_same_thing() -> None:
    def epoch(talker: str) -> GnssFix:
        fix, _ = _one_fix(
            [
                "GNGGA,080000.00,2933.0,N,10633.0,E,1,04,1.0,200.0,M,-28.0,M,,",
                f"{talker}GSA,A,3,03,07,21,46,,,,,,,,,1.8,1.0,1.5",
                f"{talker}GSV,2,1,05,03,55,172,42,07,49,041,42,21,45,200,40,46,30,010,35",
                f"{talker}GSV,2,2,05,59,20,100,30",
                "GNRMC,080000.00,A,2933.0,N,10633.0,E,1.0,90.0,010526,,,A",
            ]
        )
        return fix

    gb, bd = epoch("GB"), epoch("BD")
    assert gb == bd
    assert gb.used == _counts(beidou=4) and gb.in_view == _counts(beidou=5) and gb.beidou_in_use is True


def test_signals_carry_the_per_constellation_counts_under_catalogue_names() -> None:
    fix, _ = _one_fix(TABLE[7][1])
    sig = fix.signals(CAT)
    assert sig[RX + "GPS.SatellitesUsed"] == 3 and sig[RX + "GPS.SatellitesInView"] == 3
    assert sig[RX + "BeiDou.SatellitesUsed"] == 3 and sig[RX + "BeiDou.SatellitesInView"] == 4
    assert sig[RX + "GLONASS.SatellitesInView"] == 3 and sig[RX + "Galileo.SatellitesUsed"] == 2
    assert sig[RX + "QZSS.SatellitesInView"] == 2
    assert (sig[RX + "PDOP"], sig[RX + "VDOP"], sig[RX + "FixQuality"]) == (1.3, 1.1, 1)
    gnss = {s.name for s in CAT.from_source("gnss")}
    assert set(sig) == gnss, gnss - set(sig)  # a complete multi-GNSS epoch fills every GNSS signal


def test_dop_of_zero_means_not_available() -> None:
    fix, _ = _one_fix(
        [
            "GNGGA,012240.00,3725.0,N,12205.0,W,1,09,0.0,30.0,M,-30.0,M,,",
            "GNGSA,A,3,27,9,20,5,4,30,8,7,14,,,,0.00,0.00,0.00",
            "GNRMC,012240.00,A,3725.0,N,12205.0,W,0.0,,120821,,,A",
        ]
    )
    assert fix.hdop is None and fix.pdop is None and fix.vdop is None
    assert fix.used == _counts(gps=9)  # PRNs written without leading zeros (jl-micro-jlt)


# -- epochs and dates ----------------------------------------------------------------------------------------


def test_gga_only_receiver_crosses_midnight_with_the_date_of_its_last_zda() -> None:
    dec = NmeaDecoder()
    data = _nmea("GPZDA,235959.00,31,12,2025,00,00")
    data += _nmea("GPGGA,235959.00,2933.0,N,10633.0,E,1,08,1.0,200.0,M,-28.0,M,,")
    data += _nmea("GPGGA,000000.00,2933.0,N,10633.0,E,1,08,1.0,200.0,M,-28.0,M,,")
    data += _nmea("GPGGA,000001.00,2933.0,N,10633.0,E,1,08,1.0,200.0,M,-28.0,M,,")
    fixes = dec.feed(data) + dec.flush()
    assert [f.time_ms for f in fixes] == [_ms(2025, 12, 31, 23, 59, 59), _ms(2026, 1, 1), _ms(2026, 1, 1, 0, 0, 1)]


def test_rmc_wins_speed_and_course_over_vtg() -> None:
    fix, _ = _one_fix(
        [
            "GNRMC,101010.00,A,2933.0,N,10633.0,E,10.000,45.0,010526,,,A",
            "GNVTG,50.0,T,,M,11.000,N,20.372,K,A",
            "GNGGA,101010.00,2933.0,N,10633.0,E,1,08,1.0,200.0,M,-28.0,M,,",
        ]
    )
    assert fix.speed_kmh == pytest.approx(18.52) and fix.heading_deg == 45.0


def test_gga_vtg_receiver_is_learnt_and_emits_at_its_vtg() -> None:
    dec = NmeaDecoder()
    fixes: list[GnssFix] = []
    emitted_at: list[int] = []
    for second in range(5):
        for body in (
            f"GPGGA,0900{second:02d}.00,2933.0,N,10633.0,E,1,08,1.0,200.0,M,-28.0,M,,",
            f"GPVTG,{second * 10}.0,T,,M,{second}.000,N,{second * 1.852:.3f},K,A",
        ):
            got = dec.feed(_nmea(body))
            fixes += got
            emitted_at += [second] * len(got)
    assert dec.flush() == []
    # Epochs 0 and 1 wait for the next GGA; from epoch 2 on the decoder knows GGA+VTG make an epoch.
    assert emitted_at == [1, 2, 2, 3, 4]
    assert [f.speed_kmh for f in fixes] == pytest.approx([k * 1.852 for k in range(5)])
    assert [f.heading_deg for f in fixes] == [k * 10.0 for k in range(5)]


# -- the strict parser and robustness ------------------------------------------------------------------------


def test_parse_sentence_names_the_reason() -> None:
    good = _nmea("GBGSV,1,1,01,06,55,120,44,1")
    s = parse_sentence(good)
    assert (s.talker, s.kind, s.fields) == ("GB", "GSV", ["1", "1", "01", "06", "55", "120", "44", "1"])
    pq = parse_sentence(_nmea("PQGSA,A,3,12,,,,,,,,,,,,1.2,0.9,0.9,4"))
    assert (pq.talker, pq.kind, pq.fields[:3], pq.fields[-1]) == ("PQ", "GSA", ["A", "3", "12"], "4")
    cases = {
        "bad_checksum": good[:-4] + b"00\r\n",
        "missing_checksum": b"$GNRMC,083016.00,A,2933.46200,N,10634.62000,E,10.800,123.4,211125,,,A,V",
        "unsupported": _nmea("GNGLL,4916.45,N,12311.12,W,225444,A"),
        "garbage": b"$GN RMC,\x01",
        "overlong": b"$GPGSV," + b"1" * MAX_LINE,
    }
    for reason, line in cases.items():
        with pytest.raises(NmeaError) as info:
            parse_sentence(line)
        assert info.value.reason == reason
    with pytest.raises(NmeaError, match="unsupported"):
        parse_sentence(_nmea("GIGSV,1,1,01,05,40,100,40,5"))  # NavIC talker: not in the profile


@settings(max_examples=400, deadline=None)
@given(line=st.one_of(st.binary(max_size=300), st.text(alphabet="$*,.0123456789ABCDEFGNPQLRSVZ", max_size=120)))
def test_parse_sentence_raises_nothing_but_nmea_error(line: bytes | str) -> None:
    raw = line.encode("ascii") if isinstance(line, str) else line
    try:
        s = parse_sentence(raw)
    except NmeaError as exc:
        assert exc.reason in NmeaDecoder().counters
        return
    assert len(s.talker) == 2 and len(s.kind) == 3


_TALKERS = ["GP", "GN", "GL", "GA", "GB", "BD", "GQ", "QZ", "PQ"]
_MAX_PER_CONSTELLATION = {"gps": 32, "beidou": 63, "glonass": 32, "galileo": 36, "qzss": 10}


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(_TALKERS),
            st.sampled_from(["GSV", "GSA"]),
            st.lists(st.integers(min_value=0, max_value=99_999), max_size=8),
            st.sampled_from(["", ",1", ",0,4", ",0,5", ",7", ",1,2,3"]),
        ),
        max_size=60,
    )
)
def test_satellite_counts_stay_bounded_whatever_the_sentences_list(
    rows: list[tuple[str, str, list[int], str]],
) -> None:
    dec = NmeaDecoder()
    fixes: list[GnssFix] = []
    for talker, kind, prns, trailer in rows:
        if kind == "GSV":
            blocks = "".join(f",{p},45,100,40" for p in prns)
            body = f"{talker}GSV,1,1,{len(prns):02d}{blocks}{trailer}"
        else:
            slots = ",".join([str(p) for p in prns] + [""] * (12 - len(prns)))
            body = f"{talker}GSA,A,3,{slots},1.5,0.9,1.2{trailer}"
        fixes += dec.feed(_nmea(body))
        assert dec.buffered <= MAX_LINE
    fixes += dec.feed(_nmea("GNRMC,101010.00,A,2933.0,N,10633.0,E,1.0,45.0,010526,,,A"))
    fixes += dec.feed(_nmea("GNGGA,101010.00,2933.0,N,10633.0,E,1,08,1.0,200.0,M,-28.0,M,,"))
    (fix,) = fixes + dec.flush()
    for counts in (fix.used, fix.in_view):
        if counts is not None:
            for attr, limit in _MAX_PER_CONSTELLATION.items():
                assert 0 <= getattr(counts, attr) <= limit
    for name, value in fix.signals(CAT).items():
        assert CAT.by_name(name).in_range(value), name


# -- split across reads --------------------------------------------------------------------------------------


def _stream(receiver: Receiver, seed: int, start: float, epochs: int) -> tuple[bytes, list[TruthFix]]:
    model = VehicleModel(route_for(seed), seed=seed, start_time=T0)
    sky = SkyModel(seed)
    data = bytearray()
    truths = []
    for i in range(epochs):
        t = start + i
        enc = encode_epoch(model.state_at(t), datetime.fromtimestamp(t, UTC), sky.at(t), receiver=receiver)
        data += b"".join(enc.sentences)
        truths.append(enc.truth)
    return bytes(data), truths


@pytest.mark.parametrize("name", ["quectel-pq", "gn-multi", "legacy-gn"])
def test_every_split_position_gives_the_same_fixes(name: str) -> None:
    data, _ = _stream(RECEIVERS[name], seed=9, start=T0 + 300, epochs=3)
    whole = NmeaDecoder()
    expected = whole.feed(data) + whole.flush()
    assert len(expected) == 3 and whole.counters["malformed"] == whole.counters["unsupported"] == 0
    for cut in range(1, len(data), 5):
        dec = NmeaDecoder()
        assert dec.feed(data[:cut]) + dec.feed(data[cut:]) + dec.flush() == expected, cut


# -- every (talker, sentence) pair the emulator writes, round-tripped ----------------------------------------

_TALKER_SYSTEMS = {
    "GP": ALL_SYSTEMS,
    "GN": ALL_SYSTEMS,
    "GL": (SYSTEM_GLONASS,),
    "GA": (SYSTEM_GALILEO,),
    "GB": (SYSTEM_BEIDOU,),
    "BD": (SYSTEM_BEIDOU,),
    "GQ": (SYSTEM_QZSS,),
    "QZ": (SYSTEM_QZSS,),
    "PQ": (SYSTEM_BEIDOU, SYSTEM_QZSS),
}
_KINDS = ["RMC", "GGA", "GNS", "VTG", "ZDA", "GSA", "GSV"]
PAIRS = [(t, k) for t in _TALKER_SYSTEMS for k in _KINDS]


def _receiver_for(talker: str, kind: str, sat_first: bool, combined: bool) -> Receiver:
    """A receiver whose `kind` sentences go out under `talker`, plus what the decoder needs for a fix."""
    systems = _TALKER_SYSTEMS[talker]
    if kind in ("RMC", "GGA", "GNS"):
        sentences = (kind,) if kind == "RMC" else ("ZDA", kind)
        return Receiver(talker=talker, systems=systems, sentences=sentences, sat_talkers={})
    if kind == "VTG":
        return Receiver(talker=talker, systems=systems, sentences=("ZDA", "GGA", "VTG"), sat_talkers={})
    if kind == "ZDA":
        return Receiver(talker=talker, systems=systems, sentences=("ZDA", "GGA"), sat_talkers={})
    order = (kind, "RMC", "GGA") if sat_first else ("RMC", "GGA", kind)
    if talker in ("GP", "GN"):
        gsa = "combined" if combined else "system-id"
        return Receiver(talker=talker, systems=systems, sentences=order, sat_talkers={}, gsa=gsa)
    sat_talkers = dict.fromkeys(systems, talker)
    gsa = "system-id" if talker == "PQ" else "talker"
    return Receiver(talker="GN", systems=systems, sentences=order, sat_talkers=sat_talkers, gsa=gsa)


def _system_counts(counts: ConstellationCounts | None) -> dict[int, int]:
    assert counts is not None
    return {system: getattr(counts, attr) for attr, _, system in CONSTELLATIONS}


@pytest.mark.parametrize(("talker", "kind"), PAIRS)
@settings(max_examples=4, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    offset=st.integers(min_value=0, max_value=86_400),
    sat_first=st.booleans(),
    combined=st.booleans(),
)
def test_every_talker_and_sentence_round_trips(
    talker: str, kind: str, seed: int, offset: int, sat_first: bool, combined: bool
) -> None:
    rx = _receiver_for(talker, kind, sat_first, combined)
    data, truths = _stream(rx, seed, T0 + offset, epochs=4)
    dec = NmeaDecoder()
    fixes = dec.feed(data) + dec.flush()
    assert dec.counters["sentences"] == data.count(b"$")
    assert len(fixes) == 4
    for i, (fix, truth) in enumerate(zip(fixes, truths, strict=True)):
        positioned = "GGA" in rx.sentences or "GNS" in rx.sentences
        assert fix.mode == (3 if positioned or "GSA" in rx.sentences else 2)
        assert fix.lat == pytest.approx(truth.lat, abs=1e-9) and fix.lon == pytest.approx(truth.lon, abs=1e-9)
        if "RMC" in rx.sentences or "ZDA" in rx.sentences:
            assert fix.time_ms == truth.time_ms
        if positioned:
            assert fix.altitude_m == pytest.approx(truth.altitude_m, abs=1e-9)
            assert fix.hdop == pytest.approx(truth.hdop) and fix.satellites_used == truth.satellites_used
        if "RMC" in rx.sentences or "VTG" in rx.sentences:
            assert fix.speed_kmh == pytest.approx(truth.speed_kmh, abs=1e-9)
            assert fix.heading_deg == truth.heading_deg
        if kind in ("RMC", "GGA", "GNS"):
            assert fix.quality == truth.quality
        if kind in ("GSA", "GSV"):
            # The sky sentences of an epoch are in its fix when they came before the sentence that completed it;
            # otherwise the fix carries the previous epoch's (firmware_specs/NMEA_PROFILE.md, epochs).
            source = truths[i] if sat_first else (truths[i - 1] if i else None)
            got = fix.used if kind == "GSA" else fix.in_view
            if source is None:
                assert got is None
                continue
            want = source.used if kind == "GSA" else source.in_view
            assert _system_counts(got) == {s: want.get(s, 0) for s in (1, 2, 3, 4, 5)}
            if kind == "GSA":
                assert (fix.pdop, fix.vdop) == (source.pdop, source.vdop)
                assert fix.beidou_in_use is source.beidou_in_use
        for name, value in fix.signals(CAT).items():
            assert CAT.by_name(name).in_range(value), name


@pytest.mark.parametrize("name", sorted(RECEIVERS))
def test_named_receivers_round_trip(name: str) -> None:
    rx = RECEIVERS[name]
    data, truths = _stream(rx, seed=4, start=T0 + 4000, epochs=4)
    dec = NmeaDecoder()
    fixes = dec.feed(data) + dec.flush()
    assert len(fixes) == 4 and dec.counters["sentences"] == data.count(b"$")
    sat_first = rx.sentences.index("GSA") < max(rx.sentences.index(k) for k in ("RMC", "GGA"))
    for i, fix in enumerate(fixes[1:], start=1):
        truth, sky = truths[i], truths[i if sat_first else i - 1]
        assert fix.time_ms == truth.time_ms and fix.quality == truth.quality == rx.quality
        assert fix.satellites_used == truth.satellites_used
        assert _system_counts(fix.used) == {s: sky.used.get(s, 0) for s in (1, 2, 3, 4, 5)}
        assert _system_counts(fix.in_view) == {s: sky.in_view.get(s, 0) for s in (1, 2, 3, 4, 5)}
        assert fix.beidou_in_use is sky.beidou_in_use
        assert set(fix.signals(CAT)) >= {RX + "PDOP", RX + "FixQuality", RX + "BeiDou.SatellitesInView"}
    if SYSTEM_GPS in rx.systems and SYSTEM_GALILEO in rx.systems:
        assert fixes[-1].in_view is not None and fixes[-1].in_view.galileo > 0


def test_an_older_catalogue_gets_the_signals_it_names() -> None:
    old = Catalogue([s for s in CAT if s.id <= 9])  # the GNSS signals before per-constellation counts existed
    fix, _ = _one_fix(TABLE[7][1])
    assert set(fix.signals(old)) == {s.name for s in old}
    assert fix.signals(old).items() <= fix.signals(CAT).items()
