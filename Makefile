# imcore: `make run` starts the whole stack, `make test` runs the whole test suite.
# Both create .venv, install the pinned requirements and make sure PostgreSQL and Redis are
# up on 127.0.0.1 (starting them, or installing them with apt-get, when needed).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PG_HOST := 127.0.0.1
PG_PORT := 5432
REDIS_PORT := 6379
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export DATABASE_URL ?= postgres://postgres@$(PG_HOST):$(PG_PORT)/imcore
export REDIS_URL ?= redis://$(PG_HOST):$(REDIS_PORT)/0
export CELERY_BROKER_URL ?= redis://$(PG_HOST):$(REDIS_PORT)/1

# exec: make's shell becomes the process manager, so a signal to it reaches honcho itself.
STACK = PATH="$(BIN):$$PATH" exec $(BIN)/python bin/stack.py

.PHONY: run serve test lint fmt services venv migrate demo clean bench bench-tools bench-strategies bench-send bench-storm bench-sync bench-recall bench-push bench-soak

run: venv services migrate demo
	@echo
	@echo "  API      http://127.0.0.1:8000/api/v1/   (docs /api/v1/docs, schema /api/v1/schema)"
	@echo "  Admin    http://127.0.0.1:8000/admin/    (login admin / admin)"
	@echo "  Live     ws://127.0.0.1:8000/ws/v1/sync  (Authorization: Bearer <device token>)"
	@echo "  Flower   http://127.0.0.1:5555/"
	@echo
	$(STACK)

# The stack alone, without the setup steps above (the stop/restart test starts it this way).
# bin/stack.py is `honcho start` with every process in its process group: a SIGTERM to the
# group stops them all, a SIGKILL leaves no orphan (see its docstring). One port for HTTP and
# WebSocket: nginx in front, gunicorn (WSGI) for HTTP, uvicorn (ASGI) for /ws/ (Procfile).
serve:
	$(STACK)

test: venv services
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

# ruff, and the import contract of pyproject.toml (dependencies point one way).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

fmt: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

venv: $(VENV)/.installed

$(VENV)/.installed: requirements/base.txt requirements/dev.txt requirements/bench.txt
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV) || { \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/dev.txt
	touch $@

# PostgreSQL and Redis on 127.0.0.1: start them if installed and stopped, install if missing.
# nginx (the stack's front, bin/nginx.conf) is installed if missing; the stack runs its own
# nginx, so the system service a fresh install starts (port 80) is stopped and disabled.
services:
	@missing=""; \
	command -v pg_ctlcluster >/dev/null || missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	PATH="$$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $$missing; \
	  case "$$missing" in *nginx*) \
	    $(SUDO) systemctl disable --now nginx >/dev/null 2>&1 || \
	      $(SUDO) service nginx stop >/dev/null 2>&1 || true;; \
	  esac; \
	fi; \
	if ! pg_isready -q -h $(PG_HOST) -p $(PG_PORT); then \
	  for v in $$(ls /etc/postgresql); do \
	    $(SUDO) pg_ctlcluster --skip-systemctl-redirect $$v main start || true; \
	  done; \
	  for i in $$(seq 50); do pg_isready -q -h $(PG_HOST) -p $(PG_PORT) && break; sleep 0.2; done; \
	fi; \
	pg_isready -h $(PG_HOST) -p $(PG_PORT) || { echo "PostgreSQL is not up on $(PG_HOST):$(PG_PORT)"; exit 1; }; \
	if ! psql -h $(PG_HOST) -p $(PG_PORT) -U postgres -w -Atc 'select 1' >/dev/null 2>&1; then \
	  hba=$$(ls /etc/postgresql/*/main/pg_hba.conf | head -1); \
	  echo "allowing the local postgres user over 127.0.0.1 without a password in $$hba"; \
	  $(SUDO) sed -i '1i host all postgres 127.0.0.1/32 trust' "$$hba"; \
	  for v in $$(ls /etc/postgresql); do $(SUDO) pg_ctlcluster --skip-systemctl-redirect $$v main reload; done; \
	fi; \
	if ! redis-cli -h $(PG_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1; then \
	  redis-server --daemonize yes --bind $(PG_HOST) --port $(REDIS_PORT) --save "" --appendonly no; \
	  for i in $$(seq 50); do redis-cli -h $(PG_HOST) -p $(REDIS_PORT) ping >/dev/null 2>&1 && break; sleep 0.1; done; \
	fi; \
	redis-cli -h $(PG_HOST) -p $(REDIS_PORT) ping >/dev/null || { echo "Redis is not up on $(PG_HOST):$(REDIS_PORT)"; exit 1; }; \
	psql -h $(PG_HOST) -p $(PG_PORT) -U postgres -w -Atc "select 1 from pg_database where datname='imcore'" | grep -q 1 \
	  || createdb -h $(PG_HOST) -p $(PG_PORT) -U postgres imcore; \
	echo "PostgreSQL and Redis are up on $(PG_HOST)"

migrate: venv services
	$(BIN)/python manage.py migrate --no-input
	$(BIN)/python manage.py collectstatic --no-input --verbosity 0

demo: migrate
	$(BIN)/python manage.py seed_demo

# Benchmarks use their own database (imcore_bench) and Redis (db 8, broker on port 6390).
# `make bench` runs them all (and the machine's limits: redis-benchmark, pgbench) in one go
# and writes bench/results/<date>-<host>.md and .json.
bench: venv services bench-tools
	$(BIN)/python bench/all.py $(BENCH_ARGS)

# redis-benchmark and pgbench come with the Redis and PostgreSQL packages; wrk drives HTTP.
bench-tools:
	@for tool in wrk:wrk redis-benchmark:redis-tools pgbench:postgresql-contrib; do \
	  command -v $${tool%%:*} >/dev/null || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $$missing; \
	fi

bench-strategies: venv services bench-tools
	$(BIN)/python bench/strategies.py $(BENCH_ARGS)

bench-send: venv services bench-tools
	$(BIN)/python bench/send.py $(BENCH_ARGS)

bench-storm: venv services
	$(BIN)/python bench/storm.py $(BENCH_ARGS)

bench-sync: venv services
	$(BIN)/python bench/sync.py $(BENCH_ARGS)

# A recall beside a send in a 5,000-member group, channel mode and pipeline (issue 15).
bench-recall: venv services
	$(BIN)/python bench/recall.py $(BENCH_ARGS)

bench-push: venv services
	$(BIN)/python bench/push.py $(BENCH_ARGS)

# 10 minutes at 80 % of the measured send capacity (BENCH_ARGS="--minutes 2" for a short run):
# bench/results/soak-<date>-<host>.md, .json and .png; fails when memory grows or anything is lost.
bench-soak: venv services
	$(BIN)/python bench/soak.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache .hypothesis
