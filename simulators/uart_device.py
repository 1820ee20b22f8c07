"""What the UART device emulators (simulators/bms_jbd.py, simulators/controller_uart.py) share.

Each is a device on a real serial pty (`PtyPort`) that describes `model.state_at(clock())`; what this base holds is
everything about that which is not the device's protocol:
  - the pty's life cycle (`start`, `stop`, `port`) — a subclass only says what to do with the bytes it receives;
  - sensors that get stuck: `stuck` maps quantities of the subclass's STUCK_QUANTITIES (VehicleState names) to the
    level the device keeps reporting whatever the model does; `measured(state)` is the state as its sensors see it;
  - line faults on every frame it sends, counted per frame sent (the subclass keeps the count): every
    `bad_checksum_every`-th frame has one checksum byte flipped, every `truncate_every`-th is cut off before its
    end, and up to `noise` random bytes of line noise (seeded by the model) go before each one;
  - a failed write (nobody drains the pty) is counted in `write_failures`, never waited for.
`log` keeps what the device sent or dropped (bounded): the subclass's own record type.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Generic, TypedDict, TypeVar

from simulators.pty_port import PtyPort
from simulators.vehicle import VehicleModel, VehicleState

__all__ = ["DeviceOptions", "UartDeviceEmulator"]

EntryT = TypeVar("EntryT")


class DeviceOptions(TypedDict, total=False):
    """The keyword arguments every UART device emulator takes besides its own (see UartDeviceEmulator)."""

    noise: int
    bad_checksum_every: int
    truncate_every: int
    stuck: Mapping[str, float] | None
    clock: Callable[[], float]
    log_maxlen: int


class UartDeviceEmulator(Generic[EntryT]):
    """Base of a device emulator on a pty; subclasses set the class constants and implement `_on_data`."""

    NAME: ClassVar[str]  # how its log names it: "<NAME> emulator started"
    DEVICE: ClassVar[str]  # how errors name it: "<DEVICE> cannot have ... stuck"
    STUCK_QUANTITIES: ClassVar[frozenset[str]]  # what it measures, as VehicleState names
    CHECKSUM_OFFSET: ClassVar[int]  # index (from the frame's end) of the byte a bad-checksum fault flips
    MIN_TRUNCATED_LEN: ClassVar[int]  # a truncated frame keeps at least this many bytes (its header)

    _stuck: dict[str, Any]

    def __init__(
        self,
        model: VehicleModel,
        *,
        noise: int = 0,
        bad_checksum_every: int = 0,
        truncate_every: int = 0,
        stuck: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.time,
        log_maxlen: int = 1000,
    ) -> None:
        self.model = model
        self.noise = noise
        self.bad_checksum_every = bad_checksum_every
        self.truncate_every = truncate_every
        self.stuck = stuck or {}
        self.clock = clock
        self.log: deque[EntryT] = deque(maxlen=log_maxlen)
        self.write_failures = 0
        self.port = ""
        self._rng = random.Random(model.seed)
        self._pty = PtyPort(on_data=self._on_data)
        # The subclass's module names the logger, as if each emulator logged on its own.
        self._log = logging.getLogger(type(self).__module__)

    async def start(self) -> None:
        if self._pty.is_open:
            raise RuntimeError("emulator already started")
        self.port = self._pty.open()
        self._log.info(f"{self.NAME} emulator started", extra={"port": self.port})

    async def stop(self) -> None:
        self._pty.close()

    @property
    def stuck(self) -> dict[str, float]:
        return dict(self._stuck)

    @stuck.setter
    def stuck(self, levels: Mapping[str, float]) -> None:
        unknown = set(levels) - self.STUCK_QUANTITIES
        if unknown:
            raise ValueError(
                f"{self.DEVICE} cannot have {sorted(unknown)} stuck; it measures {sorted(self.STUCK_QUANTITIES)}"
            )
        # Any: every STUCK_QUANTITIES field is a float, which mypy cannot tell from VehicleState's int ones.
        self._stuck = {name: float(level) for name, level in levels.items()}

    def measured(self, state: VehicleState) -> VehicleState:
        """The model's state as this device's sensors see it: stuck quantities at their levels."""
        return dataclasses.replace(state, **self._stuck) if self._stuck else state

    def _on_data(self, data: bytes) -> None:
        """Called on the loop with each chunk the client writes to the port."""
        raise NotImplementedError

    def _transmit(self, frame: bytes, nth: int) -> str:
        """Send `frame`, the `nth` frame this device sends (from 1), with the configured line faults.

        Returns what went wrong with it: "" | "bad_checksum" | "truncated" | "write_failed".
        """
        wire = bytearray(frame)
        fault = ""
        if self.bad_checksum_every and nth % self.bad_checksum_every == 0:
            wire[self.CHECKSUM_OFFSET] ^= 0x5A
            fault = "bad_checksum"
        elif self.truncate_every and nth % self.truncate_every == 0:
            del wire[max(self.MIN_TRUNCATED_LEN, len(wire) // 2) :]
            fault = "truncated"
        noise = bytes(self._rng.randrange(256) for _ in range(self._rng.randint(0, self.noise)))
        if not self._pty.write(noise + wire):  # nobody drains the pty; the client will time out and retry
            self.write_failures += 1
            return "write_failed"
        return fault
