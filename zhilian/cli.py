"""The one `zhilian` command."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from zhilian.provision import device_app

app = typer.Typer(help="Zhilian: telemetry for smart-connected electric two-wheelers.", no_args_is_help=True)
sim_app = typer.Typer(help="Device emulators and virtual fleets.", no_args_is_help=True)
keys_app = typer.Typer(help="Device keys and operator API keys.", no_args_is_help=True)
spec_app = typer.Typer(help="Firmware specification artefacts.", no_args_is_help=True)
cmd_app = typer.Typer(help="Signed vehicle commands through the cloud API (firmware_specs/COMMANDS.md).")
app.add_typer(sim_app, name="sim")
app.add_typer(keys_app, name="keys")
app.add_typer(spec_app, name="spec")
app.add_typer(cmd_app, name="cmd")
app.add_typer(device_app, name="device")
console = Console()


class _JsonFormatter(logging.Formatter):
    _skip = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level.lower() != "debug":
        # httpx logs every request at info; the InfluxDB store makes several a second.
        logging.getLogger("httpx").setLevel(logging.WARNING)


LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning, error")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", help="mutual TLS: CA certificate that signed the broker's")]
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help="mutual TLS: this client's certificate (PEM)")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="mutual TLS: this client's private key (PEM, 0600)")]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="ZHILIAN_DATABASE_URL",
        help="registry database: sqlite:///path or postgresql://user@host/db (default: SQLite in DATA_DIR)",
    ),
]
InfluxUrl = Annotated[
    str | None,
    typer.Option(
        "--influx-url",
        envvar="ZHILIAN_INFLUX_URL",
        help="store telemetry in InfluxDB at this URL (e.g. http://127.0.0.1:8086) instead of SQLite in DATA_DIR",
    ),
]
InfluxDb = Annotated[str, typer.Option("--influx-db", envvar="ZHILIAN_INFLUX_DB", help="InfluxDB database")]
InfluxUser = Annotated[str | None, typer.Option("--influx-username", envvar="ZHILIAN_INFLUX_USERNAME")]
InfluxPassword = Annotated[
    str | None, typer.Option("--influx-password", envvar="ZHILIAN_INFLUX_PASSWORD", help="prefer the env var")
]
InfluxToken = Annotated[
    str | None,
    typer.Option("--influx-token", envvar="ZHILIAN_INFLUX_TOKEN", help="InfluxDB 2.x/3.x token; prefer the env var"),
]


def _store_options(
    url: str | None, db: str, username: str | None, password: str | None, token: str | None
) -> dict[str, object]:
    if url is None:
        return {}
    return {
        "influx_url": url,
        "influx_db": db,
        "influx_username": username,
        "influx_password": password,
        "influx_token": token,
    }


def _run(coro_fn) -> None:  # type: ignore[no-untyped-def]
    """Run an async entry point with SIGINT/SIGTERM mapped onto its stop event."""

    async def main() -> None:
        stop = asyncio.Event()
        # Not zhilian.serve's helper: importing it pulls in FastAPI and SQLAlchemy (≈ 1 s, tens of MB), which
        # `zhilian agent` on a board must not pay for.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await coro_fn(stop)

    asyncio.run(main())


@app.command()
def serve(
    data_dir: Annotated[Path, typer.Option(help="where the SQLite databases live")] = Path("zhilian-data"),
    http_host: str = "127.0.0.1",
    http_port: int = 8080,
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int = 1883,
    bridge: Annotated[bool, typer.Option(help="also consume from the MQTT broker")] = True,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    database_url: DatabaseUrl = None,
    influx_url: InfluxUrl = None,
    influx_db: InfluxDb = "zhilian",
    influx_username: InfluxUser = None,
    influx_password: InfluxPassword = None,
    influx_token: InfluxToken = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the ingest API and the MQTT bridge together."""
    from zhilian.serve import serve as serve_

    _logging(log_level)
    _run(
        lambda stop: serve_(
            data_dir,
            http_host,
            http_port,
            mqtt_host,
            mqtt_port,
            with_bridge=bridge,
            stop=stop,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            database_url=database_url,
            store_options=_store_options(influx_url, influx_db, influx_username, influx_password, influx_token),
        )
    )


