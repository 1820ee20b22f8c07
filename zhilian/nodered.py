"""The Node-RED baseline of the load benchmark: what a do-it-yourself `mqtt in → function → influxdb batch` flow lands.

Node-RED 4.x (it runs on Node.js 20; 5.x needs ≥ 22.9) and node-red-contrib-influxdb are installed with npm into a
cache directory on first use (`ensure_installed`). The bench generates the flow (`build_flows`) and a settings file
without editor, admin API or credential prompts, and runs Node-RED with its own user directory (`NodeRedProcess`)
against the bench's Mosquitto and InfluxDB. Two flows:

- **standard**: `mqtt in` (QoS 1, JSON) → `function` (one JSON message of 10 samples → 10 points) → `influxdb batch`:
  one InfluxDB write per MQTT message, what the node's documentation and most tutorials show;
- **tuned**: the same with a `join` node before the write grouping `group_size` messages (or whatever arrived
  within `group_timeout_s`) into one write — the usual fix once the first one falls behind.

Each sample becomes a point of the same shape our InfluxDB store writes (tag `vin`, the catalogue's `s<id>`
fields, a boolean `sample` field, millisecond time), in a measurement of its own, so both pipelines are counted by
the same query.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zhilian.broker import free_port

log = logging.getLogger("zhilian.bench.nodered")

NODE_RED_SPEC = "node-red@4"
INFLUX_NODE_SPEC = "node-red-contrib-influxdb@0.7"
NODE_RED_MAJOR = 4
MIN_NODE_MAJOR = 18
FlowMode = Literal["standard", "tuned"]


class NodeRedError(RuntimeError):
    """Node.js/npm missing, the install failed, or Node-RED did not come up."""


def default_cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "zhilian" / "node-red"


@dataclass(frozen=True)
class NodeRedInstall:
    prefix: Path
    red_js: Path
    version: str
    influx_node_version: str
    node_version: str


def _package_version(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError):
        return None


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        raise NodeRedError("Node.js (`node`) not found; Node-RED 4 needs Node.js >= 18")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=False)
    version = out.stdout.strip().lstrip("v")
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise NodeRedError(f"cannot read the Node.js version from {out.stdout!r}") from None
    if major < MIN_NODE_MAJOR:
        raise NodeRedError(f"Node.js {version} is too old for Node-RED {NODE_RED_MAJOR} (needs >= {MIN_NODE_MAJOR})")
    return version


def find_install(prefix: Path) -> NodeRedInstall | None:
    modules = prefix / "node_modules"
    red = _package_version(modules / "node-red" / "package.json")
    influx = _package_version(modules / "node-red-contrib-influxdb" / "package.json")
    if red is None or influx is None or not red.startswith(f"{NODE_RED_MAJOR}."):
        return None
    return NodeRedInstall(prefix, modules / "node-red" / "red.js", red, influx, node_version())


def ensure_installed(prefix: Path | None = None, timeout: float = 900.0) -> NodeRedInstall:
    """Node-RED and the InfluxDB nodes under `prefix` (default: the user's cache); npm-installs them if missing."""
    prefix = prefix or default_cache_dir()
    found = find_install(prefix)
    if found is not None:
        return found
    node_version()
    npm = shutil.which("npm")
    if npm is None:
        raise NodeRedError("npm not found; it ships with Node.js")
    prefix.mkdir(parents=True, exist_ok=True)
    log.info("installing Node-RED with npm", extra={"prefix": str(prefix)})
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--omit=dev"]
    try:
        out = subprocess.run(
            [*cmd, NODE_RED_SPEC, INFLUX_NODE_SPEC], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NodeRedError(f"npm install did not finish within {timeout:.0f}s") from None
    if out.returncode != 0:
        raise NodeRedError(f"npm install failed ({out.returncode}): {out.stderr.strip()[-800:]}")
    found = find_install(prefix)
    if found is None:
        raise NodeRedError(f"npm install succeeded but no Node-RED {NODE_RED_MAJOR}.x is under {prefix}")
    return found


@dataclass(frozen=True)
class FlowConfig:
    mode: FlowMode
    mqtt_host: str
    mqtt_port: int
    influx_host: str
    influx_port: int
    database: str
    measurement: str
    topic: str = "nr/+/telemetry"
    client_id: str = "zhilian-bench-node-red"
    group_size: int = 100
    group_timeout_s: float = 1.0


# One JSON message {"vin": ..., "samples": [{"t": ms, "s1": ..., ...}, ...]} → one InfluxDB point per sample.
FUNCTION_BODY = """const p = msg.payload;
const tags = { vin: p.vin };
msg.payload = p.samples.map((s) => {
    const fields = { sample: true };
    for (const k in s) {
        if (k !== "t") fields[k] = s[k];
    }
    return { measurement: MEASUREMENT, tags: tags, fields: fields, timestamp: s.t };
});
return msg;
"""


def build_flows(cfg: FlowConfig) -> list[dict[str, Any]]:
    """flows.json for Node-RED: one tab, the broker and InfluxDB config nodes and the pipeline."""
    if cfg.mode not in ("standard", "tuned"):
        raise ValueError(f"unknown flow mode {cfg.mode!r}")
    if cfg.group_size < 1 or cfg.group_timeout_s <= 0:
        raise ValueError("group_size and group_timeout_s must be positive")
    tab = "zhilian.bench.tab"
    func = "const MEASUREMENT = " + json.dumps(cfg.measurement) + ";\n" + FUNCTION_BODY
    nodes: list[dict[str, Any]] = [
        {"id": tab, "type": "tab", "label": f"zhilian bench ({cfg.mode})", "disabled": False, "info": ""},
        {
            "id": "zhilian.bench.broker",
            "type": "mqtt-broker",
            "name": "bench mosquitto",
            "broker": cfg.mqtt_host,
            "port": str(cfg.mqtt_port),
            "clientid": cfg.client_id,
            "autoConnect": True,
            "usetls": False,
            "protocolVersion": "4",
            "keepalive": "60",
            "cleansession": True,
            "autoUnsubscribe": True,
            "birthTopic": "",
            "closeTopic": "",
            "willTopic": "",
        },
        {
            "id": "zhilian.bench.influxdb",
            "type": "influxdb",
            "hostname": cfg.influx_host,
            "port": str(cfg.influx_port),
            "protocol": "http",
            "database": cfg.database,
            "name": "bench influxd",
            "usetls": False,
            "tls": "",
            "influxdbVersion": "1.x",
        },
        {
            "id": "zhilian.bench.in",
            "type": "mqtt in",
            "z": tab,
            "name": "vehicle telemetry (JSON)",
            "topic": cfg.topic,
            "qos": "1",
            "datatype": "json",
            "broker": "zhilian.bench.broker",
            "nl": False,
            "rap": True,
            "rh": 0,
            "inputs": 0,
            "x": 150,
            "y": 100,
            "wires": [["zhilian.bench.fn"]],
        },
        {
            "id": "zhilian.bench.fn",
            "type": "function",
            "z": tab,
            "name": "JSON samples → points",
            "func": func,
            "outputs": 1,
            "timeout": 0,
            "noerr": 0,
            "initialize": "",
            "finalize": "",
            "libs": [],
            "x": 380,
            "y": 100,
            "wires": [["zhilian.bench.join" if cfg.mode == "tuned" else "zhilian.bench.write"]],
        },
        {
            "id": "zhilian.bench.write",
            "type": "influxdb batch",
            "z": tab,
            "influxdb": "zhilian.bench.influxdb",
            "precision": "ms",
            "retentionPolicy": "",
            "name": "write points",
            "database": cfg.database,
            "precisionV18FluxV20": "ms",
            "retentionPolicyV18Flux": "",
            "org": "",
            "bucket": "",
            "x": 800,
            "y": 100,
            "wires": [],
        },
    ]
    if cfg.mode == "tuned":
        # A manual join collecting the points arrays of `group_size` messages (or what arrived within
        # `group_timeout_s`) into one array of arrays — a manual join does not concatenate them — and a one-line
        # function flattening that into the points of one write.
        nodes.append(
            {
                "id": "zhilian.bench.join",
                "type": "join",
                "z": tab,
                "name": f"group {cfg.group_size} messages",
                "mode": "custom",
                "build": "array",
                "property": "payload",
                "propertyType": "msg",
                "key": "topic",
                "joiner": "\\n",
                "joinerType": "str",
                "useparts": False,
                "accumulate": False,
                "timeout": str(cfg.group_timeout_s),
                "count": str(cfg.group_size),
                "reduceRight": False,
                "x": 600,
                "y": 100,
                "wires": [["zhilian.bench.flat"]],
            }
        )
        nodes.append(
            {
                "id": "zhilian.bench.flat",
                "type": "function",
                "z": tab,
                "name": "flatten",
                "func": "msg.payload = msg.payload.flat();\nreturn msg;\n",
                "outputs": 1,
                "timeout": 0,
                "noerr": 0,
                "initialize": "",
                "finalize": "",
                "libs": [],
                "x": 700,
                "y": 160,
                "wires": [["zhilian.bench.write"]],
            }
        )
    return nodes


def settings_js(flow_file: Path, port: int) -> str:
    """No editor, no admin API, no credential secret prompt; info logging so readiness shows in the log."""
    return f"""module.exports = {{
    flowFile: {json.dumps(str(flow_file))},
    flowFilePretty: true,
    credentialSecret: false,
    uiHost: "127.0.0.1",
    uiPort: {port},
    httpAdminRoot: false,
    httpNodeRoot: false,
    disableEditor: true,
    externalModules: {{ autoInstall: false, palette: {{ allowInstall: false }}, modules: {{ allowInstall: false }} }},
    functionExternalModules: false,
    telemetry: {{ enabled: false }},
    diagnostics: {{ enabled: false }},
    runtimeState: {{ enabled: false }},
    logging: {{ console: {{ level: "info", metrics: false, audit: false }} }},
    editorTheme: {{ projects: {{ enabled: false }} }}
}};
"""


class NodeRedProcess:
    """Node-RED with its own user directory under `workdir`, running `flows`; `start()` waits for its broker."""

    def __init__(self, workdir: Path, install: NodeRedInstall, flows: list[dict[str, Any]]) -> None:
        self.workdir = Path(workdir)
        self.install = install
        self.flows = flows
        self.port = free_port()
        self.log_path = self.workdir / "node-red.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise NodeRedError("Node-RED is not running")
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> NodeRedProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        flow_file = self.workdir / "flows.json"
        flow_file.write_text(json.dumps(self.flows, indent=2), encoding="utf-8")
        settings = self.workdir / "settings.js"
        settings.write_text(settings_js(flow_file, self.port), encoding="utf-8")
        node = shutil.which("node")
        if node is None:
            raise NodeRedError("Node.js (`node`) not found")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [node, str(self.install.red_js), "--userDir", str(self.workdir), "--settings", str(settings)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeRedError(f"Node-RED exited with {self.proc.returncode}: {self.log_tail()}")
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
            if "Started flows" in text and "Connected to broker" in text:
                return self
            time.sleep(0.2)
        self.stop()
        raise NodeRedError(f"Node-RED did not start its flows and connect within {timeout}s: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:].strip()
        except OSError:
            return ""

    def errors_logged(self) -> int:
        """Lines Node-RED logged at error level (failed writes show up here)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if "[error]" in line)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def __enter__(self) -> NodeRedProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
