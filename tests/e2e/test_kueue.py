"""FinetuneJobs queued in a real Kueue: quota, whole-job admission and preemption.

Kueue is installed from its own chart (CRDs, RBAC, webhooks) and its controller manager, built from
``sigs.k8s.io/kueue``, runs next to the control plane as the chart's ServiceAccount. The GPU trainers land
on kwok's fake GPU nodes (they never really run: kwok finishes a Job's pod after a delay, which a pod
annotation sets); the preemption test runs real trainers on the CPU node.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_operator.manifests import job_name
from localcluster.kueue import Kueue
from tests.e2e.support.local_stack import KubetuneStack
from tests.e2e.support.stack import REPO, Stack
from tests.e2e.test_finetunejobs import condition, progress_of, wait_for_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

FLAVOR = "default-flavor"
# kwok keeps a Job's pod Running this long (milliseconds) when its template carries the annotation.
FAKE_RUN_ANNOTATION = "kubetune.io/fake-run-milliseconds"


@pytest.fixture(scope="module")
def kueue(stack: Stack) -> Iterator[Stack]:
    """The stack with Kueue installed (once per session: its webhooks then stay, served by its manager)."""
    assert isinstance(stack, KubetuneStack) and stack.cluster is not None
    if not any(p.name == "kueue" for p in stack.cluster.processes):
        Kueue(stack.cluster).install()
    stack.apply({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}})
    yield stack


def cluster_queue(name: str, quota: dict[str, str], *, stopped: bool = False, preemption: bool = False) -> dict[str, Any]:
    resources = [{"name": r, "nominalQuota": q} for r, q in sorted(quota.items())]
    spec: dict[str, Any] = {
        "namespaceSelector": {},
        "resourceGroups": [{"coveredResources": sorted(quota), "flavors": [{"name": FLAVOR, "resources": resources}]}],
        "stopPolicy": "Hold" if stopped else "None",
    }
    if preemption:
        spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name}, "spec": spec}


def local_queue(stack: Stack, name: str, cluster_queue_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": name, "namespace": stack.settings.jobs_namespace},
        "spec": {"clusterQueue": cluster_queue_name},
    }


def gpu_job(stack: Stack, name: str, queue: str, *, gpus: int = 8, nodes: int = 1) -> dict[str, Any]:
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": gpus, "nodes": nodes, "cpu": None, "memory": None}, queueName=queue)
    body["metadata"]["name"] = name
    return body


def trainer_job(stack: Stack, name: str) -> dict[str, Any]:
    return stack.get_json("job", job_name(name), "-n", stack.settings.jobs_namespace)


def trainer_pods(stack: Stack, name: str) -> list[dict[str, Any]]:
    """The trainer Job's pods (not the preparation Job's)."""
    selector = f"batch.kubernetes.io/job-name={job_name(name)}"
    items: list[dict[str, Any]] = stack.get_json("pods", "-n", stack.settings.jobs_namespace, "-l", selector)["items"]
    return items


def waiting_for_admission(stack: Stack, name: str, queue: str) -> bool:
    status = stack.finetunejob(name).get("status", {})
    suspended = condition(status, "Suspended")
    return (
        status.get("phase") == "Pending"
        and f"queue {queue}" in str(status.get("message"))
        and suspended is not None
        and suspended["status"] == "True"
        and suspended["reason"] == "WaitingForAdmission"
        and queue in suspended["message"]
    )


def quota_condition(stack: Stack, workload: str) -> dict[str, Any] | None:
    return condition(stack.get_json("workload", workload, "-n", stack.settings.jobs_namespace).get("status", {}), "QuotaReserved")


def set_fake_run(stack: Stack, job: dict[str, Any], milliseconds: int) -> None:
    """Lengthen a suspended trainer Job's fake run (a suspended Job's pod template annotations may change)."""
    patch = {"spec": {"template": {"metadata": {"annotations": {FAKE_RUN_ANNOTATION: str(milliseconds)}}}}}
    stack.kubectl("patch", "job", job["metadata"]["name"], "-n", stack.settings.jobs_namespace, "--type=merge", "-p", json.dumps(patch))


def delete(stack: Stack, *names: str) -> None:
    for name in names:
        stack.kubectl("delete", "ftj", name, "-n", stack.settings.jobs_namespace, "--ignore-not-found", "--wait=false")


def test_second_gpu_job_waits_for_quota_and_runs_when_the_first_finishes(kueue: Stack) -> None:
    stack = kueue
    # Held at first, so both trainer Jobs exist (suspended) before either is admitted.
    stack.apply(cluster_queue("gpus-8", {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}, stopped=True))
    stack.apply(local_queue(stack, "gpu-team", "gpus-8"))
    names = ("queued-first", "queued-second")
    try:
        for name in names:
            stack.apply(gpu_job(stack, name, "gpu-team"))
        for name in names:
            stack.wait_for(functools.partial(waiting_for_admission, stack, name, "gpu-team"), 420, f"{name} waiting in queue gpu-team")
            job = trainer_job(stack, name)
            assert job["spec"]["suspend"] is True and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-team"
            set_fake_run(stack, job, 20_000)
        assert all(not trainer_pods(stack, name) for name in names)
        stack.apply(cluster_queue("gpus-8", {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}))

        def one_running() -> bool:
            return [stack.finetunejob(n).get("status", {}).get("phase") for n in names].count("Running") == 1

        stack.wait_for(one_running, 120, "one of the two jobs Running")
        first, second = sorted(names, key=lambda n: stack.finetunejob(n)["status"]["phase"] != "Running")
        # 8 GPUs of quota: the other job stays queued, its trainer Job suspended, no pod made.
        assert waiting_for_admission(stack, second, "gpu-team"), stack.finetunejob(second)["status"]
        assert not trainer_pods(stack, second) and trainer_job(stack, second)["spec"]["suspend"] is True
        status = stack.wait_for_phase(first, {"Succeeded", "Failed"}, timeout=120)["status"]
        assert status["phase"] == "Succeeded", status
        assert waiting_for_admission(stack, second, "gpu-team") or trainer_pods(stack, second)
        stack.wait_for(lambda: stack.finetunejob(second)["status"].get("phase") == "Running", 120, f"{second} Running after {first} finished")
        finished = trainer_job(stack, first)["status"]["completionTime"]
        started = min(p["metadata"]["creationTimestamp"] for p in trainer_pods(stack, second))
        assert started >= finished, (started, finished)
        assert stack.wait_for_phase(second, {"Succeeded", "Failed"}, timeout=120)["status"]["phase"] == "Succeeded"
    finally:
        delete(stack, *names)


def test_multi_node_job_is_admitted_whole_or_not_at_all(kueue: Stack) -> None:
    stack = kueue
    stack.apply(cluster_queue("gpus-whole", {"cpu": "128", "memory": "1Ti", "nvidia.com/gpu": "8"}))
    stack.apply(local_queue(stack, "team-b", "gpus-whole"))
    try:
        stack.apply(gpu_job(stack, "two-nodes", "team-b", nodes=2))
        stack.wait_for(lambda: waiting_for_admission(stack, "two-nodes", "team-b"), 420, "two-nodes waiting in queue team-b")
        job = trainer_job(stack, "two-nodes")
        set_fake_run(stack, job, 5_000)
        # 2 nodes x 8 GPUs against 8: Kueue admits no part of it.
        workloads = stack.get_json("workloads", "-n", stack.settings.jobs_namespace)["items"]
        (workload,) = [w for w in workloads if w["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]]
        name = workload["metadata"]["name"]
        stack.wait_for(lambda: quota_condition(stack, name) is not None, 60, "Kueue's verdict on the workload")
        reserved = quota_condition(stack, name)
        assert reserved is not None and reserved["status"] == "False" and "nvidia.com/gpu" in reserved["message"], reserved
        assert not trainer_pods(stack, "two-nodes")
        assert waiting_for_admission(stack, "two-nodes", "team-b")
        stack.apply(cluster_queue("gpus-whole", {"cpu": "128", "memory": "1Ti", "nvidia.com/gpu": "16"}))
        stack.wait_for(lambda: len(trainer_pods(stack, "two-nodes")) == 2, 120, "both trainer pods once 16 GPUs are quota")
        # Admitted as one: a single Workload holds both pods' 16 GPUs.
        admission = stack.get_json("workload", name, "-n", stack.settings.jobs_namespace)["status"]["admission"]
        (pod_set,) = admission["podSetAssignments"]
        assert pod_set["count"] == 2 and pod_set["resourceUsage"]["nvidia.com/gpu"] == "16", admission
        status = stack.wait_for_phase("two-nodes", {"Succeeded", "Failed"}, timeout=120)["status"]
        assert status["phase"] == "Succeeded", status
    finally:
        delete(stack, "two-nodes")


def priority_class(name: str, value: int) -> dict[str, Any]:
    return {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value, "preemptionPolicy": "Never"}


def test_higher_priority_job_preempts_and_the_preempted_one_resumes(kueue: Stack) -> None:
    stack = kueue
    stack.apply(priority_class("kueue-test-low", 100))
    stack.apply(priority_class("kueue-test-high", 1000))
    # Room for one CPU trainer at a time.
    stack.apply(cluster_queue("cpu-one", {"cpu": "1", "memory": "2Gi"}, preemption=True))
    stack.apply(local_queue(stack, "team-c", "cpu-one"))
    # Periodic checkpoints far apart: the one the preempted attempt leaves can only be the SIGTERM one.
    periodic = 200
    low = stack.example("tiny-cpu-lora.yaml", queueName="team-c", training={"maxSteps": 3 * periodic, "checkpointEvery": periodic, "logEvery": 5})
    low["metadata"]["name"] = "preempted"
    low["spec"]["resources"]["priorityClassName"] = "kueue-test-low"
    high = stack.example("tiny-cpu-lora.yaml", queueName="team-c", training={"maxSteps": 20, "checkpointEvery": 10})
    high["metadata"]["name"] = "preempting"
    high["spec"]["resources"]["priorityClassName"] = "kueue-test-high"
    try:
        stack.apply(low)
        assert wait_for_checkpoint(stack, "preempted") == periodic
        at_preemption = int(progress_of(stack, "preempted")["step"])
        assert at_preemption >= periodic, at_preemption
        stack.apply(high)
        stack.wait_for(lambda: waiting_for_admission(stack, "preempted", "team-c"), 300, "preempted back in its queue")
        # Kueue suspended its Job: the trainer got SIGTERM, checkpointed and exited; no pod is left.
        stack.wait_for(lambda: not trainer_pods(stack, "preempted"), 120, "the preempted trainer's pod gone")
        assert stack.finetunejob("preempting")["status"]["phase"] in ("Pending", "Running", "Succeeded")
        status = stack.wait_for_phase("preempting", {"Succeeded", "Failed"}, timeout=600)["status"]
        assert status["phase"] == "Succeeded", status
        status = stack.wait_for_phase("preempted", {"Succeeded", "Failed"}, timeout=900)["status"]
        assert status["phase"] == "Succeeded", status
        stopped, *later = status["usage"]["attempts"]
        assert later, status["usage"]
        # The preempted attempt checkpointed on SIGTERM, past its periodic checkpoint, and the next attempt resumed there.
        assert at_preemption <= stopped["checkpointStep"] < 2 * periodic, (at_preemption, status["usage"])
        assert status["result"]["resumedFromStep"] == stopped["checkpointStep"], status
    finally:
        delete(stack, "preempted", "preempting")


def test_kueue_example_is_accepted_by_kueue_and_kubetune(kueue: Stack) -> None:
    stack = kueue
    example = REPO / "examples" / "kueue-queue.yaml"
    result = stack.kubectl("apply", "--dry-run=server", "-n", stack.settings.jobs_namespace, "-f", str(example))
    kinds = {line.split("/", 1)[0] for line in result.stdout.splitlines()}
    assert kinds == {
        "resourceflavor.kueue.x-k8s.io",
        "clusterqueue.kueue.x-k8s.io",
        "localqueue.kueue.x-k8s.io",
        "finetunejob.kubetune.io",
    }, result.stdout
