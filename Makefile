# dmarcmilter: set-up, checks and tests.  CI runs `make test` (see .ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# System packages: libmilter-dev builds pymilter.
APT_PACKAGES := libmilter-dev gcc

.PHONY: all setup system-packages venv run demo lint typecheck test test-only bench clean

all: test

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  echo "installing system packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

setup: system-packages venv

# The main job: for now, evaluate a sample message against a demo DNS zone.
run: setup demo

demo:
	$(BIN)/python -m bench.demo

lint:
	$(BIN)/ruff check dmarcmilter tests bench
	$(BIN)/ruff format --check dmarcmilter tests bench

typecheck:
	$(BIN)/mypy

test-only:
	$(BIN)/python -m pytest

test: setup lint typecheck test-only

bench: setup
	$(BIN)/python -m bench.evaluate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
