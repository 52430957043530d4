# Two commands on a fresh machine: `make demo` (the main job on the bundled tiny model) and `make test`.
# llama-cpp-python compiles llama.cpp from source (~8 min on 2 cores) once; pip's wheel cache
# (~/.cache/pip) keeps the built wheel, so later venvs install it in seconds.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= tests/fixtures/tiny-moe.gguf
BUDGET ?= 50%
PROMPT ?= import os\n\n\ndef
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: demo test install lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/edgemoe inspect $(MODEL)
	$(VENV)/bin/edgemoe run $(MODEL) -p "$$(printf '$(PROMPT)')" -n 64 --memory-budget $(BUDGET) --repeat-penalty 1.1

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check edgemoe_llamacpp tests tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
