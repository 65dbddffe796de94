"""Whether a run is worth keeping: divergence detection while it trains, the evaluation gate when it ends.

``DivergenceSpec`` (spec.training.divergence) and ``EvaluationSpec`` (spec.evaluation) are part of the recipe;
``EvaluationReport`` travels back in the termination message and lands in the FinetuneJob status. The pure
``gate_failures`` is the one place the gate is decided.
"""

from __future__ import annotations

import math
from enum import StrEnum

from pydantic import Field

from kubetune_api.schema import ApiModel


class DivergenceAction(StrEnum):
    STOP = "Stop"
    CONTINUE = "Continue"


class DivergenceSpec(ApiModel):
    """When a finite training loss counts as running away, and what happens then."""

    on_divergence: DivergenceAction = Field(
        default=DivergenceAction.STOP,
        description=(
            "Stop ends the run Failed with reason Diverged, keeping its last good checkpoint; Continue only sets the "
            "Diverged condition and posts a Warning Event."
        ),
    )
    factor: float = Field(
        default=3.0,
        gt=1.0,
        le=1000.0,
        description="The run diverges when the smoothed loss stays above factor times its lowest value so far.",
    )
    patience: int = Field(
        default=3,
        ge=1,
        le=10000,
        description="Consecutive logged steps (every spec.training.logEvery) the smoothed loss must stay above the threshold.",
    )
    smoothing: float = Field(
        default=0.6,
        ge=0.0,
        lt=1.0,
        description="Weight of the history in the exponential moving average of the logged loss; 0 uses each logged loss as is.",
    )


class EvaluationSpec(ApiModel):
    """A gate the adapter must pass to be published; needs spec.dataset.eval. Unset limits always pass."""

    max_eval_loss: float | None = Field(
        default=None,
        gt=0,
        description="Publish only when the final eval loss is at most this value.",
    )
    min_relative_improvement: float | None = Field(
        default=None,
        gt=-1.0,
        le=1.0,
        description=(
            "Publish only when the final eval loss is at least this share below the base model's eval loss, "
            "for example 0.05 for 5%; 0 only requires it not to be worse."
        ),
    )


class GateResult(StrEnum):
    PASSED = "Passed"
    FAILED = "Failed"
    NOT_SET = "NotSet"


class EvaluationReport(ApiModel):
    """Eval loss of the base model (before the first step) and of the trained adapter, and the gate's verdict."""

    base_eval_loss: float | None = Field(default=None, description="Eval loss of the base model on the eval split, measured before the first step.")
    base_perplexity: float | None = Field(default=None, description="exp(baseEvalLoss).")
    final_eval_loss: float | None = Field(default=None, description="Eval loss of the trained adapter on the eval split.")
    final_perplexity: float | None = Field(default=None, description="exp(finalEvalLoss).")
    relative_improvement: float | None = Field(default=None, description="(base - final) / base: the share the adapter lowered the eval loss by.")
    gate: GateResult = Field(default=GateResult.NOT_SET, description="Passed, Failed, or NotSet when spec.evaluation sets no limit.")
    reasons: list[str] = Field(default_factory=list, max_length=8, description="Why the gate failed.")
    rejected_uri: str | None = Field(
        default=None, max_length=2048, description="s3:// URI of the adapter kept as a rejected candidate (not published) when the gate failed."
    )


def perplexity(loss: float | None) -> float | None:
    """exp(loss), capped where it would overflow; None for no loss."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 700.0))


def gate_failures(spec: EvaluationSpec | None, base: float | None, final: float | None) -> list[str]:
    """Every limit of ``spec`` the final eval loss breaks, each naming both figures; empty when it passes."""
    if spec is None or (spec.max_eval_loss is None and spec.min_relative_improvement is None):
        return []
    if final is None or not math.isfinite(final):
        return [f"no finite final eval loss to check against spec.evaluation (got {final})"]
    failures: list[str] = []
    if spec.max_eval_loss is not None and final > spec.max_eval_loss:
        failures.append(f"final eval loss {final:.4f} is above spec.evaluation.maxEvalLoss {spec.max_eval_loss:.4f}")
    if spec.min_relative_improvement is not None:
        if base is None or not math.isfinite(base) or base <= 0:
            failures.append(f"the base eval loss ({base}) is not a positive number, so minRelativeImprovement cannot be checked")
        else:
            gained = (base - final) / base
            # The tolerance keeps float rounding (0.2 / 2.0 = 0.0999...) from failing a run that meets the limit exactly.
            if gained < spec.min_relative_improvement - 1e-9:
                failures.append(
                    f"final eval loss {final:.4f} improves on the base model's {base:.4f} by {gained:.1%}, "
                    f"less than spec.evaluation.minRelativeImprovement {spec.min_relative_improvement:.1%}"
                )
    return failures


def evaluation_report(spec: EvaluationSpec | None, base: float | None, final: float | None) -> EvaluationReport:
    """The report of a finished run, the gate decided by ``gate_failures``."""
    failures = gate_failures(spec, base, final)
    limited = spec is not None and (spec.max_eval_loss is not None or spec.min_relative_improvement is not None)
    improvement = (base - final) / base if base and final is not None and math.isfinite(base) and math.isfinite(final) else None
    return EvaluationReport(
        base_eval_loss=base,
        base_perplexity=perplexity(base),
        final_eval_loss=final,
        final_perplexity=perplexity(final),
        relative_improvement=improvement,
        gate=GateResult.FAILED if failures else GateResult.PASSED if limited else GateResult.NOT_SET,
        reasons=failures,
    )
