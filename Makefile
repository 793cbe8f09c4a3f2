# Every target bootstraps .venv on a fresh machine. The pinned CPU build of torch is installed
# first: an unpinned torch would pull a multi-GB CUDA build. Override with TORCH_SPEC=... .
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# test-py313: the suite on Python 3.13 too (no local CPU build of torch for 3.13 here: PyPI's
# torch==2.13.0 with its CUDA libraries, about 4.7 GB in .venv313; the tests run on the CPU).
PYTHON313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) python3.13)
VENV313 := .venv313
STAMP313 := $(VENV313)/.installed

.PHONY: demo test test-slow test-py313 bench gpu-check lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,numba,hf,tensorboard,triton]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sbmt demo

test: $(STAMP)
	$(PY) -m pytest -q

$(STAMP313): pyproject.toml
	$(PYTHON313) -m venv $(VENV313)
	$(VENV313)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV313)/bin/python -m pip install -q -e ".[dev,numba,hf,tensorboard,triton]"
	touch $(STAMP313)

test-py313: $(STAMP313)
	$(VENV313)/bin/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/attention.py

# On a machine with a CUDA GPU: the CUDA tests and the GPU benchmark (docs/benchmarks-gpu.md).
gpu-check:
	bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) $(VENV313) .pytest_cache .mypy_cache .ruff_cache
