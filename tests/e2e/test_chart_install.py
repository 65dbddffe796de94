"""The chart against a real apiserver: every rendered object passes a server-side dry run, and the installed
operator's ServiceAccount has exactly the access it needs (nothing on Secrets cluster-wide)."""

from __future__ import annotations

import json

import pytest

from tests.e2e.support.stack import Stack
from tests.support.chart import MATRIX, render

pytestmark = pytest.mark.e2e

NEEDED = [("watch", "finetunejobs.kubetune.io"), ("patch", "finetunejobs.kubetune.io/status"), ("create", "jobs.batch"), ("create", "configmaps")]
FORBIDDEN_CLUSTER_WIDE = [("get", "secrets"), ("list", "secrets"), ("create", "pods"), ("delete", "nodes"), ("create", "clusterroles")]
CORE_CASES = ["defaults", "namespaced", "cluster-peering", "network-policy"]


@pytest.mark.parametrize("case", [c for c in CORE_CASES if c in MATRIX])
def test_rendered_objects_pass_server_side_dry_run(stack: Stack, case: str) -> None:
    values, apis = MATRIX[case]
    rendered = render(values, apis)
    # Custom resources (kopf's peering objects) need their CRDs served first, as helm's hook ordering gives.
    for crd in [d for d in rendered if d["kind"] == "CustomResourceDefinition"]:
        stack.apply(crd)
        stack.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s")
    docs = [d for d in rendered if d["kind"] != "CustomResourceDefinition"]
    for namespace in {d["metadata"].get("namespace") for d in docs} - {None, stack.settings.operator_namespace}:
        stack.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    body = {"apiVersion": "v1", "kind": "List", "items": docs}
    result = stack.kubectl("apply", "--dry-run=server", "--server-side", "--force-conflicts", "-f", "-", stdin=json.dumps(body), check=False)
    assert result.returncode == 0, result.stderr


def can_i(stack: Stack, verb: str, resource: str, *flags: str) -> bool:
    account = f"system:serviceaccount:{stack.settings.operator_namespace}:kubetune"
    result = stack.kubectl("auth", "can-i", verb, resource, f"--as={account}", *flags, check=False)
    return result.stdout.strip() == "yes"


def test_operator_service_account_has_least_privilege(stack: Stack) -> None:
    namespace = stack.settings.jobs_namespace
    for verb, resource in NEEDED:
        assert can_i(stack, verb, resource, "-n", namespace), f"{verb} {resource}"
    for verb, resource in FORBIDDEN_CLUSTER_WIDE:
        assert not can_i(stack, verb, resource, "--all-namespaces"), f"{verb} {resource} cluster-wide"
    rules = stack.kubectl("auth", "can-i", "--list", f"--as=system:serviceaccount:{stack.settings.operator_namespace}:kubetune", "-n", namespace).stdout
    assert "*" not in [line.split()[0] for line in rules.splitlines()[1:] if line.strip()]


def test_operator_pod_is_admitted_under_restricted_pod_security(stack: Stack) -> None:
    labels = stack.get_json("namespace", stack.settings.operator_namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = stack.get_json("pods", "-n", stack.settings.operator_namespace, "-l", "app.kubernetes.io/component=operator")["items"]
    assert pods and all(p["status"]["phase"] == "Running" for p in pods)
    assert pods[0]["spec"]["serviceAccountName"] == "kubetune"
