"""Pure status function: the observed trainer Job, its pods and a metrics sample in, status out.

Nothing is accumulated: every field is derived from what is observed now. Two exceptions keep
what was observed before because it can no longer be observed: the last progress sample
(between metric reads) and a finished run's status once its Job has been deleted by TTL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune_api import layout
from kubetune_api.exitcodes import REASONS, ExitCode
from kubetune_api.result import CheckpointRef, TerminationMessage
from kubetune_operator import manifests
from kubetune_operator.api import Condition, FinetuneJob, FinetuneJobStatus, Phase, Progress, Result
from kubetune_operator.conditions import (
    CONDITION_ORDER,
    CREATED,
    FAILED,
    GPU_RESOURCE_AVAILABLE,
    INPUT_REASONS,
    REASON_BACKOFF_LIMIT_EXCEEDED,
    REASON_CREATE_CONTAINER_CONFIG_ERROR,
    REASON_CREATING,
    REASON_DEADLINE_EXCEEDED,
    REASON_FINISHING,
    REASON_GPU_RESOURCE_FOUND,
    REASON_GPU_RESOURCE_NOT_FOUND,
    REASON_IMAGE_PULL,
    REASON_INVALID_SPEC,
    REASON_JOB_CREATED,
    REASON_JOB_FAILED,
    REASON_NO_POD,
    REASON_NOT_FAILED,
    REASON_NOT_FINISHED,
    REASON_NOT_RUNNING,
    REASON_NOT_SUSPENDED,
    REASON_OOM_KILLED,
    REASON_POD_SCHEDULED,
    REASON_RETRYING,
    REASON_STARTING,
    REASON_SUCCEEDED,
    REASON_SUSPENDED,
    REASON_TRAINING,
    REASON_UNSCHEDULABLE,
    REASON_WAITING_FOR_ADMISSION,
    REASON_WAITING_FOR_SECRET,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    SUSPENDED,
    TRAINER_REASONS,
)
from kubetune_operator.progress import TrainerSample

Obj = dict[str, Any]

MAX_MESSAGE = 4096


@dataclass(frozen=True)
class Observed:
    """Everything the operator saw about one FinetuneJob's children at one moment."""

    now: datetime
    job: Obj | None = None
    pods: list[Obj] = field(default_factory=list)
    sample: TrainerSample | None = None
    missing_secret: str | None = None
    gpu_resource_found: bool | None = None


@dataclass
class _Verdict:
    phase: Phase
    message: str
    conditions: dict[str, tuple[bool, str, str]] = field(default_factory=dict)

    def set(self, kind: str, status: bool, reason: str, message: str = "") -> None:
        self.conditions[kind] = (status, reason, message[:MAX_MESSAGE])


def _conditions_of(obj: Obj | None) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _true(conditions: dict[str, Obj], kind: str) -> bool:
    return conditions.get(kind, {}).get("status") == "True"


def _trainer_state(pod: Obj) -> Obj:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == manifests.CONTAINER_NAME:
            return dict(container)
    return {}


def _terminated(pod: Obj) -> Obj | None:
    terminated = (_trainer_state(pod).get("state") or {}).get("terminated")
    return dict(terminated) if isinstance(terminated, dict) else None


def termination_message(pod: Obj) -> TerminationMessage | None:
    """The trainer's termination message, or None when the pod ended without writing one."""
    terminated = _terminated(pod)
    text = str((terminated or {}).get("message") or "").strip()
    return TerminationMessage.decode(text) if text else None


def _log_tail(pod: Obj) -> str:
    """What the kubelet put in place of a termination message the trainer never wrote (its log tail)."""
    text = str((_terminated(pod) or {}).get("message") or "").strip()
    return "" if TerminationMessage.decode(text) is not None else text[-MAX_MESSAGE:]


def _created(pod: Obj) -> str:
    return str((pod.get("metadata") or {}).get("creationTimestamp") or "")


