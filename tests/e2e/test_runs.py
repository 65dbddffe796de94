"""Nothing lost, nothing mixed up, end to end: a namesake is a new run, a finished job's result stays, and a
Job that finished while the operator was down is recorded before its TTL removes it.

The same real stack as test_finetunejobs.py: apiserver, Job controller and garbage collector, the operator
installed by helm, trainer processes run by the node agent, moto's S3.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest

from kubetune_api import layout
from kubetune_api.output import OutputSpec
from kubetune_api.result import PublishedRun
from kubetune_api.runtime import TrainerEnvironment
from kubetune_operator import manifests
from kubetune_trainer.storage.publish import read_manifest, verify_publication
from kubetune_trainer.storage.store import S3Store
from tests.e2e.support.stack import DEMO_BUCKET, Stack
from tests.e2e.test_finetunejobs import LONG_RUN, trainer_jobs, trainer_pods, wait_for_checkpoint

pytestmark = pytest.mark.e2e

SETTLE_SECONDS = 10
"""How long nothing may happen where nothing should: no new Job, no change to a recorded result."""


def demo_store(stack: Stack) -> S3Store:
    assert stack.s3 is not None
    output = OutputSpec(bucket=DEMO_BUCKET, endpoint_url=stack.s3.endpoint_url, region="us-east-1")
    return S3Store.from_output(output, environment=TrainerEnvironment.model_validate(stack.s3.env()))


def create(stack: Stack, name: str, **overrides: Any) -> dict[str, Any]:
    body = stack.example("tiny-cpu-lora.yaml", **overrides)
    body["metadata"]["name"] = name
    stack.apply(body)
    return stack.finetunejob(name)


def delete(stack: Stack, name: str) -> None:
    stack.kubectl("delete", "ftj", name, "-n", stack.settings.jobs_namespace, "--wait=true")
    # The trainer pod gets SIGTERM and uploads a checkpoint before it goes: wait for that to have happened.
    stack.wait_for(lambda: not trainer_pods(stack, name) and not trainer_jobs(stack, name), 300, f"the children of {name} to be gone")


def succeeded(stack: Stack, name: str) -> dict[str, Any]:
    found = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=600)
    assert found["status"]["phase"] == "Succeeded", found["status"]
    return found


def manifest_keys(store: S3Store, name: str, namespace: str) -> dict[str, str]:
    """Every adapter manifest published under the job's prefix, by key, with its sha256."""
    found = {}
    for key in store.list_keys(f"runs/{namespace}/{name}/"):
        if key.endswith(f"{layout.ADAPTER_FOLDER}/{layout.MANIFEST}"):
            found[key] = hashlib.sha256(store.get_bytes(key) or b"").hexdigest()
    return found


def test_a_namesake_trains_from_the_start_and_the_earlier_adapter_stays(stack: Stack) -> None:
    """Seen before: a FinetuneJob deleted and created again with a lower learning rate resumed the old run's
    checkpoint (and its optimizer state, so the new rate had no effect) and overwrote the old adapter."""
    name, namespace = "namesake", stack.settings.jobs_namespace
    store = demo_store(stack)
    quick = {"maxSteps": 20, "checkpointEvery": 10, "logEvery": 5}
    uid = create(stack, name, training={**quick, "learningRate": 0.003}, output={"keepCheckpointsAfterSuccess": True})["metadata"]["uid"]
    first = succeeded(stack, name)["status"]["result"]
    assert first["adapterUri"] == f"s3://{DEMO_BUCKET}/runs/{namespace}/{name}/runs/{uid}/adapter/"
    delete(stack, name)

    # A second run of the name, deleted after its first checkpoint (its SIGTERM checkpoint lands too).
    create(stack, name, training={**LONG_RUN["training"], "learningRate": 0.002})
    wait_for_checkpoint(stack, name)
    delete(stack, name)

    third = create(stack, name, training={"maxSteps": 40, "checkpointEvery": 10, "logEvery": 5, "learningRate": 0.001})
    result = succeeded(stack, name)["status"]["result"]
    assert "resumedFromStep" not in result, f"the namesake resumed an earlier run's checkpoint: {result}"
    assert result["steps"] == 40
    manifest = read_manifest(store, result["adapterUri"])
    assert manifest is not None and manifest["training"]["learningRate"] == 0.001 and manifest["runUid"] == third["metadata"]["uid"]
    # The first run's adapter is where its status said, byte for byte, and latest.json names the newest run.
    assert verify_publication(store, first["adapterUri"], deep=True)
    first_key = layout.join_key(first["adapterUri"].removeprefix(f"s3://{DEMO_BUCKET}/"), layout.MANIFEST)
    assert manifest_keys(store, name, namespace)[first_key] == first["manifestSha256"]
    latest = PublishedRun.model_validate(store.get_json(layout.latest_key(f"runs/{namespace}/{name}")))
    assert (latest.run_uid, latest.adapter_uri, latest.manifest_sha256) == (third["metadata"]["uid"], result["adapterUri"], result["manifestSha256"])
    delete(stack, name)


