"""The quality part of a FinetuneJob status (pure): the Diverged condition, the evaluation report, the serving hand-off.

Divergence is seen two ways: a running trainer's ``kubetune_trainer_diverged`` gauge (onDivergence Continue keeps
training), or a trainer that stopped with reason Diverged. Once seen it stays in the status: the gauge is gone
with the pod.
"""

from __future__ import annotations

from typing import Any

from kubetune_api.exitcodes import REASONS, ExitCode
from kubetune_api.quality import EvaluationReport
from kubetune_api.serving import ServingSettings, check
from kubetune_operator.api import FinetuneJob, FinetuneJobStatus, Result
from kubetune_operator.conditions import DIVERGED, FAILED
from kubetune_operator.verdict import Verdict, newest_first, termination_message

REASON_DIVERGED = REASONS[ExitCode.DIVERGED]
CONTINUING = "the training loss diverged (spec.training.divergence); onDivergence is Continue, so training goes on: lower spec.training.learningRate"


def mark_divergence(verdict: Verdict, diverged_now: bool, previous: FinetuneJobStatus | None) -> None:
    """Set the Diverged condition when the run diverged now or before; left out while it never has."""
    failed = verdict.conditions.get(FAILED)
    if failed is not None and failed[0] and failed[1] == REASON_DIVERGED:
        verdict.set(DIVERGED, True, REASON_DIVERGED, failed[2])
        return
    before = next((c for c in (previous.conditions if previous else []) if c.type == DIVERGED and c.status == "True"), None)
    if diverged_now:
        verdict.set(DIVERGED, True, REASON_DIVERGED, before.message if before is not None else CONTINUING)
    elif before is not None:
        verdict.set(DIVERGED, True, before.reason, before.message)


def evaluation_of(pods: list[dict[str, Any]], previous: FinetuneJobStatus | None) -> EvaluationReport | None:
    """The evaluation report of the newest trainer that wrote one, else the one recorded before."""
    for pod in newest_first(pods):
        message = termination_message(pod)
        if message is not None and message.evaluation is not None:
            return message.evaluation
    return previous.evaluation if previous is not None else None


def with_serving(result: Result, spec: FinetuneJob, settings: ServingSettings) -> Result:
    """The result with its serving hand-off, when the trainer reported the adapter's facts."""
    if result.adapter is None:
        return result
    report = check(
        result.adapter,
        settings,
        base_model=spec.spec.model.source,
        adapter_uri=result.adapter_uri,
        namespace=spec.metadata.namespace,
        name=spec.metadata.name,
    )
    return result.model_copy(update={"serving": report})