def _rank(pod: Obj) -> int:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(annotations.get(manifests.COMPLETION_INDEX_ANNOTATION, 0))
    except ValueError:
        return 0


def _newest_first(pods: list[Obj]) -> list[Obj]:
    return sorted(pods, key=lambda p: (_created(p), -_rank(p)), reverse=True)


def _failure_reason(pod: Obj) -> tuple[str, str]:
    """Reason and message of a failed trainer pod, from its exit and termination message."""
    terminated = _terminated(pod) or {}
    if terminated.get("reason") == "OOMKilled":
        return REASON_OOM_KILLED, ""
    message = termination_message(pod)
    if message is not None and message.reason in TRAINER_REASONS:
        return message.reason, message.message or ""
    text = (message.message if message is not None else None) or _log_tail(pod)
    code = terminated.get("exitCode")
    if isinstance(code, int) and code in ExitCode._value2member_map_:
        return REASONS[ExitCode(code)], text
    pod_reason = (pod.get("status") or {}).get("reason")
    return (str(pod_reason) if pod_reason else REASON_JOB_FAILED), text or str((pod.get("status") or {}).get("message") or "")


def _oom_advice(spec: FinetuneJob) -> str:
    memory = spec.spec.resources.memory or "unset (the namespace default)"
    return (
        f"the trainer exceeded its memory limit (spec.resources.memory={memory}); raise spec.resources.memory, "
        "lower spec.training.perDeviceBatchSize or spec.dataset.maxSeqLength, or use method qlora"
    )


