"""The one `zhilian` command."""

from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import typer
from rich.console import Console

from zhilian.entry import run_agent
from zhilian.entry import run_until_stopped as _run
from zhilian.entry import setup_logging as _logging
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


LogLevel = Annotated[str, typer.Option("--log-level", help="debug, info, warning, error")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", help="mutual TLS: CA certificate that signed the broker's")]
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help="mutual TLS: this client's certificate (PEM)")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help="mutual TLS: this client's private key (PEM, 0600)")]
# -- storage, rules and notification options: shared by serve, ingest and bridge, declared once -------------------

DataDir = Annotated[Path, typer.Option("--data-dir", help="where the SQLite databases live")]
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
RulesFile = Annotated[
    Path | None,
    typer.Option("--rules", envvar="ZHILIAN_RULES", help="hazard rules file (default: the packaged one, RULES.md)"),
]
WebhookUrl = Annotated[
    str | None, typer.Option("--webhook-url", envvar="ZHILIAN_WEBHOOK_URL", help="POST alarm notifications here")
]
WebhookSecret = Annotated[
    str | None,
    typer.Option(
        "--webhook-secret",
        envvar="ZHILIAN_WEBHOOK_SECRET",
        help="HMAC-SHA256 key of the X-Zhilian-Signature header; prefer the env var",
    ),
]
NorthMqtt = Annotated[
    str | None,
    typer.Option(
        "--north-mqtt",
        envvar="ZHILIAN_NORTH_MQTT",
        metavar="bridge|HOST:PORT",
        help="also publish alarm notifications over MQTT (QoS 1): `bridge` = to the bridge's broker, or to "
        "HOST:PORT; with the --tls-* files (default: off)",
    ),
]
NorthTopic = Annotated[
    str | None,
    typer.Option(
        "--north-topic",
        envvar="ZHILIAN_NORTH_TOPIC",
        help="topic of --north-mqtt's notifications; {vin} is the vehicle's (default: north/alarms/{vin})",
    ),
]


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """Where an IngestService keeps its data, its rules and where its alarm notifications go: the options of every
    command that runs one. Each field is one CLI option (its Annotated type) with its default; `_service_command`
    gives a command all of them. Every process of a deployment that ingests or runs the API must get the same
    rules and notification options: a notification is queued by the process that decided the alarm."""

    data_dir: DataDir = Path("zhilian-data")
    database_url: DatabaseUrl = None
    influx_url: InfluxUrl = None
    influx_db: InfluxDb = "zhilian"
    influx_username: InfluxUser = None
    influx_password: InfluxPassword = None
    influx_token: InfluxToken = None
    rules: RulesFile = None
    webhook_url: WebhookUrl = None
    webhook_secret: WebhookSecret = None
    north_mqtt: NorthMqtt = None
    north_topic: NorthTopic = None

    def open_kwargs(
        self, bridge_broker: tuple[str, int] | None, tls: tuple[Path | None, Path | None, Path | None]
    ) -> dict[str, object]:
        """IngestService.open arguments beyond data_dir and database_url. `bridge_broker`: what `--north-mqtt
        bridge` means (None: this command runs no bridge); `tls`: the command's --tls-ca/--tls-cert/--tls-key."""
        return {**self._store(), **self._alarms(), **self._north(bridge_broker, tls)}

    def _store(self) -> dict[str, object]:
        from cloud_ingest.retention import RetentionConfig  # lazily: the agent imports this module

        # Raw telemetry 30 days, 1-minute rollups 2 years, unless ZHILIAN_RAW_RETENTION_DAYS/..._ROLLUP_... say so.
        options: dict[str, object] = {"retention": RetentionConfig.from_env(os.environ)}
        if self.influx_url is not None:
            options |= {
                "influx_url": self.influx_url,
                "influx_db": self.influx_db,
                "influx_username": self.influx_username,
                "influx_password": self.influx_password,
                "influx_token": self.influx_token,
            }
        return options

    def _alarms(self) -> dict[str, object]:
        options: dict[str, object] = {}
        if self.rules is not None:
            options["rules_path"] = self.rules
        if self.webhook_url is not None:
            from cloud_ingest.notify import NotifyConfigError, WebhookConfig

            try:
                options["webhook"] = WebhookConfig(self.webhook_url, (self.webhook_secret or "").encode())
            except NotifyConfigError as exc:
                raise typer.BadParameter(str(exc)) from None
        return options

    def _north(
        self, bridge_broker: tuple[str, int] | None, tls: tuple[Path | None, Path | None, Path | None]
    ) -> dict[str, object]:
        if self.north_mqtt is None:
            if self.north_topic is not None:
                raise typer.BadParameter("--north-topic needs --north-mqtt")
            return {}
        from cloud_ingest.north_mqtt import NorthMqttConfig, parse_broker_address
        from cloud_ingest.notify import NotifyConfigError, check_topic_template

        try:
            if self.north_mqtt.strip().lower() == "bridge":
                if bridge_broker is None:
                    raise typer.BadParameter("this command runs no bridge: give --north-mqtt HOST:PORT")
                host, port = bridge_broker
            else:
                host, port = parse_broker_address(self.north_mqtt)
            options: dict[str, object] = {"north_mqtt": NorthMqttConfig(host, port, *tls)}
            if self.north_topic is not None:
                options["north_topic"] = check_topic_template(self.north_topic)
        except NotifyConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
        return options


