# modalign developer commands. `make setup` builds .venv from scratch (CPU torch first, so no
# requirement can pull a CUDA build), `make train` runs the main job, `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Set e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu on machines without a local CPU wheel.
TORCH_INDEX ?=
# Datasets: $MODALIGN_DATA if set, else ../shared/data when it exists, else (left empty) the
# per-user cache that `modalign train` downloads built-in datasets into on first use.
export MODALIGN_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
RUN_DIR ?= runs/av-digits-clip

.PHONY: setup train test test-all lint type imports bench clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -c "import torch, modalign; print('torch', torch.__version__, '| modalign', modalign.__version__)"

train:
	$(BIN)/modalign train av-digits-clip --run-dir $(RUN_DIR) --no-resume

test: imports
	$(BIN)/python -m pytest -q -m "not gpu"

lint:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

type:
	$(BIN)/mypy

imports:
	$(BIN)/lint-imports

bench:
	$(BIN)/python benchmarks/bench_retrieval.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
