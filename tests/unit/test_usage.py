"""GPU time over all attempts from pod timestamps, the work lost to restarts, and its operator metrics."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator.api import Progress
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.progress import TrainerSample
from kubetune_operator.status import compute_status
from kubetune_operator.usagespec import GpuPrices
from tests.unit.test_status import ftj, job, observe, pod

pytestmark = pytest.mark.unit


def ended(started: str, finished: str, code: int, checkpoint_time: str | None = None) -> dict[str, Any]:
    import json

    message: dict[str, Any] = {"status": "Failed" if code else "Succeeded", "reason": "RuntimeError" if code else "Succeeded", "exitCode": code}
    if checkpoint_time is not None:
        message["lastCheckpoint"] = {"step": 20, "uri": "s3://a/step-20/", "time": checkpoint_time}
    return {"terminated": {"exitCode": code, "reason": "Error", "startedAt": started, "finishedAt": finished, "message": json.dumps(message)}}


def test_gpu_seconds_sum_every_attempt_and_count_the_lost_work() -> None:
    first = pod("Failed", name="a-1", created="2026-11-27T07:00:00Z", state=ended("2026-11-27T07:00:00Z", "2026-11-27T07:10:00Z", 1, "2026-11-27T07:08:00Z"))
    second = pod("Running", name="a-2", created="2026-11-27T07:10:05Z", state={"running": {"startedAt": "2026-11-27T07:50:00Z"}})
    status = compute_status(ftj(resources={"gpus": 2}), observe(job=job(active=1, failed=1), pods=[first, second]))
    usage = status["usage"]
    # 2 GPUs x 600 s, plus 2 GPUs x 600 s running until NOW (08:00).
    assert usage["gpuSeconds"] == 2400.0
    # The first attempt's two minutes after its checkpoint at 07:08 are done again.
    assert usage["lostGpuSeconds"] == 240.0
    assert [a["pod"] for a in usage["attempts"]] == ["a-1", "a-2"]


def test_attempts_are_listed_in_the_order_their_pods_were_made() -> None:
    """Pod names end in a random suffix: the replacement's name may sort before the pod it replaced."""
    killed = pod("Failed", name="a-zz", created="2026-11-27T07:00:00Z", state=ended("2026-11-27T07:00:00Z", "2026-11-27T07:10:00Z", 1))
    replacement = pod("Running", name="a-aa", created="2026-11-27T07:10:05Z", state={"running": {"startedAt": "2026-11-27T07:10:10Z"}})
    status = compute_status(ftj(), observe(job=job(active=1, failed=1), pods=[replacement, killed]))
    assert [a["pod"] for a in status["usage"]["attempts"]] == ["a-zz", "a-aa"]


def test_an_attempt_without_a_checkpoint_loses_all_its_time() -> None:
    failed = pod("Failed", name="a-1", state=ended("2026-11-27T07:00:00Z", "2026-11-27T07:01:40Z", 1))
    usage = compute_status(ftj(resources={"gpus": 1}), observe(job=job(failed=1), pods=[failed]))["usage"]
    assert usage["gpuSeconds"] == 100.0 and usage["lostGpuSeconds"] == 100.0


def test_attempts_whose_pods_are_gone_stay_counted() -> None:
    first = pod("Failed", name="a-1", state=ended("2026-11-27T07:00:00Z", "2026-11-27T07:10:00Z", 1, "2026-11-27T07:10:00Z"))
    before = compute_status(ftj(), observe(job=job(failed=1), pods=[first]))
    second = pod("Running", name="a-2", state={"running": {"startedAt": "2026-11-27T07:55:00Z"}})
    after = compute_status(ftj(before), observe(job=job(active=1), pods=[second]))
    assert after["usage"]["gpuSeconds"] == 600.0 + 300.0 and [a["pod"] for a in after["usage"]["attempts"]] == ["a-1", "a-2"]


def test_a_pod_that_has_not_started_counts_nothing() -> None:
    status = compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None)]))
    assert "usage" not in status


def test_operator_metrics_export_gpu_seconds_per_job() -> None:
    metrics = OperatorMetrics()
    metrics.usage.set("team-a", "llama", {"usage": {"gpuSeconds": 2400.0, "lostGpuSeconds": 240.0}})
    metrics.usage.set("team-a", "gone", {"usage": {"gpuSeconds": 1.0}})
    metrics.usage.forget("team-a", "gone")
    body = metrics.exposition().decode()
    assert 'kubetune_finetunejob_gpu_seconds_total{finetunejob="llama",namespace="team-a"} 2400.0' in body
    assert 'kubetune_finetunejob_lost_work_gpu_seconds_total{finetunejob="llama",namespace="team-a"} 240.0' in body
    assert '"gone"' not in body


