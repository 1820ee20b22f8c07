"""Footprint benchmark of the edge agent as it runs on a board (issue 4: ≤ 35 MB RSS, ≤ 2 % of one core).

One real `zhilian agent run --config agent.toml` process — the systemd unit's command line — reads a GNSS receiver
(NMEA at 1 Hz), a JBD BMS (polled every second) and a motor controller (status frames at 5 Hz), each emulated on its
own serial pty, and publishes over mutual TLS to a private Mosquitto with the production ACL. Without a [sampling]
table the agent sends every value of every sample: the full signal set at 1 Hz, the heaviest steady load.

The agent process is watched from outside, as an operator would: every `interval_s` its resident memory (VmRSS,
split into RssAnon and RssFile, and VmHWM, the kernel's peak) from /proc/PID/status and its CPU time (utime +
stime) from /proc/PID/stat. The first `warmup_s` (interpreter start, imports, TLS handshake, first batches) are
left out of the mean RSS and the CPU share; the peak covers the whole run. A subscriber with the bridge's identity
counts what actually arrived (verified envelopes, decoded samples, distinct signals) and keeps the agent's own last
status report as a cross-check of its self-metrics. Emulators and subscriber run in this process, so they cost
the agent nothing.

Installed packages come with compiled bytecode; where PYTHONDONTWRITEBYTECODE is set (as on the project's dev
machines) the agent would compile every module at each start, which costs RSS a board never pays. So by default
the agent gets a private bytecode cache (PYTHONPYCACHEPREFIX) primed by one short run before the measured one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from protocol import DeviceKey, Kind, ProtocolError, decode_batch, load_catalogue, parse_envelope
from protocol.commands import decode_status
from protocol.tls import client_context
from simulators.bms_jbd import JbdBmsEmulator
from simulators.controller_uart import ControllerEmulator
from simulators.gnss import GnssEmulator
from simulators.route import route_for
from simulators.vehicle import VehicleModel
from zhilian import pki
from zhilian.broker import MosquittoProcess, TlsFiles
from zhilian.procs import spawn_zhilian, stop_process

log = logging.getLogger("zhilian.bench.agent")

VIN = "LZHBENCH000000001"
TARGET_RSS_MB = 35.0
TARGET_CPU_PCT = 2.0
PRIME_TIMEOUT_S = 120.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class AgentBenchError(RuntimeError):
    """The benchmark could not measure: the agent died, or nothing reached the broker."""


@dataclass(frozen=True, slots=True)
class ProcReading:
    t: float  # monotonic seconds since the agent was spawned
    rss_kb: int
    hwm_kb: int  # the process's peak RSS so far
    anon_kb: int  # RssAnon: the process's own memory (Python objects, malloc, OpenSSL state)
    file_kb: int  # RssFile: mapped files, mostly shared libraries (libpython, the system OpenSSL, SQLite, libc)
    cpu_s: float  # utime + stime


def read_proc(pid: int, t: float) -> ProcReading:
    """One look at a live process through /proc (Linux); raises ProcessLookupError once it is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    fields[key] = int(rest.split()[0])  # kB
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # The command name (field 2) may hold spaces and parentheses: count fields from its closing parenthesis.
    after_comm = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(after_comm[11]), int(after_comm[12])  # fields 14 and 15 of proc(5)
    if "VmRSS" not in fields:  # a zombie has no memory lines
        raise ProcessLookupError(pid)
    return ProcReading(
        t, fields["VmRSS"], fields["VmHWM"], fields["RssAnon"], fields["RssFile"], (utime + stime) / _CLK_TCK
    )


@dataclass
class Uplink:
    """What reached the broker from the agent, verified and decoded."""

    messages: int = 0
    samples: int = 0
    signals: set[str] = field(default_factory=set)
    rejected: int = 0
    last_status: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.messages = self.samples = self.rejected = 0
        self.signals.clear()
        self.last_status = {}


async def _subscribe(
    broker: MosquittoProcess, tls: pki.CertFiles | None, ca: Path | None, key: DeviceKey, uplink: Uplink
) -> None:
    catalogue = load_catalogue()
    context = client_context(ca, tls.cert, tls.key) if tls is not None and ca is not None else None
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="zhilian-bench-agent", tls_context=context, timeout=10
    ) as client:
        await client.subscribe(f"ev/{VIN}/telemetry", qos=1)
        await client.subscribe(f"ev/{VIN}/status", qos=1)
        async for message in client.messages:
            if not isinstance(message.payload, bytes):
                uplink.rejected += 1
                continue
            try:
                env = parse_envelope(message.payload).verify(key.public_raw)
                if env.kind is Kind.STATUS:
                    uplink.last_status = dict(decode_status(env.body).metrics)
                    continue
                batch = decode_batch(env.body, catalogue).batch
            except ProtocolError as exc:
                uplink.rejected += 1
                log.error("uplink message rejected", extra={"topic": str(message.topic), "error": str(exc)})
                continue
            uplink.messages += 1
            uplink.samples += len(batch)
            uplink.signals.update(n for n, col in batch.columns.items() if any(v is not None for v in col))


