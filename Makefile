# Every target does its own setup on a fresh machine: Python deps, the pinned opencode
# binary, and (for the Kubernetes tests) etcd/kube-apiserver/kubectl built from Go modules.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OPENCODE_VERSION := $(shell sed -n 's/^OPENCODE_VERSION = "\(.*\)"/\1/p' operator/reactor/__init__.py)
OPENCODE_DIR := .tools/opencode
OPENCODE_BIN := $(OPENCODE_DIR)/node_modules/.bin/opencode
OPENCODE_SEED := .tools/opencode-seed
export REACTOR_OPENCODE_BIN := $(abspath $(OPENCODE_BIN))
export REACTOR_OPENCODE_SEED := $(abspath $(OPENCODE_SEED))

.PHONY: help setup venv opencode envtest test test-fast demo bench clean image deploy deploy-fleet undeploy kind-up kind-load
IMAGE ?= reactor:0.1.0
KIND_CLUSTER ?= reactor

help:
	@echo "make demo    - offline demo: local control plane + operator + scripted model"
	@echo "make test    - full test suite (does its own setup)"
	@echo "make bench   - benchmarks: cell vs bare opencode, operator vs reactor run, memory per cell,"
	@echo "               throughput of 1-3 replicas and failover (prints figures)"

$(PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(PY)

venv: $(PY)

# The opencode binary from the npm package, pinned, project-local (no global install).
$(OPENCODE_BIN): operator/reactor/__init__.py
	@if [ -x "$(OPENCODE_BIN)" ] && [ "$$($(OPENCODE_BIN) --version 2>/dev/null)" = "$(OPENCODE_VERSION)" ]; then \
	  touch $(OPENCODE_BIN); \
	else \
	  mkdir -p $(OPENCODE_DIR) && \
	  npm install --prefix $(OPENCODE_DIR) --no-audit --no-fund --loglevel=error opencode-ai@$(OPENCODE_VERSION) && \
	  test "$$($(OPENCODE_BIN) --version)" = "$(OPENCODE_VERSION)"; \
	fi

# OpenCode's plugin package, installed once: every cell's config dir links to it read-only
# instead of running its own background npm install (network, ~64 MB, and a cell that
# ignores SIGTERM while npm unpacks).
$(OPENCODE_SEED)/package-lock.json: operator/reactor/__init__.py
	rm -rf $(OPENCODE_SEED).tmp && mkdir -p $(OPENCODE_SEED).tmp
	printf '{"dependencies": {"@opencode-ai/plugin": "%s"}}\n' '$(OPENCODE_VERSION)' > $(OPENCODE_SEED).tmp/package.json
	npm install --prefix $(OPENCODE_SEED).tmp --no-audit --no-fund --loglevel=error
	rm -rf $(OPENCODE_SEED) && mv $(OPENCODE_SEED).tmp $(OPENCODE_SEED)

opencode: $(OPENCODE_BIN) $(OPENCODE_SEED)/package-lock.json

# etcd + kube-apiserver + kubectl, built once into the envtest cache outside the repo.
envtest:
	@hack/envtest/build.sh

setup: venv opencode envtest

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m reactor.demo

# Speed and memory figures, as ratios against baselines measured in the same run.
bench: setup
	$(PY) bench/cell_bootstrap.py
	$(PY) bench/operator_overhead.py
	$(PY) bench/cell_memory.py
	$(PY) bench/fleet_throughput.py

# Tests that need neither opencode nor a control plane (seconds).
test-fast: venv
	$(PY) -m pytest -m "not kube and not opencode" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tools .reactor

# --- deployment (needs docker / kubectl / kind on the user's machine) ---
image:
	docker build --build-arg OPENCODE_VERSION=$(OPENCODE_VERSION) -t $(IMAGE) .

deploy:
	kubectl apply -k manifests/

# Several replicas sharing the tasks (a StatefulSet), instead of `make deploy`.
deploy-fleet:
	kubectl apply -k manifests-fleet/

# Tasks first, while the operator still runs to remove their finalizers; otherwise
# deleting the CRD waits forever.
undeploy:
	-kubectl delete agenttasks --all --all-namespaces --wait=true --timeout=120s
	kubectl delete -k manifests-fleet/ --ignore-not-found  # the StatefulSet variant, if deployed
	kubectl delete -k manifests/ --ignore-not-found

kind-up:
	kind get clusters | grep -qx $(KIND_CLUSTER) || kind create cluster --name $(KIND_CLUSTER) --config examples/kind/kind-config.yaml

kind-load: image
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
