# The two quick-start commands: `make demo` (the main job) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 is pinned: any other request downloads a multi-GB CUDA build here.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

demo: install
	$(BIN)/python examples/digits_soup.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/ema_update.py
	$(BIN)/python benchmarks/training_overhead.py
	$(BIN)/python benchmarks/fsdp_ema.py

clean:
	rm -rf $(VENV) mlflow.db mlruns mlartifacts .pytest_cache .ruff_cache
