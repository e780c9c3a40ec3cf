# Sandpiper: build, run and test. `make help` lists the targets.
#
#   make run HOST=0.0.0.0 PORT=8080 CONFIG=sandpiper.toml DATA_DIR=/var/lib/sandpiper/data ARGS=...
#   make test
#
# Where setup.sh puts the venvs (these are exported to it, so both agree):
SANDPIPER_RUNTIME_DIR ?= /var/lib/sandpiper/runtimes
SANDPIPER_TEST_VENV ?= /var/lib/sandpiper/test-venv
export SANDPIPER_RUNTIME_DIR SANDPIPER_TEST_VENV

PYTHON_RUNTIME := $(SANDPIPER_RUNTIME_DIR)/python
TEST_VENV := $(SANDPIPER_TEST_VENV)

SWIFT ?= swift
SWIFT_TEST_FLAGS ?= --no-parallel
PYTEST_FLAGS ?= -q
# Python test directories: agents, HTTP end to end, the abuse suite, leaks/faults/hostile clients.
PYTEST_DIRS := $(wildcard tests/agent tests/e2e tests/security tests/reliability)

# HOST/PORT/CONFIG/DATA_DIR become `serve` flags when set; ARGS is passed as is.
# TLS=1 serves HTTPS with a self-signed pair made once in $(TLS_DIR) (Semantic Kernel needs https).
TLS_DIR ?= $(or $(DATA_DIR),/var/lib/sandpiper)/tls
SERVE_FLAGS := $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) \
	$(if $(CONFIG),--config $(CONFIG)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
	$(if $(TLS),--tls-cert $(TLS_DIR)/cert.pem --tls-key $(TLS_DIR)/key.pem)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.PHONY: help setup build build-debug run test test-swift test-python bench format lint clean tls-cert load soak

help:
	@echo "make setup   - install apt packages, the sandbox Python runtime and the test venv (scripts/setup.sh)"
	@echo "make build   - release build of the sandpiper binary"
	@echo "make run     - setup + build, then serve (HOST=, PORT=, CONFIG=, DATA_DIR=, TLS=1, ARGS=)"
	@echo "make test    - setup, swift tests with integration enabled, then the Python tests"
	@echo "make bench   - setup + release build, then bench/bench.py"
	@echo "make load    - bench/load.py: 200 sessions across pools for 120 s (release build if built, else debug; ARGS=...)"
	@echo "make soak    - leak test with SOAK_LIFECYCLES (10000) session lifecycles, then bench/load.py for 600 s"
	@echo "make format  - swift format the sources in place;  make lint - check formatting"
	@echo "make clean   - remove build products (not the venvs under /var/lib/sandpiper)"

setup:
	@echo "==> make setup: scripts/setup.sh"
	scripts/setup.sh

build:
	@echo "==> make build: release build of sandpiper, sandpiper-init and libSandpiperForker.so (forked sessions)"
	$(SWIFT) build -c release --product sandpiper
	$(SWIFT) build -c release --product sandpiper-init
	$(SWIFT) build -c release --product SandpiperForker

run: setup build $(if $(TLS),tls-cert)
	@echo "==> make run: .build/release/sandpiper serve $(strip $(SERVE_FLAGS) $(ARGS))"
	SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) exec .build/release/sandpiper serve $(SERVE_FLAGS) $(ARGS)

# A self-signed certificate for localhost and 127.0.0.1, made once.
tls-cert:
	@if [ ! -s $(TLS_DIR)/cert.pem ] || [ ! -s $(TLS_DIR)/key.pem ]; then \
		echo "==> make tls-cert: self-signed certificate for localhost in $(TLS_DIR)"; \
		mkdir -p $(TLS_DIR) && chmod 700 $(TLS_DIR); \
		openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj /CN=localhost \
			-addext subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1 \
			-keyout $(TLS_DIR)/key.pem -out $(TLS_DIR)/cert.pem 2>/dev/null; \
	fi