def _agent_toml(path: Path, state: Path, broker: MosquittoProcess, ports: dict[str, str], tls: dict[str, Path]) -> None:
    lines = [
        "[agent]",
        f'vin = "{VIN}"',
        f'key_file = "{state / "device.key"}"',
        f'state_dir = "{state}"',
        f'broker_host = "{broker.host}"',
        f"broker_port = {broker.port}",
        *(f'{name} = "{port}"' for name, port in ports.items()),
        *(f'{name} = "{p}"' for name, p in tls.items()),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text(encoding="ascii").split("\n", 1)[0].split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    return f"{os.cpu_count()} × {cpu}{mem}, Linux {platform.release()}, CPython {platform.python_version()}"


def summarise(readings: list[ProcReading], warmup_s: float) -> dict[str, float]:
    """Mean and peak RSS and the CPU share of one core over the readings after the warm-up."""
    steady = [r for r in readings if r.t >= warmup_s]
    if len(steady) < 2:
        raise AgentBenchError(f"fewer than two readings after the {warmup_s:.0f} s warm-up; run longer")
    first, last = steady[0], steady[-1]
    return {
        "rss_mean_mb": round(statistics.fmean(r.rss_kb for r in steady) / 1024, 2),
        "rss_max_mb": round(max(r.rss_kb for r in steady) / 1024, 2),
        "rss_hwm_mb": round(last.hwm_kb / 1024, 2),  # includes start-up
        "rss_anon_mb": round(statistics.fmean(r.anon_kb for r in steady) / 1024, 2),
        "rss_file_mb": round(statistics.fmean(r.file_kb for r in steady) / 1024, 2),
        "cpu_pct_one_core": round(100 * (last.cpu_s - first.cpu_s) / (last.t - first.t), 3),
        "cpu_s_total": round(last.cpu_s, 2),
        "measured_s": round(last.t - first.t, 1),
    }


def _agent_died(proc: subprocess.Popen[bytes], log_path: Path) -> AgentBenchError:
    tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:] if log_path.exists() else ""
    return AgentBenchError(f"the agent exited with {proc.returncode}; its log ends:\n{tail}")


