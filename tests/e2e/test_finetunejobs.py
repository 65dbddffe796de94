"""FinetuneJobs end to end: kubectl apply -> operator -> trainer pods -> adapter in S3, and the faults.

Everything is real: the apiserver (schema, CEL, RBAC, status subresource, garbage collection), the Job
controller and scheduler, kwok's fake GPU nodes, the operator deployed by helm and running as the
chart's ServiceAccount, trainer processes run by the node agent, moto's S3 over HTTP, and Prometheus.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.publish import read_manifest, verify_publication
from kubetune_trainer.storage.store import S3Store
from tests.e2e.support.stack import Stack
from tests.support.invalid_specs import INVALID_SPECS, InvalidSpec, apply_change

pytestmark = pytest.mark.e2e

LONG_RUN = {"training": {"maxSteps": 400, "checkpointEvery": 25, "logEvery": 5}}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def trainer_jobs(stack: Stack, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = stack.get_json("jobs", "-n", stack.settings.jobs_namespace, "-l", f"kubetune.io/finetunejob={name}")["items"]
    return items


def trainer_pods(stack: Stack, name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = stack.get_json("pods", "-n", stack.settings.jobs_namespace, "-l", f"kubetune.io/finetunejob={name}")["items"]
    return items


def event_reasons(stack: Stack, name: str) -> list[str]:
    """Reasons of the Events about FinetuneJob `name`, oldest first."""
    selector = f"involvedObject.kind=FinetuneJob,involvedObject.name={name}"
    items = stack.get_json("events", "-n", stack.settings.jobs_namespace, "--field-selector", selector)["items"]
    return [str(e["reason"]) for e in sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")]


def adapter_is_complete(stack: Stack, uri: str) -> bool:
    assert stack.s3 is not None
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    output = OutputSpec(bucket=bucket, endpoint_url=stack.s3.endpoint_url, region="us-east-1")
    return bool(verify_publication(S3Store.from_output(output, environment=TrainerEnvironment.model_validate(stack.s3.env())), uri))


def wait_for_checkpoint(stack: Stack, name: str, timeout: float = 300) -> int:
    step = 0

    def has_checkpoint() -> bool:
        nonlocal step
        status = stack.finetunejob(name).get("status", {})
        if status.get("phase") in ("Succeeded", "Failed"):
            raise AssertionError(f"{name} finished before a checkpoint could be observed: {status}")
        step = int((status.get("lastCheckpoint") or {}).get("step", 0))
        return step > 0

    stack.wait_for(has_checkpoint, timeout, f"a checkpoint of {name}")
    return step


def test_cpu_lora_job_succeeds_with_adapter_in_s3(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml")
    stack.apply(body)
    job = stack.wait_for_phase("tiny-lora", {"Succeeded", "Failed"}, timeout=600)
    status = job["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["percent"] == 100 and status["progressText"] == "100%"
    assert status["progress"]["step"] == body["spec"]["training"]["maxSteps"]
    # Each run publishes into its own folder, named by the FinetuneJob's uid.
    assert status["result"]["adapterUri"].endswith(f"/{stack.settings.jobs_namespace}/tiny-lora/runs/{job['metadata']['uid']}/adapter/")
    assert adapter_is_complete(stack, status["result"]["adapterUri"])
    # The example's gate compared the adapter with the base model; the hand-off says how vLLM serves it.
    assert status["evaluation"]["gate"] == "Passed" and status["evaluation"]["finalEvalLoss"] < status["evaluation"]["baseEvalLoss"]
    assert status["result"]["serving"]["compatible"] is True and "--enable-lora" in status["result"]["serving"]["vllmArgs"]
    succeeded = condition(status, "Succeeded")
    assert succeeded is not None and succeeded["status"] == "True"
    table = stack.kubectl("get", "ftj", "tiny-lora", "-n", stack.settings.jobs_namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:6] == ["NAME", "PHASE", "PROGRESS", "LOSS", "GPUS", "AGE"]
    assert "Succeeded" in table and "100%" in table
    assert len(trainer_jobs(stack, "tiny-lora")) == 1
    # Every phase change is an Event on the FinetuneJob (kubectl describe shows the history).
    stack.wait_for(lambda: {"Pending", "Running", "Succeeded"} <= set(event_reasons(stack, "tiny-lora")), 60, "the phase Events")


def test_cpu_qlora_job_succeeds(stack: Stack) -> None:
    stack.apply(stack.example("tiny-cpu-qlora.yaml"))
    status = stack.wait_for_phase("tiny-qlora", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    assert adapter_is_complete(stack, status["result"]["adapterUri"])


@pytest.mark.parametrize("case", INVALID_SPECS, ids=lambda c: c.name)
def test_apiserver_rejects_invalid_spec(stack: Stack, case: InvalidSpec) -> None:
    body = apply_change(stack.example("tiny-cpu-lora.yaml"), case)
    body["metadata"]["name"] = f"invalid-{case.name}"[:63]
    result = stack.kubectl("create", "--dry-run=server", "-f", "-", stdin=json.dumps(body), check=False)
    assert result.returncode != 0, f"{case.name} was admitted"
    assert case.field in result.stderr, result.stderr


def test_spec_is_immutable_except_suspend(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", suspend=True)
    body["metadata"]["name"] = "immutable"
    stack.kubectl("create", "-f", "-", stdin=json.dumps(body))
    try:
        changed = stack.kubectl(
            "patch", "ftj", "immutable", "-n", stack.settings.jobs_namespace, "--type=merge", "-p", '{"spec":{"lora":{"r":4}}}', check=False
        )
        assert changed.returncode != 0 and "immutable" in changed.stderr
        stack.kubectl("patch", "ftj", "immutable", "-n", stack.settings.jobs_namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    finally:
        stack.kubectl("delete", "ftj", "immutable", "-n", stack.settings.jobs_namespace, "--wait=false")


def test_gpu_job_runs_on_a_fake_gpu_node(stack: Stack) -> None:
    if not stack.local and not any(int(n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")) >= 2 for n in stack.get_json("nodes")["items"]):
        pytest.skip("no node of this cluster offers 2 nvidia.com/gpu")
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": 2, "cpu": None, "memory": None})
    body["metadata"]["name"] = "on-gpus"
    stack.apply(body)
    # The CPU-only preparation Job runs first.
    stack.wait_for(lambda: any(p["spec"].get("nodeName", "").startswith("gpu-node") for p in trainer_pods(stack, "on-gpus")), 420, "a pod on a GPU node")
    pod = next(p for p in trainer_pods(stack, "on-gpus") if p["spec"].get("nodeName", "").startswith("gpu-node"))
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    status = stack.wait_for_phase("on-gpus", {"Succeeded", "Failed"}, timeout=180)["status"]
    assert status["phase"] == "Succeeded", status


def test_too_many_gpus_reports_unschedulable(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": 16, "cpu": None, "memory": None})
    body["metadata"]["name"] = "too-many-gpus"
    stack.apply(body)
    try:

        def unschedulable() -> bool:
            scheduled = condition(stack.finetunejob("too-many-gpus").get("status", {}), "Scheduled")
            return scheduled is not None and scheduled["reason"] == "Unschedulable"

        stack.wait_for(unschedulable, 420, "an Unschedulable condition (after the preparation Job)")
        scheduled = condition(stack.finetunejob("too-many-gpus")["status"], "Scheduled")
        assert scheduled is not None and "Insufficient nvidia.com/gpu" in scheduled["message"]
    finally:
        stack.kubectl("delete", "ftj", "too-many-gpus", "-n", stack.settings.jobs_namespace)


def progress_of(stack: Stack, name: str) -> dict[str, Any]:
    progress: dict[str, Any] = stack.finetunejob(name).get("status", {}).get("progress") or {}
    return progress


def running_trainer_pods(stack: Stack, name: str) -> list[dict[str, Any]]:
    return [p for p in trainer_pods(stack, name) if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def test_killed_trainer_resumes_from_its_checkpoint(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", **LONG_RUN)
    body["metadata"]["name"] = "killed"
    stack.apply(body)
    checkpoint_step = wait_for_checkpoint(stack, "killed")
    pod = next(p for p in trainer_pods(stack, "killed") if p["status"].get("phase") == "Running")
    stack.crash_pod(pod)
    # The replacement's first progress after its resume, and never two trainers at once.
    after: dict[str, Any] = {}

    def resumed() -> bool:
        running = running_trainer_pods(stack, "killed")
        assert len(running) <= 1, f"two trainer pods run at once: {[p['metadata']['name'] for p in running]}"
        progress = progress_of(stack, "killed")
        replaced = any(p["metadata"]["uid"] != pod["metadata"]["uid"] for p in running)
        if replaced and progress.get("loss") is not None and int(progress.get("step", 0)) > checkpoint_step:
            after.update(progress)
        return bool(after) or stack.finetunejob("killed")["status"].get("phase") in ("Succeeded", "Failed")

    stack.wait_for(resumed, 600, "progress of the replacement trainer", interval=0.2)
    status = stack.wait_for_phase("killed", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["steps"] == LONG_RUN["training"]["maxSteps"]
    assert status["result"]["resumedFromStep"] >= checkpoint_step
    attempts = [attempt["pod"] for attempt in status["usage"]["attempts"]]
    assert len(set(attempts)) == len(attempts) >= 2 and pod["metadata"]["name"] in attempts, attempts
    if stack.crash_fails_pod:
        # A force-deleted pod (external clusters) may vanish before the Job controller counts it as failed.
        assert status["attempts"] == 2
        # The killed attempt wrote no termination message: what it reached and its newest checkpoint come from the
        # metrics the operator read while it ran; the steps after that checkpoint were run again.
        killed, *_ = status["usage"]["attempts"]
        assert killed["pod"] == pod["metadata"]["name"], status["usage"]
        assert checkpoint_step <= killed["checkpointStep"] <= status["result"]["resumedFromStep"], status["usage"]
        assert killed["reachedStep"] >= killed["checkpointStep"], status["usage"]
        assert status["usage"]["redoneSteps"] == killed["redoneSteps"] == killed["reachedStep"] - killed["checkpointStep"], status["usage"]
        assert (killed["lostSeconds"] > 0) == (killed["redoneSteps"] > 0) and killed["lostSeconds"] <= killed["seconds"], status["usage"]
    assert after, "no progress was read from the replacement trainer before the run ended"
    assert_loss_continues(stack, status, checkpoint_step)


def assert_loss_continues(stack: Stack, status: dict[str, Any], checkpoint_step: int) -> None:
    """The replacement picked up the adapter where the checkpoint left it: its first logged loss is close to the loss
    logged at the checkpoint, not back near where training began (a resume that lost the weights starts over)."""
    assert stack.s3 is not None
    uri = status["result"]["adapterUri"]
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    store = S3Store.from_output(
        OutputSpec(bucket=bucket, endpoint_url=stack.s3.endpoint_url, region="us-east-1"), environment=TrainerEnvironment.model_validate(stack.s3.env())
    )
    manifest = read_manifest(store, uri)
    assert manifest is not None, uri
    history = {int(step): float(loss) for step, loss in manifest["metrics"]["lossHistory"]}
    resumed = int(status["result"]["resumedFromStep"])
    first, at_resume = history[min(history)], history[resumed]
    after_resume = history[min(step for step in history if step > resumed)]
    # Here the loss falls from about 7.6 to 2 by the first checkpoint (step 25) and is about 1.2 five steps later.
    assert first - at_resume > 1.0, f"too little was learned by step {resumed} for the check to tell anything: {history}"
    assert after_resume < at_resume + 0.25 * (first - at_resume), (checkpoint_step, resumed, first, at_resume, after_resume)


def test_operator_restart_creates_no_duplicates(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", **LONG_RUN)
    body["metadata"]["name"] = "operator-restart"
    stack.apply(body)
    wait_for_checkpoint(stack, "operator-restart")
    before = stack.finetunejob("operator-restart")["status"]["progress"]["step"]
    (job_before,) = trainer_jobs(stack, "operator-restart")
    (pod_before,) = running_trainer_pods(stack, "operator-restart")
    stack.kubectl("delete", "pod", "-n", stack.settings.operator_namespace, "-l", "app.kubernetes.io/name=kubetune")
    stack.kubectl("rollout", "status", "deployment", "-n", stack.settings.operator_namespace, "--timeout=120s")
    stack.wait_for(
        lambda: (
            stack.finetunejob("operator-restart")["status"]["progress"]["step"] > before
            or stack.finetunejob("operator-restart")["status"]["phase"] == "Succeeded"
        ),
        180,
        "progress after the operator restart",
    )
    status = stack.wait_for_phase("operator-restart", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    # The trainer the first operator started is the one that finished: same Job, same single pod, no resume.
    assert [job["metadata"]["uid"] for job in trainer_jobs(stack, "operator-restart")] == [job_before["metadata"]["uid"]]
    assert status["attempts"] == 1 and "resumedFromStep" not in status["result"], status
    assert [attempt["pod"] for attempt in status["usage"]["attempts"]] == [pod_before["metadata"]["name"]]
    assert [p["metadata"]["uid"] for p in trainer_pods(stack, "operator-restart")] == [pod_before["metadata"]["uid"]]


def test_deleting_a_running_job_leaves_nothing(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", **LONG_RUN)
    body["metadata"]["name"] = "deleted"
    stack.apply(body)
    stack.wait_for(lambda: stack.finetunejob("deleted").get("status", {}).get("phase") == "Running", 180, "Running")
    stack.kubectl("delete", "ftj", "deleted", "-n", stack.settings.jobs_namespace, "--wait=true")
    namespace = stack.settings.jobs_namespace

    def gone() -> bool:
        selector = "kubetune.io/finetunejob=deleted"
        left = stack.get_json("jobs,pods,configmaps,services", "-n", namespace, "-l", selector)["items"]
        return not left

    stack.wait_for(gone, 120, "the Job, pods, ConfigMap and Service to be garbage-collected")


def test_missing_secret_is_named_and_creating_it_lets_the_job_run(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", output={"credentialsSecret": {"name": "late-credentials"}})
    body["metadata"]["name"] = "late-secret"
    stack.apply(body)
    namespace = stack.settings.jobs_namespace

    def names_secret() -> bool:
        status = stack.finetunejob("late-secret").get("status", {})
        return "late-credentials" in json.dumps(status.get("conditions", []))

    stack.wait_for(names_secret, 120, "a condition naming the missing Secret")
    assert stack.finetunejob("late-secret")["status"]["phase"] == "Pending"
    secret = stack.get_json("secret", "s3-credentials", "-n", namespace)
    stack.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late-credentials", "namespace": namespace}, "data": secret["data"]})
    status = stack.wait_for_phase("late-secret", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status


def test_suspend_and_resume(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", **LONG_RUN)
    body["metadata"]["name"] = "suspended"
    stack.apply(body)
    namespace = stack.settings.jobs_namespace
    periodic = wait_for_checkpoint(stack, "suspended")
    # Suspended past its periodic checkpoint, the step reached is kept only by the checkpoint taken on SIGTERM.
    stack.wait_for(lambda: int(progress_of(stack, "suspended").get("step", 0)) > periodic, 120, "progress past the checkpoint", interval=0.2)
    at_suspension = int(progress_of(stack, "suspended")["step"])
    stack.kubectl("patch", "ftj", "suspended", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    stack.wait_for_phase("suspended", {"Suspended"}, timeout=120)
    stack.wait_for(lambda: not trainer_pods(stack, "suspended"), 120, "the trainer pods to stop")
    suspended = stack.finetunejob("suspended")["status"]
    sigterm_step = int(suspended["lastCheckpoint"]["step"])
    assert sigterm_step >= at_suspension > periodic, (periodic, at_suspension, suspended["lastCheckpoint"])
    stack.kubectl("patch", "ftj", "suspended", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    status = stack.wait_for_phase("suspended", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["result"]["steps"] == LONG_RUN["training"]["maxSteps"]
    assert status["result"]["resumedFromStep"] == sigterm_step, status["result"]


def test_spec_changed_while_the_operator_was_down_reaches_the_job(stack: Stack) -> None:
    """The operator keeps no state on the FinetuneJob: after a restart it compares the spec with the Job itself."""
    namespace, operators = stack.settings.jobs_namespace, stack.settings.operator_namespace
    body = stack.example("tiny-cpu-lora.yaml", suspend=True)
    body["metadata"]["name"] = "changed-while-down"
    stack.apply(body)
    stack.wait_for(lambda: len(trainer_jobs(stack, "changed-while-down")) == 1, 120, "the suspended trainer Job")
    deployment = stack.kubectl("get", "deployment", "-n", operators, "-l", "app.kubernetes.io/name=kubetune", "-o", "name").stdout.split()[0]
    stack.kubectl("scale", deployment, "-n", operators, "--replicas=0")
    try:
        stack.wait_for(lambda: not stack.get_json("pods", "-n", operators, "-l", "app.kubernetes.io/name=kubetune")["items"], 120, "the operator to stop")
        patch = json.dumps({"spec": {"suspend": False, "backoffLimit": 5, "activeDeadlineSeconds": 3600}})
        stack.kubectl("patch", "ftj", "changed-while-down", "-n", namespace, "--type=merge", "-p", patch)
        time.sleep(2)
        assert trainer_jobs(stack, "changed-while-down")[0]["spec"]["suspend"] is True  # nobody applied it yet
    finally:
        stack.kubectl("scale", deployment, "-n", operators, "--replicas=1")
        stack.kubectl("rollout", "status", deployment, "-n", operators, "--timeout=120s")

    def applied() -> bool:
        spec = trainer_jobs(stack, "changed-while-down")[0]["spec"]
        return spec["suspend"] is False and spec["backoffLimit"] == 5 and spec.get("activeDeadlineSeconds") == 3600

    stack.wait_for(applied, 120, "the spec change to reach the trainer Job")
    stack.wait_for(lambda: "Resuming" in event_reasons(stack, "changed-while-down"), 60, "a Resuming Event")
    status = stack.wait_for_phase("changed-while-down", {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    assert len(trainer_jobs(stack, "changed-while-down")) == 1