@app.command()
def ingest(
    data_dir: Path = Path("zhilian-data"),
    http_host: str = "127.0.0.1",
    http_port: int = 8080,
    database_url: DatabaseUrl = None,
    influx_url: InfluxUrl = None,
    influx_db: InfluxDb = "zhilian",
    influx_username: InfluxUser = None,
    influx_password: InfluxPassword = None,
    influx_token: InfluxToken = None,
    log_level: LogLevel = "info",
) -> None:
    """Run only the ingest API (the operator API; feed it with one or more `zhilian bridge`)."""
    from zhilian.serve import serve as serve_

    _logging(log_level)
    store = _store_options(influx_url, influx_db, influx_username, influx_password, influx_token)
    _run(
        lambda stop: serve_(
            data_dir,
            http_host,
            http_port,
            with_bridge=False,
            stop=stop,
            database_url=database_url,
            store_options=store,
        )
    )


@app.command()
def bridge(
    data_dir: Path = Path("zhilian-data"),
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int = 1883,
    share_group: Annotated[str | None, typer.Option(help="MQTT 5 shared-subscription group (several workers)")] = None,
    client_id: str = "zhilian-bridge",
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    database_url: DatabaseUrl = None,
    influx_url: InfluxUrl = None,
    influx_db: InfluxDb = "zhilian",
    influx_username: InfluxUser = None,
    influx_password: InfluxPassword = None,
    influx_token: InfluxToken = None,
    log_level: LogLevel = "info",
) -> None:
    """Run only the MQTT bridge, storing into DATA_DIR's databases."""
    from zhilian.serve import serve as serve_

    _logging(log_level)
    _run(
        lambda stop: serve_(
            data_dir,
            mqtt_host=mqtt_host,
            mqtt_port=mqtt_port,
            with_api=False,
            share_group=share_group,
            client_id=client_id,
            stop=stop,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            database_url=database_url,
            store_options=_store_options(influx_url, influx_db, influx_username, influx_password, influx_token),
        )
    )


agent_app = typer.Typer(help="The edge agent (as on a vehicle board).")
app.add_typer(agent_app, name="agent")


