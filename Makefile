# imcore: `make run` starts the whole stack, `make test` runs the whole test suite.
# Both create .venv, install the pinned requirements and make sure PostgreSQL and Redis are
# up on 127.0.0.1 (starting them, or installing them with apt-get, when needed).

SHELL := /bin/bash
# The venv's interpreter: the distribution's /usr/bin/python3 where it is 3.11 or newer (Debian
# builds it with profile-guided and link-time optimisation, libpython linked in), else the first
# python3 on PATH. pyenv's default build (a shared libpython, no --enable-optimizations) ran a
# send 9 % slower in the process and the API's workers used 10 % more CPU (README, Performance
# 3l). `make PYTHON=...` picks another; an existing .venv keeps its own until `make clean`.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  2>/dev/null && echo /usr/bin/python3 || echo python3)
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

.PHONY: run run-cluster stop-cluster test-cluster bench-cluster serve test lint fmt services venv migrate demo clean bench bench-tools bench-strategies bench-send bench-storm bench-sync bench-recall bench-push bench-soak

run: venv services migrate demo
	@echo
	@echo "  API      http://127.0.0.1:8000/api/v1/   (docs /api/v1/docs, schema /api/v1/schema)"
	@echo "  Admin    http://127.0.0.1:8000/admin/    (login admin / admin)"
	@echo "  Live     ws://127.0.0.1:8000/ws/v1/sync  (Authorization: Bearer <device token>)"
	@echo "  Flower   http://127.0.0.1:5555/"
	@echo
	$(STACK)

# The same stack with the hot state on a local 3-master Redis Cluster (no persistence) on
# RUN_CLUSTER_PORTS, started if it is not up and left running (`make stop-cluster`). The
# Celery broker, the Channels layer and the rate-limit cache stay on the plain Redis.
RUN_CLUSTER_PORTS ?= 7001-7003
RUN_CLUSTER_DIR ?= /tmp/imcore-cluster-$(RUN_CLUSTER_PORTS)
run-cluster: venv services migrate demo
	@nodes=$$($(BIN)/python bin/redis_cluster.py start --ports $(RUN_CLUSTER_PORTS) \
	  --dir $(RUN_CLUSTER_DIR)) || exit 1; \
	echo "  Redis Cluster  $$nodes   (stop it: make stop-cluster)"; \
	REDIS_CLUSTER_NODES=$$nodes $(STACK)

stop-cluster:
	$(BIN)/python bin/redis_cluster.py stop --ports $(RUN_CLUSTER_PORTS) --dir $(RUN_CLUSTER_DIR)

# The stack alone, without the setup steps above (the stop/restart test starts it this way).
# bin/stack.py is `honcho start` with every process in its process group: a SIGTERM to the
# group stops them all, a SIGKILL leaves no orphan (see its docstring). One port for HTTP and
# WebSocket: nginx in front, uWSGI (WSGI) for HTTP, uvicorn (ASGI) for /ws/ (Procfile).
serve:
	$(STACK)

test: venv services
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-cluster

# The second pass of `make test`: the counter, pipeline, channel-mode, sync and fault tests
# again, with the hot state on a local 3-master Redis Cluster (REDIS_CLUSTER_NODES) that the
# session starts on TEST_CLUSTER_PORTS and stops (tests/conftest.py, bin/redis_cluster.py).
# The kill-a-master failover test (tests/counters/test_cluster_failover.py, its own cluster
# with replicas) runs in the first pass.
TEST_CLUSTER_PORTS ?= 7101-7103
CLUSTER_TESTS := tests/counters/test_rebuild.py tests/counters/test_concurrency.py \
  tests/counters/test_pipeline.py tests/imcore/test_channel_mode.py tests/imcore/test_faults.py \
  tests/offline/test_sync.py tests/offline/test_sync_protocol.py tests/offline/test_versions.py
# Left to the first pass: the watch/lock/naive strategies (lua is the one deployed), the fan-out
# write path (the pipeline is the default), two of the three kill points of a worker mid-batch,
# and the single-Redis snapshot test.
CLUSTER_TESTS_SKIP := not watch and not lock and not naive and not fanout and not after_read \
  and not mid_apply and not older_snapshot
test-cluster: venv services
	IMCORE_TEST_REDIS_CLUSTER=1 IMCORE_TEST_REDIS_CLUSTER_PORTS=$(TEST_CLUSTER_PORTS) \
	  $(BIN)/pytest $(CLUSTER_TESTS) -k "$(CLUSTER_TESTS_SKIP)"

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
# `make bench` runs them all (strategies, storm, recall, send, sync, push and a 2-minute soak,
# with the machine's limits: redis-benchmark, pgbench) in one go, about 25 minutes, and writes
# bench/results/<date>-<host>.md and .json, each section's .md, .json, .pyperf.json and PNG
# plot beside them. BENCH_ARGS=--quick: smoke sizes, a few minutes (bench-* targets take it).
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

# 10 minutes at 80 % of the measured send capacity (BENCH_ARGS=--quick: one minute):
# bench/results/soak-<date>-<host>.md, .json and .png; fails when memory grows or anything is lost.
# The S1 storm and the send path on a local 3-master cluster beside the single Redis, in one
# run: per-node Redis commands/s and CPU per message (bench/results/cluster-<date>-<host>.md).
bench-cluster: venv services
	$(BIN)/python bench/cluster.py $(BENCH_ARGS)

bench-soak: venv services
	$(BIN)/python bench/soak.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) staticfiles .pytest_cache .ruff_cache .hypothesis