_SERVICE_HINTS = get_type_hints(ServiceOptions, include_extras=True)
_SERVICE_PARAMS = [
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=_SERVICE_HINTS[f.name])
    for f in fields(ServiceOptions)
]


def _service_command(command: Callable[..., None]) -> Callable[..., None]:
    """Typer sees the command's `service: ServiceOptions` parameter as all of ServiceOptions' options, in its
    place; the command gets them back as one ServiceOptions."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    params = [
        q.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in own
        for q in (_SERVICE_PARAMS if p.name == "service" else [p])
    ]
    names = [p.name for p in _SERVICE_PARAMS]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        command(service=ServiceOptions(**{n: kwargs.pop(n) for n in names}), **kwargs)

    wrapper.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return wrapper


def _serve(
    service: ServiceOptions,
    log_level: str,
    broker: tuple[str, int] | None,
    tls: tuple[Path | None, Path | None, Path | None],
    **parts: Any,
) -> None:
    """Run zhilian.serve with the shared options. `broker`: the bridge's, which also gets the `tls` files (None:
    the command has no bridge); `parts`: which halves run and their own settings."""
    from zhilian.serve import serve as serve_

    _logging(log_level)
    store = service.open_kwargs(broker, tls)
    if broker is not None:
        parts |= {
            "mqtt_host": broker[0],
            "mqtt_port": broker[1],
            "tls_ca": tls[0],
            "tls_cert": tls[1],
            "tls_key": tls[2],
        }
    _run(
        lambda stop: serve_(
            service.data_dir,
            stop=stop,
            database_url=service.database_url,
            store_options=store,
            freeze_heap=True,
            **parts,
        )
    )


@app.command()
@_service_command
def serve(
    service: ServiceOptions,
    http_host: str = "127.0.0.1",
    http_port: int = 8080,
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int = 1883,
    bridge: Annotated[bool, typer.Option(help="also consume from the MQTT broker")] = True,
    share_group: Annotated[str | None, typer.Option(help="MQTT 5 shared-subscription group (several workers)")] = None,
    client_id: str = "zhilian-bridge",
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the ingest API and the MQTT bridge together (several on one --share-group spread the load)."""
    _serve(
        service, log_level, (mqtt_host, mqtt_port), (tls_ca, tls_cert, tls_key),
        http_host=http_host, http_port=http_port, with_bridge=bridge, share_group=share_group, client_id=client_id,
    )  # fmt: skip


@app.command()
@_service_command
def ingest(
    service: ServiceOptions,
    http_host: str = "127.0.0.1",
    http_port: int = 8080,
    tls_ca: Annotated[Path | None, typer.Option(help="--north-mqtt over mutual TLS: the broker's CA")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="--north-mqtt over mutual TLS: client certificate")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="--north-mqtt over mutual TLS: client key (0600)")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run only the ingest API (the operator API; feed it with one or more `zhilian bridge`)."""
    _serve(
        service, log_level, None, (tls_ca, tls_cert, tls_key), http_host=http_host, http_port=http_port,
        with_bridge=False,
    )  # fmt: skip


@app.command()
@_service_command
def bridge(
    service: ServiceOptions,
    mqtt_host: str = "127.0.0.1",
    mqtt_port: int = 1883,
    share_group: Annotated[str | None, typer.Option(help="MQTT 5 shared-subscription group (several workers)")] = None,
    client_id: str = "zhilian-bridge",
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    log_level: LogLevel = "info",
) -> None:
    """Run only the MQTT bridge, storing into DATA_DIR's databases."""
    _serve(
        service, log_level, (mqtt_host, mqtt_port), (tls_ca, tls_cert, tls_key),
        with_api=False, share_group=share_group, client_id=client_id,
    )  # fmt: skip


agent_app = typer.Typer(help="The edge agent (as on a vehicle board).")
app.add_typer(agent_app, name="agent")


