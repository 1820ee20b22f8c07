"""A JBD / Xiaoxiang BMS on a real serial pty, answering from the vehicle model at the instant it is asked.

The agent opens `emulator.port` with pyserial as it would /dev/ttyS2. Requests are decoded with the agent's own
sans-I/O codec (edge_agent.devices.jbd) and answered at once from `model.state_at(clock())`: pack voltage,
current, SOC and temperature come from the model; cell voltages are derived so they sum to the pack voltage
(to the millivolt) with a small per-cell spread fixed by the model's seed. Cell count, probe count, capacity and
barcode default to the model's vehicle variant (13S 24 Ah for the e-bike, 20S 40 Ah for the 72 V motorcycle).

Faults, for tests of the client's resilience:
  sleep_after_s       the BMS dozes off after this much silence and drops the request that wakes it (also the
                      very first one) — the wake-up quirk of real boards;
  noise               up to this many random bytes of line noise before each answer;
  bad_checksum_every  every Nth answer carries a wrong checksum;
  truncate_every      every Nth answer is cut off before its end byte.
`log` keeps what was answered (bounded), as ground truth.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.devices.jbd import (
    OP_READ,
    REG_BARCODE,
    REG_BASIC_INFO,
    REG_CELL_VOLTAGES,
    STATUS_ERROR,
    BasicInfo,
    JbdRequest,
    JbdRequestDecoder,
    build_barcode,
    build_basic_info,
    build_cell_voltages,
    encode_response,
    production_date_raw,
)
from simulators.pty_port import PtyPort
from simulators.vehicle import VehicleModel, VehicleState

log = logging.getLogger(__name__)

CELL_SPREAD_MV = 6.0  # amplitude of the per-cell deviation from the mean: a healthy, balanced pack
PROBE_STEP_C = 0.8  # each further NTC reads this much cooler than the hottest one
_PRODUCTION_DATE = dt.date(2024, 3, 18)


@dataclass(frozen=True, slots=True)
class JbdAnswer:
    """One request the emulator saw and what it did about it."""

    t: float  # model time the answer describes (clock() when the request arrived)
    register: int
    status: int
    payload: bytes  # the payload as built, before any fault was applied
    fault: str  # "" | "asleep" (dropped) | "bad_checksum" | "truncated" | "write_failed"
    state: VehicleState


class JbdBmsEmulator:
    def __init__(
        self,
        model: VehicleModel,
        cells: int | None = None,
        probes: int | None = None,
        barcode: str | None = None,
        *,
        nominal_ah: float | None = None,
        sleep_after_s: float | None = None,
        noise: int = 0,
        bad_checksum_every: int = 0,
        truncate_every: int = 0,
        clock: Callable[[], float] = time.time,
        log_maxlen: int = 1000,
    ) -> None:
        variant = model.variant
        cells = variant.cells_in_series if cells is None else cells
        probes = variant.temperature_probes if probes is None else probes
        if not 1 <= cells <= 32 or not 0 <= probes <= 8:
            raise ValueError("cells must be in 1..32 and probes in 0..8")
        self.model = model
        self.cells = cells
        self.probes = probes
        self.barcode = f"{variant.barcode_prefix}-{model.seed % 1_000_000:06d}" if barcode is None else barcode
        self.nominal_ah = variant.nominal_ah if nominal_ah is None else nominal_ah
        self.sleep_after_s = sleep_after_s
        self.noise = noise
        self.bad_checksum_every = bad_checksum_every
        self.truncate_every = truncate_every
        self.clock = clock
        self.log: deque[JbdAnswer] = deque(maxlen=log_maxlen)
        self.answers = 0  # answers sent (faulty ones included), the base of the every-N faults
        self.dropped_asleep = 0
        self.write_failures = 0
        self.port = ""
        self.decoder = JbdRequestDecoder()
        self._rng = random.Random(model.seed)
        self._cycles = 40 + model.seed % 400
        self._spread = _cell_offsets(cells, model.seed)
        self._last_request_mono: float | None = None
        self._pty = PtyPort(on_data=self._on_data)

    async def start(self) -> None:
        if self._pty.is_open:
            raise RuntimeError("emulator already started")
        self.port = self._pty.open()
        log.info("jbd bms emulator started", extra={"port": self.port})

    async def stop(self) -> None:
        self._pty.close()

    # -- what the BMS would say ---------------------------------------------------------------------------

    def basic_info(self, state: VehicleState) -> BasicInfo:
        top = state.battery_temp_max_c
        return BasicInfo(
            voltage_v=state.pack_voltage_v,
            current_a=state.pack_current_a,
            remaining_ah=self.nominal_ah * state.soc_pct / 100,
            nominal_ah=self.nominal_ah,
            cycles=self._cycles,
            production_date_raw=production_date_raw(_PRODUCTION_DATE),
            balance_bits=0,
            protection=0,
            version=0x10,
            soc_pct=round(state.soc_pct),
            fet_status=0x03,
            cell_count=self.cells,
            temperatures_c=tuple(top - PROBE_STEP_C * k for k in range(self.probes)),
        )

    def cell_millivolts(self, state: VehicleState) -> list[int]:
        """Cell voltages in mV summing exactly to the pack voltage in mV, spread by the seed's fixed offsets."""
        total = round(state.pack_voltage_v * 1000)
        exact = [total / self.cells + offset for offset in self._spread]
        mv = [math.floor(x) for x in exact]
        # Hand the rounding remainder, one mV each, to the cells that lost the most to floor().
        by_loss = sorted(range(self.cells), key=lambda i: mv[i] - exact[i])
        for i in by_loss[: total - sum(mv)]:
            mv[i] += 1
        return mv

    def _payload(self, register: int, state: VehicleState) -> tuple[int, bytes]:
        if register == REG_BASIC_INFO:
            return 0, build_basic_info(self.basic_info(state))
        if register == REG_CELL_VOLTAGES:
            return 0, build_cell_voltages([mv / 1000 for mv in self.cell_millivolts(state)])
        if register == REG_BARCODE:
            return 0, build_barcode(self.barcode)
        return STATUS_ERROR, b""

    # -- I/O ----------------------------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        for request in self.decoder.feed(data):
            self._answer(request)

    def _answer(self, request: JbdRequest) -> None:
        now_mono = time.monotonic()
        asleep = self.sleep_after_s is not None and (
            self._last_request_mono is None or now_mono - self._last_request_mono > self.sleep_after_s
        )
        self._last_request_mono = now_mono  # any request, even a dropped one, wakes the board
        state = self.model.state_at(self.clock())
        if asleep:
            self.dropped_asleep += 1
            self.log.append(JbdAnswer(state.t, request.register, 0, b"", "asleep", state))
            return
        if request.operation == OP_READ:
            status, payload = self._payload(request.register, state)
        else:
            status, payload = STATUS_ERROR, b""  # this emulator is read-only
        frame = bytearray(encode_response(request.register, payload, status))
        self.answers += 1
        fault = ""
        if self.bad_checksum_every and self.answers % self.bad_checksum_every == 0:
            frame[-2] ^= 0x5A
            fault = "bad_checksum"
        elif self.truncate_every and self.answers % self.truncate_every == 0:
            del frame[max(4, len(frame) // 2) :]
            fault = "truncated"
        noise = bytes(self._rng.randrange(256) for _ in range(self._rng.randint(0, self.noise)))
        if not self._write(noise + frame):
            fault = "write_failed"
        self.log.append(JbdAnswer(state.t, request.register, status, payload, fault, state))

    def _write(self, data: bytes) -> bool:
        if not self._pty.write(data):  # nobody drains the pty; the client will retry
            self.write_failures += 1
            return False
        return True


def _cell_offsets(cells: int, seed: int) -> list[float]:
    """Deterministic per-cell deviations (mV) with zero sum, so the cells still add up to the pack."""
    raw = [CELL_SPREAD_MV * math.sin(2.4 * i + seed % 997) for i in range(cells)]
    mean = sum(raw) / cells
    return [r - mean for r in raw]
