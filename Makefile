# tagbus — every target installs what it needs first (see `setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TAGBUS := $(VENV)/bin/tagbus
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup up down demo test check lint types bench status clean reliability proto proto-check

## setup: system packages (apt, as root), the virtualenv, kinesis-mock, DynamoDB Local, the KCL jars and grpcurl
setup: $(STAMP)
	$(PY) -m tagbus.install

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*; touch $@

## up / down: start or stop the local stack in the background (state under .tagbus/)
up: setup
	$(TAGBUS) up

down:
	@if [ -x $(TAGBUS) ]; then $(TAGBUS) down; fi

status:
	$(TAGBUS) status

## demo: the main job end to end — watch two tenants, post their config, see each change pushed and stored
demo: up
	$(TAGBUS) demo

## test: every test, unit and end-to-end through the real parts (starts the stack if needed)
# pytest's exit code is kept in .tagbus/pytest-exit so that .ci/run can tell "no tests" (5) apart.
# The keeper renews the Kinesis stream only when a test asks (tests/integration/test_stream_generations.py):
# a renewal pauses the consumer, which would fail whichever test waits on a read model then.
test: export TAGBUS_KINESIS_ROTATE_RECORDS = 0
test: export TAGBUS_KINESIS_ROTATE_BYTES = 0
test: up
	@set -a; . .tagbus/env; set +a; rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; echo $$rc > .tagbus/pytest-exit; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

lint: setup proto-check
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

## proto: regenerate the config service's modules (committed) from config_api/v1/config.proto
PROTOC := PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -I .
proto: setup
	$(PROTOC) --python_out=. --mypy_out=. --grpc_python_out=. --mypy_grpc_out=. config_api/v1/config.proto

proto-check: setup
	@tmp=$$(mktemp -d); $(PROTOC) --python_out=$$tmp --mypy_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp \
	  config_api/v1/config.proto >/dev/null && for f in $$tmp/config_api/v1/*; do \
	  cmp -s $$f config_api/v1/$$(basename $$f) || { echo "config_api/v1/$$(basename $$f) is stale: run make proto" >&2; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp

types: setup
	$(VENV)/bin/mypy

## check: what CI runs — lint, types, then the tests
check: lint types test

## reliability: full run (about 20 min): every fault 3 times under load with the ledger check, a 5-minute
## soak at 80% of capacity, 60 s at 3x; writes reports/reliability.md and reports/reliability-latency.png.
## (make check runs the short version: each fault once, 5 s outages, 30 s soak; it writes no report.)
reliability: export TAGBUS_RELIABILITY = full
reliability: export TAGBUS_TAILER_AGGREGATE = 1
reliability: up
	@set -a; . .tagbus/env; set +a; $(PY) -m pytest tests/reliability -s -q -p no:cacheprovider

## bench: the benchmarks (results printed and written under reports/)
bench: up
	$(PY) -m bench

clean: down
	rm -rf .tagbus
