"""Pure status function: the observed trainer Job, its pods and a metrics sample in, status out.

Nothing is accumulated: every field is derived from what is observed now. The exceptions keep
what was observed before because it can no longer be observed: the last progress sample
(between metric reads), a finished run's result once its pods are gone (pod garbage collection,
``kubectl delete pod``), and a finished run's whole status once its Job has been deleted by TTL.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubetune_api import layout
from kubetune_api.result import CheckpointRef
from kubetune_api.serving import ServingSettings
from kubetune_operator import manifests
from kubetune_operator.api import Condition, FinetuneJob, FinetuneJobStatus, Phase, Progress, Result
from kubetune_operator.conditions import (
    CONDITION_ORDER,
    CREATED,
    FAILED,
    GPU_RESOURCE_AVAILABLE,
    PREPARED,
    REASON_CREATING,
    REASON_DATA_PREPARED,
    REASON_GPU_RESOURCE_FOUND,
    REASON_GPU_RESOURCE_NOT_FOUND,
    REASON_INVALID_SPEC,
    REASON_JOB_CREATED,
    REASON_NAME_TAKEN,
    REASON_WAITING_FOR_SECRET,
)
from kubetune_operator.progress import TrainerSample
from kubetune_operator.quality import evaluation_of, mark_divergence, with_serving
from kubetune_operator.usage import Seen, usage
from kubetune_operator.usagespec import GpuPrices
from kubetune_operator.verdict import (
    MAX_MESSAGE,
    Verdict,
    conditions_of,
    disruptions,
    fill_negatives,
    job_phase,
    newest_first,
    preparation_report,
    prepared_summary,
    preparing_phase,
    termination_message,
)

Obj = dict[str, Any]


@dataclass(frozen=True)
class Observed:
    """Everything the operator saw about one FinetuneJob's children at one moment."""

    now: datetime
    job: Obj | None = None
    pods: list[Obj] = field(default_factory=list)
    sample: TrainerSample | None = None
    missing_secret: str | None = None
    name_taken: str | None = None
    """Why a child cannot be created: its name is taken by an object this FinetuneJob does not own."""
    gpu_resource_found: bool | None = None
    prepare_job: Obj | None = None
    """The preparation Job, for FinetuneJobs prepared in a separate Job."""
    prepare_pods: list[Obj] = field(default_factory=list)
    serving: ServingSettings = field(default_factory=ServingSettings)
    gpu_products: Mapping[str, str] = field(default_factory=dict)
    """The nvidia.com/gpu.product label of each GPU node, by node name."""
    prices: GpuPrices = field(default_factory=GpuPrices)


def _checkpoint(spec: FinetuneJob, observed: Observed, previous: FinetuneJobStatus | None) -> CheckpointRef | None:
    for pod in newest_first(observed.pods):
        message = termination_message(pod)
        if message is not None and message.status == "Succeeded":
            # A successful run may have deleted its checkpoints after publishing: what it reports is what is left.
            return message.last_checkpoint
        if message is not None and message.last_checkpoint is not None:
            return message.last_checkpoint
    if observed.sample is not None and observed.sample.last_checkpoint_step is not None:
        run = layout.run_prefix(spec.spec.output.prefix, spec.metadata.namespace, spec.metadata.name, spec.metadata.uid)
        return CheckpointRef(
            step=observed.sample.last_checkpoint_step, uri=layout.checkpoint_uri(spec.spec.output.bucket, run, observed.sample.last_checkpoint_step)
        )
    return previous.last_checkpoint if previous else None


def _logs_uri(spec: FinetuneJob, observed: Observed, previous: FinetuneJobStatus | None) -> str | None:
    """Where the trainer logs go, once a trainer has started."""
    if not any(pod.get("status", {}).get("containerStatuses") for pod in observed.pods):
        return previous.logs_uri if previous else None
    run = layout.run_prefix(spec.spec.output.prefix, spec.metadata.namespace, spec.metadata.name, spec.metadata.uid)
    return layout.uri(spec.spec.output.bucket, layout.logs_prefix(run))


def _result(spec: FinetuneJob, observed: Observed, previous: FinetuneJobStatus | None) -> Result | None:
    for pod in newest_first(observed.pods):
        message = termination_message(pod)
        if message is not None and message.status == "Succeeded" and message.result is not None:
            return with_serving(Result.model_validate(message.result.model_dump()), spec, observed.serving)
    # The pods that reported it are gone (garbage-collected, deleted by hand): a finished job's result never goes away.
    return previous.result if previous is not None and previous.phase is Phase.SUCCEEDED else None


def _attempts(spec: FinetuneJob, observed: Observed) -> int:
    job_status = (observed.job or {}).get("status") or {}
    counted = sum(int(job_status.get(k) or 0) for k in ("active", "succeeded", "failed"))
    pods = max(len(observed.pods), counted)
    return math.ceil(pods / spec.spec.resources.nodes)


def _merge_conditions(verdict: Verdict, previous: FinetuneJobStatus | None, generation: int, now: datetime) -> list[Condition]:
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


def _phase_since(phase: Phase, previous: FinetuneJobStatus | None, now: datetime) -> datetime:
    """When the current phase was entered: kept while the phase stays, now when it changes."""
    if previous is not None and previous.phase is phase and previous.phase_transition_time is not None:
        return previous.phase_transition_time
    return now.replace(microsecond=0)


