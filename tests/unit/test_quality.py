"""Divergence and the evaluation gate: the pure rules, and how they show in the FinetuneJob status and Events."""

from __future__ import annotations

import math
from typing import Any

import pytest

from kubetune_api.quality import DivergenceAction, DivergenceSpec, EvaluationSpec, GateResult, evaluation_report, gate_failures
from kubetune_operator import conditions as st
from kubetune_operator.api import Progress
from kubetune_operator.events import transition_events
from kubetune_operator.progress import TrainerSample, parse_metrics
from kubetune_operator.status import compute_status
from tests.unit.test_status import NOW, cond, conditions_by_type, ftj, job, observe, pod, terminated

pytestmark = pytest.mark.unit


def watch(**spec: Any) -> Any:
    from kubetune_trainer.divergence import DivergenceWatch

    return DivergenceWatch(DivergenceSpec(**spec))


def test_a_loss_that_runs_away_diverges_after_patience_logged_steps() -> None:
    w = watch(factor=2.0, patience=3, smoothing=0.0)
    steps = [(10, 4.0), (20, 2.0), (30, 1.0), (40, 2.5), (50, 3.0)]
    assert [w.observe(step, loss) for step, loss in steps] == [None] * 5
    found = w.observe(60, 3.5)
    assert found is not None and found.step == 60 and found.lowest_loss == 1.0
    assert "spec.training.learningRate" in found.describe() and "step 60" in found.describe()
    # Reported once: later intervals do not report it again.
    assert w.observe(70, 4.0) is None and w.diverged is found


def test_a_spike_shorter_than_patience_is_not_divergence() -> None:
    w = watch(factor=2.0, patience=3, smoothing=0.0)
    for step, loss in [(1, 2.0), (2, 1.0), (3, 5.0), (4, 5.0), (5, 1.1), (6, 5.0), (7, 5.0), (8, 1.0)]:
        assert w.observe(step, loss) is None


def test_smoothing_damps_a_single_noisy_interval() -> None:
    w = watch(factor=2.0, patience=1, smoothing=0.8)
    assert w.observe(1, 1.0) is None
    # Raw 2.5 is above 2x the minimum, the smoothed 1.3 is not.
    assert w.observe(2, 2.5) is None


def test_a_resumed_run_replays_its_logged_losses() -> None:
    w = watch(factor=2.0, patience=2, smoothing=0.0)
    w.replay([(10, 1.0), (20, 2.5)])
    assert w.observe(30, 3.0) is not None


def test_divergence_defaults_stop() -> None:
    assert DivergenceSpec().on_divergence is DivergenceAction.STOP
    w = watch(factor=2.0, patience=1, smoothing=0.0)
    w.observe(1, 1.0)
    assert w.observe(2, 3.0).stops
    assert watch(on_divergence="Continue").spec.on_divergence is not DivergenceAction.STOP


def test_gate_max_eval_loss_names_both_figures() -> None:
    failures = gate_failures(EvaluationSpec(max_eval_loss=1.5), 3.0, 1.75)
    assert failures == ["final eval loss 1.7500 is above spec.evaluation.maxEvalLoss 1.5000"]
    assert gate_failures(EvaluationSpec(max_eval_loss=1.5), 3.0, 1.5) == []


def test_gate_min_relative_improvement_over_the_base() -> None:
    spec = EvaluationSpec(min_relative_improvement=0.1)
    assert gate_failures(spec, 2.0, 1.8) == []
    (failure,) = gate_failures(spec, 2.0, 1.9)
    assert "1.9000" in failure and "2.0000" in failure and "5.0%" in failure and "minRelativeImprovement" in failure
    assert gate_failures(spec, None, 1.0) and gate_failures(spec, 2.0, float("nan"))


def test_report_carries_perplexities_and_the_verdict() -> None:
    report = evaluation_report(EvaluationSpec(max_eval_loss=1.0), 2.0, 1.5)
    assert report.gate is GateResult.FAILED and report.reasons
    assert report.base_perplexity == pytest.approx(math.exp(2.0)) and report.final_perplexity == pytest.approx(math.exp(1.5))
    assert report.relative_improvement == pytest.approx(0.25)
    assert evaluation_report(None, 2.0, 1.5).gate is GateResult.NOT_SET
    assert evaluation_report(EvaluationSpec(min_relative_improvement=0.2), 2.0, 1.5).gate is GateResult.PASSED


