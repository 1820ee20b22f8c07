"""Signed commands on the board: the gate that decides (sans-I/O), the persisted control state, and the executor.

The gate checks a received command in this order; the first check that fails names the rejection reason:

    1  wire layout (protocol.commands.parse_command)                    malformed
    2  key id among the trusted cloud keys, signature verifies          forged
    3  target VIN is this vehicle's                                     misaddressed
    4  command id (the nonce) already seen                              replayed
    5  expires_ms + skew < now                                          expired
    6  issued_ms > now + skew, expires_ms <= issued_ms,
       or expires_ms > now + max horizon                                bad_validity
    7  replay cache full                                                overloaded
    8  name and args (protocol.commands.check_args)                     unknown_command / malformed

Every rejection is logged and counted per reason. Acks: a command that passed 1-4 is acked — "rejected" with the
reason for 5-8, "done" or "failed" once acted on; from step 7 on its id is remembered, so it is acked once (an
expired or out-of-window command is not remembered and is acked "rejected" again should it arrive again — the cloud
keeps the first ack). Forged, misaddressed, unparseable and replayed commands get none: their command id is not ours
to answer (or was answered already — the first ack is in the durable spool).

Replay cache: the nonce of every command that passed 1-7 is remembered until its expiry (plus the skew) and
persisted, with the control state, before the command is acted on — a restart never re-accepts it, and a crash
between persisting and acting loses the action rather than doubling it. Step 6 keeps the cache bounded in time
(nothing is remembered longer than the horizon), `max_seen` bounds it in size.

Control state (persisted in state_dir/control.json, written atomically): `locked` (lock/unlock), the active
sampling `profile` (set_profile), and `speed_limit_report_s` (speed_limit_report). speed_limit_report semantics:
while `interval_s` > 0 the agent adds, every `interval_s` seconds and once right after the command, one telemetry
sample holding the latest controller values of Powertrain.ElectricMotor.ConfiguredSpeedLimit and
Chassis.Wheel.Size, whatever the sampling profile says (these configuration values rarely change, so deadband
sampling would otherwise hide them), and the status report carries the same two values; 0 switches it off.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from protocol import ed25519, signing
from protocol.commands import (
    COMMAND_ID_LEN,
    PROFILE_RE,
    AckStatus,
    ArgValue,
    Command,
    CommandAck,
    CommandName,
    check_args,
    parse_command,
)
from protocol.errors import DecodeError, ProtocolError, SignatureError

log = logging.getLogger("zhilian.agent.commands")

CONTROL_STATE_FILE = "control.json"
# set_profile {profile: "auto"} lifts a commanded profile: the agent picks it from the vehicle's state again.
AUTO_PROFILE = "auto"
_STATE_VERSION = 1


class Reason(enum.StrEnum):
    MALFORMED = "malformed"
    FORGED = "forged"
    MISADDRESSED = "misaddressed"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    BAD_VALIDITY = "bad_validity"
    OVERLOADED = "overloaded"
    UNKNOWN_COMMAND = "unknown_command"


class ControlStateError(Exception):
    """control.json or the cloud key file exists but cannot be read, holds garbage, or is writable by others."""


# --- trusted cloud keys --------------------------------------------------------------------------------------


def load_cloud_keys(path: str | Path, backend: ed25519.Ed25519Backend | None = None) -> dict[bytes, bytes]:
    """Trusted cloud public keys (key id → raw key) from a file of base64 raw Ed25519 keys, one per line.

    Several lines make rotation simple: install the new key next to the old one, then remove the old one once the
    cloud signs with the new key. `#` starts a comment. A file others may write is refused: whoever can add a line
    can command the vehicle.
    """
    import base64
    import binascii

    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ControlStateError(f"cannot read cloud key file {path}: {exc}") from None
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlStateError(f"cloud key file {path} is writable by group/others; chmod 644 it")
    keys: dict[bytes, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            raw = base64.b64decode(entry, validate=True)
            signing.load_public_key(raw, backend)
        except (binascii.Error, ValueError, SignatureError) as exc:
            raise ControlStateError(f"{path}:{number}: not a base64 Ed25519 public key ({exc})") from None
        keys[signing.key_id_for(raw)] = raw
    if not keys:
        raise ControlStateError(f"cloud key file {path} holds no key")
    return keys


# --- persisted control state ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ControlState:
    locked: bool = False
    profile: str | None = None
    speed_limit_report_s: int = 0
    # Replay cache: command id → its expires_ms. Shared with the gate, which adds and prunes entries.
    seen: dict[bytes, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _STATE_VERSION,
                "locked": self.locked,
                "profile": self.profile,
                "speed_limit_report_s": self.speed_limit_report_s,
                "seen": {k.hex(): v for k, v in self.seen.items()},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ControlState:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict) or doc.get("version") != _STATE_VERSION:
                raise ValueError(
                    f"unknown control state version {doc.get('version') if isinstance(doc, dict) else doc!r}"
                )
            locked, profile, interval = doc["locked"], doc["profile"], doc["speed_limit_report_s"]
            if not isinstance(locked, bool):
                raise ValueError("locked must be a boolean")
            if profile is not None and (not isinstance(profile, str) or not PROFILE_RE.match(profile)):
                raise ValueError("profile must be null or a profile name")
            if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
                raise ValueError("speed_limit_report_s must be a non-negative integer")
            seen: dict[bytes, int] = {}
            for k, v in dict(doc["seen"]).items():
                nonce = bytes.fromhex(k)
                if len(nonce) != COMMAND_ID_LEN or isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"bad replay cache entry {k!r}")
                seen[nonce] = v
        except (ValueError, KeyError, TypeError) as exc:
            raise ControlStateError(f"control state is unreadable: {exc}") from None
        return cls(locked, profile, interval, seen)


class ControlStateFile:
    """control.json in the agent's state dir: read at start, rewritten atomically (write, fsync, rename) on change."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / CONTROL_STATE_FILE

    def load(self) -> ControlState:
        if not self.path.exists():
            return ControlState()
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ControlStateError(f"cannot read {self.path}: {exc}") from None
        try:
            return ControlState.from_json(text)
        except ControlStateError as exc:
            # Never silently start afresh: an empty replay cache would accept every recent command again.
            raise ControlStateError(f"{self.path}: {exc}; fix or remove it deliberately") from None

    def save(self, state: ControlState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, state.to_json().encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --- the gate (sans-I/O) -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """The gate's decision. `command` is set once the command verified and was addressed to us (it gets an ack)."""

    reason: Reason | None
    detail: str = ""
    command: Command | None = None
    name: CommandName | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def ackable(self) -> bool:
        return self.command is not None


class CommandGate:
    def __init__(
        self,
        vin: str,
        trusted_keys: Mapping[bytes, bytes],
        seen: dict[bytes, int] | None = None,
        *,
        skew_ms: int = 30_000,
        horizon_ms: int = 7 * 86_400_000,
        max_seen: int = 4096,
        backend: ed25519.Ed25519Backend | None = None,
    ) -> None:
        if skew_ms < 0 or horizon_ms <= 0 or max_seen < 1:
            raise ValueError("skew_ms must be >= 0, horizon_ms and max_seen positive")
        self.vin = vin
        self.trusted_keys = dict(trusted_keys)
        self.seen = seen if seen is not None else {}
        self.skew_ms = skew_ms
        self.horizon_ms = horizon_ms
        self.max_seen = max_seen
        self.backend = backend  # the Ed25519 implementation commands are verified with (None: the default)
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def prune(self, now_ms: int) -> None:
        """Forget nonces whose command can no longer pass the expiry check anyway."""
        for nonce in [n for n, expires in self.seen.items() if expires + self.skew_ms < now_ms]:
            del self.seen[nonce]

    def check(self, payload: bytes, now_ms: int) -> Verdict:
        verdict = self._check(payload, now_ms)
        if verdict.reason is None:
            self.accepted += 1
        else:
            self.rejected[verdict.reason.value] += 1
            cmd = verdict.command
            log.warning(
                "command rejected",
                extra={
                    "reason": verdict.reason.value,
                    "detail": verdict.detail[:200],
                    "command_id": cmd.command_id.hex() if cmd else None,
                    "command": cmd.name if cmd else None,
                },
            )
        return verdict

    def _check(self, payload: bytes, now_ms: int) -> Verdict:
        try:
            signed = parse_command(payload)
        except DecodeError as exc:
            return Verdict(Reason.MALFORMED, str(exc))
        try:
            cmd = signed.verify(self.trusted_keys, self.backend)
        except SignatureError as exc:
            return Verdict(Reason.FORGED, str(exc))
        if cmd.vin != self.vin:
            return Verdict(Reason.MISADDRESSED, f"command for {cmd.vin}")
        self.prune(now_ms)
        if cmd.command_id in self.seen:
            return Verdict(Reason.REPLAYED, f"command id {cmd.command_id.hex()} seen before")
        if cmd.expires_ms + self.skew_ms < now_ms:
            return Verdict(Reason.EXPIRED, f"expired {now_ms - cmd.expires_ms} ms ago", cmd)
        if cmd.issued_ms > now_ms + self.skew_ms:
            return Verdict(Reason.BAD_VALIDITY, "issued in the future (clock skew?)", cmd)
        if cmd.expires_ms <= cmd.issued_ms:
            return Verdict(Reason.BAD_VALIDITY, "expires before it was issued", cmd)
        if cmd.expires_ms > now_ms + self.horizon_ms:
            return Verdict(Reason.BAD_VALIDITY, f"expiry beyond the {self.horizon_ms} ms horizon", cmd)
        if len(self.seen) >= self.max_seen:
            return Verdict(Reason.OVERLOADED, f"replay cache holds {len(self.seen)} unexpired commands", cmd)
        self.seen[cmd.command_id] = cmd.expires_ms
        try:
            name = check_args(cmd.name, cmd.args)
        except ProtocolError as exc:
            reason = Reason.UNKNOWN_COMMAND if exc.reason == "unknown_command" else Reason.MALFORMED
            return Verdict(reason, str(exc), cmd)
        return Verdict(None, "", cmd, name)

    def counters(self) -> dict[str, int]:
        return {"accepted": self.accepted, **{r.value: self.rejected[r.value] for r in Reason}}


def apply_command(state: ControlState, name: CommandName, args: Mapping[str, ArgValue]) -> tuple[ControlState, str]:
    """The new control state after an accepted command (a copy; `seen` is shared), and the ack's detail."""
    if name is CommandName.LOCK:
        return replace(state, locked=True), "locked" if not state.locked else "already locked"
    if name is CommandName.UNLOCK:
        return replace(state, locked=False), "unlocked" if state.locked else "already unlocked"
    if name is CommandName.SET_PROFILE:
        profile = str(args["profile"])
        if profile == AUTO_PROFILE:
            return replace(state, profile=None), "profile chosen from the vehicle's state"
        return replace(state, profile=profile), f"profile {profile}"
    if name is CommandName.SPEED_LIMIT_REPORT:
        interval = int(args["interval_s"])
        detail = f"speed limit report every {interval} s" if interval else "speed limit report off"
        return replace(state, speed_limit_report_s=interval), detail
    return state, ""  # SNAPSHOT changes no state; the executor takes the sample


# --- the executor (async shell) ------------------------------------------------------------------------------


class CommandExecutor:
    """Runs the gate, persists, acts and acks. Persisting runs on a worker thread (an fsync must not stall the loop).

    `snapshot()` takes and spools an immediate sample and returns the ack's detail; `send_ack` spools an ack;
    `on_change(old, new)` is told about every control state change once it is durable.
    """

    def __init__(
        self,
        gate: CommandGate,
        state: ControlState,
        store: ControlStateFile,
        *,
        clock: Callable[[], float],
        snapshot: Callable[[], Awaitable[str]],
        send_ack: Callable[[CommandAck], Awaitable[None]],
        on_change: Callable[[ControlState, ControlState], None] | None = None,
        check: Callable[[CommandName, Mapping[str, ArgValue]], str | None] | None = None,
    ) -> None:
        if gate.seen is not state.seen:
            raise ValueError("the gate must share the control state's replay cache")
        self.gate = gate
        self.state = state
        self.store = store
        self.clock = clock
        self.snapshot = snapshot
        self.send_ack = send_ack
        self.on_change = on_change
        self.check = check
        self.refused = 0
        self.done = 0
        self.failed = 0
        self._lock = asyncio.Lock()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def handle(self, payload: bytes) -> Verdict:
        # One command at a time: the state written by one must be the base of the next.
        async with self._lock:
            verdict = self.gate.check(payload, self._now_ms())
            cmd = verdict.command
            if cmd is None:
                return verdict
            if verdict.name is None:
                assert verdict.reason is not None
                await self._persist_quietly()
                await self._ack(cmd, AckStatus.REJECTED, verdict.reason.value + ": " + verdict.detail)
                return verdict
            refusal = self.check(verdict.name, cmd.args) if self.check is not None else None
            if refusal is not None:
                self.refused += 1
                log.warning("command refused", extra={"command": cmd.name, "detail": refusal})
                await self._persist_quietly()
                await self._ack(cmd, AckStatus.REJECTED, refusal)
                return verdict
            new_state, detail = apply_command(self.state, verdict.name, cmd.args)
            try:
                await self._persist(new_state)
            except OSError as exc:
                self.failed += 1
                log.error("control state not persisted; command not acted on", extra={"error": str(exc)})
                await self._ack(cmd, AckStatus.FAILED, f"state not persisted: {exc}")
                return verdict
            old, self.state = self.state, new_state
            if self.on_change is not None and old != new_state:
                try:
                    self.on_change(old, new_state)
                except Exception:
                    log.exception("control state listener failed", extra={"command": cmd.name})
            status = AckStatus.DONE
            if verdict.name is CommandName.SNAPSHOT:
                try:
                    detail = await self.snapshot()
                except Exception as exc:
                    log.exception("snapshot failed", extra={"command_id": cmd.command_id.hex()})
                    status, detail = AckStatus.FAILED, f"snapshot failed: {exc}"
            if status is AckStatus.DONE:
                self.done += 1
            else:
                self.failed += 1
            log.info(
                "command acted on", extra={"command": cmd.name, "command_id": cmd.command_id.hex(), "detail": detail}
            )
            await self._ack(cmd, status, detail)
            return verdict

    async def _persist(self, state: ControlState) -> None:
        await asyncio.to_thread(self.store.save, state)

    async def _persist_quietly(self) -> None:
        """Persist the replay cache after a rejection that is acked, so the rejection itself is not replayable."""
        try:
            await self._persist(self.state)
        except OSError as exc:
            # The nonce stays in memory: only a restart before the next successful save could re-accept it.
            log.error("replay cache not persisted", extra={"error": str(exc)})

    async def _ack(self, cmd: Command, status: AckStatus, detail: str) -> None:
        await self.send_ack(CommandAck(cmd.command_id, status, detail, self._now_ms()))

    def metrics(self) -> dict[str, Any]:
        return {"done": self.done, "failed": self.failed, "refused": self.refused, **self.gate.counters()}
