# Kubernetes and container targets (included by the top-level Makefile).
#   make image          build the image (docker or podman)       make k8s-render   render overlays
#   make k8s-check      offline checks, part of `make test`      make k8s-smoke    run the Job's pod
#   make deploy         kubectl apply -k (K8S_OVERLAY=gpu|cpu)   make k8s-verify   server dry run
K8S_OVERLAYS := gpu cpu
K8S_OVERLAY ?= gpu
K8S_NAMESPACE := caffe2torch
# Oldest to newest Kubernetes release whose API schemas the manifests must satisfy.
K8S_VERSIONS ?= 1.29.0 1.31.0 1.33.0 1.35.0 1.37.0
K8S_OUT := build/k8s
CHECKOV_VENV := .venv-checkov
IMAGE ?= caffe2torch:0.1.0
# Empty: the Dockerfile's default (PyTorch's CUDA runtime image).
BASE_IMAGE ?=
# docker when its daemon answers, else podman (recursive: only looked up when a target uses it).
CONTAINER_ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
    elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)

.PHONY: image k8s-render k8s-check k8s-kubectl k8s-smoke deploy k8s-token k8s-verify

test: k8s-check

image:
	$(CONTAINER_ENGINE) build -f deploy/Dockerfile -t $(IMAGE) \
	    $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) .

k8s-kubectl:
	@command -v kubectl >/dev/null 2>&1 || { echo "k8s: kubectl not found: install kubectl" \
	    "(it bundles kustomize; https://kubernetes.io/docs/tasks/tools/) and run this again" >&2; \
	    exit 1; }

# One rendered file per overlay, written whole or not at all.
k8s-render: k8s-kubectl
	@mkdir -p $(K8S_OUT)
	@for o in $(K8S_OVERLAYS); do \
	    kubectl kustomize deploy/overlays/$$o > $(K8S_OUT)/$$o.yaml.tmp && \
	    mv $(K8S_OUT)/$$o.yaml.tmp $(K8S_OUT)/$$o.yaml || { rm -f $(K8S_OUT)/$$o.yaml.tmp; exit 1; }; \
	    echo "k8s-render: $(K8S_OUT)/$$o.yaml"; \
	done

$(CHECKOV_VENV)/.installed: deploy/requirements-k8s.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check -r deploy/requirements-k8s.txt
	touch $@

K8S_RENDERED = $(K8S_OVERLAYS:%=$(K8S_OUT)/%.yaml)
# The check ids of deploy/checkov-skips.yaml, comma-separated for --skip-check.
K8S_SKIPS = $(shell $(PY) -c 'import yaml; \
    print(",".join(yaml.safe_load(open("deploy/checkov-skips.yaml"))))')

k8s-check: $(VENV)/.installed $(CHECKOV_VENV)/.installed k8s-render
	$(VENV)/bin/yamllint --strict -c deploy/.yamllint.yaml deploy
	@for v in $(K8S_VERSIONS); do \
	    echo "kubernetes-validate --strict -k $$v $(K8S_RENDERED)"; \
	    $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_RENDERED) || exit 1; \
	done
	$(PY) -m pytest -q -p no:cacheprovider tests/k8s
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes dockerfile \
	    $(K8S_RENDERED:%=-f %) -f deploy/Dockerfile --skip-check $(K8S_SKIPS)
	$(VENV)/bin/hadolint deploy/Dockerfile
	@echo "k8s-check: all passed"

# Builds the image from a local Debian root file system with podman and runs the batch Job's pod
# template under params/smoke.yaml; see deploy/smoke.py.
k8s-smoke: $(VENV)/.installed k8s-kubectl
	$(PY) deploy/smoke.py

deploy: k8s-kubectl
	kubectl apply -k deploy/overlays/$(K8S_OVERLAY)
	@$(MAKE) --no-print-directory k8s-token

# Jupyter's token: a random one, made on your machine and stored only in the cluster's Secret.
k8s-token: k8s-kubectl
	@if kubectl -n $(K8S_NAMESPACE) get secret jupyter-token >/dev/null 2>&1; then \
	    echo "k8s-token: secret/jupyter-token exists"; \
	else \
	    $(PYTHON) -c 'import secrets, sys; sys.stdout.write(secrets.token_hex(32))' | \
	    kubectl -n $(K8S_NAMESPACE) create secret generic jupyter-token --from-file=token=/dev/stdin; \
	fi

# A server-side dry run: the API server validates and runs its admission checks (Pod Security
# "restricted" included) without storing anything. Needs a real cluster.
k8s-verify: k8s-kubectl
	@kubectl cluster-info --request-timeout=10s >/dev/null 2>&1 || { echo "k8s-verify: no" \
	    "Kubernetes API server answers for kubectl's current context" \
	    "($$(kubectl config current-context 2>/dev/null || echo none)); it needs a real cluster." \
	    "The offline checks are make k8s-check." >&2; exit 1; }
	@kubectl get namespace $(K8S_NAMESPACE) >/dev/null 2>&1 || { echo "k8s-verify: namespace" \
	    "$(K8S_NAMESPACE) does not exist, and a dry run cannot check objects in a namespace it" \
	    "does not create; create it first: kubectl create namespace $(K8S_NAMESPACE)" >&2; exit 1; }
	kubectl apply -k deploy/overlays/$(K8S_OVERLAY) --dry-run=server