@agent_app.command("run")
def agent_run(
    config: Annotated[Path, typer.Option(help="agent TOML file (see deploy/agent.example.toml)")],
    log_level: LogLevel = "info",
) -> None:
    """Run the edge agent from its config file (the systemd unit's entry point)."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig, ConfigError

    _logging(log_level)
    try:
        cfg = AgentConfig.from_toml(config)
    except ConfigError as exc:
        console.print(f"[red]agent config {config}: {exc}[/red]")
        raise typer.Exit(2) from None
    _run(lambda stop: EdgeAgent(cfg).run(stop))


# `zhilian agent --vin ... [--config f]` (without `run`) keeps working: the group's own options run the agent.
@agent_app.callback(invoke_without_command=True)
def agent(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="agent TOML file ([agent] table)")] = None,
    vin: str | None = None,
    key_file: Path | None = None,
    state_dir: Path | None = None,
    gnss_port: Annotated[str | None, typer.Option(help="serial device of the GNSS module, e.g. /dev/ttyS1")] = None,
    gnss_baudrate: int | None = None,
    bms_port: Annotated[str | None, typer.Option(help="serial device of a JBD-protocol BMS")] = None,
    controller_port: Annotated[str | None, typer.Option(help="serial device of the motor controller")] = None,
    can_interface: Annotated[
        str | None, typer.Option(help="BMS/controller on CAN via python-can: socketcan | slcan | virtual")
    ] = None,
    can_channel: Annotated[str | None, typer.Option(help="CAN channel: can0, or the slcan adapter's port")] = None,
    can_bitrate: int | None = None,
    can_variant: Annotated[str | None, typer.Option(help="CAN profile (firmware_specs/CAN.md): 48v | 72v")] = None,
    broker_host: str | None = None,
    broker_port: int | None = None,
    batch_interval: float | None = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the edge agent (as on a vehicle board): `zhilian agent run --config agent.toml`, or options alone."""
    if ctx.invoked_subcommand is not None:
        return
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig

    _logging(log_level)
    overrides = {
        "vin": vin,
        "key_file": key_file,
        "state_dir": state_dir,
        "gnss_port": gnss_port,
        "gnss_baudrate": gnss_baudrate,
        "bms_port": bms_port,
        "controller_port": controller_port,
        "can_interface": can_interface,
        "can_channel": can_channel,
        "can_bitrate": can_bitrate,
        "can_variant": can_variant,
        "broker_host": broker_host,
        "broker_port": broker_port,
        "batch_interval_s": batch_interval,
        "tls_ca": tls_ca,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
    }
    if config is not None:
        cfg = AgentConfig.from_toml(config, **overrides)
    else:
        missing = [k for k in ("vin", "key_file", "state_dir") if overrides[k] is None]
        if missing:
            raise typer.BadParameter(f"without --config, these are required: {', '.join('--' + m for m in missing)}")
        cfg = AgentConfig(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    _run(lambda stop: EdgeAgent(cfg).run(stop))


@sim_app.command("fleet")
def sim_fleet(
    vehicles: int = 20,
    state_dir: Path = Path("zhilian-fleet"),
    broker_host: str = "127.0.0.1",
    broker_port: int = 1883,
    api: Annotated[str | None, typer.Option(help="ingest API base URL, to register the vehicles")] = None,
    api_key: Annotated[str | None, typer.Option(help="admin API key for registration")] = None,
    batch_interval: float = 5.0,
    gnss_rate: float = 1.0,
    log_level: LogLevel = "info",
) -> None:
    """Run N virtual vehicles: GNSS emulators on real ptys + synthetic BMS/controller + real edge agents."""
    from zhilian.fleet import run_fleet

    _logging(log_level)

    async def go(stop: asyncio.Event) -> None:
        await run_fleet(vehicles, state_dir, broker_host, broker_port, api, api_key, stop, batch_interval, gnss_rate)

    _run(go)


@sim_app.command("gnss")
def sim_gnss(
    index: Annotated[int, typer.Option(help="which vehicle of the demo fleet's routes to ride")] = 0,
    rate: float = 1.0,
    talker: str = "GN",
) -> None:
    """Emulate one BeiDou/GNSS receiver on a new pty and print its device path (for `zhilian agent --gnss-port`)."""
    import time

    from simulators.gnss import GnssEmulator
    from simulators.route import route_for
    from simulators.vehicle import VehicleModel

    async def go(stop: asyncio.Event) -> None:
        emu = GnssEmulator(
            VehicleModel(route_for(index), seed=index, start_time=time.time()), rate_hz=rate, talker=talker
        )
        await emu.start()
        console.print(f"GNSS emulator writing NMEA to [bold]{emu.port}[/] at {rate} Hz; Ctrl-C stops")
        try:
            await stop.wait()
        finally:
            await emu.stop()

    _run(go)


@keys_app.command("device")
def keys_device(out: Annotated[Path, typer.Argument(help="private key file to create (mode 0600)")]) -> None:
    """Generate a device signing key; prints the public key (base64) to register with POST /v1/devices."""
    from protocol import DeviceKey

    if out.exists():
        raise typer.BadParameter(f"{out} exists; refusing to overwrite a device key")
    key = DeviceKey.generate()
    key.save(out)
    console.print(f"public_key={base64.b64encode(key.public_raw).decode()} key_id={key.key_id.hex()}")


@keys_app.command("tls-ca")
def keys_tls_ca(
    out: Annotated[Path, typer.Option(help="directory for ca.crt, ca.key and the broker's server.crt/server.key")],
    host: Annotated[list[str] | None, typer.Option(help="broker address for its certificate (repeatable)")] = None,
) -> None:
    """Create a dev/test CA for the MQTT transport's mutual TLS, plus the broker's certificate."""
    from zhilian.pki import PkiError, issue_server_cert, make_ca

    try:
        ca = make_ca(out)
        server = issue_server_cert(ca, out, host or ["127.0.0.1", "localhost"])
    except PkiError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"ca={ca.cert} server_cert={server.cert} server_key={server.key}")


@keys_app.command("tls-client")
def keys_tls_client(
    ca_dir: Annotated[Path, typer.Option(help="directory made by `zhilian keys tls-ca`")],
    cn: Annotated[str, typer.Option(help="identity: the vehicle's VIN, or zhilian-bridge for the bridge")],
    out: Annotated[Path, typer.Option(help="directory for CN.crt and CN.key (0600)")],
) -> None:
    """Issue a client certificate; its CN is the MQTT username the broker's ACL applies."""
    from zhilian.pki import Ca, PkiError, issue_client_cert

    try:
        files = issue_client_cert(Ca.load(ca_dir), out, cn)
    except PkiError as exc:
        raise typer.BadParameter(str(exc)) from None
    console.print(f"cert={files.cert} key={files.key}")


@keys_app.command("api")
def keys_api(
    role: Annotated[str, typer.Option(help="admin, operator or viewer")] = "operator",
    name: str = "cli",
    data_dir: Path = Path("zhilian-data"),
    database_url: DatabaseUrl = None,
) -> None:
    """Mint an operator API key straight into the registry (prints it once)."""
    from cloud_ingest.service import IngestService

    svc = IngestService.open(data_dir, database_url)
    try:
        print(svc.registry.create_api_key(role, name))
    finally:
        svc.close()


