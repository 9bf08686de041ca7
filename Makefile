# gpufleet: the two commands are `make demo` and `make test`. Every target is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup debs venv test lint docs demo bench clean

setup: debs venv

debs:
	@scripts/install-debs.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/python -m exporters.metricsdoc --check

# Everything generated and committed: the metric catalogue, the dashboards' JSON, and the
# Kubernetes objects derived from alerts/rules and dashboards/json (tests fail when stale).
docs: venv
	$(BIN)/python -m exporters.metricsdoc --write
	$(BIN)/gpufleet dashboards build
	$(BIN)/python deploy/kubernetes/generate.py

test: setup lint
	$(BIN)/pytest -q
	@echo "tests/gpu against the simulator (keeps the hardware suite itself honest):"
	GPUFLEET_GPU_TESTS_BACKEND=sim $(BIN)/pytest -q tests/gpu

demo: setup
	@scripts/demo.sh $(DEMO_ARGS)

bench: setup
	$(BIN)/python bench/exporter.py
	$(BIN)/python bench/collectors.py
	$(BIN)/python bench/slurm_exporter.py
	$(BIN)/python bench/remediation.py
	$(BIN)/python bench/e2e.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .tmp
