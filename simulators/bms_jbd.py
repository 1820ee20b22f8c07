"""A JBD / Xiaoxiang BMS on a real serial pty, answering from the vehicle model at the instant it is asked.

The agent opens `emulator.port` with pyserial as it would /dev/ttyS2. Requests are decoded with the agent's own
sans-I/O codec (edge_agent.devices.jbd) and answered at once from `model.state_at(clock())`: pack voltage,
current, SOC and temperature come from the model; cell voltages are derived so they sum to the pack voltage
(to the millivolt) spread as the model's cells are. Cell count, probe count, capacity and barcode default to the
model's pack and vehicle variant (13S 24 Ah NMC for the e-bike, 20S 40 Ah for the 72 V motorcycle; LFP packs have
more cells). A swapped-in pack is another pack with its own BMS: its barcode, cells and capacity are the state's.
While the pack is out (`state.battery_present` false) nobody answers.

Faults, for tests of the client's resilience (all but the device-specific ones are simulators/uart_device.py's,
shared with the controller emulator):
  sleep_after_s       the BMS dozes off after this much silence and drops the request that wakes it (also the
                      very first one) — the wake-up quirk of real boards;
  noise               up to this many random bytes of line noise before each answer;
  bad_checksum_every  every Nth answer carries a wrong checksum;
  truncate_every      every Nth answer is cut off before its end byte;
  stuck               {quantity: level} of STUCK_QUANTITIES: the BMS reports that level whatever the model does —
                      a frozen sensor that keeps talking. Derived values follow it (cells still add up to a stuck
                      pack voltage, probes step down from a stuck hottest one). Settable while running.
`log` keeps what was answered (bounded), as ground truth; its states carry the stuck levels, as the answers did.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import dataclass
from typing import Unpack

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
from simulators.uart_device import DeviceOptions, UartDeviceEmulator
from simulators.vehicle import VehicleModel, VehicleState

CELL_SPREAD_MV = 6.0  # amplitude of the per-cell deviation from the mean: a healthy, balanced pack
PROBE_STEP_C = 0.8  # each further NTC reads this much cooler than the hottest one
_PRODUCTION_DATE = dt.date(2024, 3, 18)
# What a BMS measures, as VehicleState names: the quantities that can get stuck in this emulator.
STUCK_QUANTITIES = frozenset({"pack_voltage_v", "pack_current_a", "soc_pct", "battery_temp_max_c"})


@dataclass(frozen=True, slots=True)
class JbdAnswer:
    """One request the emulator saw and what it did about it."""

    t: float  # model time the answer describes (clock() when the request arrived)
    register: int
    status: int
    payload: bytes  # the payload as built, before any fault was applied
    fault: str  # "" | "asleep" | "absent" (both dropped) | "bad_checksum" | "truncated" | "write_failed"
    state: VehicleState


class JbdBmsEmulator(UartDeviceEmulator[JbdAnswer]):
    NAME = "jbd bms"
    DEVICE = "a BMS"
    STUCK_QUANTITIES = STUCK_QUANTITIES
    CHECKSUM_OFFSET = -2  # the checksum's low byte
    MIN_TRUNCATED_LEN = 4  # start, register, status, length

    def __init__(
        self,
        model: VehicleModel,
        cells: int | None = None,
        probes: int | None = None,
        barcode: str | None = None,
        *,
        nominal_ah: float | None = None,
        sleep_after_s: float | None = None,
        **options: Unpack[DeviceOptions],
    ) -> None:
        variant = model.variant
        cells = model.cells if cells is None else cells  # the model's pack: its chemistry sets the cell count
        probes = variant.temperature_probes if probes is None else probes
        if not 1 <= cells <= 32 or not 0 <= probes <= 8:
            raise ValueError("cells must be in 1..32 and probes in 0..8")
        super().__init__(model, **options)
        self.cells = cells
        self.probes = probes
        self.barcode = f"{variant.barcode_prefix}-{model.seed % 1_000_000:06d}" if barcode is None else barcode
        self.nominal_ah = model.nominal_ah if nominal_ah is None else nominal_ah
        self.sleep_after_s = sleep_after_s
        self.answers = 0  # answers sent (faulty ones included), the base of the every-N faults
        self.dropped_asleep = 0
        self.absent = 0  # requests unanswered because the pack was out (a swap)
        self.decoder = JbdRequestDecoder()
        self._cycles = 40 + model.seed % 400
        self._spread = _cell_offsets(cells, model.seed)
        self._own_barcode = model.packs[0].barcode  # the pack the vehicle came with; others bring their own BMS
        self._last_request_mono: float | None = None

    # -- what the BMS would say ---------------------------------------------------------------------------

    def pack_of(self, state: VehicleState) -> tuple[str, int, float]:
        """(barcode, cells, nominal Ah) of the pack in the vehicle at `state`: this emulator's configuration while
        the vehicle's own pack is in, the swapped-in pack's (another pack, another BMS) otherwise."""
        if not state.battery_barcode or state.battery_barcode == self._own_barcode:
            return self.barcode, self.cells, self.nominal_ah
        return state.battery_barcode, state.cell_count or self.cells, state.nominal_ah or self.nominal_ah

    def basic_info(self, state: VehicleState) -> BasicInfo:
        state = self.measured(state)
        _, cells, nominal_ah = self.pack_of(state)
        top = state.battery_temp_max_c
        probes = state.probe_temps_c
        if self.probes and len(probes) >= self.probes and "battery_temp_max_c" not in self._stuck:
            temps = tuple(probes[: self.probes])  # the model's probes (a hot spot shows on its own probe)
        else:
            temps = tuple(top - PROBE_STEP_C * k for k in range(self.probes))
        return BasicInfo(
            voltage_v=state.pack_voltage_v,
            current_a=state.pack_current_a,
            remaining_ah=nominal_ah * state.soc_pct / 100,
            nominal_ah=nominal_ah,
            cycles=self._cycles,
            production_date_raw=production_date_raw(_PRODUCTION_DATE),
            balance_bits=0,
            protection=state.bms_protection,
            version=0x10,
            soc_pct=round(state.soc_pct),
            fet_status=0x03,
            cell_count=cells,
            temperatures_c=temps,
        )

    def cell_millivolts(self, state: VehicleState) -> list[int]:
        """Cell voltages in mV summing exactly to the pack voltage in mV, spread as the model's cells are (else by
        the seed's fixed offsets)."""
        total = round(self.measured(state).pack_voltage_v * 1000)
        cells = self.pack_of(state)[1]
        volts = state.cell_voltages_v
        if len(volts) == cells:
            mean = sum(volts) / cells
            spread = [(v - mean) * 1000 for v in volts]
        else:
            spread = self._spread if cells == self.cells else _cell_offsets(cells, self.model.seed)
        exact = [total / cells + offset for offset in spread]
        mv = [math.floor(x) for x in exact]
        # Hand the rounding remainder, one mV each, to the cells that lost the most to floor().
        by_loss = sorted(range(cells), key=lambda i: mv[i] - exact[i])
        for i in by_loss[: total - sum(mv)]:
            mv[i] += 1
        return mv

    def _payload(self, register: int, state: VehicleState) -> tuple[int, bytes]:
        if register == REG_BASIC_INFO:
            return 0, build_basic_info(self.basic_info(state))
        if register == REG_CELL_VOLTAGES:
            return 0, build_cell_voltages([mv / 1000 for mv in self.cell_millivolts(state)])
        if register == REG_BARCODE:
            return 0, build_barcode(self.pack_of(state)[0])
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
        state = self.measured(self.model.state_at(self.clock()))
        if not state.battery_present:
            # The pack (and its BMS) is out of the vehicle: nobody answers.
            self.absent += 1
            self.log.append(JbdAnswer(state.t, request.register, 0, b"", "absent", state))
            return
        if asleep:
            self.dropped_asleep += 1
            self.log.append(JbdAnswer(state.t, request.register, 0, b"", "asleep", state))
            return
        if request.operation == OP_READ:
            status, payload = self._payload(request.register, state)
        else:
            status, payload = STATUS_ERROR, b""  # this emulator is read-only
        self.answers += 1
        fault = self._transmit(encode_response(request.register, payload, status), self.answers)
        self.log.append(JbdAnswer(state.t, request.register, status, payload, fault, state))


def _cell_offsets(cells: int, seed: int) -> list[float]:
    """Deterministic per-cell deviations (mV) with zero sum, so the cells still add up to the pack."""
    raw = [CELL_SPREAD_MV * math.sin(2.4 * i + seed % 997) for i in range(cells)]
    mean = sum(raw) / cells
    return [r - mean for r in raw]
