"""The verdict on a trainer Job and its pods: phase, message and conditions (pure).

The status module assembles the rest of the status (progress, checkpoint, result) around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune_api.estimate import format_bytes
from kubetune_api.exitcodes import REASONS, ExitCode
from kubetune_api.fit import FitDecision
from kubetune_api.result import PreparationReport, TerminationMessage
from kubetune_operator import manifests, podspec
from kubetune_operator.api import FinetuneJob, Phase
from kubetune_operator.conditions import (
    FAILED,
    INPUT_REASONS,
    PREPARED,
    REASON_BACKOFF_LIMIT_EXCEEDED,
    REASON_CREATE_CONTAINER_CONFIG_ERROR,
    REASON_DATA_PREPARED,
    REASON_DEADLINE_EXCEEDED,
    REASON_DISRUPTION_LIMIT_EXCEEDED,
    REASON_DOES_NOT_FIT,
    REASON_EVICTED,
    REASON_FINISHING,
    REASON_IMAGE_PULL,
    REASON_JOB_FAILED,
    REASON_NO_POD,
    REASON_NOT_FAILED,
    REASON_NOT_FINISHED,
    REASON_NOT_RUNNING,
    REASON_NOT_SUSPENDED,
    REASON_OOM_KILLED,
    REASON_POD_SCHEDULED,
    REASON_PREPARATION_FAILED,
    REASON_PREPARING,
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
from kubetune_operator.evictions import disruption_summary, eviction_advice, eviction_text

Obj = dict[str, Any]

MAX_MESSAGE = 4096


@dataclass
class Verdict:
    phase: Phase
    message: str
    conditions: dict[str, tuple[bool, str, str]] = field(default_factory=dict)

    def set(self, kind: str, status: bool, reason: str, message: str = "") -> None:
        self.conditions[kind] = (status, reason, message[:MAX_MESSAGE])


def conditions_of(obj: Obj | None) -> dict[str, Obj]:
    return {c.get("type", ""): c for c in ((obj or {}).get("status") or {}).get("conditions") or []}


def _true(conditions: dict[str, Obj], kind: str) -> bool:
    return conditions.get(kind, {}).get("status") == "True"


def _trainer_state(pod: Obj) -> Obj:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == podspec.CONTAINER_NAME:
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


def rank(pod: Obj) -> int:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(annotations.get(manifests.COMPLETION_INDEX_ANNOTATION, 0))
    except ValueError:
        return 0


def newest_first(pods: list[Obj]) -> list[Obj]:
    return sorted(pods, key=lambda p: (_created(p), -rank(p)), reverse=True)


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


def disruptions(pods: list[Obj]) -> int:
    """Trainer pods that ended because they were evicted or preempted, which the podFailurePolicy does not count."""
    return sum(1 for pod in pods if (pod.get("status") or {}).get("phase") == "Failed" and _true(conditions_of(pod), "DisruptionTarget"))


def job_phase(spec: FinetuneJob, job: Obj, pods: list[Obj], verdict: Verdict) -> None:
    """The phase, message and conditions that an existing trainer Job and its pods (newest first) call for."""
    job_conditions = conditions_of(job)
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if _true(job_conditions, "Complete") or _true(job_conditions, "SuccessCriteriaMet"):
        verdict.phase, verdict.message = Phase.SUCCEEDED, "training finished"
        verdict.set(SUCCEEDED, True, REASON_SUCCEEDED, verdict.message)
        return
    disrupted = disruptions(pods)
    if disrupted > spec.spec.max_disruptions:
        verdict.phase = Phase.FAILED
        advice = disruption_summary(pods, spec.spec.resources) or "look for node pressure (disk, memory) or preemption by higher-priority pods"
        verdict.message = (
            f"trainer pods were evicted or preempted {disrupted} times, more than spec.maxDisruptions={spec.spec.max_disruptions}; "
            f"{advice}, then create the job again"
        )
        verdict.set(FAILED, True, REASON_DISRUPTION_LIMIT_EXCEEDED, verdict.message)
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


def _pod_phase(spec: FinetuneJob, pods: list[Obj], failed_pods: list[Obj], verdict: Verdict) -> None:
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
        elif reason == REASON_EVICTED or disruptions(failed_pods[:1]):
            message = eviction_advice(eviction_text(failed_pods[0]), spec.spec.resources) or message
        verdict.message = f"attempt failed ({reason}), retrying from the newest checkpoint: {message}".rstrip(": ")
        verdict.set(RUNNING, False, REASON_RETRYING if reason not in (REASON_OOM_KILLED,) else REASON_OOM_KILLED, verdict.message)
        return
    verdict.message = "waiting for the trainer pod to be created"
    verdict.set(SCHEDULED, False, REASON_NO_POD, verdict.message)


def fill_negatives(verdict: Verdict) -> None:
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


def preparation_report(pods: list[Obj]) -> PreparationReport | None:
    """The report in the newest preparation pod's termination message, if any."""
    for pod in pods:
        message = termination_message(pod)
        if message is not None and message.preparation is not None:
            return message.preparation
    return None