test: setup
	@echo "==> make test: building the package and its tests (debug)"
	$(SWIFT) build --build-tests
	@echo "==> make test: swift test $(SWIFT_TEST_FLAGS) (integration tests on, runtime $(PYTHON_RUNTIME))"
	SANDPIPER_INTEGRATION=1 SANDPIPER_REQUIRE_GVISOR=1 SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) $(SWIFT) test $(SWIFT_TEST_FLAGS)
	@$(MAKE) --no-print-directory test-python

# The Python tests alone, against the debug binary that `make test` builds.
test-python:
ifeq ($(strip $(PYTEST_DIRS)),)
	@echo "==> make test: no Python test directories (tests/agent, tests/e2e) yet, skipping pytest"
else
	@# One pytest per directory: each has its own conftest (and server); all run even if one
	@# fails. pytest exits 5 when it collects no test at all: not a failure here.
	failed=""; for dir in $(PYTEST_DIRS); do \
		echo "==> make test: pytest $$dir"; \
		SANDPIPER_PYTHON=$(PYTHON_RUNTIME)/bin/python SANDPIPER_BIN=$(CURDIR)/.build/debug/sandpiper \
		SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) SANDPIPER_REQUIRE_CLIENTS=1 SANDPIPER_REQUIRE_SCHEMATHESIS=1 \
			$(TEST_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_FLAGS) $$dir \
			|| { rc=$$?; if [ $$rc -eq 5 ]; then echo "==> pytest collected no tests in $$dir"; else failed="$$failed $$dir"; fi; }; \
	done; \
	if [ -n "$$failed" ]; then echo "==> make test: pytest failed in:$$failed"; exit 1; fi
endif

bench: setup build
	@echo "==> make bench: bench/bench.py against .build/release/sandpiper"
	SANDPIPER_PYTHON=$(PYTHON_RUNTIME)/bin/python SANDPIPER_BIN=$(CURDIR)/.build/release/sandpiper \
	SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) \
		$(TEST_VENV)/bin/python bench/bench.py $(ARGS)

# Load and soak: the release binary when it is built, else the debug one (no build here).
LOAD_BIN = $(if $(wildcard .build/release/sandpiper),$(CURDIR)/.build/release/sandpiper,$(CURDIR)/.build/debug/sandpiper)
SOAK_LIFECYCLES ?= 10000

load:
	@echo "==> make load: bench/load.py against $(LOAD_BIN)"
	SANDPIPER_BIN=$(LOAD_BIN) SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) \
		$(TEST_VENV)/bin/python bench/load.py $(ARGS)

# Both parts run even when the first fails; the target fails if either did.
soak:
	@echo "==> make soak: $(SOAK_LIFECYCLES) session lifecycles (tests/reliability/test_leaks.py), then bench/load.py --duration 600"
	rc=0; \
	SANDPIPER_BIN=$(LOAD_BIN) SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) SANDPIPER_LEAK_LIFECYCLES=$(SOAK_LIFECYCLES) \
		$(TEST_VENV)/bin/python -m pytest -p no:cacheprovider $(PYTEST_FLAGS) tests/reliability/test_leaks.py || rc=1; \
	SANDPIPER_BIN=$(LOAD_BIN) SANDPIPER_PYTHON_RUNTIME=$(PYTHON_RUNTIME) \
		$(TEST_VENV)/bin/python bench/load.py --duration 600 $(ARGS) || rc=1; \
	exit $$rc

format:
	@echo "==> make format: swift format (in place) Sources Tests"
	$(SWIFT) format format --parallel --in-place --recursive Sources Tests

lint:
	@echo "==> make lint: swift format lint --strict Sources Tests"
	$(SWIFT) format lint --strict --recursive Sources Tests

clean:
	@echo "==> make clean: removing .build and Python caches (venvs stay; rm -rf /var/lib/sandpiper to drop them)"
	rm -rf .build .swiftpm
	find . -path ./.git -prune -o -path ./.build -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
