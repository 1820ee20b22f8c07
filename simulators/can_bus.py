"""The BMS and the motor controller of one vehicle on its CAN bus, driven by the vehicle model.

Every frame of the profile (firmware_specs/CAN.md) goes out at its DBC period, built with the agent's own codec
(edge_agent.devices.can_codec) from `model.state_at(clock())`. The values are those the UART emulators report for
the same instant: this emulator asks a `JbdBmsEmulator` and a `ControllerEmulator` of the same model (never
started; only their value methods are used) for basic info, cell voltages, status and config, so a vehicle reads
the same over UART and CAN. Where CAN carries more than the JBD registers (SOC to 0.1 %, SOH), it comes from the
model directly. The profile variant follows the model's vehicle kind ("ebike48" → 48v, "emoto72" → 72v) unless
given.

Two ways onto a bus:
  transport="virtual"  python-can's in-process virtual bus on `channel` (fast unit tests);
  transport="slcan"    an slcan adapter on a pty (`port`), as a USB-CAN dongle on the board would be — the
                       cross-process path. `unplug()` / `replug()` take the adapter away and bring it back.

Faults, for tests of the client's resilience:
  garble_every   every Nth frame line is replaced by a garbled one (slcan only; the kinds rotate: truncated line,
                 non-hex digits, non-ASCII line noise);
  bad_dlc_every  every Nth frame goes out with 3 data bytes instead of 8 (a valid CAN frame of the wrong length);
  stuck_at       while set (model time), every frame describes that instant: a sensor that froze but keeps
                 talking.
`log` keeps what was sent (bounded), as ground truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_agent.devices.can_codec import CanCodec, CanFrameError
from protocol.catalogue import Value
from simulators.bms_jbd import JbdBmsEmulator
from simulators.can_slcan import SlcanFrame, SlcanPtyAdapter
from simulators.controller_uart import ControllerEmulator
from simulators.vehicle import VehicleModel, VehicleState

log = logging.getLogger("zhilian.sim.can")

# The CAN profile variant (firmware_specs/CAN.md) each vehicle kind of simulators/vehicle.py speaks.
CAN_VARIANT_OF = {"ebike48": "48v", "emoto72": "72v"}
B = "Powertrain.TractionBattery."
M = "Powertrain.ElectricMotor."
_GARBLED = (b"t30", b"t3008ZZ", bytes(range(0x80, 0x88)))  # truncated line, non-hex digits, non-ASCII noise


@dataclass(frozen=True, slots=True)
class CanSent:
    """One frame the emulator put on the bus and what it described."""

    t: float  # model time the frame describes
    message: str
    group: int | None
    values: dict[str, Value]  # catalogue names, physical values before the DBC's quantisation
    fault: str  # "" | "garbled" | "bad_dlc" | "not_sent" (adapter closed/unplugged or bus full) | "unencodable"
    state: VehicleState


class CanVehicleEmulator:
    def __init__(
        self,
        model: VehicleModel,
        *,
        variant: str | None = None,
        transport: str = "virtual",
        channel: str = "zhilian-vehicle-can",
        bms: JbdBmsEmulator | None = None,
        controller: ControllerEmulator | None = None,
        garble_every: int = 0,
        bad_dlc_every: int = 0,
        clock: Callable[[], float] = time.time,
        log_maxlen: int = 5000,
    ) -> None:
        if transport not in ("virtual", "slcan"):
            raise ValueError("transport must be 'virtual' or 'slcan'")
        if garble_every and transport != "slcan":
            raise ValueError("garbled lines exist only on an slcan link")
        self.model = model
        # The vehicle's kind picks the profile unless told otherwise (a test may speak 72v for an e-bike).
        self.variant = variant or CAN_VARIANT_OF[model.variant.name]
        self.transport = transport
        self.channel = channel
        self.codec = CanCodec(self.variant)
        self.bms = bms or JbdBmsEmulator(model)
        self.controller = controller or ControllerEmulator(model)
        self.garble_every = garble_every
        self.bad_dlc_every = bad_dlc_every
        self.stuck_at: float | None = None
        self.clock = clock
        self.log: deque[CanSent] = deque(maxlen=log_maxlen)
        self.sent = 0  # frames built (faulty ones included), the base of the every-N faults
        self.not_sent = 0
        self.unencodable = 0  # frames whose values the profile cannot carry (outside its ranges): not sent
        self._slcan = SlcanPtyAdapter() if transport == "slcan" else None
        self._bus: Any = None  # can.BusABC of the virtual transport
        self._task: asyncio.Task[None] | None = None
        # Frames grouped by period: one timer per period, every frame of it from the same instant.
        periods: dict[float, list[str]] = {}
        for name in self.codec.messages:
            periods.setdefault(self.codec.period_s(name), []).append(name)
        self._periods = periods

    @property
    def port(self) -> str:
        """The slcan adapter's pty path (slcan transport only)."""
        return self._slcan.port if self._slcan is not None else ""

    @property
    def adapter_open(self) -> bool:
        """True while the host has the slcan channel open (always True on the virtual bus once started)."""
        if self._slcan is None:
            return self._bus is not None
        return self._slcan.plugged and self._slcan.adapter.is_open

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("emulator already started")
        if self._slcan is not None:
            self._slcan.open()
        else:
            import can

            self._bus = can.Bus(interface="virtual", channel=self.channel)
        self._task = asyncio.create_task(self._run(), name=f"can-emulator:{self.port or self.channel}")
        log.info(
            "can emulator started", extra={"transport": self.transport, "port": self.port, "variant": self.variant}
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        if self._slcan is not None:
            self._slcan.close()
        if self._bus is not None:
            self._bus.shutdown()
            self._bus = None

    def unplug(self) -> None:
        """The USB adapter is pulled out: its pty vanishes under the host. Frames meanwhile are lost."""
        if self._slcan is None:
            raise RuntimeError("only an slcan adapter can be unplugged")
        self._slcan.close()

    def replug(self) -> str:
        """The adapter comes back (on a new pty, as a re-enumerated device would); returns its path."""
        if self._slcan is None:
            raise RuntimeError("only an slcan adapter can be plugged in")
        return self._slcan.open()

    # -- what the devices would say -----------------------------------------------------------------------

    def frames(self, state: VehicleState, messages: list[str]) -> list[tuple[str, int | None, dict[str, Value]]]:
        """(message, multiplexer value, catalogue values) of every frame of `messages` describing `state`."""
        out: list[tuple[str, int | None, dict[str, Value]]] = []
        # With the pack out (a swap) its BMS is off the bus.
        bms = self._bms_values(state) if state.battery_present and any(m.startswith("BMS_") for m in messages) else {}
        mc = self._controller_values(state) if any(m.startswith("MC_") for m in messages) else {}
        values = {**bms, **mc}
        for message in messages:
            groups: list[int | None] = list(self.codec.groups(message)) or [None]
            for group in groups:
                names = self.codec.signals(message, group)
                carried = {n: values[n] for n in names if n in values}
                if not carried and (group is not None or not state.battery_present):
                    continue  # cells or probes this pack does not have, or a pack that is out: off the bus
                out.append((message, group, carried))
        return out

    def _bms_values(self, state: VehicleState) -> dict[str, Value]:
        info = self.bms.basic_info(state)
        cells = [mv / 1000 for mv in self.bms.cell_millivolts(state)]
        values: dict[str, Value] = {
            B + "CurrentVoltage": info.voltage_v,
            B + "CurrentCurrent": info.current_a,
            B + "StateOfCharge": state.soc_pct,
            B + "ProtectionStatus": info.protection,
            B + "StateOfHealth": state.soh_pct,
            B + "CycleCount": info.cycles,
            B + "CellCount": info.cell_count,
            B + "RemainingCapacity": info.remaining_ah,
            B + "NominalCapacity": info.nominal_ah,
            B + "CellVoltage.Max": max(cells),
            B + "CellVoltage.Min": min(cells),
        }
        temps = info.temperatures_c
        if temps:
            values[B + "Temperature.Max"] = max(temps)
            values[B + "Temperature.Min"] = min(temps)
        for i, v in enumerate(cells, start=1):
            values[f"{B}CellVoltage.Cell{i}"] = v
        for i, t in enumerate(temps, start=1):
            values[f"{B}Temperature.Probe{i}"] = t
        return values

    def _controller_values(self, state: VehicleState) -> dict[str, Value]:
        st = self.controller.status(state)
        cfg = self.controller.config(state)
        values: dict[str, Value] = {
            "Speed": st.speed_kmh,
            M + "Speed": st.motor_rpm,
            M + "PhaseCurrent": st.phase_current_a,
            M + "SupplyCurrent": st.supply_current_a,
            M + "ControllerTemperature": st.controller_temp_c,
            M + "FaultCode": st.faults,
            "Chassis.Accelerator.PedalPosition": st.throttle_pct,
            M + "AssistLevel": st.assist_level,
            "Chassis.Brake.IsEngaged": st.brake,
            M + "ConfiguredSpeedLimit": cfg.speed_limit_kmh,
            "Chassis.Wheel.Size": cfg.wheel_inch,
            M + "PolePairs": cfg.pole_pairs,
        }
        if st.motor_temp_c is not None:
            values[M + "Temperature"] = st.motor_temp_c
        return values

    # -- I/O ----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        due = dict.fromkeys(self._periods, start)
        while True:
            now = loop.time()
            ready = [p for p, at in due.items() if at <= now]
            if ready:
                t = self.clock() if self.stuck_at is None else self.stuck_at
                state = self.model.state_at(t)
                for period in ready:
                    for message, group, values in self.frames(state, self._periods[period]):
                        self._send(message, group, values, state)
                    due[period] += period
                    if due[period] < now:
                        due[period] = now + period  # a stalled loop does not make up for lost frames with a burst
            await asyncio.sleep(max(0.0, min(due.values()) - loop.time()))

    def _send(self, message: str, group: int | None, values: dict[str, Value], state: VehicleState) -> None:
        try:
            frame_id, data = self.codec.encode(message, values, group)
        except CanFrameError as exc:
            # A model outside the profile's ranges (e.g. a 72 V pack on the 48v profile) is a test set-up error;
            # it is counted and logged, and the emulator keeps sending its other frames.
            self.unencodable += 1
            if self.unencodable == 1:
                log.error("frame not encodable", extra={"message": message, "error": str(exc)})
            self.log.append(CanSent(state.t, message, group, values, "unencodable", state))
            return
        self.sent += 1
        fault = ""
        if self.bad_dlc_every and self.sent % self.bad_dlc_every == 0:
            data = data[:3]
            fault = "bad_dlc"
        if self.garble_every and self.sent % self.garble_every == 0:
            kind = _GARBLED[(self.sent // self.garble_every) % len(_GARBLED)]
            ok = self._slcan is not None and self._slcan.write_raw(kind + b"\r")
            fault = "garbled"
        else:
            ok = self._put(frame_id, data)
        if not ok:
            self.not_sent += 1
            fault = "not_sent"
        self.log.append(CanSent(state.t, message, group, values, fault, state))

    def _put(self, frame_id: int, data: bytes) -> bool:
        if self._slcan is not None:
            return self._slcan.send_frame(SlcanFrame(frame_id, data))
        import can

        try:
            # timeout=0: a receiver that stopped reading has a full queue, and the emulator must never block.
            self._bus.send(can.Message(arbitration_id=frame_id, data=data, is_extended_id=False), timeout=0)
        except can.CanError:
            return False
        return True


def within_resolution(codec: CanCodec, name: str, got: Value, sent: Value) -> bool:
    """True when `got` is what a frame carrying `sent` decodes to: within half the DBC factor (plus float noise).

    The ground-truth check of the tests: the emulator logs values before quantisation, the agent sees them after.
    """
    if isinstance(sent, bool | str) or isinstance(got, bool | str):
        return got == sent
    step = codec.resolution(name)
    res = codec.catalogue.by_name(name).resolution or 0.0
    # A catalogue resolution coarser than the DBC factor rounds once more after scaling: both halves add up.
    slack = step / 2 + (res / 2 if res > step else 0.0)
    return math.isclose(float(got), float(sent), rel_tol=0.0, abs_tol=slack + 1e-9)
