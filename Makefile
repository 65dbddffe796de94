# The project's stable interface. `make setup && make test` on a fresh machine; `make demo` for the demo.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SETUP_INPUTS := pyproject.toml hack/localcluster/pyproject.toml hack/tinymodel/pyproject.toml hack/setup-system.sh
SETUP_KEY := $(shell cat $(SETUP_INPUTS) 2>/dev/null | sha256sum | cut -c1-16)
SETUP_STAMP := $(VENV)/.setup-$(SETUP_KEY)
PYTEST := $(BIN)/pytest

.PHONY: help setup tools lint test test-unit test-integration test-trainer test-e2e crds demo bench cluster-up cluster-down kind-e2e images clean

help: ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(SETUP_STAMP) ## Create .venv, install kubetune with every extra, the local cluster and the tiny model packages, and Debian's prometheus/promtool (root or sudo once).

$(SETUP_STAMP): $(SETUP_INPUTS)
	bash hack/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[operator,trainer,dev]' -e hack/localcluster -e hack/tinymodel
	rm -f $(VENV)/.setup-*
	touch $@

tools: ## Build (or reuse) etcd, kube-*, kubectl, kwok, helm and kueue from Go modules (first time: ~25 min on 2 cores).
	bash hack/build-tools.sh

# mypy silences errors in packages it reaches through an install, so the two installed dev packages are checked by name.
lint: setup ## ruff, mypy strict, shellcheck and the CRD drift check.
	$(BIN)/ruff check .
	$(BIN)/shellcheck hack/*.sh hack/kind/*.sh .ci/run
	$(BIN)/ruff format --check .
	$(BIN)/mypy api operator trainer tests bench hack/localcluster/tests
	$(BIN)/mypy -p localcluster -p tinymodel
	$(BIN)/python -m kubetune_operator.crdgen --check

test-unit: setup ## Fast tests: no cluster, no training, no Go-built binaries.
	$(PYTEST) -m unit -q

test-integration: setup tools ## helm and a real etcd + kube-apiserver (needs make tools, built on first use).
	$(PYTEST) -m integration -q

test-trainer: setup ## Trains the tiny model on CPU: LoRA, QLoRA, resume, S3 publication (no Go-built binaries).
	$(PYTEST) -m trainer -q

test-e2e: setup tools ## The local cluster, the chart, the operator and real training jobs (needs make tools).
	$(PYTEST) -m e2e -q

kind-e2e: setup ## The e2e suite on a kind cluster (needs Docker, kind, kubectl, helm).
	bash hack/kind/e2e.sh

test: lint test-unit test-integration test-trainer test-e2e ## Every tier; builds the tools before the first tier that needs them.

crds: setup ## Regenerate crds/ and the chart's CRD from the API models.
	$(BIN)/python -m kubetune_operator.crdgen

demo: setup tools ## Run the tiny CPU FinetuneJob end to end on the local cluster.
	$(BIN)/python -m tests.e2e.support.demo $(DEMO_ARGS)

cluster-up: setup tools ## Start the local cluster (kubeconfig in .cache/cluster/kubeconfig).
	$(BIN)/python -m localcluster up --workdir .cache/cluster

cluster-down: setup ## Stop the local cluster.
	$(BIN)/python -m localcluster down --workdir .cache/cluster

bench: setup ## Benchmarks: trainer throughput against peers, operator latency and memory, the preparation phase.
	$(BIN)/python bench/trainer_throughput.py
	$(BIN)/python bench/operator_latency.py
	$(BIN)/python bench/preparation_latency.py

images: ## Build the operator and trainer images (needs Docker).
	docker build -f operator/Dockerfile -t kubetune/operator:dev .
	docker build -f trainer/Dockerfile -t kubetune/trainer:dev .

clean: ## Remove the virtualenv and local caches (not the Go tool cache).
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
