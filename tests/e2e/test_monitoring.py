"""Prometheus scrapes the operator and the trainers, and every dashboard query returns data after a real run."""

from __future__ import annotations

import pytest

from localcluster.stack import KubetuneStack
from tests.support.dashboards import dashboard_queries

pytestmark = pytest.mark.e2e

JOB = "monitored"
BROKEN = "monitored-broken"


@pytest.fixture(scope="module")
def finished_job(stack: KubetuneStack) -> str:
    training = {"maxSteps": 120, "logEvery": 2, "checkpointEvery": 40, "evalEvery": 40}
    body = stack.example("tiny-cpu-lora.yaml", training=training, dataset={"eval": {"ratio": 0.25}})
    body["metadata"]["name"] = JOB
    stack.apply(body)
    # A job whose dataset lacks its text field fails at once (no retries): the failure panels get data too.
    broken = stack.example("tiny-cpu-lora.yaml", dataset={"textField": "body"})
    broken["metadata"]["name"] = BROKEN
    stack.apply(broken)
    status = stack.wait_for_phase(JOB, {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    failed = stack.wait_for_phase(BROKEN, {"Succeeded", "Failed"}, timeout=300)["status"]
    assert failed["phase"] == "Failed" and failed["attempts"] == 1, failed
    assert "body" in failed["message"], failed["message"]
    return JOB


def test_operator_is_scraped(stack: KubetuneStack) -> None:
    assert stack.prometheus is not None
    stack.wait_for(lambda: bool(stack.prometheus and stack.prometheus.query('up{job="kubetune-operator"} == 1')), 60, "a healthy operator target")
    phases = stack.prometheus.query("kubetune_operator_finetunejobs")
    assert phases, "the operator exports FinetuneJobs by phase"


def test_trainer_metrics_reached_prometheus(stack: KubetuneStack, finished_job: str) -> None:
    assert stack.prometheus is not None
    selector = f'{{namespace="{stack.settings.jobs_namespace}",finetunejob="{finished_job}"}}'
    steps = stack.prometheus.query_range(f"max(kubetune_trainer_step{selector})", seconds=900)
    assert steps and max(float(v) for _, v in steps[0]["values"]) > 0
    assert stack.prometheus.query_range(f"kubetune_trainer_loss{selector}", seconds=900)


def test_every_dashboard_query_returns_data(stack: KubetuneStack, finished_job: str) -> None:
    assert stack.prometheus is not None
    queries = [q for q in dashboard_queries(stack.settings.jobs_namespace, finished_job) if not q.needs_gpu]
    assert queries
    empty = [f"{q.dashboard} / {q.panel}: {q.expr}" for q in queries if not stack.prometheus.query_range(q.expr, seconds=900)]
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
