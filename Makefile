# Zhilian — two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
# Both run `setup` first (scripts/setup.sh): Mosquitto, uv and the locked Python dependencies.

SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
RUN = uv run --frozen
ARGS ?=

.PHONY: setup demo test lint bench clean

setup:
	@scripts/setup.sh

demo: setup
	$(RUN) zhilian demo $(ARGS)

test: setup
	$(RUN) pytest -q $(ARGS)

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy protocol

bench: setup
	$(RUN) zhilian bench --out bench-results.json

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results.json
