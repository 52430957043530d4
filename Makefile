# Two commands on a fresh machine: `make demo` (the main job on the bundled tiny model) and `make test`.
# `edgemoe build-runtime` compiles llama-cpp-python 0.3.36 with edgemoe's patches (~8 min on 2 cores) once and
# caches the wheel under ~/.cache/edgemoe-llamacpp/wheels, keyed by the patches, the llama-cpp-python version and
# the instruction-set target (portable by default); later venvs install it in seconds. `make test` also builds an
# unpatched llama-cpp-python (cached the same way) into .runtime/stock, for the tests that compare with stock.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= tests/fixtures/tiny-moe.gguf
BUDGET ?= 50%
PROMPT ?= import os\n\n\ndef
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: demo test install lint clean

STOCK  := .runtime/stock

$(VENV)/.installed: pyproject.toml edgemoe_llamacpp/engine/build.py $(wildcard edgemoe_llamacpp/patches/*.patch)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install -q 'torch==2.13.0+cpu' 'tokenizers>=0.15' || \
	  echo "note: no CPU build of torch here; the training tests of tools/make_tiny_moe.py skip"
	$(VENV)/bin/edgemoe build-runtime
	touch $@

$(STOCK)/.installed: $(VENV)/.installed
	$(VENV)/bin/edgemoe build-runtime --stock --target $(STOCK)
	touch $@

install: $(VENV)/.installed

DEMO   := build/demo

demo: $(VENV)/.installed
	$(VENV)/bin/edgemoe inspect $(MODEL)
	$(VENV)/bin/edgemoe run $(MODEL) -p "$$(printf '$(PROMPT)')" -n 64 --memory-budget $(BUDGET) --repeat-penalty 1.1
	mkdir -p $(DEMO)
	$(VENV)/bin/edgemoe profile $(MODEL) --out $(DEMO)/profile.npz --tokens 4096
	$(VENV)/bin/edgemoe convert $(MODEL) $(DEMO)/tiny-moe-3.5bit.gguf --profile $(DEMO)/profile.npz --expert-bits 3.5 --force
	$(VENV)/bin/edgemoe verify $(DEMO)/tiny-moe-3.5bit.gguf
	$(VENV)/bin/edgemoe run $(DEMO)/tiny-moe-3.5bit.gguf -p "$$(printf '$(PROMPT)')" -n 64 --memory-budget $(BUDGET) --repeat-penalty 1.1

test: $(VENV)/.installed $(STOCK)/.installed
	EDGEMOE_STOCK_RUNTIME=$(STOCK) EDGEMOE_REQUIRE_PATCHED=1 $(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check edgemoe_llamacpp edgemoe_bench tests tools

clean:
	rm -rf $(VENV) .runtime build *.egg-info .pytest_cache