def test_evaluation_needs_an_eval_split() -> None:
    with pytest.raises(ValueError, match="spec.evaluation needs spec.dataset.eval"):
        ftj(evaluation={"maxEvalLoss": 1.0})


def running_status(diverged: bool, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    sample = TrainerSample(progress=Progress(step=42, total_steps=100, percent=42, loss=9.0, last_update_time=NOW), diverged=diverged)
    running = pod("Running", state={"running": {"startedAt": "2026-11-27T07:01:00Z"}})
    return compute_status(ftj(previous), observe(job=job(active=1), pods=[running], sample=sample))


def test_a_diverging_run_that_continues_gets_the_condition_and_one_warning() -> None:
    calm = running_status(False)
    assert st.DIVERGED not in conditions_by_type(calm)
    diverged = running_status(True, calm)
    condition = conditions_by_type(diverged)[st.DIVERGED]
    assert (condition["status"], condition["reason"]) == ("True", "Diverged") and "Continue" in condition["message"]
    events = transition_events(calm, diverged)
    assert [(e.type, e.reason) for e in events] == [("Warning", "Diverged")]
    # Kept once seen (between reads, and after the gauge is gone), and not posted again.
    later = running_status(False, diverged)
    assert conditions_by_type(later)[st.DIVERGED]["status"] == "True"
    assert transition_events(diverged, later) == []


def test_the_diverged_gauge_is_read_from_the_trainer_metrics() -> None:
    text = 'kubetune_trainer_step{rank="0"} 4.0\nkubetune_trainer_diverged{rank="0"} 1.0\n'
    sample = parse_metrics([text], NOW)
    assert sample is not None and sample.diverged
    assert not parse_metrics(['kubetune_trainer_step{rank="0"} 4.0\nkubetune_trainer_diverged{rank="0"} 0.0\n'], NOW).diverged  # type: ignore[union-attr]


def failed_with(code: int, message: dict[str, Any]) -> dict[str, Any]:
    failed = job([cond("FailureTarget", "PodFailurePolicy"), cond("Failed", "PodFailurePolicy")], failed=1)
    return compute_status(ftj(), observe(job=failed, pods=[pod("Failed", state=terminated(code, message))]))


def test_a_run_stopped_on_divergence_fails_with_reason_diverged() -> None:
    advice = "The training loss diverged at step 60 ... Lower spec.training.learningRate"
    status = failed_with(16, {"status": "Failed", "reason": "Diverged", "message": advice, "exitCode": 16})
    conditions = conditions_by_type(status)
    assert status["phase"] == "Failed" and conditions["Failed"]["reason"] == "Diverged" and advice in conditions["Failed"]["message"]
    assert conditions[st.DIVERGED]["status"] == "True"
    events = transition_events(None, status)
    assert [(e.type, e.reason) for e in events] == [("Warning", "Diverged")]


def test_a_gate_failure_carries_both_figures_and_the_rejected_candidate() -> None:
    report = {
        "baseEvalLoss": 3.0,
        "finalEvalLoss": 2.9,
        "gate": "Failed",
        "reasons": ["final eval loss 2.9000 is above spec.evaluation.maxEvalLoss 1.0000"],
        "rejectedUri": "s3://adapters/runs/team-a/llama/rejected/",
    }
    message = {"status": "Failed", "reason": "EvaluationGateFailed", "message": "The adapter failed spec.evaluation", "exitCode": 17, "evaluation": report}
    status = failed_with(17, message)
    assert conditions_by_type(status)["Failed"]["reason"] == "EvaluationGateFailed"
    assert status["evaluation"]["baseEvalLoss"] == 3.0 and status["evaluation"]["finalEvalLoss"] == 2.9
    assert status["evaluation"]["rejectedUri"].endswith("/rejected/") and "result" not in status
