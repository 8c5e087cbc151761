# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install jars browser run test test-fast lint format services-up services-down check-deploy lock bench soak up down clean

install: $(STAMP) jars browser

# The tests run on the versions the image ships: requirements.lock as constraints. Without its hashes: the
# dev extra and the editable project are not in the lock, and pip's hash mode would refuse them.
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	sed -n 's/^\([A-Za-z0-9_.-]*==[^ \\]*\).*/\1/p' requirements.lock > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

jars:
	deploy/kafka/kafka.sh jars

# The console's browser tests drive Debian's chromium with Playwright (never Playwright's own download).
# As root with apt it is installed when missing, as deploy/postgres/postgres.sh installs postgresql;
# otherwise those tests fail saying what is missing.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium (the console's browser tests)"; \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      || { echo "apt-get install chromium failed"; exit 1; }; \
	  else \
	    echo "chromium not found and not root with apt: the console's browser tests will fail until it is installed"; \
	  fi; }

services-up: install
	deploy/kafka/kafka.sh start
	deploy/postgres/postgres.sh start

services-down:
	-deploy/kafka/kafka.sh stop
	-deploy/postgres/postgres.sh stop

# The whole stack in the foreground; Ctrl-C stops what it started.
run: install
	$(PY) -m sentpipe.devstack

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Tests start the local broker and database themselves (tests/services.py) and stop what they started.
# The slowest tests are listed at the end: the suite takes most of an hour on 2 cores, and that is where to cut.
test: install lint check-deploy
	$(PY) -m pytest -q --durations=30

test-fast: install
	$(PY) -m pytest -q -x

check-deploy: $(STAMP)
	@if [ -x deploy/check.sh ]; then deploy/check.sh; else echo "deploy/check.sh not present"; fi

# requirements.lock: the image's dependencies (with the rocksdb extra and the build backend) at exact
# versions with sha256 hashes, resolved from pyproject.toml. Run after changing the dependencies there.
# pip-tools lives in a virtualenv of its own under .local/, so it cannot move the project's pins.
PIP_TOOLS_VERSION := 7.5.2
lock:
	test -x .local/pip-tools/bin/pip-compile || { $(PYTHON) -m venv .local/pip-tools && \
	  .local/pip-tools/bin/pip install -q "pip-tools==$(PIP_TOOLS_VERSION)"; }
	.local/pip-tools/bin/pip-compile pyproject.toml --extra rocksdb --all-build-deps --allow-unsafe \
	  --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links --quiet -o requirements.lock

bench: install
	$(PY) -m bench

# The randomized fault soak (bench/README.md): SOAK_MINUTES and SOAK_SEED choose its length and schedule.
SOAK_MINUTES ?= 15
SOAK_SEED ?= 1
soak: install
	$(PY) -m bench.soak --minutes $(SOAK_MINUTES) --seed $(SOAK_SEED)

up:
	docker compose -f deploy/compose/docker-compose.yml up -d --build

down:
	docker compose -f deploy/compose/docker-compose.yml down

clean: services-down
	rm -rf .local