@agent_app.command("run")
def agent_run(
    config: Annotated[Path, typer.Option(help="agent TOML file (see deploy/agent.example.toml)")],
    log_level: LogLevel = "info",
) -> None:
    """Run the edge agent from its config file (the systemd unit's entry point)."""
    # The board reaches run_agent through zhilian.entry.main without this module (and typer) in memory.
    code = run_agent(config, log_level)
    if code:
        raise typer.Exit(code)


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
    mode: Annotated[str, typer.Option(help="device (real agents on emulated devices) or protocol")] = "device",
    rate: Annotated[float, typer.Option(help="protocol mode: messages/s across the fleet (10 samples each)")] = 100.0,
    seed: Annotated[int, typer.Option(help="protocol mode: fleet seed (keys, rides, bytes)")] = 0,
    boot: Annotated[int | None, typer.Option(help="protocol mode: boot counter (default: now)")] = None,
    duration: Annotated[float | None, typer.Option(help="protocol mode: seconds (default: until Ctrl-C)")] = None,
    payload: Annotated[str, typer.Option(help="protocol mode: signed (ev/...) or json (nr/...)")] = "signed",
    log_level: LogLevel = "info",
) -> None:
    """Run N virtual vehicles. Device mode (default): GNSS, BMS and controller emulated on real ptys read by real
    edge agents. Protocol mode: thousands of vehicles on one event loop, each with its own MQTT connection,
    publishing the agent's signed envelopes at --rate messages/s (standing load against any broker)."""
    _logging(log_level)
    if mode == "protocol":
        _sim_fleet_protocol(vehicles, broker_host, broker_port, api, api_key, rate, seed, boot, duration, payload)
        return
    if mode != "device":
        raise typer.BadParameter(f"--mode must be device or protocol, not {mode!r}")
    from zhilian.fleet import run_fleet

    async def go(stop: asyncio.Event) -> None:
        await run_fleet(vehicles, state_dir, broker_host, broker_port, api, api_key, stop, batch_interval, gnss_rate)

    _run(go)


def _sim_fleet_protocol(
    vehicles: int,
    broker_host: str,
    broker_port: int,
    api: str | None,
    api_key: str | None,
    rate: float,
    seed: int,
    boot: int | None,
    duration: float | None,
    payload: str,
) -> None:
    import time

    from simulators.virtual_fleet import fleet_key, fleet_vin, run_standing_load
    from zhilian.fleet import register_devices

    if payload not in ("signed", "json"):
        raise typer.BadParameter(f"--payload must be signed or json, not {payload!r}")
    if rate <= 0 or vehicles < 1:
        raise typer.BadParameter("--rate and --vehicles must be positive")
    boot = int(time.time()) if boot is None else boot

    def report(snapshot: dict[str, object]) -> None:
        console.print(
            f"sent {snapshot['sent']:,} acked {snapshot['acked']:,} connected {snapshot['connected']:,} "
            f"send lag p99 {snapshot['lag_ms_p99']:.1f} ms, fleet CPU {snapshot['cpu_s']:.1f} s"
        )

    async def go(stop: asyncio.Event) -> None:
        if api and api_key:
            devices = [(fleet_vin(i), fleet_key(seed, fleet_vin(i)).public_raw) for i in range(vehicles)]
            await register_devices(api, api_key, devices)
            console.print(f"registered {vehicles:,} vehicles with {api}")
        console.print(f"protocol fleet: {vehicles:,} vehicles, {rate:,.0f} msg/s, seed {seed}, boot {boot}")
        kind: Literal["signed", "json"] = "json" if payload == "json" else "signed"
        await run_standing_load(
            vehicles, rate, broker_host, broker_port, stop, seed=seed, boot=boot, kind=kind, duration_s=duration,
            report=report,
        )  # fmt: skip

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
    data_dir: DataDir = Path("zhilian-data"),
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


@app.command("bench-agent")
def bench_agent(
    seconds: Annotated[float, typer.Option(help="how long to watch the agent (the acceptance asks ≥ 300)")] = 300.0,
    warmup: Annotated[float, typer.Option(help="seconds after start left out of mean RSS and CPU")] = 30.0,
    interval: Annotated[float, typer.Option(help="seconds between /proc readings")] = 5.0,
    tls: Annotated[bool, typer.Option(help="mutual TLS to the broker, as deployed")] = True,
    bytecode: Annotated[bool, typer.Option(help="compiled bytecode, as installed (a private cache)")] = True,
    out: Annotated[Path | None, typer.Option(help="also write the results here (JSON)")] = None,
) -> None:
    """Footprint of one `zhilian agent` on emulated serial devices: RSS and CPU (see BENCHMARKS.md)."""
    from zhilian.bench_agent import AgentBenchError, run_agent_bench

    try:
        results = asyncio.run(
            run_agent_bench(seconds, warmup, interval, tls=tls, bytecode=bytecode, progress=console.print)
        )
    except AgentBenchError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    summary = {k: v for k, v in results.items() if not k.startswith("readings")}
    console.print_json(json.dumps(summary))
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {out}")


