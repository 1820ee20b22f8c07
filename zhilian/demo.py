"""`zhilian demo`: the whole stack on the embedded defaults with a simulated fleet, and a live table.

Starts a private Mosquitto, `zhilian serve` (ingest API + bridge, SQLite) and `zhilian sim fleet` (N virtual
vehicles, each a real edge agent on its own emulated GNSS pty), then watches the operator API.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cloud_ingest.service import IngestService
from zhilian.broker import MosquittoProcess, free_port
from zhilian.procs import spawn_zhilian, stop_process


class DemoError(RuntimeError):
    """A part of the demo did not come up."""


@dataclass
class DemoResult:
    api: str
    operator_key: str
    vehicles: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    # VIN -> number of track points (lat/lon inside Chongqing) the API returned at the end of the run
    tracks: dict[str, int] = field(default_factory=dict)

    @property
    def reporting(self) -> int:
        """Vehicles whose latest position and a track of at least two points came back from the API."""
        return sum(1 for v in self.vehicles if v.get("position") and self.tracks.get(v["vin"], 0) >= 2)


# Chongqing's main urban area, generously: a reported position outside it means something is wrong.
CHONGQING = (29.3, 29.9, 106.2, 106.9)


def _fetch_tracks(client: httpx.Client, result: DemoResult) -> None:
    signals = "CurrentLocation.Latitude,CurrentLocation.Longitude"
    for v in result.vehicles:
        r = client.get(f"/v1/vehicles/{v['vin']}/telemetry", params={"signals": signals, "limit": 100000})
        if r.status_code != 200:
            continue
        cols = r.json()["columns"]
        points = [
            (lat, lon)
            for lat, lon in zip(cols["CurrentLocation.Latitude"], cols["CurrentLocation.Longitude"], strict=True)
            if lat is not None and lon is not None
        ]
        lat0, lat1, lon0, lon1 = CHONGQING
        result.tracks[v["vin"]] = sum(1 for lat, lon in points if lat0 < lat < lat1 and lon0 < lon < lon1)


def _raise_interrupt(signum: int, frame: object) -> None:
    # Ctrl-C and SIGTERM (e.g. from a CI timeout) take the same clean-up path.
    raise KeyboardInterrupt


def _wait_http(url: str, timeout: float, proc: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"ingest service exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise DemoError(f"{url} did not answer within {timeout}s")


def _render(result: DemoResult, elapsed: float, duration: float | None) -> Group:
    table = Table(title=f"Zhilian demo — {len(result.vehicles)} vehicles", expand=False)
    table.add_column("VIN", no_wrap=True, min_width=17)
    for col in ("samples", "msgs", "seen UTC", "lat", "lon", "track"):
        table.add_column(col, justify="left" if col == "seen UTC" else "right", no_wrap=True)
    for v in result.vehicles:
        pos = v.get("position") or {}
        table.add_row(
            v["vin"],
            str(v.get("samples", 0)),
            str(v.get("messages", 0)),
            (v.get("last_seen") or "-")[11:19],
            f"{pos['lat']:.6f}" if pos else "-",
            f"{pos['lon']:.6f}" if pos else "-",
            str(result.tracks.get(v["vin"], "")),
        )
    st = result.stats
    rejected = st.get("rejected") or {}
    rej_text = ", ".join(f"{k}={n}" for k, n in sorted(rejected.items())) or "none"
    left = f" / {duration:.0f}s" if duration else " (Ctrl-C to stop)"
    footer = Text(
        f"stored messages {st.get('stored', 0)}  samples {st.get('samples', 0)}  duplicates {st.get('duplicate', 0)}"
        f"  rejected: {rej_text}   t={elapsed:.0f}s{left}\n"
        f"API {result.api}/docs   operator key {result.operator_key}"
    )
    return Group(table, footer)


def run_demo(
    vehicles: int = 20,
    duration: float | None = None,
    data_dir: Path | None = None,
    http_port: int | None = None,
    batch_interval_s: float = 5.0,
    console: Console | None = None,
) -> DemoResult:
    console = console or Console()
    own_tmp = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="zhilian-demo-")) if data_dir is None else Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    ingest_dir, fleet_dir, logs = root / "ingest", root / "fleet", root / "logs"
    for d in (ingest_dir, fleet_dir, logs):
        d.mkdir(exist_ok=True)
    http_port = http_port or free_port()
    api = f"http://127.0.0.1:{http_port}"

    # API keys are minted straight into the registry before the service starts, so no key ever travels.
    svc = IngestService.open(ingest_dir)
    try:
        admin_key = svc.registry.create_api_key("admin", "demo-admin")
        operator_key = svc.registry.create_api_key("operator", "demo-operator")
    finally:
        svc.close()
    result = DemoResult(api=api, operator_key=operator_key)

    broker = MosquittoProcess(root / "mosquitto")
    procs: list[Any] = []
    interrupted = False
    # Installed explicitly: a shell's background job inherits SIGINT as ignored, and Python then has no handler.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker.start()
        console.print(f"[bold]broker[/] mqtt://127.0.0.1:{broker.port}   [bold]data[/] {root}")
        serve = spawn_zhilian(
            ["serve", "--data-dir", str(ingest_dir), "--http-port", str(http_port), "--mqtt-port", str(broker.port)],
            logs / "serve.log",
        )
        procs.append(serve)
        _wait_http(f"{api}/healthz", 30, serve)
        fleet = spawn_zhilian(
            [
                "sim",
                "fleet",
                "--vehicles",
                str(vehicles),
                "--state-dir",
                str(fleet_dir),
                "--broker-port",
                str(broker.port),
                "--api",
                api,
                "--api-key",
                admin_key,
                "--batch-interval",
                str(batch_interval_s),
            ],
            logs / "fleet.log",
        )
        procs.append(fleet)
        console.print(f"[bold]API[/] {api}  (OpenAPI: {api}/docs)   [bold]operator key[/] {operator_key}")
        headers = {"Authorization": f"Bearer {operator_key}"}
        start = time.monotonic()
        with (
            httpx.Client(base_url=api, headers=headers, timeout=5.0) as client,
            Live(_render(result, 0, duration), console=console, refresh_per_second=2, transient=False) as live,
        ):
            while duration is None or time.monotonic() - start < duration:
                for p, name in ((serve, "ingest service"), (fleet, "fleet simulator")):
                    if p.poll() is not None:
                        raise DemoError(f"{name} exited with code {p.returncode}; see {logs}")
                try:
                    result.vehicles = client.get("/v1/vehicles").json()
                    result.stats = client.get("/v1/ingest/stats").json()
                except (httpx.HTTPError, ValueError) as exc:
                    console.log(f"API poll failed: {exc}")
                live.update(_render(result, time.monotonic() - start, duration))
                time.sleep(1.0)
            _fetch_tracks(client, result)
            live.update(_render(result, time.monotonic() - start, duration))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in reversed(procs):
            stop_process(p)
        broker.stop()
    console.print()
    console.print(
        f"{'interrupted' if interrupted else 'done'}: {result.reporting} vehicles reported positions and tracks; "
        f"{result.stats.get('samples', 0)} samples stored; logs in {logs}"
    )
    if own_tmp and not interrupted and result.reporting >= vehicles:
        shutil.rmtree(root, ignore_errors=True)
    return result
