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

.PHONY: help setup venv opencode envtest forge observe-tools node node-deps test-node node-up node-down node-load bench-node test test-fast demo bench clean image deploy deploy-fleet undeploy kind-up kind-load
IMAGE ?= reactor:0.1.0
KIND_CLUSTER ?= reactor
# kubectl on PATH, else the one `make envtest` built.
KUBECTL = $$(command -v kubectl || echo "$$(hack/envtest/build.sh)/kubectl")

help:
	@echo "make demo    - offline demo: local control plane + operator + scripted model"
	@echo "make test    - full test suite (does its own setup)"
	@echo "make bench   - benchmarks: cell vs bare opencode, operator vs reactor run, memory per cell,"
	@echo "               throughput of 1-3 replicas and failover, merge queue (prints figures)"
	@echo "make image   - the operator image (docker, else podman with local stand-in bases)"
	@echo "make node-up / node-load / deploy / node-down - the operator as a pod on a local one-node cluster (root)"

# A stamp of its own: $(PY) is a symlink, and touching it would touch the interpreter it
# points to (shared with every other venv), hiding a changed pyproject.toml from make.
VENV_STAMP := $(VENV)/.installed
# The development tools (dev/: the local cluster, the test helpers, the demo) are a package of
# their own, installed here beside reactor and never into the operator image.
$(VENV_STAMP): pyproject.toml dev/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' -e dev/
	@touch $@

venv: $(VENV_STAMP)

# The opencode binary from the npm package, pinned, project-local (no global install).
$(OPENCODE_BIN): operator/reactor/__init__.py
	@if [ -x "$(OPENCODE_BIN)" ] && [ "$$($(OPENCODE_BIN) --version 2>/dev/null)" = "$(OPENCODE_VERSION)" ]; then \
	  touch $(OPENCODE_BIN); \
	else \
	  mkdir -p $(OPENCODE_DIR) && \
	  npm install --prefix $(OPENCODE_DIR) --no-audit --no-fund --loglevel=error opencode-ai@$(OPENCODE_VERSION) && \
	  test "$$($(OPENCODE_BIN) --version)" = "$(OPENCODE_VERSION)"; \
	fi

# `source .venv/bin/activate` then finds the pinned opencode too (reactor run needs it).
$(VENV)/bin/opencode: $(OPENCODE_BIN) $(VENV_STAMP)
	ln -sfn $(abspath $(OPENCODE_BIN)) $@

# OpenCode's plugin package, installed once: every cell's config dir links to it read-only
# instead of running its own background npm install (network, ~64 MB, and a cell that
# ignores SIGTERM while npm unpacks).
$(OPENCODE_SEED)/package-lock.json: operator/reactor/__init__.py
	rm -rf $(OPENCODE_SEED).tmp && mkdir -p $(OPENCODE_SEED).tmp
	printf '{"dependencies": {"@opencode-ai/plugin": "%s"}}\n' '$(OPENCODE_VERSION)' > $(OPENCODE_SEED).tmp/package.json
	npm install --prefix $(OPENCODE_SEED).tmp --no-audit --no-fund --loglevel=error
	rm -rf $(OPENCODE_SEED) && mv $(OPENCODE_SEED).tmp $(OPENCODE_SEED)

opencode: $(OPENCODE_BIN) $(OPENCODE_SEED)/package-lock.json $(VENV)/bin/opencode

# etcd + kube-apiserver + kubectl, built once into the envtest cache outside the repo.
envtest:
	@hack/envtest/build.sh

# Gitea 1.26, the real forge the pull-request tests (tests/forge) open PRs on: built from Go
# modules once into ~/.cache/reactor-forge/ (~3 min cold on 2 quiet cores, then instant).
forge:
	@hack/forge/build.sh >/dev/null

# Debian's prometheus and chromium, which the observability tests drive for real
# (installed only when missing; apt-get needs root, as on CI: without root the tests that
# need them are skipped and named; no service is started or enabled at boot).
observe-tools:
	@hack/node/install-packages.sh --optional observe

# The dev node: Debian's containerd/runc/CNI plugins (apt-get), and kubelet,
# kube-controller-manager, kube-scheduler, kube-proxy built from the pinned module.
node-deps:
	@hack/node/install-packages.sh --optional node

node: envtest node-deps
	@hack/node/build.sh

setup: venv opencode envtest

# The dev node only where its tests can run (root); elsewhere tests/node is skipped, named at
# the end of the run (CI=1: a skip fails the run).
test-node:
	@if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory node; \
	else echo "make test: not root, so no dev node: tests/node will be skipped (sudo make test runs them)"; fi

# tests/node (marker `node`) build the image themselves (incremental) and need the node.
# The run ends with the slowest tests and modules, and what was skipped and why.
# Two workers (pytest-xdist; a module stays on one worker: tests/conftest.py's scheduler);
# PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
test: setup test-node observe-tools forge
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadscope --durations=10 $(PYTEST_ARGS)

demo: setup
	$(PY) -m reactor_dev.demo

# Speed and memory figures, as ratios against baselines measured in the same run.
bench: setup forge
	$(PY) bench/cell_bootstrap.py
	$(PY) bench/operator_overhead.py
	$(PY) bench/cell_memory.py
	$(PY) bench/fleet_throughput.py
	$(PY) bench/observe_overhead.py
	$(PY) bench/pr_latency.py
	$(PY) bench/merge_queue.py
	$(PY) bench/resume.py

# The operator pod on the dev node against a local operator process, and the pod's memory (root).
bench-node: setup node
	$(PY) bench/operator_pod.py

# Tests that need neither opencode nor a control plane (seconds).
test-fast: venv
	$(PY) -m pytest -m "not kube and not opencode and not node and not forge" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tools .reactor

# --- deployment ---
# docker build when a docker daemon answers, else podman against local stand-in base
# images (no registry needed); saves an archive for node-load (path printed last).
image:
	@hack/image/build.sh $(IMAGE) $(OPENCODE_VERSION)

deploy:
	$(KUBECTL) apply -k manifests/

# Several replicas sharing the tasks (a StatefulSet), instead of `make deploy`.
deploy-fleet:
	$(KUBECTL) apply -k manifests-fleet/

# Tasks first, while the operator still runs to remove their finalizers; otherwise
# deleting the CRD waits forever.
undeploy:
	-$(KUBECTL) delete agenttasks --all --all-namespaces --wait=true --timeout=120s
	$(KUBECTL) delete -k manifests-fleet/ --ignore-not-found  # the StatefulSet variant, if deployed
	$(KUBECTL) delete -k manifests/ --ignore-not-found

# A local one-node cluster (root): `make node-up node-load deploy`, then
# `export KUBECONFIG=$$PWD/.reactor/dev-cluster/kubeconfig`; `make node-down` removes it all.
node-up: setup node
	$(VENV)/bin/reactor dev-cluster up --node

node-down: venv
	$(VENV)/bin/reactor dev-cluster down

# The `kind load` of the dev node: the image into its containerd.
node-load: venv
	archive=$$(hack/image/build.sh $(IMAGE) $(OPENCODE_VERSION)) && \
	  $(VENV)/bin/reactor dev-cluster load "$$archive" --tag "$$(source hack/image/env.sh && qualified_name $(IMAGE))"

kind-up:
	kind get clusters | grep -qx $(KIND_CLUSTER) || kind create cluster --name $(KIND_CLUSTER) --config examples/kind/kind-config.yaml

kind-load: image
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
