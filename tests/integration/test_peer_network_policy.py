"""A multi-node job's own NetworkPolicy, created by the operator with the chart's RBAC on the real apiserver."""

from __future__ import annotations

import pytest
from kubernetes import client

from kubetune_operator import manifests
from tests.integration.harness import NAMESPACE, Harness, decoded

pytestmark = pytest.mark.integration


def test_a_multi_node_job_gets_a_policy_admitting_only_its_own_pods(harness: Harness) -> None:
    harness.restart(trainer_peer_network_policy=True)
    body = harness.created("gang", resources={"gpus": 1, "nodes": 2}, preparation={"mode": "InTrainer"})
    networking = client.NetworkingV1Api(harness.plane.admin)
    policy = decoded(networking.read_namespaced_network_policy("gang-peers", NAMESPACE, _preload_content=False))
    own = {"matchLabels": {manifests.LABEL_FINETUNEJOB: "gang", manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}}
    assert policy["spec"]["podSelector"] == own and policy["spec"]["ingress"] == [{"from": [{"podSelector": own}]}]
    assert policy["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
    harness.created("single", resources={"gpus": 1})
    names = [item["metadata"]["name"] for item in decoded(networking.list_namespaced_network_policy(NAMESPACE, _preload_content=False))["items"]]
    assert "single-peers" not in names