def compute_status(spec: FinetuneJob, observed: Observed) -> Obj:
    """The status a FinetuneJob should have given what is observed (camelCase dict, with the printer fields)."""
    previous = spec.status
    if observed.job is None and previous is not None and previous.phase in (Phase.SUCCEEDED, Phase.FAILED):
        # The finished Job was removed (ttlSecondsAfterFinished): the recorded outcome stays.
        return status_to_api(previous)
    verdict = Verdict(phase=Phase.PENDING, message="")
    # A CPU run prepares inside the trainer, whose termination message then carries the report.
    preparation = preparation_report(newest_first(observed.prepare_pods)) or preparation_report(newest_first(observed.pods))
    preparation = preparation or (previous.preparation if previous else None)
    if observed.job is None and observed.prepare_job is not None:
        verdict.set(CREATED, True, REASON_JOB_CREATED, f"preparation Job {manifests.prepare_job_name(spec.metadata.name)} created")
        preparing_phase(spec, observed.prepare_job, newest_first(observed.prepare_pods), preparation, verdict)
    elif observed.job is None:
        if observed.missing_secret:
            verdict.message = (
                f'Secret "{observed.missing_secret}" not found in namespace {spec.metadata.namespace}: create it; the trainer Job is created once it exists'
            )
            verdict.set(CREATED, False, REASON_WAITING_FOR_SECRET, verdict.message)
        elif observed.name_taken:
            verdict.message = observed.name_taken
            verdict.set(CREATED, False, REASON_NAME_TAKEN, verdict.message)
        else:
            verdict.message = "creating the trainer Job"
            verdict.set(CREATED, False, REASON_CREATING, verdict.message)
    else:
        verdict.set(CREATED, True, REASON_JOB_CREATED, f"trainer Job {manifests.job_name(spec.metadata.name)} created")
        if preparation is not None:
            verdict.set(PREPARED, True, REASON_DATA_PREPARED, prepared_summary(preparation))
        job_phase(spec, observed.job, newest_first(observed.pods), verdict)
    fill_negatives(verdict)
    if spec.spec.resources.gpus > 0 and observed.gpu_resource_found is not None:
        name = spec.spec.resources.gpu_resource_name
        if observed.gpu_resource_found:
            verdict.set(GPU_RESOURCE_AVAILABLE, True, REASON_GPU_RESOURCE_FOUND, f"some node offers {name}")
        else:
            advice = f"no node has {name} in its allocatable resources; install the device plugin or check spec.resources.gpuResourceName"
            verdict.set(GPU_RESOURCE_AVAILABLE, False, REASON_GPU_RESOURCE_NOT_FOUND, advice)
    mark_divergence(verdict, observed.sample is not None and observed.sample.diverged, previous)
    result = _result(spec, observed, previous) if verdict.phase is Phase.SUCCEEDED else None
    if result is not None:
        verdict.message = f"adapter published at {result.adapter_uri}"
    progress = _progress(verdict.phase, observed, previous, result)
    job_status = (observed.job or {}).get("status") or {}
    # A run that failed in its preparation ends with the prepare Job; it never had a trainer Job.
    last_job = observed.job if observed.job is not None else observed.prepare_job
    completion = ((last_job or {}).get("status") or {}).get("completionTime")
    if verdict.phase is Phase.FAILED and not completion:
        failed = conditions_of(last_job).get("Failed") or {}
        completion = failed.get("lastTransitionTime")
    status = FinetuneJobStatus(
        phase=verdict.phase,
        phase_transition_time=_phase_since(verdict.phase, previous, observed.now),
        conditions=_merge_conditions(verdict, previous, spec.metadata.generation, observed.now),
        progress=progress,
        last_checkpoint=_checkpoint(spec, observed, previous),
        result=result,
        preparation=preparation,
        evaluation=evaluation_of(observed.pods, previous),
        usage=usage(spec, observed.pods, Seen(spec.spec.resources.gpus, observed.now, observed.sample, observed.gpu_products, observed.prices)),
        logs_uri=_logs_uri(spec, observed, previous),
        job_name=manifests.job_name(spec.metadata.name) if observed.job is not None else None,
        start_time=job_status.get("startTime"),
        completion_time=completion if verdict.phase in (Phase.SUCCEEDED, Phase.FAILED) else None,
        attempts=_attempts(spec, observed),
        disruptions=disruptions(observed.pods),
        observed_generation=spec.metadata.generation,
        message=verdict.message[:MAX_MESSAGE] or None,
    )
    return status_to_api(status)


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


def job_expiry(spec: FinetuneJob, status: FinetuneJobStatus) -> datetime | None:
    """When the trainer Job may be deleted under spec.ttlSecondsAfterFinished: its completion plus the TTL, once
    ``status`` (as written) records the outcome; None while it is not finished or no TTL is set."""
    ttl = spec.spec.ttl_seconds_after_finished
    if ttl is None or status.phase not in (Phase.SUCCEEDED, Phase.FAILED) or status.completion_time is None:
        return None
    return status.completion_time + timedelta(seconds=ttl)


def invalid_spec_status(message: str, generation: int, previous: FinetuneJobStatus | None, now: datetime) -> Obj:
    """Status of a FinetuneJob whose spec the apiserver accepted but the API model rejects."""
    verdict = Verdict(phase=Phase.FAILED, message=f"invalid spec: {message}"[:MAX_MESSAGE])
    verdict.set(CREATED, False, REASON_INVALID_SPEC, verdict.message)
    verdict.set(FAILED, True, REASON_INVALID_SPEC, verdict.message)
    fill_negatives(verdict)
    status = FinetuneJobStatus(
        phase=Phase.FAILED,
        phase_transition_time=_phase_since(Phase.FAILED, previous, now),
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