async def _prime_bytecode(args: list[str], log_path: Path, env: dict[str, str], uplink: Uplink) -> None:
    """One short agent run that compiles every module the agent imports into the private bytecode cache."""
    proc = spawn_zhilian(args, log_path, env)
    try:
        deadline = time.monotonic() + PRIME_TIMEOUT_S
        while uplink.samples == 0:
            if proc.poll() is not None:
                raise _agent_died(proc, log_path)
            if time.monotonic() > deadline:
                raise AgentBenchError(f"the priming run published nothing within {PRIME_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        await asyncio.to_thread(stop_process, proc)
    await asyncio.sleep(1.0)  # its last batch, sent at the stop, reaches the subscriber
    uplink.reset()


async def _watch(
    proc: subprocess.Popen[bytes],
    log_path: Path,
    seconds: float,
    interval_s: float,
    uplink: Uplink,
    progress: Callable[[str], None],
    progress_every_s: float,
) -> list[ProcReading]:
    start = time.monotonic()
    readings: list[ProcReading] = []
    next_progress = progress_every_s
    while (elapsed := time.monotonic() - start) < seconds:
        if proc.poll() is not None:
            raise _agent_died(proc, log_path)
        readings.append(read_proc(proc.pid, elapsed))
        if elapsed >= next_progress:
            r = readings[-1]
            progress(
                f"[{elapsed:4.0f}/{seconds:.0f} s] agent RSS {r.rss_kb / 1024:.1f} MB (peak {r.hwm_kb / 1024:.1f}), "
                f"CPU {100 * r.cpu_s / r.t:.2f} % of a core since start, {uplink.samples} samples published"
            )
            next_progress += progress_every_s
        await asyncio.sleep(min(interval_s, max(0.0, seconds - elapsed)))
    readings.append(read_proc(proc.pid, time.monotonic() - start))
    return readings


async def run_agent_bench(
    seconds: float = 300.0,
    warmup_s: float = 30.0,
    interval_s: float = 5.0,
    *,
    tls: bool = True,
    bytecode: bool = True,
    progress: Callable[[str], None] = print,
    progress_every_s: float = 30.0,
) -> dict[str, Any]:
    """Watch one agent for `seconds`; see the module docstring for the method. `bytecode`: run it as installed
    (compiled .pyc, in a private cache primed by one short run) even where PYTHONDONTWRITEBYTECODE is set."""
    if seconds <= warmup_s + interval_s or interval_s <= 0:
        raise AgentBenchError("seconds must exceed the warm-up by at least one interval; interval must be > 0")
    with tempfile.TemporaryDirectory(prefix="zhilian-bench-agent-") as tmp:
        work = Path(tmp)
        state = work / "agent"
        state.mkdir()
        key = DeviceKey.generate()
        key.save(state / "device.key")
        tls_files: dict[str, Path] = {}
        broker_tls: TlsFiles | None = None
        reader: pki.CertFiles | None = None
        ca_cert: Path | None = None
        if tls:
            ca = pki.make_ca(work / "pki" / "ca")
            server = pki.issue_server_cert(ca, work / "pki" / "server", ["127.0.0.1"])
            device = pki.issue_client_cert(ca, work / "pki" / "clients", VIN)
            reader = pki.issue_client_cert(ca, work / "pki" / "clients", pki.BRIDGE_CN)  # the ACL lets it read
            broker_tls, ca_cert = TlsFiles(ca.cert, server.cert, server.key), ca.cert
            tls_files = {"tls_ca": ca.cert, "tls_cert": device.cert, "tls_key": device.key}
        # Installed packages come with compiled bytecode; this cache stands in for it without writing into the
        # source tree or the virtualenv. Without it every start compiles ≈ 400 modules, and RSS shows it.
        env = {"PYTHONPYCACHEPREFIX": str(work / "pycache"), "PYTHONDONTWRITEBYTECODE": ""} if bytecode else {}
        model = VehicleModel(route_for(0), seed=0, start_time=time.time())
        gnss = GnssEmulator(model, rate_hz=1.0)
        bms = JbdBmsEmulator(model)
        controller = ControllerEmulator(model)
        broker = MosquittoProcess(work / "mosquitto", tls=broker_tls).start()  # stopped by the finally below
        uplink = Uplink()
        subscriber: asyncio.Task[None] | None = None
        proc: subprocess.Popen[bytes] | None = None
        log_path = work / "agent.log"
        try:
            for emulator in (gnss, bms, controller):
                await emulator.start()
            ports = {"gnss_port": gnss.port, "bms_port": bms.port, "controller_port": controller.port}
            config = work / "agent.toml"
            _agent_toml(config, state, broker, ports, tls_files)
            subscriber = asyncio.create_task(_subscribe(broker, reader, ca_cert, key, uplink), name="bench-sub")
            await asyncio.sleep(0.5)  # subscribed before the agent's first batch
            if subscriber.done():
                subscriber.result()  # raises what stopped it
            args = ["agent", "run", "--config", str(config), "--log-level", "warning"]
            if bytecode:
                progress("priming the bytecode cache with one short agent run ...")
                await _prime_bytecode(args, log_path, env, uplink)
            proc = spawn_zhilian(args, log_path, env)
            watch = asyncio.create_task(
                _watch(proc, log_path, seconds, interval_s, uplink, progress, progress_every_s), name="bench-watch"
            )
            # Whichever ends first: the watch (normally), or the subscriber (a failure that voids the count).
            await asyncio.wait({watch, subscriber}, return_when=asyncio.FIRST_COMPLETED)
            if not watch.done():
                watch.cancel()
                raise AgentBenchError(f"the uplink subscriber stopped: {subscriber.exception()!r}")
            readings = watch.result()
            await asyncio.sleep(0.5)  # the last batch's PUBLISH may still be on its way to the subscriber
        finally:
            if proc is not None:
                await asyncio.to_thread(stop_process, proc)
            if subscriber is not None:
                subscriber.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await asyncio.wait_for(subscriber, 5)
            for emulator in (gnss, bms, controller):
                await emulator.stop()
            broker.stop()
    if uplink.samples == 0:
        raise AgentBenchError("the agent published nothing; the measurement would describe an idle process")
    catalogue = load_catalogue()
    own = uplink.last_status
    return {
        "machine": machine(),
        "python": sys.version.split()[0],
        "command": "python -m zhilian agent run --config agent.toml (GNSS, JBD BMS, controller on ptys; "
        + ("mutual TLS" if tls else "plain MQTT")
        + (", compiled bytecode)" if bytecode else ", no bytecode cache)"),
        "seconds": seconds,
        "warmup_s": warmup_s,
        "interval_s": interval_s,
        **summarise(readings, warmup_s),
        "target_rss_mb": TARGET_RSS_MB,
        "target_cpu_pct": TARGET_CPU_PCT,
        "messages_published": uplink.messages,
        "samples_published": uplink.samples,
        "samples_per_s": round(uplink.samples / readings[-1].t, 3),
        "signals_sent": len(uplink.signals),
        "signals_in_catalogue": len(catalogue),
        # Those the fitted devices do not have (cells and probes beyond the pack's, CAN-only values).
        "signals_not_sent": sorted({sig.name for sig in catalogue} - uplink.signals),
        "rejected": uplink.rejected,
        "agent_reported": {k: own.get(k) for k in ("rss_kb", "cpu_pct", "samples", "published", "spool_depth")},
        "readings_columns": ["t_s", "rss_kb", "hwm_kb", "anon_kb", "file_kb", "cpu_s"],
        "readings": [[round(r.t, 1), r.rss_kb, r.hwm_kb, r.anon_kb, r.file_kb, round(r.cpu_s, 2)] for r in readings],
    }
