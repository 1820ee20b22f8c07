"""The persisted boot counter: part of every message's identity (vin, boot, seq).

Incremented and made durable before the agent sends anything, so sequence numbers restarting at 0 after a
reboot never collide with those of an earlier boot.
"""

from __future__ import annotations

import os
from pathlib import Path


class BootCounterError(Exception):
    """The boot counter file exists but cannot be read or holds garbage."""


def next_boot(state_dir: str | Path) -> int:
    """Read the last boot number, store last+1 durably (write, fsync, rename, fsync dir) and return it."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    path = state / "boot_counter"
    previous = 0
    if path.exists():
        text = path.read_text(encoding="ascii").strip()
        if not text.isdigit():
            # Never silently restart at 0: that would make (vin, boot, seq) collide with stored messages.
            raise BootCounterError(f"{path} holds {text[:32]!r}, not a boot number; fix or remove it deliberately")
        previous = int(text)
    current = previous + 1
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{current}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(state, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return current
