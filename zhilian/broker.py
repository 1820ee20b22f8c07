"""Spawns a private Mosquitto broker on a free loopback port with its own temporary configuration.

Used by `zhilian demo` and by the test fixtures, so neither depends on (or disturbs) a system broker.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class BrokerError(RuntimeError):
    """Mosquitto is missing or did not come up."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    exe = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if exe is None:
        raise BrokerError("mosquitto not found; install it with `make setup` (Debian package `mosquitto`)")
    return exe


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The broker's side of mutual TLS: the CA that signs client certificates, and the broker's own cert/key."""

    ca: Path
    cert: Path
    key: Path


# The ACL of DESIGN.md ("a device may only publish under its own ev/{vin}/"); the username is the client
# certificate's CN (`use_identity_as_username`). deploy/mosquitto/acl carries the same rules (a test compares them).
ACL_RULES = """\
# Devices: CN = VIN; read and write only below their own ev/{vin}/ (telemetry, alert, status, cmd, cmd/ack).
pattern readwrite ev/%u/#

# The cloud bridge: consumes every vehicle's uplink, sends commands, reads their acknowledgements.
# Shared subscriptions of several bridge workers ($share/<group>/ev/+/telemetry ...) need no rules of their own:
# Mosquitto checks read access against each delivered message's real topic (tests/test_status.py shows both that
# the bridge receives through them and that a device gains nothing by using one).
user zhilian-bridge
topic read ev/+/telemetry
topic read ev/+/alert
topic read ev/+/status
topic write ev/+/cmd
topic read ev/+/cmd/ack
# Alarm notifications northbound (north/alarms/{vin}; `--north-mqtt` publishes them with this same certificate).
topic write north/#

# Northbound consumers (an operator console, a customer's integration): read the alarm notifications, nothing else.
# An example identity: issue it with `zhilian keys tls-client --cn zhilian-operator`; add one block per consumer.
# Devices get nothing under north/: no rule above grants a VIN any topic outside its own ev/{vin}/.
user zhilian-operator
topic read north/#
"""


class MosquittoProcess:
    def __init__(self, workdir: Path, port: int | None = None, tls: TlsFiles | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "mosquitto.log"
        self.acl_path = self.workdir / "acl"

    def _security_lines(self) -> list[str]:
        if self.tls is None:
            return ["allow_anonymous true"]
        return [
            f"cafile {self.tls.ca}",
            f"certfile {self.tls.cert}",
            f"keyfile {self.tls.key}",
            "tls_version tlsv1.2",
            # Only clients with a certificate from our CA get in, and the certificate's CN is their identity:
            # no passwords to provision or leak, and the ACL's %u is a name the client cannot choose.
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
            f"acl_file {self.acl_path}",
        ]

    def config_text(self) -> str:
        return "\n".join(
            [
                f"listener {self.port} {self.host}",
                # Unlimited (the default, stated): the load bench holds 10,000 vehicle connections; the open-file
                # limit mosquitto inherits from its parent is the real bound (raise_nofile_limit in the bench).
                "max_connections -1",
                # Started as root (containers, CI), mosquitto would drop to the `mosquitto` user, which cannot
                # read our private temp dir (log, TLS key at 0600): stay whoever started us.
                f"user {getpass.getuser()}",
                *self._security_lines(),
                "persistence false",
                # Deep enough for a bridge restart under a fleet's load; QoS 1 messages beyond it are dropped
                # by the broker, so the bridge's persistent session must not stay away long.
                "max_queued_messages 100000",
                "max_inflight_messages 0",
                f"log_dest file {self.log_path}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "",
            ]
        )

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        exe = find_mosquitto()
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        if self.tls is not None:
            self.acl_path.write_text(ACL_RULES, encoding="utf-8")
        conf.write_text(self.config_text(), encoding="utf-8")
        self.proc = subprocess.Popen(
            [exe, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()[:500]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
