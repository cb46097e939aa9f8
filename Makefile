# MeshMQ: every target runs in the virtualenv .venv, created from python3.11 when missing.
#
#   make run     venv + install + a single-node broker on port 1883 (embedded SQLite store)
#   make test    what the tests need (Python packages; Debian's mosquitto, postgresql) + the suite

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Written after a successful install; pyproject.toml changing makes it stale.
INSTALLED := $(VENV)/.meshmq-installed

# Bounds of one whole test run: pytest stops starting new tests after TEST_SESSION_S seconds
# (and fails); coreutils timeout kills it after TEST_HARD_LIMIT_S in case a test hangs past its
# own 120 s bound.
TEST_SESSION_S ?= 540
TEST_HARD_LIMIT_S ?= 600
PYTEST_ARGS ?=
# Parallel test processes (pytest-xdist): most tests wait on real brokers and sockets, not the CPU.
TEST_WORKERS ?= 4
# `make lint LINT_PATHS="broker/config.py"` checks some files only; likewise TYPE_PATHS.
LINT_PATHS ?= .
TYPE_PATHS ?= broker mesh store tools

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help venv install run test system-deps lint type bench fuzz clean distclean

help:
	@echo "make run        start a single-node broker on port 1883 (etc/meshmq.yaml)"
	@echo "make test       install what the tests need, then run the whole suite"
	@echo "make venv       create .venv and install MeshMQ with its test extras (alias: install)"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make type       mypy --strict on broker mesh store tools"
	@echo "make bench      benchmark (python -m tools.bench)"
	@echo "make fuzz       fuzz the MQTT decoder for 300 s"
	@echo "make clean      remove caches and build output (distclean: the venv too)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[test]'
	@touch $@

venv install: $(INSTALLED)

run: $(INSTALLED)
	$(VENV)/bin/meshmq -config etc/meshmq.yaml

# Debian packages the end-to-end tests use; installed only when one of them is missing.
system-deps:
	@if [ -x /usr/sbin/mosquitto ] && command -v mosquitto_pub >/dev/null \
	    && compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
	    && command -v nft >/dev/null && command -v ip >/dev/null && command -v haproxy >/dev/null \
	    && command -v openssl >/dev/null; then :; else \
	  echo "installing Debian packages: mosquitto mosquitto-clients postgresql nftables iproute2 haproxy openssl"; \
	  $(SUDO) apt-get update && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y mosquitto mosquitto-clients postgresql \
	    nftables iproute2 haproxy openssl; \
	fi

# Exit status 5 (no tests collected) fails like any other non-zero status; it gets its own line.
test: $(INSTALLED) system-deps
	@status=0; \
	timeout --kill-after=20 $(TEST_HARD_LIMIT_S) \
	  $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --session-timeout=$(TEST_SESSION_S) $(PYTEST_ARGS) tests \
	  || status=$$?; \
	case $$status in \
	  0) ;; \
	  5) echo "make test: FAILED: pytest collected no tests" >&2 ;; \
	  124|137) echo "make test: FAILED: the run was killed after $(TEST_HARD_LIMIT_S) s" >&2 ;; \
	  *) echo "make test: FAILED (pytest exit status $$status)" >&2 ;; \
	esac; \
	exit $$status

lint: $(INSTALLED)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

type: $(INSTALLED)
	$(VENV)/bin/mypy --strict $(TYPE_PATHS)

bench: $(INSTALLED)
	$(PY) -m tools.bench

fuzz: $(INSTALLED)
	$(PY) tests/fuzz/fuzz_decoder.py --seconds 300

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
