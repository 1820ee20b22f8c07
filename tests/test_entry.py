"""The `zhilian` entry point: the board's `zhilian agent run --config F` runs without the typer CLI in memory, and
every other command line still reaches the CLI unchanged."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from zhilian.entry import agent_run_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_board_command_line_is_recognised_in_every_spelling() -> None:
    cfg = Path("/etc/zhilian/agent.toml")
    assert agent_run_args(["agent", "run", "--config", str(cfg)]) == (cfg, "info")
    assert agent_run_args(["agent", "run", f"--config={cfg}", "--log-level", "debug"]) == (cfg, "debug")
    assert agent_run_args(["agent", "run", "--log-level=warning", "--config", str(cfg)]) == (cfg, "warning")


def test_anything_else_is_left_to_the_cli() -> None:
    for argv in (
        [],
        ["agent"],
        ["agent", "run"],
        ["agent", "run", "--help"],
        ["agent", "run", "--config"],  # no value
        ["agent", "run", "--config", "--log-level", "info"],  # an option where the value should be
        ["agent", "run", "--config", "a.toml", "--config", "b.toml"],
        ["agent", "run", "--config", "a.toml", "--verbose"],
        ["agent", "run", "--config="],
        ["agent", "--config", "a.toml"],  # the option form: the CLI parses its many options
        ["serve", "--config", "a.toml"],
        ["bench-agent", "--seconds", "10"],
    ):
        assert agent_run_args(argv) is None, argv


option = st.sampled_from(["--config", "--log-level"])
value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


@given(
    st.lists(st.tuples(option, value, st.booleans()), max_size=4),
    st.lists(value.filter(lambda v: not v.startswith("-")), max_size=2),  # stray arguments, not options
)
def test_parse_agrees_with_a_plain_reading_of_the_arguments(
    opts: list[tuple[str, str, bool]], stray: list[str]
) -> None:
    argv = ["agent", "run"]
    for name, val, joined in opts:
        argv += [f"{name}={val}"] if joined else [name, val]
    argv += stray
    got = agent_run_args(argv)
    names = [name for name, _, _ in opts]
    values = {name: val for name, val, _ in opts}
    plain = (
        not stray
        and len(set(names)) == len(names)
        and "--config" in values
        and all(joined or not val.startswith("-") for _, val, joined in opts)
    )
    if plain:
        assert got == (Path(values["--config"]), values.get("--log-level", "info"))
    else:
        assert got is None


def _zhilian(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zhilian", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_agent_run_keeps_the_cli_out_of_memory(tmp_path: Path) -> None:
    # A config error returns before the agent starts: what is imported by then is what a running agent carries.
    probe = (
        "import sys\n"
        f"sys.argv = ['zhilian', 'agent', 'run', '--config', {str(tmp_path / 'missing.toml')!r}]\n"
        "from zhilian.entry import main\n"
        "code = main()\n"
        "heavy = sorted(m for m in ('typer', 'click', 'pydantic', 'zhilian.cli', 'httpx') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "2 []", out.stdout + out.stderr
    assert "missing.toml" in out.stderr


def test_the_cli_still_answers_everything_else(tmp_path: Path) -> None:
    bad = _zhilian("agent", "run", "--config", str(tmp_path / "missing.toml"))
    assert bad.returncode == 2 and "cannot read agent config" in bad.stderr
    helped = _zhilian("agent", "run", "--help")
    assert helped.returncode == 0 and "--config" in helped.stdout and "--log-level" in helped.stdout
    unknown = _zhilian("agent", "run", "--config", "x.toml", "--bogus")
    assert unknown.returncode == 2 and "No such option" in unknown.stderr