@app.command("bench-store-scale")
def bench_store_scale(
    vehicles: Annotated[int, typer.Option(help="vehicles in the store (the snapshot covers them all)")] = 10_000,
    samples: Annotated[
        int, typer.Option(help="1 Hz samples per vehicle, a multiple of 30 (plus one vehicle with a whole day)")
    ] = 1_020,
    backend: Annotated[list[str] | None, typer.Option(help="sqlite and/or influx (default: both)")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="keep the data here; a later run of the same size only queries again")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="also write the results here (JSON)")] = None,
) -> None:
    """Operator queries (fleet snapshot, day track, daily) over ≥ 10 M rows on each backend (see BENCHMARKS.md)."""
    from zhilian.bench_store import run_scale_benchmarks

    results = run_scale_benchmarks(console, vehicles, samples, tuple(backend or ("sqlite", "influx")), data_dir)
    if out is not None:
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        console.print(f"results written to {out}")


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
    micro: Annotated[bool, typer.Option(help="only the micro-benchmarks (codecs, pipeline, stores, rules)")] = False,
    store_seconds: Annotated[
        float, typer.Option(help="--micro: sustained ingest into SQLite and a private InfluxDB, seconds each (0: skip)")
    ] = 30.0,
    vehicles: Annotated[int, typer.Option(help="virtual vehicles, one MQTT connection each")] = 10_000,
    store: Annotated[str, typer.Option(help="influx (needed for the Node-RED comparison) or sqlite")] = "influx",
    step_seconds: Annotated[float, typer.Option(help="seconds of load per ramp step")] = 10.0,
    start_rate: Annotated[float, typer.Option(help="first step's messages/s (10 samples each)")] = 200.0,
    max_steps: Annotated[int, typer.Option(help="ramp steps per pipeline before refining")] = 8,
    nodered: Annotated[bool, typer.Option(help="run the Node-RED baseline (npm-installed on first use)")] = True,
    micro_section: Annotated[bool, typer.Option(help="add the bench message's codec costs")] = True,
    alarm_probe: Annotated[bool, typer.Option(help="measure alarm latency (when GET /v1/alarms exists)")] = True,
    ingest_workers: Annotated[
        int, typer.Option(min=1, max=16, help="`zhilian serve` processes on one MQTT shared subscription")
    ] = 2,
    profile_messages: Annotated[int, typer.Option(help="messages profiled in-process with cProfile (0: skip)")] = 1000,
    plot: Annotated[Path | None, typer.Option(help="PNG plot (default: next to --out)")] = None,
    report: Annotated[Path | None, typer.Option(help="append the report to this Markdown file")] = Path(
        "BENCHMARKS.md"
    ),
    no_report: Annotated[bool, typer.Option("--no-report", help="do not append to a Markdown file")] = False,
) -> None:
    """End-to-end load benchmark side by side with Node-RED, plus the bench message's codec costs (BENCHMARKS.md);
    --micro: the micro-benchmarks of codecs, pipeline, stores, rules and decoders instead."""
    from zhilian.bench import run_benchmarks

    if micro:
        results = run_benchmarks(console, store_seconds=store_seconds)
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {out}")
        return
    from zhilian.loadbench import (
        LoadBenchConfig,
        LoadBenchError,
        append_report,
        codec_micro,
        markdown_report,
        print_summary,
        run_loadbench,
        write_plot,
    )

    if store not in ("influx", "sqlite"):
        raise typer.BadParameter(f"--store must be influx or sqlite, not {store!r}")
    config = LoadBenchConfig(
        vehicles=vehicles,
        store=store,  # type: ignore[arg-type]
        step_s=step_seconds,
        start_rate=start_rate,
        nodered_start_rate=start_rate,
        max_steps=max_steps,
        nodered=nodered,
        alarm_probe=alarm_probe,
        ingest_workers=ingest_workers,
        profile_messages=profile_messages,
    )
    try:
        results = run_loadbench(config, console)
    except LoadBenchError as exc:
        console.print(f"[red]load benchmark failed: {exc}[/red]")
        raise typer.Exit(1) from None
    if micro_section:
        results["micro"] = codec_micro()
    plot_path = write_plot(results, plot or out.with_suffix(".png"))
    results["plot"] = str(plot_path)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(console, results)
    if report is not None and not no_report:
        append_report(report, markdown_report(results, plot_path))
        console.print(f"report appended to {report}")
    console.print(f"results written to {out}, plot {plot_path}")


def main() -> None:
    app()
