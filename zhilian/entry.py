"""Entry point of the `zhilian` command, and the process plumbing every long-running subcommand shares.

The board runs `zhilian agent run --config agent.toml` (deploy/systemd/zhilian-agent.service) for months. Parsing
that through the typer CLI (zhilian/cli.py) would keep typer, click, rich and — typer coerces parameters with
pydantic — pydantic resident: ≈ 13 MB of the agent's ≤ 35 MB budget (BENCHMARKS.md, agent footprint). So `main`
recognises exactly that command line and runs the agent without importing the CLI; every other command line,
including `--help` and malformed ones, goes to the typer app, which parses and answers it as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path


class JsonFormatter(logging.Formatter):
    """One JSON object per log line: ts, level, logger, msg, and every `extra={...}` field."""

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


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if level.lower() != "debug":
        # httpx logs every request at info; the InfluxDB store makes several a second.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def run_until_stopped(coro_fn: Callable[[asyncio.Event], Awaitable[object]]) -> None:
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


def run_agent(config: Path, log_level: str) -> int:
    """`zhilian agent run`: the edge agent from its TOML file until SIGTERM/SIGINT; 2 for an unusable config."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig, ConfigError

    setup_logging(log_level)
    try:
        cfg = AgentConfig.from_toml(config)
    except ConfigError as exc:
        from rich.console import Console  # only on this error path: the running agent has no use for rich

        Console(stderr=True).print(f"[red]agent config {config}: {exc}[/red]")
        return 2
    run_until_stopped(lambda stop: EdgeAgent(cfg).run(stop))
    return 0


def agent_run_args(argv: Sequence[str]) -> tuple[Path, str] | None:
    """(config, log level) when `argv` is exactly `agent run --config F [--log-level L]` (either order, either
    `--opt value` or `--opt=value`); None for anything else, which the typer CLI then handles."""
    if list(argv[:2]) != ["agent", "run"]:
        return None
    values: dict[str, str] = {}
    rest = list(argv[2:])
    while rest:
        token = rest.pop(0)
        name, eq, value = token.partition("=")
        if name not in ("--config", "--log-level") or name in values:
            return None
        if not eq:
            if not rest or rest[0].startswith("-"):
                return None
            value = rest.pop(0)
        values[name] = value
    if not values.get("--config"):
        return None
    return Path(values["--config"]), values.get("--log-level", "info")


def main() -> int | None:
    board = agent_run_args(sys.argv[1:])
    if board is not None:
        return run_agent(*board)
    from zhilian.cli import app

    app()
    return None
