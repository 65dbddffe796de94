"""A run that diverges, and an adapter that fails its gate, end to end: the status, the conditions and the Events."""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.support.stack import Stack
from tests.e2e.test_finetunejobs import condition, event_reasons

pytestmark = pytest.mark.e2e

FINISH_SECONDS = 600
"""A tiny CPU run on a busy machine: model load, a few dozen steps, the upload."""


def named(body: dict[str, Any], name: str) -> dict[str, Any]:
    body["metadata"]["name"] = name
    return body


def test_a_diverging_run_stops_with_the_condition_and_an_event(stack: Stack) -> None:
    # The trainer tier's diverging run: the loss dips while the learning rate ramps up, then climbs back 10-20% and
    # stays there. (A learning rate of 1.0 takes the demo data straight to NaN, which is LossNotFinite instead.)
    training = {
        "maxSteps": 50,
        "learningRate": 0.3,
        "logEvery": 2,
        "warmupSteps": 40,
        "scheduler": "constant_with_warmup",
        "checkpointEvery": 4,
        "divergence": {"factor": 1.1, "patience": 2, "smoothing": 0.0},
    }
    stack.apply(named(stack.example("tiny-cpu-lora.yaml", training=training), "tiny-diverge"))
    status = stack.wait_for_phase("tiny-diverge", {"Succeeded", "Failed"}, timeout=FINISH_SECONDS)["status"]
    failed = condition(status, "Failed")
    assert status["phase"] == "Failed" and failed is not None and failed["reason"] == "Diverged", status
    assert "spec.training.learningRate" in failed["message"]
    diverged = condition(status, "Diverged")
    assert diverged is not None and diverged["status"] == "True" and diverged["reason"] == "Diverged"
    assert status["lastCheckpoint"]["step"] < 50
    stack.wait_for(lambda: "Diverged" in event_reasons(stack, "tiny-diverge"), 60, "the Diverged Event")


def test_an_adapter_that_fails_the_gate_is_not_published(stack: Stack) -> None:
    stack.apply(named(stack.example("tiny-cpu-lora.yaml", evaluation={"maxEvalLoss": 0.0001}), "tiny-gated"))
    job = stack.wait_for_phase("tiny-gated", {"Succeeded", "Failed"}, timeout=FINISH_SECONDS)
    status = job["status"]
    failed = condition(status, "Failed")
    assert status["phase"] == "Failed" and failed is not None and failed["reason"] == "EvaluationGateFailed", status
    report = status["evaluation"]
    assert report["gate"] == "Failed" and report["finalEvalLoss"] < report["baseEvalLoss"]
    assert f"{report['finalEvalLoss']:.4f}" in failed["message"] and "maxEvalLoss" in failed["message"]
    assert report["rejectedUri"].endswith(f"/tiny-gated/runs/{job['metadata']['uid']}/rejected/") and "result" not in status
    stack.wait_for(lambda: "EvaluationGateFailed" in event_reasons(stack, "tiny-gated"), 60, "the EvaluationGateFailed Event")
