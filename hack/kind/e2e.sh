#!/usr/bin/env bash
# The e2e suite on a kind cluster, for machines with Docker:
#   1. create the kind cluster (or reuse it),
#   2. build the operator and the CPU trainer image and load them into the kind nodes,
#   3. run S3 (moto) and Prometheus in the cluster and port-forward both,
#   4. run `pytest -m e2e` with KUBETUNE_E2E_* pointing at them (the tests install the chart with helm).
# Tests that need the local cluster's own parts (node agent, kwok's fake GPU nodes, the demo) skip.
#
# Needs docker, kind, kubectl and helm on PATH, and `make setup` done (the tests run from .venv).
# KEEP_CLUSTER=1 leaves the cluster running afterwards; KIND_NODE_IMAGE picks the Kubernetes version.
# Extra arguments go to pytest, e.g. `hack/kind/e2e.sh -k lora`.
set -euo pipefail

cd "$(dirname "$0")/../.."
CLUSTER=${KIND_CLUSTER:-kubetune-e2e}
INFRA=kubetune-e2e-infra
S3_PORT=${S3_PORT:-19000}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-19090}
WORKDIR=.cache/kind
KUBECONFIG_FILE="$PWD/$WORKDIR/kubeconfig"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "e2e.sh: $tool is not on PATH (this script needs Docker, kind, kubectl and helm)" >&2; exit 2; }
done
[ -x .venv/bin/pytest ] || { echo "e2e.sh: run 'make setup' first" >&2; exit 2; }
mkdir -p "$WORKDIR"

forwards=()
cleanup() {
  for pid in "${forwards[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "${KEEP_CLUSTER:-0}" != 1 ]; then kind delete cluster --name "$CLUSTER"; fi
}
trap cleanup EXIT

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 180s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG_FILE"
export KUBECONFIG="$KUBECONFIG_FILE"

docker build -f operator/Dockerfile -t kubetune/operator:e2e .
docker build -f trainer/Dockerfile --build-arg VARIANT=cpu -t kubetune/trainer:e2e-cpu .
kind load docker-image --name "$CLUSTER" kubetune/operator:e2e kubetune/trainer:e2e-cpu

kubectl apply -f hack/kind/s3.yaml -f hack/kind/prometheus.yaml
kubectl -n "$INFRA" rollout status deployment/s3 deployment/prometheus --timeout=300s

forward() {  # service local-port remote-port
  kubectl -n "$INFRA" port-forward "service/$1" "$2:$3" >"$WORKDIR/port-forward-$1.log" 2>&1 &
  forwards+=("$!")
  for _ in $(seq 60); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "e2e.sh: port-forward to $1 did not open 127.0.0.1:$2; see $WORKDIR/port-forward-$1.log" >&2
  return 1
}
forward s3 "$S3_PORT" 5000
forward prometheus "$PROMETHEUS_PORT" 9090

KUBETUNE_E2E_KUBECONFIG="$KUBECONFIG_FILE" \
KUBETUNE_E2E_VALUES="$PWD/hack/kind/values.yaml" \
KUBETUNE_E2E_S3_URL="http://127.0.0.1:$S3_PORT" \
KUBETUNE_E2E_S3_POD_URL="http://s3.$INFRA.svc.cluster.local:5000" \
KUBETUNE_E2E_S3_SERVICE="$INFRA/s3" \
KUBETUNE_E2E_PROMETHEUS_URL="http://127.0.0.1:$PROMETHEUS_PORT" \
KUBETUNE_KUBECTL="$(command -v kubectl)" \
KUBETUNE_HELM="$(command -v helm)" \
  .venv/bin/pytest -m e2e "$@"
