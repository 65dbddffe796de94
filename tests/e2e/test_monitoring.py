"""Prometheus scrapes the operator and the trainers, and every dashboard query returns data after a real run."""

from __future__ import annotations

import functools

import pytest

from localcluster.prometheus import PrometheusQueries
from tests.e2e.support.stack import Stack
from tests.support.dashboards import dashboard_queries

pytestmark = pytest.mark.e2e

JOB = "monitored"
BROKEN = "monitored-broken"


@pytest.fixture(scope="module", autouse=True)
def prometheus_is_there(stack: Stack) -> None:
    if stack.prometheus is None:
        pytest.skip("this cluster's Prometheus is not known: set KUBETUNE_E2E_PROMETHEUS_URL")


@pytest.fixture(scope="module")
def finished_job(stack: Stack) -> str:
    training = {"maxSteps": 120, "logEvery": 2, "checkpointEvery": 40, "evalEvery": 40}
    # The example measures the eval loss on its own eval source, every evalEvery steps.
    body = stack.example("tiny-cpu-lora.yaml", training=training)
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
    # On a 2-core node the broken job waits for the CPU the first one holds, so it may have failed only just now:
    # the panels read what Prometheus has scraped, which lags the API by up to a scrape interval.
    prometheus = stack.prometheus
    assert prometheus is not None
    for name, phase in ((JOB, "Succeeded"), (BROKEN, "Failed")):
        expr = f'kubetune_operator_finetunejob_info{{finetunejob="{name}",phase="{phase}"}}'
        stack.wait_for(functools.partial(scraped, prometheus, expr), 60, f"Prometheus to scrape {name} as {phase}")
    return JOB


def scraped(prometheus: PrometheusQueries, expr: str) -> bool:
    return bool(prometheus.query(expr))


def test_operator_is_scraped(stack: Stack, finished_job: str) -> None:
    assert stack.prometheus is not None
    stack.wait_for(lambda: bool(stack.prometheus and stack.prometheus.query('up{job="kubetune-operator"} == 1')), 60, "a healthy operator target")
    phases = stack.prometheus.query(f'kubetune_operator_finetunejobs{{namespace="{stack.settings.jobs_namespace}",phase="Succeeded"}}')
    assert phases and float(phases[0]["value"][1]) >= 1, f"the operator exports FinetuneJobs by phase: {phases}"


def test_trainer_metrics_reached_prometheus(stack: Stack, finished_job: str) -> None:
    assert stack.prometheus is not None
    selector = f'{{namespace="{stack.settings.jobs_namespace}",finetunejob="{finished_job}"}}'
    steps = stack.prometheus.query_range(f"max(kubetune_trainer_step{selector})", seconds=900)
    assert steps and max(float(v) for _, v in steps[0]["values"]) > 0
    assert stack.prometheus.query_range(f"kubetune_trainer_loss{selector}", seconds=900)


def test_every_dashboard_query_returns_data(stack: Stack, finished_job: str) -> None:
    assert stack.prometheus is not None
    queries = [q for q in dashboard_queries(stack.settings.jobs_namespace, finished_job) if not q.needs_gpu]
    assert queries
    empty = [f"{q.dashboard} / {q.panel}: {q.expr}" for q in queries if not stack.prometheus.query_range(q.expr, seconds=900)]
    assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