def test_the_result_stays_when_the_pods_of_a_succeeded_job_are_deleted(stack: Stack) -> None:
    """Seen before: `kubectl delete pods` after Succeeded, and status.result was null 15 s later."""
    name, namespace = "result-stays", stack.settings.jobs_namespace
    create(stack, name, training={"maxSteps": 10, "checkpointEvery": 10, "logEvery": 5})
    result = succeeded(stack, name)["status"]["result"]
    stack.kubectl("delete", "pods", "-n", namespace, "-l", f"kubetune.io/finetunejob={name}", "--wait=true")
    stack.wait_for(lambda: not trainer_pods(stack, name), 120, "the pods to be gone")
    # A spec change makes the operator compute the status again, now without the pods: observedGeneration shows it did.
    stack.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps({"spec": {"backoffLimit": 4}}))
    generation = stack.finetunejob(name)["metadata"]["generation"]
    stack.wait_for(lambda: stack.finetunejob(name)["status"].get("observedGeneration") == generation, 120, "the status computed after the change")
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        status = stack.finetunejob(name)["status"]
        assert status["phase"] == "Succeeded" and status.get("result") == result, status
        time.sleep(1)
    stack.kubectl("delete", "ftj", name, "-n", namespace)


def test_a_job_finished_while_the_operator_was_down_is_recorded_then_removed_by_its_ttl(stack: Stack) -> None:
    """Seen before: with ttlSecondsAfterFinished 0 and the operator down at completion, the Job went before the
    outcome was recorded and the operator trained the run a second time.

    The run starts only once the operator is stopped (the Job is created suspended and resumed by hand), so it
    finishes while the operator is down however fast or slow the machine is.
    """
    name, namespace, operators = "ttl-while-down", stack.settings.jobs_namespace, stack.settings.operator_namespace
    store = demo_store(stack)
    create(stack, name, suspend=True, ttlSecondsAfterFinished=0, training={"maxSteps": 20, "checkpointEvery": 10, "logEvery": 5})
    stack.wait_for(lambda: len(trainer_jobs(stack, name)) == 1, 120, "the suspended trainer Job")
    assert "ttlSecondsAfterFinished" not in trainer_jobs(stack, name)[0]["spec"], "the Job controller must not delete it before the operator saw it finish"
    deployment = stack.kubectl("get", "deployment", "-n", operators, "-l", "app.kubernetes.io/name=kubetune", "-o", "name").stdout.split()[0]
    stack.kubectl("scale", deployment, "-n", operators, "--replicas=0")
    try:
        stack.wait_for(lambda: not stack.get_json("pods", "-n", operators, "-l", "app.kubernetes.io/name=kubetune")["items"], 120, "the operator to stop")
        resume = json.dumps({"spec": {"suspend": False}})
        stack.kubectl("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", resume)
        stack.kubectl("patch", "job", manifests.job_name(name), "-n", namespace, "--type=merge", "-p", resume)

        def finished() -> bool:
            jobs = trainer_jobs(stack, name)
            return not jobs or any(c["type"] == "Complete" and c["status"] == "True" for c in jobs[0].get("status", {}).get("conditions") or [])

        stack.wait_for(finished, 600, "the trainer Job to complete")
        time.sleep(SETTLE_SECONDS)  # where a Job controller TTL would have deleted the Job by now
        assert trainer_jobs(stack, name), "the finished Job went while nobody had recorded its outcome"
        published = manifest_keys(store, name, namespace)
        assert len(published) == 1, published
    finally:
        stack.kubectl("scale", deployment, "-n", operators, "--replicas=1")
        stack.kubectl("rollout", "status", deployment, "-n", operators, "--timeout=120s")

    status = succeeded(stack, name)["status"]
    assert status["result"]["manifestSha256"] == next(iter(published.values()))
    # Recorded first, then removed by the operator's TTL; no second Job is ever made.
    stack.wait_for(lambda: not trainer_jobs(stack, name), 120, "the operator to delete the finished Job")
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        assert trainer_jobs(stack, name) == [], "a new trainer Job was created for a finished run"
        time.sleep(1)
    after = stack.finetunejob(name)["status"]
    assert after["phase"] == "Succeeded" and after["result"] == status["result"] and after["attempts"] == 1
    assert manifest_keys(store, name, namespace) == published, "the adapter was published again"
    stack.kubectl("delete", "ftj", name, "-n", namespace)
