# Two commands: `make run` (everything, embedded, on this machine) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat requirements-dev.lock pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint typecheck pytest bench soak lock clean

$(STAMP): requirements-dev.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

run: $(STAMP)
	$(BIN)/sms-dispatch dev

test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# Throughput and latency on this machine, each against a floor measured in the same run
# (docs/performance.md). Uses Debian's wrk, installed here when running as root; without it the
# accept scenario falls back to a Python load generator and says so. BENCH_FULL=1 adds the
# 200,000-message backlog, BENCH_PROFILE=1 py-spy profiles (pip install py-spy into the venv).
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || apt-get install -y -qq wrk >/dev/null 2>&1 \
	  || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq wrk >/dev/null 2>&1; } || true
	$(BIN)/python -m bench.run

# Thousands of messages under repeated real faults (worker kills, a Redis restart, a provider
# outage, sends in doubt), ending with the ledger; docs/operations.md records the last figures.
# SMSD_SOAK_MESSAGES sets its size (default 3000).
soak: $(STAMP)
	$(BIN)/pytest -m soak -s -p no:cacheprovider --timeout 1800 tests/faults/test_soak.py

# Re-resolve the pinned, hashed dependency sets after editing pyproject.toml: the development
# set (everything `make` installs), then the runtime set for images, held to the same versions.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --generate-hashes --extra dev --no-emit-index-url \
	  --no-emit-find-links --strip-extras --allow-unsafe -o requirements-dev.lock pyproject.toml
	$(BIN)/pip-compile --quiet --generate-hashes --no-emit-index-url --no-emit-find-links \
	  --strip-extras --allow-unsafe -c requirements-dev.lock -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