def sample(step: int, checkpoint: int | None) -> TrainerSample:
    return TrainerSample(progress=Progress(step=step, total_steps=100), last_checkpoint_step=checkpoint)


def test_steps_a_killed_attempt_ran_after_its_checkpoint_are_counted_as_redone() -> None:
    """A SIGKILLed trainer writes no termination message: the steps come from the metrics read while it ran."""
    running = pod("Running", name="a-1", state={"running": {"startedAt": "2026-11-27T07:00:00Z"}})
    first = compute_status(ftj(resources={"gpus": 2}), observe(job=job(active=1), pods=[running], sample=sample(5, None)))
    later = compute_status(ftj(first, resources={"gpus": 2}), observe(job=job(active=1), pods=[running], sample=sample(50, 40)))
    killed = pod(
        "Failed",
        name="a-1",
        state={"terminated": {"exitCode": 137, "reason": "Error", "startedAt": "2026-11-27T07:00:00Z", "finishedAt": "2026-11-27T07:15:00Z"}},
    )
    usage = compute_status(ftj(later, resources={"gpus": 2}), observe(job=job(failed=1), pods=[killed]))["usage"]
    (attempt,) = usage["attempts"]
    assert (attempt["firstStep"], attempt["reachedStep"], attempt["checkpointStep"]) == (5, 50, 40)
    assert usage["redoneSteps"] == 10
    # 900 s for steps 5..50; the 10 steps after the checkpoint took about 10/45 of them.
    assert usage["lostSeconds"] == 200.0 and usage["lostGpuSeconds"] == 400.0


def test_a_successful_attempt_redoes_nothing() -> None:
    done = pod("Succeeded", name="a-1", state=ended("2026-11-27T07:00:00Z", "2026-11-27T07:10:00Z", 0, "2026-11-27T07:08:00Z"))
    usage = compute_status(ftj(resources={"gpus": 1}), observe(job=job(succeeded=1), pods=[done]))["usage"]
    assert usage["redoneSteps"] == 0 and usage["lostSeconds"] == 0.0


def test_the_cost_is_each_pods_gpu_hours_at_the_price_of_its_nodes_gpu_product() -> None:
    prices = GpuPrices(by_product={"NVIDIA-H100-80GB-HBM3": 4.0}, default=1.5, currency="EUR")
    first = pod("Failed", name="a-1", node="h100-node", state=ended("2026-11-27T07:00:00Z", "2026-11-27T07:30:00Z", 1, "2026-11-27T07:30:00Z"))
    second = pod("Running", name="a-2", node="other-node", state={"running": {"startedAt": "2026-11-27T07:30:00Z"}})
    products = {"h100-node": "NVIDIA-H100-80GB-HBM3", "other-node": "NVIDIA-L4"}
    observed = observe(job=job(active=1, failed=1), pods=[first, second], gpu_products=products, prices=prices)
    usage = compute_status(ftj(resources={"gpus": 2}), observed)["usage"]
    # 2 GPUs x 0.5 h at 4.0 on the H100 node, then 2 x 0.5 h at the default 1.5 on the L4 node.
    assert [a["estimatedCost"] for a in usage["attempts"]] == [4.0, 1.5]
    assert usage["estimatedCost"] == 5.5 and usage["currency"] == "EUR"
    assert usage["attempts"][0]["gpuProduct"] == "NVIDIA-H100-80GB-HBM3"


def test_without_prices_no_cost_is_claimed() -> None:
    running = pod("Running", name="a-1", state={"running": {"startedAt": "2026-11-27T07:30:00Z"}})
    usage = compute_status(ftj(), observe(job=job(active=1), pods=[running], gpu_products={"gpu-node-a": "NVIDIA-L4"}))["usage"]
    assert "estimatedCost" not in usage and "currency" not in usage


def test_operator_metrics_export_lost_work_redone_steps_and_cost() -> None:
    metrics = OperatorMetrics()
    metrics.usage.set("team-a", "llama", {"usage": {"gpuSeconds": 7200.0, "lostSeconds": 90.0, "redoneSteps": 12, "estimatedCost": 8.2, "currency": "USD"}})
    body = metrics.exposition().decode()
    assert 'kubetune_finetunejob_lost_work_seconds_total{finetunejob="llama",namespace="team-a"} 90.0' in body
    assert 'kubetune_finetunejob_redone_steps_total{finetunejob="llama",namespace="team-a"} 12.0' in body
    assert 'kubetune_finetunejob_estimated_cost{currency="USD",finetunejob="llama",namespace="team-a"} 8.2' in body
