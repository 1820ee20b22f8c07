# Zhilian — two commands on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
# Both run `setup` first (scripts/setup.sh): Mosquitto, uv and the locked Python dependencies.

SHELL := /bin/bash
export PATH := $(HOME)/.local/bin:$(PATH)
RUN = uv run --frozen
ARGS ?=

.PHONY: setup demo test lint bench bench-micro clean

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

# End to end against Node-RED (10,000 vehicles; npm-installs Node-RED on first use), appended to BENCHMARKS.md,
# plot in bench-results.png, plus a short micro section; < 15 min on 2 cores. `bench-micro`: codecs, stores, rules.
bench: setup
	$(RUN) zhilian bench --out bench-results.json $(ARGS)

bench-micro: setup
	$(RUN) zhilian bench --micro --out bench-micro.json $(ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results.json bench-results.png bench-micro.json
