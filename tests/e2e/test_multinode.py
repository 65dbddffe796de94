"""A 2-node CPU FinetuneJob across two real pods on the two CPU nodes: rendezvous through the headless Service,
a gang restart after a killed pod, and a missing rank that fails the job by name after the join timeout."""

from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.manifests import COMPLETION_INDEX_ANNOTATION
from tests.e2e.support.local_stack import CPU_NODES
from tests.e2e.support.stack import Stack
from tests.e2e.test_finetunejobs import condition, running_trainer_pods, trainer_pods, wait_for_checkpoint
from tests.support.s3 import free_port
from tests.trainer.conftest import TrainerRun, collect, start_trainer, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]


def two_node_job(stack: Stack, name: str, **training: Any) -> dict[str, Any]:
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": 0, "nodes": 2, "cpu": "1", "memory": "2Gi"}, training=training)
    body["metadata"]["name"] = name
    # The example's gate needs an eval split, which costs an evaluation per pod; the gang's behaviour is the point here.
    body["spec"].pop("evaluation", None)
    body["spec"]["dataset"].pop("eval", None)
    return body


def index_of(pod: dict[str, Any]) -> int:
    return int(pod["metadata"]["annotations"][COMPLETION_INDEX_ANNOTATION])


def log_lines(stack: Stack, pod: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON lines a trainer pod wrote, from the node agent's log files."""
    (log,) = stack.workdir.glob(f"node*/pods/{pod['metadata']['namespace']}_{pod['metadata']['name']}_*/logs/trainer/0.log")
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


def losses_in_log(stack: Stack, pod: dict[str, Any]) -> dict[int, float]:
    """step -> loss of the progress lines a trainer pod wrote (rank 0 reports them)."""
    return TrainerRun(0, "", None, log_lines(stack, pod)).progress()


def two_processes_on_one_host(stack: Stack, name: str, tmp_path: Path) -> TrainerRun:
    """The job's own trainer config, run by two processes of one host (no Kubernetes) under a run id of its own."""
    assert stack.s3 is not None
    rendered = stack.get_json("configmap", f"{name}-config", "-n", stack.settings.jobs_namespace)["data"]["config.yaml"]
    config: dict[str, Any] = yaml.safe_load(rendered)
    port = free_port()
    config["runtime"].update(runUid="reference", rendezvousHost="127.0.0.1", rendezvousPort=port, peerHosts=[])
    processes = []
    for index in range(2):
        own = copy.deepcopy(config)
        folder = tmp_path / f"process-{index}"
        folder.mkdir()
        # Host processes share one network stack: each serves its metrics on a port of its own.
        own["runtime"].update(workDir=str(folder), terminationMessagePath=str(folder / "termination-log"), metricsPort=free_port())
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "KUBETUNE_", "PYTEST_"))}
        env.update(stack.s3.env(), JOB_COMPLETION_INDEX=str(index), KUBETUNE_POD_IP="127.0.0.1", KUBETUNE_POD_NAME=f"reference-{index}")
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        processes.append((start_trainer(write_config(own, folder / "config.yaml"), env), folder / "termination-log"))

    def finish(process: Any) -> TrainerRun:
        _, stderr = process[0].communicate(timeout=600)
        return collect(process[0].returncode, stderr, process[1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(finish, processes))
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    return TrainerRun(0, "", runs[0].termination, [event for run in runs for event in run.events])


def test_two_pods_on_two_nodes_train_like_two_processes_on_one_host(stack: Stack, tmp_path: Path) -> None:
    stack.apply(two_node_job(stack, "gang", maxSteps=20, checkpointEvery=10, logEvery=5))
    status = stack.wait_for_phase("gang", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["result"]["steps"] == 20
    pods = sorted(trainer_pods(stack, "gang"), key=index_of)
    # One pod per node, by the job's anti-affinity; each reached the other by its name under the headless Service.
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(CPU_NODES), [p["spec"]["nodeName"] for p in pods]
    assert [p["spec"]["hostname"] for p in pods] == ["gang-trainer-0", "gang-trainer-1"]
    curve = losses_in_log(stack, pods[0])
    assert sorted(curve) == [5, 10, 15, 20], curve
    reference = two_processes_on_one_host(stack, "gang", tmp_path).progress()
    assert sorted(reference) == sorted(curve)
    for step, loss in curve.items():
        assert loss == pytest.approx(reference[step], rel=0.02), (step, curve, reference)
    assert curve[20] < curve[5]


def test_a_killed_pod_restarts_every_rank_from_the_checkpoint(stack: Stack) -> None:
    stack.apply(two_node_job(stack, "gang-kill", maxSteps=60, checkpointEvery=10, logEvery=5))
    checkpoint_step = wait_for_checkpoint(stack, "gang-kill")
    (victim,) = [p for p in running_trainer_pods(stack, "gang-kill") if index_of(p) == 1]
    stack.crash_pod(victim)
    status = stack.wait_for_phase("gang-kill", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", json.dumps(status, indent=1)
    assert status["result"]["steps"] == 60
    # Rank 0's pod lived on and restarted its worker in place; it resumed from the checkpoint, not from step 0.
    assert status["result"]["resumedFromStep"] >= checkpoint_step
    pods = trainer_pods(stack, "gang-kill")
    by_index = {index: [p for p in pods if index_of(p) == index] for index in (0, 1)}
    assert len(by_index[0]) == 1 and by_index[0][0]["status"]["phase"] == "Succeeded"
    # The Job controller replaced the killed pod; the replacement joined the new round of the rendezvous.
    assert sorted(p["status"]["phase"] for p in by_index[1]) == ["Failed", "Succeeded"]
    restarts = [line for line in log_lines(stack, by_index[0][0]) if line.get("msg") == "training started"]
    assert len(restarts) == 2, restarts


def test_a_rank_that_never_starts_fails_the_job_by_name(stack: Stack) -> None:
    stack.kubectl("cordon", CPU_NODES[1])
    try:
        body = two_node_job(stack, "gang-missing", maxSteps=20, checkpointEvery=10, logEvery=5)
        body["spec"]["distributed"] = {"joinTimeoutSeconds": 20}
        stack.apply(body)
        status = stack.wait_for_phase("gang-missing", {"Succeeded", "Failed"}, timeout=300)["status"]
        assert status["phase"] == "Failed", json.dumps(status, indent=1)
        failed = condition(status, "Failed")
        assert failed is not None and failed["reason"] == "RendezvousTimeout", status
        # The trainer Job's pods only (a preparation pod carries the same FinetuneJob label).
        pods = [p for p in trainer_pods(stack, "gang-missing") if COMPLETION_INDEX_ANNOTATION in (p["metadata"].get("annotations") or {})]
        placed = {index_of(p) for p in pods if p["spec"].get("nodeName")}
        unplaced = {0, 1} - placed
        assert len(unplaced) == 1, [(p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("phase")) for p in pods]
        (missing,) = unplaced
        assert f"node rank {missing} (pod gang-missing-trainer-{missing})" in failed["message"], failed
        assert "joinTimeoutSeconds=20" in failed["message"]
    finally:
        stack.kubectl("uncordon", CPU_NODES[1])
        stack.kubectl("delete", "ftj", "gang-missing", "-n", stack.settings.jobs_namespace, "--ignore-not-found")
