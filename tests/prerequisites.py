"""A real server the tests need is missing: a failure under CI=true (the project's setup installs it there), a skip
that says why on a developer's machine."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, problem: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{what} tests must run in CI: {problem}")
    pytest.skip(problem)
