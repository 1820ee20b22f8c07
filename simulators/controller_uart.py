"""A motor controller on a real serial pty, streaming status from the vehicle model and answering config reads.

The agent opens `emulator.port` with pyserial as it would /dev/ttyS3. Frames are built with the agent's own
sans-I/O codec (edge_agent.devices.controller). Every `period_s` a status frame describes `model.state_at(clock())`:
wheel speed and temperatures come straight from the state; motor rpm is the wheel's rpm for the configured wheel
size (a hub motor turns with the wheel); the battery-side current is the pack's discharge current and the phase
current a fixed multiple of it; the brake is on while the model decelerates, the throttle open in proportion to
the current while it is driven. Config reads are answered at once. Speed limit, wheel size, pole pairs and the
current that means full throttle default to the model's vehicle variant.

Faults, for tests of the client's resilience (all but the device-specific ones are simulators/uart_device.py's,
shared with the BMS emulator):
  noise                  up to this many random bytes of line noise before each frame;
  bad_checksum_every     every Nth frame sent carries a wrong checksum;
  truncate_every         every Nth frame sent is cut off before its end;
  tamper_speed_limit_kmh the config reports this speed limit instead (a derestricted controller);
  stuck                  {quantity: level} of STUCK_QUANTITIES: the controller reports that level whatever the
                         model does — a frozen sensor that keeps talking. Derived values follow it (motor rpm from
                         a stuck speed, phase current from a stuck pack current). Settable while running.
`log` keeps what was sent (bounded), as ground truth; its states carry the stuck levels, as the frames did.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Unpack

from edge_agent.devices.controller import (
    TYPE_CONFIG,
    TYPE_READ_CONFIG,
    TYPE_STATUS,
    ControllerConfig,
    ControllerRequestDecoder,
    ControllerStatus,
    build_config,
    build_status,
    encode_frame,
)
from simulators.uart_device import DeviceOptions, UartDeviceEmulator
from simulators.vehicle import VehicleModel, VehicleState

PHASE_TO_SUPPLY = 1.6  # phase current exceeds the DC current at part duty cycle; a fixed ratio is plausible enough
ACCEL_WINDOW_S = 0.5  # the speed change over this window decides "braking"
BRAKE_DECEL_KMH_S = 0.5
INCH_M = 0.0254
# What a controller measures, as VehicleState names: the quantities that can get stuck in this emulator. Its
# supply current is the pack's discharge current, so a stuck pack_current_a is a stuck current sensor.
STUCK_QUANTITIES = frozenset({"speed_kmh", "motor_temp_c", "controller_temp_c", "pack_current_a"})


@dataclass(frozen=True, slots=True)
class ControllerSent:
    """One frame the emulator sent and what it described."""

    t: float  # model time the frame describes
    type: int  # TYPE_STATUS or TYPE_CONFIG
    payload: bytes  # as built, before any fault was applied
    fault: str  # "" | "bad_checksum" | "truncated" | "write_failed"
    state: VehicleState


class ControllerEmulator(UartDeviceEmulator[ControllerSent]):
    NAME = "controller"
    DEVICE = "a controller"
    STUCK_QUANTITIES = STUCK_QUANTITIES
    CHECKSUM_OFFSET = -3  # the checksum, before the CR LF end
    MIN_TRUNCATED_LEN = 3  # start, type, length

    def __init__(
        self,
        model: VehicleModel,
        *,
        speed_limit_kmh: float | None = None,
        wheel_inch: float | None = None,
        pole_pairs: int | None = None,
        firmware: str = "ZL-C1.4.2",
        assist_level: int = 3,
        faults: int = 0,
        motor_sensor: bool = True,
        period_s: float = 0.2,
        tamper_speed_limit_kmh: float | None = None,
        **options: Unpack[DeviceOptions],
    ) -> None:
        variant = model.variant
        wheel_inch = variant.wheel_inch if wheel_inch is None else wheel_inch
        if period_s <= 0 or wheel_inch <= 0:
            raise ValueError("period_s and wheel_inch must be positive")
        super().__init__(model, **options)
        self.speed_limit_kmh = variant.speed_limit_kmh if speed_limit_kmh is None else speed_limit_kmh
        self.wheel_inch = wheel_inch
        self.pole_pairs = variant.pole_pairs if pole_pairs is None else pole_pairs
        self.max_current_a = variant.controller_max_current_a
        self.idle_current_a = variant.idle_current_a
        self.firmware = firmware
        self.assist_level = assist_level
        self.faults = faults
        self.motor_sensor = motor_sensor
        self.period_s = period_s
        self.tamper_speed_limit_kmh = tamper_speed_limit_kmh
        self.sent = 0  # frames sent (faulty ones included), the base of the every-N faults
        self.config_reads = 0
        self.decoder = ControllerRequestDecoder()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await super().start()
        self._task = asyncio.create_task(self._stream(), name=f"controller-emulator:{self.port}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=2.0)
        await super().stop()

    # -- what the controller would say --------------------------------------------------------------------

    def status(self, state: VehicleState, earlier: VehicleState | None = None) -> ControllerStatus:
        """`earlier`: a state shortly before, if the caller has one (else the model is asked ACCEL_WINDOW_S back)."""
        state = self.measured(state)
        if earlier is None or not 0.0 < state.t - earlier.t <= 2.0:
            earlier = self.model.state_at(state.t - ACCEL_WINDOW_S)
        # From the same sensors: a stuck speed is no acceleration, so it never reads as braking.
        earlier = self.measured(earlier)
        accel_kmh_s = (state.speed_kmh - earlier.speed_kmh) / (state.t - earlier.t)
        supply_a = -state.pack_current_a  # the pack's discharge current is what the controller draws
        braking = accel_kmh_s < -BRAKE_DECEL_KMH_S
        driving = not braking and supply_a > self.idle_current_a + 0.2
        throttle = min(100, round(100 * supply_a / self.max_current_a)) if driving else 0
        # The wheel turns at the speed over ground (not at all while the vehicle is carried); the controller
        # computes its speed from that rpm and its *configured* wheel, which a tampered one has too small.
        ground_kmh = 0.0 if state.carried else state.speed_kmh
        wheel_rpm = ground_kmh / 3.6 / (math.pi * self.wheel_inch * INCH_M) * 60.0
        return ControllerStatus(
            speed_kmh=ground_kmh * (state.wheel_inch_cfg or self.wheel_inch) / self.wheel_inch,
            motor_rpm=round(wheel_rpm),
            phase_current_a=PHASE_TO_SUPPLY * (supply_a - self.idle_current_a),
            supply_current_a=supply_a,
            controller_temp_c=state.controller_temp_c,
            motor_temp_c=state.motor_temp_c if self.motor_sensor else None,
            faults=self.faults,
            brake=braking,
            throttle_pct=max(0, throttle),
            assist_level=self.assist_level,
        )

    def config(self, state: VehicleState | None = None) -> ControllerConfig:
        """The configuration as read out; `state` carries a reconfiguration injected into the model (faults)."""
        limit = self.speed_limit_kmh if self.tamper_speed_limit_kmh is None else self.tamper_speed_limit_kmh
        wheel = self.wheel_inch
        if state is not None:
            limit = state.speed_limit_cfg_kmh or limit
            wheel = state.wheel_inch_cfg or wheel
        return ControllerConfig(
            speed_limit_kmh=limit, wheel_inch=wheel, pole_pairs=self.pole_pairs, firmware=self.firmware
        )

    # -- I/O ----------------------------------------------------------------------------------------------

    async def _stream(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            state = self.measured(self.model.state_at(self.clock()))
            self._send(TYPE_STATUS, build_status(self.status(state)), state)
            next_at += self.period_s
            now = loop.time()
            if next_at < now:
                next_at = now  # a stalled loop does not make up for lost frames with a burst
            await asyncio.sleep(next_at - now)

    def _on_data(self, data: bytes) -> None:
        for request in self.decoder.feed(data):
            if request.type == TYPE_READ_CONFIG:
                self.config_reads += 1
                state = self.measured(self.model.state_at(self.clock()))
                self._send(TYPE_CONFIG, build_config(self.config(state)), state)

    def _send(self, frame_type: int, payload: bytes, state: VehicleState) -> None:
        self.sent += 1
        fault = self._transmit(encode_frame(frame_type, payload), self.sent)
        self.log.append(ControllerSent(state.t, frame_type, payload, fault, state))
