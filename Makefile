# dmarcmilter: set-up, checks and tests.  On a bare machine, start with
# ./dev.sh TARGET, which installs make first; CI runs `./dev.sh test` (.ci/run).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# System packages: the venv module (Debian splits it from python3), and what
# builds pymilter (its C extension links libmilter).
APT_PACKAGES := python3-venv python3-dev libmilter-dev gcc
# Test-only system packages: the tests start their own throwaway PostgreSQL cluster
# (tests/pgserver.py), MariaDB server (tests/mysqlserver.py) and Postfix instances
# (tests/postfixserver.py); the Debian-packaged system services are not used.
# systemd provides systemd-analyze for the unit checks; podman, runc and
# debootstrap build and run the container images (tests/podman.py: the
# image, Sendmail), podman-compose the sidecar example, whose service names
# resolve through aardvark-dns on a netavark network.
TEST_APT_PACKAGES := postgresql mariadb-server postfix systemd podman runc debootstrap \
	podman-compose netavark aardvark-dns iptables chromium
# Optional, for the milter benchmark only (bench/milter_throughput.py compares
# dmarcmilter with Debian's opendkim + opendmarc): not test dependencies.  The
# system services are not started (policy-rc.d); the benchmark runs private
# instances.
BENCH_APT_PACKAGES := opendkim opendmarc
POLICY_RC_D := /usr/sbin/policy-rc.d
# Marks a policy-rc.d written here, so that one left by an interrupted install
# is recognised and removed, and one the administrator wrote is left alone.
POLICY_RC_D_MARK := \# dmarcmilter set-up: no service starts during this install

.PHONY: all setup test-setup system-packages test-system-packages bench-system-packages apt-install venv test-venv run demo lint typecheck test test-only bench bench-milter bench-report bench-fuzz clean

all: test

system-packages:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

test-system-packages:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES) $(TEST_APT_PACKAGES)"

bench-system-packages:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES) $(TEST_APT_PACKAGES) $(BENCH_APT_PACKAGES)"

# Installs the missing ones of $(PACKAGES).  policy-rc.d stops the postgresql,
# mariadb-server and postfix packages from starting their system services during the
# install (the tests run their own).  postfix is preseeded with "No configuration":
# no question is asked, and no /etc/postfix/main.cf is written, so the system's
# Postfix has nothing to run with.  An install interrupted half-way is finished
# by the next run (dpkg --configure -a), and its policy-rc.d is removed.
apt-install:
	@rcd=$(POLICY_RC_D); \
	if [ -e $$rcd ] && grep -qF '$(POLICY_RC_D_MARK)' $$rcd; then rm -f $$rcd; fi; \
	missing=""; for p in $(PACKAGES); do \
	  dpkg-query -W -f '$${Status}' $$p 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  echo "installing system packages:$$missing"; \
	  case " $$missing " in *" postfix "*) \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections || exit 1;; \
	  esac; \
	  added=""; \
	  if [ ! -e $$rcd ]; then printf '#!/bin/sh\n%s\nexit 101\n' '$(POLICY_RC_D_MARK)' >$$rcd && chmod 755 $$rcd && added=1; fi; \
	  trap '[ -z "$$added" ] || rm -f $$rcd' EXIT; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  dpkg --configure -a && apt-get update -qq && apt-get install -y -qq --no-remove $$missing >/dev/null; \
	fi

# The virtualenv: .venv/.complete is written last, so a venv whose creation was
# interrupted (no pip, say) is removed and made again, not left to break every
# later run.
$(VENV)/.complete:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	touch $@

# dmarcmilter and its runtime dependencies only; installed again when
# pyproject.toml changes, not at every start (so `run` works offline).
$(VENV)/.installed-run: pyproject.toml $(VENV)/.complete
	$(BIN)/pip install -q -e .
	touch $@

# ... plus the test, lint and type-check tools.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.complete
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed-run

venv: $(VENV)/.installed-run

test-venv: $(VENV)/.installed-test

setup: system-packages venv

test-setup: test-system-packages test-venv

# The main job: the milter daemon in the foreground, on its built-in defaults
# (or CONFIG=/path/to/dmarcmilter.toml).
run: setup
	$(BIN)/dmarcmilter run $(if $(CONFIG),--config $(CONFIG))

# Evaluate a sample message against a demo DNS zone, without an MTA (the demo
# zone is served by the tests' DNS server, hence the test tools).
demo: system-packages test-venv
	$(BIN)/python -m bench.demo

lint:
	$(BIN)/ruff check dmarcmilter tests bench
	$(BIN)/ruff format --check dmarcmilter tests bench

typecheck:
	$(BIN)/mypy

test-only:
	$(BIN)/python -m pytest

test: test-setup lint typecheck test-only

bench: system-packages test-venv
	$(BIN)/python -m bench.evaluate

# dmarcmilter behind a private Postfix against no milter and opendkim + opendmarc
# (root; several minutes).  ARGS="--quick" for a smoke run.
bench-milter: test-setup bench-system-packages
	$(BIN)/python -m bench.milter_throughput $(ARGS)

# Every aggregate report of a 10,000,000-message day across 10,000 domains, as
# a dry run on SQLite (builds a ~6 GB history under /var/tmp once, ~8 min).
bench-report: setup
	$(BIN)/python -m bench.report_dryrun $(ARGS)

# A million generated inputs through the header parsers and the end-of-message
# path (about 5 minutes on 2 cores); crash inputs are saved and printed.
# ARGS="--inputs 20000" for a smoke run, ARGS="--atheris authres" for libFuzzer
# (pip install -e '.[fuzz]').
bench-fuzz: test-setup
	$(BIN)/python -m bench.fuzz $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