def _pending_reason(pod: Obj) -> tuple[str, str, str] | None:
    """(condition type, reason, message) explaining why a pod does not run yet."""
    pod_conditions = {c.get("type"): c for c in (pod.get("status") or {}).get("conditions") or []}
    scheduled = pod_conditions.get("PodScheduled")
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason") == REASON_UNSCHEDULABLE:
        return SCHEDULED, REASON_UNSCHEDULABLE, str(scheduled.get("message") or "no node fits the trainer pod")
    waiting = (_trainer_state(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    text = str(waiting.get("message") or "")
    if reason == REASON_CREATE_CONTAINER_CONFIG_ERROR:
        secret = _secret_in(text)
        if secret:
            return RUNNING, REASON_WAITING_FOR_SECRET, f'Secret "{secret}" not found: create it in this namespace; the trainer starts once it exists'
        return RUNNING, REASON_CREATE_CONTAINER_CONFIG_ERROR, text
    if reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
        return RUNNING, REASON_IMAGE_PULL, f"cannot pull the trainer image: {text}"
    return None


def _secret_in(text: str) -> str | None:
    marker = 'secret "'
    start = text.find(marker)
    if start < 0:
        return None
    end = text.find('"', start + len(marker))
    return text[start + len(marker) : end] if end > start else None


def _job_phase(spec: FinetuneJob, observed: Observed, verdict: _Verdict) -> None:
    job = observed.job or {}
    job_conditions = _conditions_of(job)
    pods = _newest_first(observed.pods)
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if _true(job_conditions, "Complete") or _true(job_conditions, "SuccessCriteriaMet"):
        verdict.phase, verdict.message = Phase.SUCCEEDED, "training finished"
        verdict.set(SUCCEEDED, True, REASON_SUCCEEDED, verdict.message)
        return
    failed = job_conditions.get("Failed") if _true(job_conditions, "Failed") else None
    failed = failed or (job_conditions.get("FailureTarget") if _true(job_conditions, "FailureTarget") else None)
    if failed is not None:
        job_reason = str(failed.get("reason") or REASON_JOB_FAILED)
        if job_reason == REASON_DEADLINE_EXCEEDED:
            reason, message = job_reason, f"the run exceeded spec.activeDeadlineSeconds={spec.spec.active_deadline_seconds}; raise it or shorten the run"
        elif failed_pods:
            reason, message = _failure_reason(failed_pods[0])
            if reason == REASON_OOM_KILLED:
                message = _oom_advice(spec)
            elif job_reason == REASON_BACKOFF_LIMIT_EXCEEDED and reason not in INPUT_REASONS:
                # Retriable faults (RuntimeError, Interrupted, ...) only fail the job by running out of retries.
                reason = REASON_BACKOFF_LIMIT_EXCEEDED
            if job_reason == REASON_BACKOFF_LIMIT_EXCEEDED:
                message = f"retried spec.backoffLimit={spec.spec.backoff_limit} times; last attempt: {message or reason}"
        else:
            reason, message = job_reason, str(failed.get("message") or "")
        verdict.phase, verdict.message = Phase.FAILED, message or reason
        verdict.set(FAILED, True, reason if reason.isidentifier() else REASON_JOB_FAILED, verdict.message)
        return
    if (job.get("spec") or {}).get("suspend"):
        waiting = spec.spec.queue_name is not None and not spec.spec.suspend
        active = int((job.get("status") or {}).get("active") or 0)
        if waiting:
            verdict.phase, verdict.message = Phase.PENDING, f"waiting for Kueue to admit the trainer Job in queue {spec.spec.queue_name}"
            verdict.set(SUSPENDED, True, REASON_WAITING_FOR_ADMISSION, verdict.message)
        else:
            verdict.phase = Phase.SUSPENDED
            verdict.message = "suspended: trainer pods are checkpointing and stopping" if active else "suspended; set spec.suspend to false to resume"
            verdict.set(SUSPENDED, True, REASON_SUSPENDED, verdict.message)
        return
    _pod_phase(spec, pods, failed_pods, verdict)


def _pod_phase(spec: FinetuneJob, pods: list[Obj], failed_pods: list[Obj], verdict: _Verdict) -> None:
    live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running", "Unknown", None)]
    running = [p for p in live if "running" in (_trainer_state(p).get("state") or {})]
    if live and len(running) == len(live):
        verdict.phase, verdict.message = Phase.RUNNING, "training"
        verdict.set(SCHEDULED, True, REASON_POD_SCHEDULED)
        verdict.set(RUNNING, True, REASON_TRAINING, verdict.message)
        return
    if not live and any((p.get("status") or {}).get("phase") == "Succeeded" for p in pods):
        # The trainer exited 0 and the Job controller has not marked the Job Complete yet: still Running, never
        # back to Pending on the way to Succeeded.
        verdict.phase, verdict.message = Phase.RUNNING, "the trainer finished; waiting for the Job to complete"
        verdict.set(SCHEDULED, True, REASON_POD_SCHEDULED)
        verdict.set(RUNNING, True, REASON_FINISHING, verdict.message)
        return
    verdict.phase = Phase.PENDING
    for pod in live:
        explained = _pending_reason(pod)
        if explained is not None:
            kind, reason, message = explained
            if kind == RUNNING:
                verdict.set(SCHEDULED, True, REASON_POD_SCHEDULED)
            verdict.set(kind, False, reason, message)
            verdict.message = message
            return
    if live:
        scheduled = all((p.get("spec") or {}).get("nodeName") for p in live)
        verdict.set(SCHEDULED, scheduled, REASON_POD_SCHEDULED if scheduled else REASON_NO_POD)
        verdict.message = "the trainer is starting" if scheduled else "waiting for the scheduler"
        verdict.set(RUNNING, False, REASON_STARTING, verdict.message)
        return
    if failed_pods:
        reason, message = _failure_reason(failed_pods[0])
        if reason == REASON_OOM_KILLED:
            message = _oom_advice(spec)
        verdict.message = f"attempt failed ({reason}), retrying from the newest checkpoint: {message}".rstrip(": ")
        verdict.set(RUNNING, False, REASON_RETRYING if reason not in (REASON_OOM_KILLED,) else REASON_OOM_KILLED, verdict.message)
        return
    verdict.message = "waiting for the trainer pod to be created"
    verdict.set(SCHEDULED, False, REASON_NO_POD, verdict.message)


def _checkpoint(spec: FinetuneJob, observed: Observed, previous: FinetuneJobStatus | None) -> CheckpointRef | None:
    for pod in _newest_first(observed.pods):
        message = termination_message(pod)
        if message is not None and message.last_checkpoint is not None:
            return message.last_checkpoint
    if observed.sample is not None and observed.sample.last_checkpoint_step is not None:
        run = layout.run_prefix(spec.spec.output.prefix, spec.metadata.namespace, spec.metadata.name)
        return CheckpointRef(
            step=observed.sample.last_checkpoint_step, uri=layout.checkpoint_uri(spec.spec.output.bucket, run, observed.sample.last_checkpoint_step)
        )
    return previous.last_checkpoint if previous else None


def _result(observed: Observed) -> Result | None:
    for pod in _newest_first(observed.pods):
        message = termination_message(pod)
        if message is not None and message.status == "Succeeded" and message.result is not None:
            return Result.model_validate(message.result.model_dump())
    return None


def _attempts(spec: FinetuneJob, observed: Observed) -> int:
    job_status = (observed.job or {}).get("status") or {}
    counted = sum(int(job_status.get(k) or 0) for k in ("active", "succeeded", "failed"))
    pods = max(len(observed.pods), counted)
    return math.ceil(pods / spec.spec.resources.nodes)


def _merge_conditions(verdict: _Verdict, previous: FinetuneJobStatus | None, generation: int, now: datetime) -> list[Condition]:
    before = {c.type: c for c in (previous.conditions if previous else [])}
    merged: list[Condition] = []
    for kind in CONDITION_ORDER:
        if kind not in verdict.conditions:
            continue
        status, reason, message = verdict.conditions[kind]
        text = "True" if status else "False"
        old = before.get(kind)
        since = old.last_transition_time if old is not None and old.status == text else now.replace(microsecond=0)
        merged.append(Condition(type=kind, status=text, reason=reason, message=message, last_transition_time=since, observed_generation=generation))
    return merged


def compute_status(spec: FinetuneJob, observed: Observed) -> Obj:
    """The status a FinetuneJob should have given what is observed (camelCase dict, with the printer fields)."""
    previous = spec.status
    if observed.job is None and previous is not None and previous.phase in (Phase.SUCCEEDED, Phase.FAILED):
        # The finished Job was removed (ttlSecondsAfterFinished): the recorded outcome stays.
        return status_to_api(previous)
    verdict = _Verdict(phase=Phase.PENDING, message="")
    if observed.job is None:
        if observed.missing_secret:
            verdict.message = (
                f'Secret "{observed.missing_secret}" not found in namespace {spec.metadata.namespace}: create it; the trainer Job is created once it exists'
            )
            verdict.set(CREATED, False, REASON_WAITING_FOR_SECRET, verdict.message)
        else:
            verdict.message = "creating the trainer Job"
            verdict.set(CREATED, False, REASON_CREATING, verdict.message)
    else:
        verdict.set(CREATED, True, REASON_JOB_CREATED, f"trainer Job {manifests.job_name(spec.metadata.name)} created")
        _job_phase(spec, observed, verdict)
    _fill_negatives(verdict)
    if spec.spec.resources.gpus > 0 and observed.gpu_resource_found is not None:
        name = spec.spec.resources.gpu_resource_name
        if observed.gpu_resource_found:
            verdict.set(GPU_RESOURCE_AVAILABLE, True, REASON_GPU_RESOURCE_FOUND, f"some node offers {name}")
        else:
            advice = f"no node has {name} in its allocatable resources; install the device plugin or check spec.resources.gpuResourceName"
            verdict.set(GPU_RESOURCE_AVAILABLE, False, REASON_GPU_RESOURCE_NOT_FOUND, advice)
    result = _result(observed) if verdict.phase is Phase.SUCCEEDED else None
    if result is not None:
        verdict.message = f"adapter published at {result.adapter_uri}"
    progress = _progress(verdict.phase, observed, previous, result)
    job_status = (observed.job or {}).get("status") or {}
    completion = job_status.get("completionTime")
    if verdict.phase is Phase.FAILED and not completion:
        failed = _conditions_of(observed.job).get("Failed") or {}
        completion = failed.get("lastTransitionTime")
    status = FinetuneJobStatus(
        phase=verdict.phase,
        conditions=_merge_conditions(verdict, previous, spec.metadata.generation, observed.now),
        progress=progress,
        last_checkpoint=_checkpoint(spec, observed, previous),
        result=result,
        job_name=manifests.job_name(spec.metadata.name) if observed.job is not None else None,
        start_time=job_status.get("startTime"),
        completion_time=completion if verdict.phase in (Phase.SUCCEEDED, Phase.FAILED) else None,
        attempts=_attempts(spec, observed),
        observed_generation=spec.metadata.generation,
        message=verdict.message[:MAX_MESSAGE] or None,
    )
    return status_to_api(status)


def _fill_negatives(verdict: _Verdict) -> None:
    """Every lifecycle condition is present, False when it does not hold."""
    defaults = {
        RUNNING: REASON_NOT_RUNNING,
        SUCCEEDED: REASON_NOT_FINISHED,
        FAILED: REASON_NOT_FAILED,
        SUSPENDED: REASON_NOT_SUSPENDED,
    }
    if verdict.phase in (Phase.SUCCEEDED, Phase.FAILED):
        verdict.conditions[RUNNING] = (False, REASON_NOT_RUNNING, "")
    for kind, reason in defaults.items():
        verdict.conditions.setdefault(kind, (False, reason, ""))


def _progress(phase: Phase, observed: Observed, previous: FinetuneJobStatus | None, result: Result | None) -> Progress | None:
    before = previous.progress if previous else None
    if phase is Phase.SUCCEEDED:
        base = before.model_copy() if before else Progress()
        if result is not None and result.steps is not None:
            base.step, base.total_steps = result.steps, result.steps
        if result is not None and result.final_loss is not None:
            base.loss = result.final_loss
        base.percent, base.eta_seconds, base.tokens_per_second = 100, 0, None
        return base
    if phase is Phase.RUNNING and observed.sample is not None:
        return observed.sample.progress
    if before is not None and phase is not Phase.RUNNING:
        # Figures of a trainer that is not running would go stale: keep where it got to, not its speed.
        return before.model_copy(update={"tokens_per_second": None, "eta_seconds": None})
    return before


def invalid_spec_status(message: str, generation: int, previous: FinetuneJobStatus | None, now: datetime) -> Obj:
    """Status of a FinetuneJob whose spec the apiserver accepted but the API model rejects."""
    verdict = _Verdict(phase=Phase.FAILED, message=f"invalid spec: {message}"[:MAX_MESSAGE])
    verdict.set(CREATED, False, REASON_INVALID_SPEC, verdict.message)
    verdict.set(FAILED, True, REASON_INVALID_SPEC, verdict.message)
    _fill_negatives(verdict)
    status = FinetuneJobStatus(
        phase=Phase.FAILED,
        conditions=_merge_conditions(verdict, previous, generation, now),
        observed_generation=generation,
        message=verdict.message,
    )
    return status_to_api(status)


def status_to_api(status: FinetuneJobStatus) -> Obj:
    """The status as stored: camelCase, unset fields left out, computed printer fields included."""
    return status.to_api()


def status_patch(old: Obj | None, new: Obj) -> Obj | None:
    """Merge patch turning old into new (None deletes a field); None when nothing changed."""
    old = {k: v for k, v in (old or {}).items() if k in new or k in _OWN_FIELDS}
    if old == new:
        return None
    patch: Obj = dict(new)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


_OWN_FIELDS = frozenset(
    [info.alias for info in FinetuneJobStatus.model_fields.values() if info.alias]
    + [info.alias for info in FinetuneJobStatus.model_computed_fields.values() if info.alias]
)
