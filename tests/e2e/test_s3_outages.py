"""S3 down while the trainer publishes the adapter: ridden out inside the retry budget, and past it.

Each outage starts at the trainer's first publication request (the S3 proxy of the local stack drops that request
and refuses every connection from then on), not after a guessed delay, so the run is past training, eval and its
last checkpoint upload when S3 goes away, on any machine.
"""

from __future__ import annotations

import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_api.exitcodes import REASONS, ExitCode
from kubetune_api.metrics import TrainerMetric
from localcluster.s3 import MotoS3Server
from tests.e2e.support.stack import Stack
from tests.e2e.test_finetunejobs import adapter_is_complete, running_trainer_pods, trainer_pods

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

OUTAGE_SECONDS = 20.0
"""Long enough for several retries with backoff, far inside the default retry budget (300 s)."""


def local_s3(stack: Stack) -> MotoS3Server:
    if not isinstance(stack.s3, MotoS3Server):
        pytest.skip("an outage begun by the trainer's own request needs the local stack's S3 proxy")
    return stack.s3


def publication_request(name: str) -> bytes:
    """The first upload into ``<prefix>/<namespace>/<name>/runs/<run>/adapter/``: where publishing begins."""
    return rb"^PUT /[^ ]*/" + name.encode() + rb"/runs/[^/ ]+/adapter/"


def s3_retries(stack: Stack, pod: dict[str, Any]) -> float:
    """kubetune_trainer_s3_retries_total, read from the running trainer pod's own /metrics."""
    (port,) = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", []) if p["name"] == "metrics"]
    try:
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as error:
        name = pod["metadata"]["labels"]["kubetune.io/finetunejob"]
        seen = [p["status"] for p in trainer_pods(stack, name) if p["metadata"]["uid"] == pod["metadata"]["uid"]]
        raise AssertionError(f"the trainer stopped serving /metrics during the outage ({error}); its pod: {seen}") from error
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == TrainerMetric.S3_RETRIES)


def event_messages(stack: Stack, name: str, reason: str) -> list[str]:
    selector = f"involvedObject.kind=FinetuneJob,involvedObject.name={name},reason={reason}"
    return [str(e.get("message", "")) for e in stack.get_json("events", "-n", stack.settings.jobs_namespace, "--field-selector", selector)["items"]]


def test_an_s3_outage_while_publishing_is_ridden_out_by_the_same_attempt(stack: Stack) -> None:
    s3 = local_s3(stack)
    name = "s3-outage"
    # No periodic checkpoint: a replacement pod would have to train again from step 0, which the assertions would see.
    body = stack.example("tiny-cpu-lora.yaml", training={"maxSteps": 200, "checkpointEvery": 1000, "logEvery": 5})
    body["metadata"]["name"] = name
    began = s3.outage_on(publication_request(name), OUTAGE_SECONDS)
    stack.apply(body)
    stack.wait_for(began.is_set, 600, "the trainer's first publication request", interval=0.2)
    (pod,) = running_trainer_pods(stack, name)
    stack.wait_for(lambda: s3_retries(stack, pod) > 0, OUTAGE_SECONDS, "kubetune_trainer_s3_retries_total > 0 during the outage", interval=0.5)
    assert stack.finetunejob(name)["status"]["phase"] == "Running"
    status = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    # The attempt that was publishing when S3 went away is the one that finished.
    assert status["attempts"] == 1 and "resumedFromStep" not in status["result"], status
    assert [p["metadata"]["uid"] for p in trainer_pods(stack, name)] == [pod["metadata"]["uid"]]
    assert adapter_is_complete(stack, status["result"]["adapterUri"])


def test_an_s3_outage_past_the_retry_budget_fails_the_attempt_and_the_next_resumes(stack: Stack) -> None:
    s3 = local_s3(stack)
    name = "s3-long-outage"
    steps = 200
    body = stack.example("tiny-cpu-lora.yaml", training={"maxSteps": steps, "checkpointEvery": 50, "logEvery": 5}, output={"retryTimeoutSeconds": 10})
    body["metadata"]["name"] = name
    began = s3.outage_on(publication_request(name))  # down until the attempt has given up
    stack.apply(body)
    try:
        stack.wait_for(began.is_set, 600, "the trainer's first publication request", interval=0.2)
        (pod,) = running_trainer_pods(stack, name)

        def gave_up() -> bool:
            (seen,) = [p for p in trainer_pods(stack, name) if p["metadata"]["uid"] == pod["metadata"]["uid"]]
            terminated = [(s.get("state") or {}).get("terminated") for s in seen["status"].get("containerStatuses", [])]
            return any(t and t["exitCode"] == ExitCode.STORAGE_UNAVAILABLE for t in terminated)

        stack.wait_for(gave_up, 120, f"the attempt to exit {int(ExitCode.STORAGE_UNAVAILABLE)} once its 10 s retry budget was spent")
    finally:
        s3.start()
    status = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    # The checkpoint of the last step was complete before publishing began: the next attempt only publishes.
    assert status["attempts"] == 2 and status["result"]["resumedFromStep"] == steps, status
    assert status["usage"]["redoneSteps"] == 0, status["usage"]
    reason = REASONS[ExitCode.STORAGE_UNAVAILABLE]
    retried = event_messages(stack, name, "Retrying")
    assert any(reason in m and "reachable from the pod" in m for m in retried), retried
    assert adapter_is_complete(stack, status["result"]["adapterUri"])
