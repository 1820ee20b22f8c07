"""Spawns a private InfluxDB 1.x server (`influxd`) on free loopback ports with its own directories.

Used by the test fixtures and the storage benchmark, so neither depends on (or disturbs) a system InfluxDB.
`stop()` and `start()` may alternate on the same data directory and ports, which is how the outage test takes
the server away and brings it back.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from zhilian.broker import free_port


class InfluxError(RuntimeError):
    """influxd is missing or did not come up."""


def find_influxd() -> str:
    exe = shutil.which("influxd") or next(
        (p for p in ("/usr/bin/influxd", "/usr/local/bin/influxd") if os.access(p, os.X_OK)), None
    )
    if exe is None:
        raise InfluxError("influxd not found; install it with `make setup` (Debian package `influxdb`)")
    return exe


class InfluxProcess:
    """One influxd with HTTP on 127.0.0.1:`port` and its RPC (backup/restore) listener on 127.0.0.1:`rpc_port`.

    `auth`: (admin user, password) — the server then requires credentials and the admin is created on first start
    (InfluxDB 1.x allows exactly that one unauthenticated statement while no user exists).
    `retention_check_interval`: how often the server deletes shard groups past their retention policy (tests make
    it short to see retention act; InfluxDB's default is 30 minutes).
    """

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        rpc_port: int | None = None,
        auth: tuple[str, str] | None = None,
        retention_check_interval: str = "30m0s",
    ) -> None:
        self.workdir = Path(workdir)
        self.retention_check_interval = retention_check_interval
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.rpc_port = rpc_port or free_port()
        self.auth = auth
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "influxd.log"
        self.conf_path = self.workdir / "influxd.conf"
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def config_text(self) -> str:
        w = self.workdir
        return f"""\
reporting-disabled = true
bind-address = "{self.host}:{self.rpc_port}"

[meta]
  dir = "{w / "meta"}"
  logging-enabled = false

[data]
  dir = "{w / "data"}"
  wal-dir = "{w / "wal"}"
  # Every acknowledged write is fsynced: the store's "durable when write_many returns" rests on it.
  wal-fsync-delay = "0s"
  index-version = "inmem"
  query-log-enabled = false

[coordinator]
  write-timeout = "10s"

[retention]
  enabled = true
  check-interval = "{self.retention_check_interval}"

[shard-precreation]
  enabled = false

[monitor]
  # No _internal database: it would write into the test's data dir every 10 s and cost CPU on shared cores.
  store-enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  pprof-enabled = false
  max-row-limit = 0

[logging]
  level = "warn"
  suppress-logo = true

[[graphite]]
  enabled = false

[[collectd]]
  enabled = false

[[opentsdb]]
  enabled = false

[[udp]]
  enabled = false

[continuous_queries]
  enabled = true
  log-enabled = false
"""

    def _headers(self) -> dict[str, str]:
        if self.auth is None:
            return {}
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    def start(self, timeout: float = 30.0) -> InfluxProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        exe = find_influxd()
        for sub in ("meta", "data", "wal"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.conf_path.write_text(self.config_text(), encoding="utf-8")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "-config", str(self.conf_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-1000:]
                    raise InfluxError(f"influxd exited with {self.proc.returncode}: {tail.strip()}")
                try:
                    if client.get(f"{self.url}/ping").status_code == 204:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            else:
                self.stop()
                raise InfluxError(f"influxd did not answer /ping on {self.url} within {timeout}s")
            if self.auth is not None:
                self._ensure_admin(client)
        return self

    def _ensure_admin(self, client: httpx.Client) -> None:
        user, password = self.auth  # type: ignore[misc]
        # Authenticated first: after a restart the admin exists and an anonymous statement would be refused.
        r = client.post(f"{self.url}/query", data={"q": "SHOW USERS"}, headers=self._headers())
        if r.status_code == 200:
            return
        quoted = password.replace("\\", "\\\\").replace("'", "\\'")
        r = client.post(
            f"{self.url}/query",
            data={"q": f"CREATE USER \"{user}\" WITH PASSWORD '{quoted}' WITH ALL PRIVILEGES"},
        )
        if r.status_code != 200 or "error" in r.text:
            raise InfluxError(f"cannot create influx admin user: {r.status_code} {r.text[:300]}")

    @property
    def client(self) -> httpx.Client:
        """A client for this server, kept open: building one costs tens of ms (its TLS context)."""
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, headers=self._headers(), timeout=30.0)
        return self._client

    def query(self, q: str, db: str | None = None) -> httpx.Response:
        """One InfluxQL statement as the admin (for fixtures: CREATE/DROP DATABASE, inspection)."""
        params = {"q": q, "epoch": "ms"}
        if db is not None:
            params["db"] = db
        r = self.client.post("/query", data=params)
        r.raise_for_status()
        doc = r.json()
        errors = [res["error"] for res in doc.get("results", []) if "error" in res]
        if errors or "error" in doc:
            raise InfluxError(f"influx query {q[:100]!r} failed: {errors or doc['error']}")
        return r

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write(self, body: str, db: str) -> httpx.Response:
        """Raw line protocol, precision ms, as the admin (for tests that need data the store would not write)."""
        return self.client.post("/write", params={"db": db, "precision": "ms"}, content=body.encode())

    def stop(self, timeout: float = 15.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def __enter__(self) -> InfluxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