@spec_app.command("vectors")
def spec_vectors(write: Annotated[bool, typer.Option(help="rewrite the committed vector file")] = False) -> None:
    """Show the envelope test vectors, or --write them and the control-plane vectors to firmware_specs/test_vectors/."""
    from zhilian import specgen

    if write:
        console.print(f"wrote {specgen.write()}")
        console.print(f"wrote {specgen.write_commands()}")
    else:
        print(json.dumps(specgen.build(), indent=2))


CmdApi = Annotated[str, typer.Option("--api", envvar="ZHILIAN_API", help="ingest API base URL")]
CmdKey = Annotated[str, typer.Option("--api-key", envvar="ZHILIAN_API_KEY", help="API key (send: operator)")]


def _cmd_call(api: str, api_key: str, method: str, path: str, body: dict[str, object] | None = None) -> object:
    import httpx  # only here: the agent, which imports this module, never needs it

    r = httpx.request(
        method, api.rstrip("/") + path, json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
    )
    if r.status_code >= 400:
        console.print(f"[red]{r.status_code}[/red] {r.text[:500]}")
        raise typer.Exit(1)
    return r.json()


def _arg_value(text: str) -> bool | int | float | str:
    if text in ("true", "false"):
        return text == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


@cmd_app.command("send")
def cmd_send(
    vin: Annotated[str, typer.Argument(help="the vehicle")],
    name: Annotated[str, typer.Argument(help="lock, unlock, set_profile, snapshot, speed_limit_report")],
    api: CmdApi,
    api_key: CmdKey,
    arg: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, e.g. --arg profile=riding")] = None,
    ttl: Annotated[float, typer.Option(help="seconds until the command expires")] = 600,
) -> None:
    """Issue a signed command; prints its id (follow it with `zhilian cmd list`)."""
    args = {}
    for item in arg or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--arg {item!r} is not KEY=VALUE")
        args[key] = _arg_value(value)
    out = _cmd_call(api, api_key, "POST", f"/v1/vehicles/{vin}/commands", {"name": name, "args": args, "ttl_s": ttl})
    print(json.dumps(out))


@cmd_app.command("list")
def cmd_list(vin: str, api: CmdApi, api_key: CmdKey) -> None:
    """The vehicle's commands, newest first, with their state and ack."""
    print(json.dumps(_cmd_call(api, api_key, "GET", f"/v1/vehicles/{vin}/commands"), indent=2))


@cmd_app.command("cloud-key")
def cmd_cloud_key(
    api: CmdApi,
    api_key: CmdKey,
    out: Annotated[Path | None, typer.Option(help="write it as an agent's cloud_key_file (mode 0644)")] = None,
) -> None:
    """The cloud's command-signing public key, as one line of an agent's cloud_key_file."""
    doc = _cmd_call(api, api_key, "GET", "/v1/cloud-key")
    assert isinstance(doc, dict)
    line = f"{doc['public_key']}  # Zhilian cloud command key {doc['key_id']}\n"
    if out is None:
        print(line, end="")
        return
    out.write_text(line, encoding="ascii")
    out.chmod(0o644)
    console.print(f"wrote {out}")


@app.command()
def demo(
    vehicles: int = 20,
    duration: Annotated[float | None, typer.Option(help="seconds to run; default until Ctrl-C")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="keep databases and logs here (default: temp dir)")] = None,
    http_port: int | None = None,
    batch_interval: float = 5.0,
    require_all: Annotated[bool, typer.Option(help="exit 1 unless every vehicle reported a position")] = False,
) -> None:
    """Run the whole stack with a simulated fleet and a live table."""
    from zhilian.demo import run_demo

    result = run_demo(vehicles, duration, data_dir, http_port, batch_interval, console)
    if require_all and result.reporting < vehicles:
        console.print(f"[red]only {result.reporting} of {vehicles} vehicles reported[/]")
        raise typer.Exit(1)


@app.command()
def bench(
    out: Annotated[Path, typer.Option(help="where to write the results (JSON)")] = Path("bench-results.json"),
    store_seconds: Annotated[
        float, typer.Option(help="sustained ingest into SQLite and a private InfluxDB, seconds each (0: skip)")
    ] = 30.0,
) -> None:
    """Micro-benchmarks of the wire contract (see BENCHMARKS.md for method and recorded numbers)."""
    from zhilian.bench import run_benchmarks

    results = run_benchmarks(console, store_seconds=store_seconds)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"results written to {out}")


def main() -> None:
    app()
