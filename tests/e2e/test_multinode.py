"""A 2-node CPU FinetuneJob across two real pods on the two CPU nodes: rendezvous through the headless Service,
a gang restart after a killed pod, and a missing rank that fails the job by name after the join timeout."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.support.local_stack import CPU_NODES
from tests.e2e.support.stack import Stack
from tests.e2e.test_finetunejobs import condition, trainer_pods, wait_for_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

TWO_NODES = {"resources": {"gpus": 0, "nodes": 2, "cpu": "1", "memory": "2Gi"}}


def two_node_job(stack: Stack, name: str, **training: Any) -> dict[str, Any]:
    body = stack.example("tiny-cpu-lora.yaml", **TWO_NODES, training=training)
    body["metadata"]["name"] = name
    # The example's gate needs an eval split; the gang's behaviour is the point here.
    body["spec"].pop("evaluation", None)
    body["spec"]["dataset"].pop("eval", None)
    return body


def test_two_pods_on_two_nodes_train_one_adapter(stack: Stack) -> None:
    body = two_node_job(stack, "gang", maxSteps=20, checkpointEvery=10, logEvery=5)
    stack.apply(body)
    status = stack.wait_for_phase("gang", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["result"]["steps"] == 20
    pods = trainer_pods(stack, "gang")
    trainers = [p for p in pods if p["metadata"]["labels"].get("kubetune.io/component") != "prepare"]
    # One pod per node, by the job's anti-affinity; each reached the other through the headless Service.
    assert sorted(p["spec"]["nodeName"] for p in trainers) == sorted(CPU_NODES), [p["spec"]["nodeName"] for p in trainers]
    assert {p["spec"]["hostname"] for p in trainers} == {"gang-trainer-0", "gang-trainer-1"}