def does_not_fit_message(fit: FitDecision) -> str:
    """Why the run cannot start: the decision, the estimate per GPU part by part, and what would fit."""
    parts = ", ".join(f"{label} {format_bytes(value)}" for label, value in fit.estimate.rows() if value)
    return f"the run does not fit the GPU: {fit.message}. Estimate per GPU: {parts}. What would fit: {'; '.join(fit.suggestions)}"


def preparing_phase(spec: FinetuneJob, job: Obj, pods: list[Obj], report: PreparationReport | None, verdict: Verdict) -> None:
    """Phase and conditions while the preparation Job runs, or once it ended and the trainer Job does not exist yet."""
    job_conditions = conditions_of(job)
    if _true(job_conditions, "Failed") or _true(job_conditions, "FailureTarget"):
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        reason, message = _failure_reason(failed[0]) if failed else (REASON_PREPARATION_FAILED, str(job_conditions.get("Failed", {}).get("message") or ""))
        verdict.phase, verdict.message = Phase.FAILED, f"preparation failed: {message or reason}"
        verdict.set(PREPARED, False, reason if reason.isidentifier() else REASON_PREPARATION_FAILED, verdict.message)
        verdict.set(FAILED, True, reason if reason.isidentifier() else REASON_PREPARATION_FAILED, verdict.message)
        return
    verdict.phase = Phase.PREPARING
    if _true(job_conditions, "Complete") or _true(job_conditions, "SuccessCriteriaMet"):
        if report is None:
            verdict.message = "the preparation Job finished without a report; waiting for its pod's termination message"
            verdict.set(PREPARED, False, REASON_PREPARING, verdict.message)
        elif spec.spec.training.auto_fit and report.fit is not None and not report.fit.fits:
            verdict.phase, verdict.message = Phase.FAILED, does_not_fit_message(report.fit)
            verdict.set(PREPARED, False, REASON_DOES_NOT_FIT, verdict.message)
            verdict.set(FAILED, True, REASON_DOES_NOT_FIT, verdict.message)
        else:
            verdict.message = f"{prepared_summary(report)}; creating the trainer Job"
            verdict.set(PREPARED, True, REASON_DATA_PREPARED, prepared_summary(report))
        return
    live = [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running", None)]
    explained = next((e for e in map(_pending_reason, live) if e is not None), None)
    verdict.message = explained[2] if explained else "validating, tokenizing and packing the data on a CPU before any GPU is requested"
    verdict.set(PREPARED, False, explained[1] if explained else REASON_PREPARING, verdict.message)


def prepared_summary(report: PreparationReport) -> str:
    data = report.data
    text = f"data prepared: {data.train_records} records, {data.tokens} tokens in {data.sequences} sequences, {data.total_steps} steps"
    if report.fit is not None:
        fit = report.fit
        text += f"; micro-batch {fit.micro_batch} x {fit.gradient_accumulation_steps}, estimated {format_bytes(fit.estimate.total)} per GPU"
    return text
