# slurm-singularity: the two commands a person needs are `make demo` and
# `make test`; both run `make setup` first, which is idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test bench clean-state

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh

test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	@scripts/bench.sh

clean-state:
	@$(VENV)/bin/singularity-admin cluster down --state-dir .state/demo || true
	@$(VENV)/bin/singularity-admin cluster down --state-dir .state/demo-federation 2>/dev/null || true
	rm -rf .state
