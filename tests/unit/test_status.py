"""The pure status function over recorded Job and Pod states, and the Events a change deserves."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_api.result import CheckpointRef, SkippedCheckpoint, TerminationMessage, TrainingResult
from kubetune_operator import conditions as st
from kubetune_operator.api import FinetuneJob, FinetuneJobStatus, Progress
from kubetune_operator.events import transition_events
from kubetune_operator.progress import TrainerSample
from kubetune_operator.status import Observed, compute_status, invalid_spec_status, job_expiry, status_patch

pytestmark = pytest.mark.unit

NOW = datetime(2026, 11, 27, 8, 0, 0, tzinfo=UTC)
BODY: dict[str, Any] = {
    "metadata": {"name": "llama", "namespace": "team-a", "uid": "uid-1", "generation": 2},
    "spec": {
        "model": {"source": "meta-llama/Llama-3.1-8B"},
        "dataset": {"source": "s3://data/alpaca.jsonl"},
        "training": {"maxSteps": 100},
        "output": {"bucket": "adapters", "prefix": "runs"},
        "resources": {"gpus": 1, "memory": "64Gi"},
        "backoffLimit": 2,
        "activeDeadlineSeconds": 3600,
    },
}


def ftj(status: dict[str, Any] | None = None, **spec: Any) -> FinetuneJob:
    body = copy.deepcopy(BODY)
    body["spec"].update(spec)
    if status is not None:
        body["status"] = {k: v for k, v in status.items() if k != "progressText"}
    return FinetuneJob.from_body(body)


def job(conditions: list[dict[str, Any]] | None = None, suspend: bool = False, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "llama-trainer", "creationTimestamp": "2026-11-27T07:00:00Z"},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or [], "startTime": "2026-11-27T07:00:05Z", **status},
    }


def cond(kind: str, reason: str, message: str = "", when: str = "2026-11-27T07:30:00Z") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": when}


def pod(
    phase: str,
    *,
    state: dict[str, Any] | None = None,
    conditions: list[dict[str, Any]] | None = None,
    created: str = "2026-11-27T07:00:06Z",
    node: str | None = "gpu-node-a",
    name: str = "llama-trainer-abcde",
) -> dict[str, Any]:
    statuses = [{"name": "trainer", "state": state}] if state is not None else []
    return {
        "metadata": {"name": name, "creationTimestamp": created, "annotations": {}},
        "spec": {"nodeName": node},
        "status": {"phase": phase, "conditions": conditions or [], "containerStatuses": statuses, "podIP": "10.0.0.7"},
    }


def terminated(code: int, message: Any = "", reason: str = "Error") -> dict[str, Any]:
    text = json.dumps(message) if isinstance(message, dict) else message
    return {"terminated": {"exitCode": code, "reason": reason, "message": text}}


def conditions_by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def observe(**kwargs: Any) -> Observed:
    return Observed(now=NOW, **kwargs)


def test_no_job_yet_is_pending_and_creating() -> None:
    status = compute_status(ftj(), observe())
    assert status["phase"] == "Pending"
    assert conditions_by_type(status)["Created"]["reason"] == st.REASON_CREATING
    assert status["observedGeneration"] == 2
    assert "jobName" not in status


def test_missing_secret_named_while_waiting_to_create() -> None:
    status = compute_status(ftj(), observe(missing_secret="s3-creds"))
    created = conditions_by_type(status)["Created"]
    assert (created["status"], created["reason"]) == ("False", st.REASON_WAITING_FOR_SECRET)
    assert '"s3-creds"' in created["message"] and "team-a" in created["message"]
    assert status["phase"] == "Pending"


def test_pending_pod_waiting_for_the_scheduler() -> None:
    status = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None)]))
    assert status["phase"] == "Pending"
    assert status["jobName"] == "llama-trainer"
    assert conditions_by_type(status)["Created"]["status"] == "True"
    assert conditions_by_type(status)["Scheduled"]["status"] == "False"
    assert status["attempts"] == 1


def test_unschedulable_pod_carries_the_scheduler_message() -> None:
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    status = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None, conditions=[scheduled])]))
    condition = conditions_by_type(status)["Scheduled"]
    assert (condition["status"], condition["reason"], condition["message"]) == ("False", "Unschedulable", message)
    assert status["message"] == message


def test_running_with_metrics_fills_progress_and_checkpoint() -> None:
    sample = TrainerSample(
        progress=Progress(step=42, total_steps=100, percent=42, loss=1.25, tokens_per_second=5100.0, eta_seconds=300, last_update_time=NOW),
        last_checkpoint_step=40,
    )
    running = pod("Running", state={"running": {"startedAt": "2026-11-27T07:01:00Z"}})
    status = compute_status(ftj(), observe(job=job(active=1), pods=[running], sample=sample))
    assert status["phase"] == "Running"
    assert conditions_by_type(status)["Running"]["status"] == "True"
    assert status["progress"]["step"] == 42
    assert status["progress"]["loss"] == 1.25
    assert status["progressText"] == "42%"
    # The run's own folder: runs/<FinetuneJob uid>/ under the job's prefix (kubetune_api.layout).
    assert status["lastCheckpoint"] == {"step": 40, "uri": "s3://adapters/runs/team-a/llama/runs/uid-1/checkpoints/step-40/"}
    assert status["startTime"] == "2026-11-27T07:00:05Z"


def test_progress_is_kept_between_metric_reads_while_running() -> None:
    first = compute_status(
        ftj(),
        observe(job=job(active=1), pods=[pod("Running", state={"running": {}})], sample=TrainerSample(Progress(step=10, percent=10, last_update_time=NOW))),
    )
    again = compute_status(ftj(first), observe(job=job(active=1), pods=[pod("Running", state={"running": {}})]))
    assert again["progress"] == first["progress"]
    assert status_patch(first, again) is None


SUCCESS_MESSAGE = TerminationMessage.succeeded(
    TrainingResult(
        adapter_uri="s3://adapters/runs/team-a/llama/runs/uid-1/adapter/",
        manifest_sha256="a" * 64,
        size_bytes=1234,
        final_loss=0.875,
        steps=100,
        tokens=409600,
        duration_seconds=321.5,
        peak_memory_bytes=9_000_000_000,
        resumed_from_step=60,
    ),
    CheckpointRef(step=100, uri="s3://adapters/runs/team-a/llama/runs/uid-1/checkpoints/step-100/"),
).to_api()


def test_succeeded_with_termination_message_publishes_the_result() -> None:
    done = job([cond("SuccessCriteriaMet", "CompletionsReached"), cond("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-27T07:40:00Z")
    status = compute_status(ftj(), observe(job=done, pods=[pod("Succeeded", state=terminated(0, SUCCESS_MESSAGE, "Completed"))]))
    assert status["phase"] == "Succeeded"
    assert status["result"]["adapterUri"] == "s3://adapters/runs/team-a/llama/runs/uid-1/adapter/"
    assert status["result"]["finalLoss"] == 0.875
    assert status["result"]["peakMemoryBytes"] == 9_000_000_000
    assert status["result"]["resumedFromStep"] == 60
    assert status["lastCheckpoint"]["step"] == 100
    assert status["progress"]["percent"] == 100 and status["progressText"] == "100%"
    assert status["progress"]["step"] == 100
    assert status["completionTime"] == "2026-11-27T07:40:00Z"
    conditions = conditions_by_type(status)
    assert conditions["Succeeded"]["status"] == "True"
    assert conditions["Failed"]["status"] == "False"
    assert conditions["Running"]["status"] == "False"


def test_phase_never_goes_back_to_pending_while_the_job_completes() -> None:
    """The trainer pod exits 0 a moment before the Job controller marks the Job Complete: Running, then Succeeded."""
    running = observe(job=job(active=1), pods=[pod("Running", state={"running": {}})])
    finished_pod = pod("Succeeded", state=terminated(0, SUCCESS_MESSAGE, "Completed"))
    exited = observe(job=job(active=0), pods=[finished_pod])
    done = observe(job=job([cond("Complete", "CompletionsReached")], succeeded=1), pods=[finished_pod])
    phases = []
    status: dict[str, Any] | None = None
    for observed in (running, exited, done):
        status = compute_status(ftj(status), observed)
        phases.append(status["phase"])
    assert phases == ["Running", "Running", "Succeeded"]


def test_failed_with_config_error_exit_code_uses_the_trainer_reason() -> None:
    message = {
        "status": "Failed",
        "reason": "ConfigError",
        "message": "spec.lora.targetModules: no module q_proj; linear layers: c_attn, c_proj",
        "exitCode": 10,
    }
    failed = job(
        [cond("FailureTarget", "PodFailurePolicy"), cond("Failed", "PodFailurePolicy", "Container trainer for pod x failed with exit code 10")], failed=1
    )
    status = compute_status(ftj(), observe(job=failed, pods=[pod("Failed", state=terminated(10, message))]))
    assert status["phase"] == "Failed"
    condition = conditions_by_type(status)["Failed"]
    assert condition["reason"] == "ConfigError"
    assert "no module q_proj" in condition["message"]
    assert status["completionTime"] == "2026-11-27T07:30:00Z"


@pytest.mark.parametrize("code", [10, 11, 12, 13, 14, 15])
def test_every_non_retriable_exit_code_maps_to_its_reason_without_a_message(code: int) -> None:
    from kubetune_api.exitcodes import REASONS, ExitCode

    failed = job([cond("Failed", "PodFailurePolicy")], failed=1)
    status = compute_status(ftj(), observe(job=failed, pods=[pod("Failed", state=terminated(code, "Traceback (most recent call last): ..."))]))
    assert conditions_by_type(status)["Failed"]["reason"] == REASONS[ExitCode(code)]


def test_backoff_limit_exceeded_after_runtime_errors() -> None:
    failed = job([cond("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")], failed=3)
    pods = [
        pod(
            "Failed",
            state=terminated(1, {"status": "Failed", "reason": "RuntimeError", "message": "NCCL timeout", "exitCode": 1}),
            created=f"2026-11-27T07:0{i}:00Z",
            name=f"p{i}",
        )
        for i in range(3)
    ]
    status = compute_status(ftj(), observe(job=failed, pods=pods))
    condition = conditions_by_type(status)["Failed"]
    assert condition["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit=2" in condition["message"] and "NCCL timeout" in condition["message"]
    assert status["attempts"] == 3


def test_deadline_exceeded() -> None:
    failed = job([cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")], active=0)
    status = compute_status(ftj(), observe(job=failed, pods=[]))
    condition = conditions_by_type(status)["Failed"]
    assert condition["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=3600" in condition["message"]


def test_oom_killed_gives_advice() -> None:
    failed = job([cond("Failed", "BackoffLimitExceeded")], failed=3)
    status = compute_status(ftj(), observe(job=failed, pods=[pod("Failed", state=terminated(137, "", "OOMKilled"))]))
    condition = conditions_by_type(status)["Failed"]
    assert condition["reason"] == "OOMKilled"
    assert "spec.resources.memory=64Gi" in condition["message"] and "perDeviceBatchSize" in condition["message"]


def test_oom_killed_attempt_while_retrying_is_reported() -> None:
    status = compute_status(ftj(), observe(job=job(failed=1), pods=[pod("Failed", state=terminated(137, "", "OOMKilled"))]))
    assert status["phase"] == "Pending"
    assert conditions_by_type(status)["Running"]["reason"] == "OOMKilled"


def test_create_container_config_error_names_the_missing_secret() -> None:
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}}
    status = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", state=waiting)]))
    condition = conditions_by_type(status)["Running"]
    assert (condition["status"], condition["reason"]) == ("False", st.REASON_WAITING_FOR_SECRET)
    assert '"s3-creds"' in condition["message"]
    assert status["phase"] == "Pending"


def test_suspended_job() -> None:
    status = compute_status(ftj(suspend=True), observe(job=job([cond("Suspended", "JobSuspended")], suspend=True), pods=[]))
    assert status["phase"] == "Suspended"
    assert conditions_by_type(status)["Suspended"]["status"] == "True"


def test_suspended_while_pods_checkpoint() -> None:
    status = compute_status(ftj(suspend=True), observe(job=job(suspend=True, active=1), pods=[pod("Running", state={"running": {}})]))
    assert status["phase"] == "Suspended"
    assert "checkpointing" in status["message"]


def test_queued_in_kueue_waits_for_admission() -> None:
    status = compute_status(ftj(queueName="q"), observe(job=job(suspend=True), pods=[]))
    assert status["phase"] == "Pending"
    assert conditions_by_type(status)["Suspended"]["reason"] == st.REASON_WAITING_FOR_ADMISSION


def test_finished_status_survives_the_job_ttl() -> None:
    done = job([cond("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-27T07:40:00Z")
    finished = compute_status(ftj(), observe(job=done, pods=[pod("Succeeded", state=terminated(0, SUCCESS_MESSAGE, "Completed"))]))
    after_ttl = compute_status(ftj(finished), observe(job=None, pods=[]))
    assert after_ttl == finished


def test_the_result_stays_when_the_pods_of_a_finished_job_are_gone() -> None:
    """Pod garbage collection or `kubectl delete pod` after Succeeded: the Job is still Complete, its pods are not there."""
    done = job([cond("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-27T07:40:00Z")
    finished = compute_status(ftj(), observe(job=done, pods=[pod("Succeeded", state=terminated(0, SUCCESS_MESSAGE, "Completed"))]))
    without_pods = compute_status(ftj(finished), observe(job=done, pods=[]))
    assert without_pods["result"] == finished["result"] and without_pods["result"]["manifestSha256"] == "a" * 64
    assert without_pods["completionTime"] == finished["completionTime"] and without_pods["phase"] == "Succeeded"
    assert status_patch(finished, without_pods) is None, "the status would be written again without the result"


def test_a_finished_job_expires_its_ttl_after_completion_and_only_once_finished() -> None:
    done = job([cond("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-27T07:40:00Z")
    finished = FinetuneJobStatus.model_validate(
        compute_status(ftj(), observe(job=done, pods=[pod("Succeeded", state=terminated(0, SUCCESS_MESSAGE, "Completed"))]))
    )
    assert job_expiry(ftj(ttlSecondsAfterFinished=600), finished) == datetime(2026, 11, 27, 7, 50, tzinfo=UTC)
    assert job_expiry(ftj(), finished) is None, "no TTL: the Job stays"
    running = FinetuneJobStatus.model_validate(compute_status(ftj(), observe(job=job(active=1), pods=[pod("Running", state={"running": {}})])))
    assert job_expiry(ftj(ttlSecondsAfterFinished=0), running) is None, "a Job whose outcome is not recorded never expires"


def test_a_success_that_deleted_its_checkpoints_reports_none() -> None:
    """After publishing, the trainer deletes the run's checkpoints (spec.output.keepCheckpointsAfterSuccess: false)
    and reports no lastCheckpoint: the status must not keep pointing at a deleted one."""
    running = compute_status(
        ftj(),
        observe(job=job(active=1), pods=[pod("Running", state={"running": {}})], sample=TrainerSample(Progress(step=50), last_checkpoint_step=50)),
    )
    assert running["lastCheckpoint"]["step"] == 50
    message = {k: v for k, v in SUCCESS_MESSAGE.items() if k != "lastCheckpoint"}
    done = job([cond("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-27T07:40:00Z")
    finished = compute_status(ftj(running), observe(job=done, pods=[pod("Succeeded", state=terminated(0, message, "Completed"))]))
    assert "lastCheckpoint" not in finished


def test_gpu_resource_not_found_is_a_warning_not_a_failure() -> None:
    status = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None)], gpu_resource_found=False))
    condition = conditions_by_type(status)["GPUResourceAvailable"]
    assert (condition["status"], condition["reason"]) == ("False", "GPUResourceNotFound")
    assert status["phase"] == "Pending"


def test_transition_time_moves_only_when_the_condition_status_changes() -> None:
    pending = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None)]))
    later = Observed(now=NOW + timedelta(minutes=5), job=job(active=1), pods=[pod("Running", state={"running": {}})])
    running = compute_status(ftj(pending), later)
    before, after = conditions_by_type(pending), conditions_by_type(running)
    assert after["Created"]["lastTransitionTime"] == before["Created"]["lastTransitionTime"]
    assert after["Running"]["lastTransitionTime"] != before["Running"]["lastTransitionTime"]
    assert FinetuneJobStatus.model_validate({k: v for k, v in running.items() if k != "progressText"}).phase == "Running"


def test_invalid_spec_status() -> None:
    status = invalid_spec_status("training: set exactly one of epochs or maxSteps", 3, None, NOW)
    assert status["phase"] == "Failed"
    assert conditions_by_type(status)["Failed"]["reason"] == st.REASON_INVALID_SPEC
    assert "epochs or maxSteps" in status["message"]


def test_status_patch_only_when_changed_and_deletes_vanished_fields() -> None:
    old = {"phase": "Running", "progress": {"step": 1}, "progressText": "1%", "attempts": 1}
    assert status_patch(old, dict(old)) is None
    new = {"phase": "Suspended", "attempts": 1, "progress": {"step": 1}}
    assert status_patch(old, new) == {"phase": "Suspended", "attempts": 1, "progress": {"step": 1}, "progressText": None}


def test_events_on_transitions() -> None:
    pending = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None)]))
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}
    stuck = compute_status(ftj(pending), observe(job=job(active=1), pods=[pod("Pending", node=None, conditions=[scheduled])]))
    events = transition_events(pending, stuck)
    assert [(e.type, e.reason) for e in events] == [("Warning", "Unschedulable")]
    assert transition_events(stuck, stuck) == []
    failed = compute_status(ftj(stuck), observe(job=job([cond("Failed", "DeadlineExceeded")]), pods=[]))
    assert [(e.type, e.reason) for e in transition_events(stuck, failed)] == [("Warning", "DeadlineExceeded")]
    first = transition_events(None, pending)
    assert [(e.type, e.reason) for e in first] == [("Normal", "Pending")]


def test_a_damaged_checkpoint_passed_over_is_a_warning_event_at_success() -> None:
    skipped = SkippedCheckpoint(step=20, uri="s3://adapters/runs/team-a/llama/runs/uid-1/checkpoints/step-20/", reason="optimizer.pt cannot be loaded safely")
    result = TrainingResult(adapter_uri="s3://adapters/runs/team-a/llama/runs/uid-1/adapter/", resumed_from_step=10, skipped_checkpoints=[skipped])
    message = TerminationMessage.succeeded(result, None).to_api()
    running = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Running")]))
    done = job([cond("Complete", "CompletionsReached")], succeeded=1, completionTime="2026-11-27T07:40:00Z")
    finished = compute_status(ftj(), observe(job=done, pods=[pod("Succeeded", state=terminated(0, message, "Completed"))]))
    events = transition_events(running, finished)
    assert [(e.type, e.reason) for e in events] == [("Normal", "Succeeded"), ("Warning", "DamagedCheckpointPassedOver")]
    assert all(part in events[1].message for part in ("step 20", skipped.uri, skipped.reason)), events[1].message
    assert transition_events(finished, finished) == []


def test_every_reason_is_camel_case_as_the_condition_schema_requires() -> None:
    import re

    from kubetune_operator import conditions
    from kubetune_operator.api import Condition

    pattern = Condition.model_fields["reason"].metadata[-1].pattern
    reasons = [value for name, value in vars(conditions).items() if name.startswith("REASON_")]
    reasons += sorted(conditions.TRAINER_REASONS)
    assert reasons and all(re.fullmatch(pattern, reason) and reason[0].isupper() for reason in reasons)


def evicted(i: int) -> dict[str, Any]:
    """A trainer pod the kubelet evicted (disk pressure): Failed with the DisruptionTarget condition."""
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet", "message": "The node was low on resource: ephemeral-storage."}
    return pod("Failed", state=terminated(137, reason="Error"), conditions=[condition], created=f"2026-11-27T07:0{i}:00Z", name=f"evicted-{i}")


def test_disruptions_are_counted_and_fail_the_job_past_the_limit() -> None:
    retrying = compute_status(ftj(maxDisruptions=2), observe(job=job(failed=0), pods=[evicted(0), evicted(1)]))
    assert retrying["disruptions"] == 2 and retrying["phase"] != "Failed"
    too_many = compute_status(ftj(maxDisruptions=2), observe(job=job(failed=0), pods=[evicted(0), evicted(1), evicted(2)]))
    assert too_many["phase"] == "Failed" and too_many["disruptions"] == 3
    failed = conditions_by_type(too_many)["Failed"]
    assert failed["reason"] == "DisruptionLimitExceeded" and "spec.maxDisruptions=2" in failed["message"] and "3 times" in failed["message"]
    # A runtime failure is not a disruption.
    crashed = pod("Failed", state=terminated(1), name="crashed")
    assert compute_status(ftj(maxDisruptions=0), observe(job=job(failed=1), pods=[crashed]))["disruptions"] == 0
