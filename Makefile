# kd3 — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Torch: where pip is capped to the wheels on local disk (these dev/CI machines), pin exactly those
# so nothing is downloaded; anywhere else pip picks the right build for the machine.
ifneq ($(wildcard /etc/xdg/pip/constraints.txt),)
TORCH_REQ ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_REQ ?= torch>=2.3 torchvision>=0.18
endif

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: venv lint test test-slow test-deploy demo bench clean

# kd3 and, beside it, kd3-demo (demo/: the demo world, the fake web, `kd3 demo`; not in a production install)
$(VENV)/.installed: pyproject.toml demo/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=68" wheel
	$(PIP) install -q $(TORCH_REQ)
	$(PIP) install -q -e ".[dev,server]" -e ./demo
	touch $@

venv: $(VENV)/.installed

# the architecture: layer contracts (import-linter), no import cycle between files, no function over 80 lines
lint: venv
	$(VENV)/bin/lint-imports
	$(PY) tools/check_imports.py
	$(PY) tools/check_function_length.py

test: venv lint
	$(PY) -m pytest -q -m "not slow and not deploy" --durations=15

test-slow: venv
	$(PY) -m pytest -q -m slow

# the documented deployment for real: Postgres + Prefect server + both workers (tools/local_stack.py), faults
test-deploy: venv
	$(PY) -m pytest -q -s -m deploy tests/deploy

demo: venv
	$(VENV)/bin/kd3 demo

bench: venv
	$(PY) bench/throughput.py
	$(PY) bench/accuracy.py

clean:
	rm -rf $(VENV) runs demo-out .pytest_cache
