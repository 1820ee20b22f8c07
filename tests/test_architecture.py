"""The dependency rules that keep the house livable (DESIGN.md), checked on every import statement."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"protocol", "edge_agent", "broker_bridge", "cloud_ingest", "simulators", "zhilian"}
FORBIDDEN = {
    "protocol": PARTS - {"protocol"},
    "edge_agent": {"broker_bridge", "cloud_ingest", "simulators", "zhilian"},
    "cloud_ingest": {"broker_bridge", "simulators", "edge_agent", "zhilian"},
    "broker_bridge": {"simulators", "edge_agent", "zhilian"},
    "simulators": {"broker_bridge", "cloud_ingest", "zhilian"},
}
# The board must not carry the cloud's web and database stack.
BOARD_FORBIDDEN_LIBS = {"fastapi", "sqlalchemy", "uvicorn", "starlette"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    violations = {
        f"{path.relative_to(ROOT)} imports {name}" for path in files for name in _imports(path) & FORBIDDEN[package]
    }
    if package == "edge_agent":
        violations |= {
            f"{path.relative_to(ROOT)} imports {name}"
            for path in files
            for name in _imports(path) & BOARD_FORBIDDEN_LIBS
        }
    assert not violations, sorted(violations)
