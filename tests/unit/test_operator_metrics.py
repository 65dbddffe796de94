"""The operator's /metrics, /healthz and /readyz server, served for real on loopback."""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.metrics import Health, MetricsServer, OperatorMetrics

pytestmark = pytest.mark.unit


@pytest.fixture
def served() -> Iterator[tuple[str, OperatorMetrics, Health]]:
    metrics, health = OperatorMetrics(), Health()
    server = MetricsServer("127.0.0.1", 0, metrics, health)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", metrics, health
    finally:
        server.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_metrics_follow_the_contract(served: tuple[str, OperatorMetrics, Health]) -> None:
    base, metrics, _ = served
    metrics.jobs.set("team-a", "one", "Running")
    metrics.jobs.set("team-a", "two", "Running")
    metrics.jobs.set("team-b", "three", "Failed")
    metrics.jobs.set("team-b", "gone", "Pending")
    metrics.jobs.forget("team-b", "gone")
    metrics.reconcile_duration.labels(handler="ensure").observe(0.02)
    metrics.reconcile_errors.labels(kind="api500").inc()
    metrics.jobs_created.labels(namespace="team-a").inc()
    code, body = get(f"{base}/metrics")
    assert code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples[("kubetune_operator_finetunejobs", (("namespace", "team-a"), ("phase", "Running")))] == 2
    assert samples[("kubetune_operator_finetunejobs", (("namespace", "team-b"), ("phase", "Failed")))] == 1
    assert ("kubetune_operator_finetunejobs", (("namespace", "team-b"), ("phase", "Pending"))) not in samples
    assert samples[("kubetune_operator_finetunejob_info", (("finetunejob", "three"), ("namespace", "team-b"), ("phase", "Failed")))] == 1
    assert samples[("kubetune_operator_reconcile_duration_seconds_count", (("handler", "ensure"),))] == 1
    assert samples[("kubetune_operator_reconcile_errors_total", (("kind", "api500"),))] == 1
    assert samples[("kubetune_operator_jobs_created_total", (("namespace", "team-a"),))] == 1


def test_readyz_waits_for_startup_and_healthz_follows_the_heartbeat(served: tuple[str, OperatorMetrics, Health], monkeypatch: pytest.MonkeyPatch) -> None:
    base, _, health = served
    assert get(f"{base}/readyz")[0] == 503
    health.ready.set()
    assert get(f"{base}/readyz")[0] == 200
    assert get(f"{base}/healthz")[0] == 200
    monkeypatch.setattr(health, "_beat", health._beat - 3600)
    assert get(f"{base}/healthz")[0] == 503
    assert get(f"{base}/nope")[0] == 404


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_promtool_accepts_the_exposition() -> None:
    metrics = OperatorMetrics()
    metrics.jobs.set("team-a", "one", "Running")
    metrics.reconcile_duration.labels(handler="ensure").observe(0.02)
    metrics.reconcile_errors.labels(kind="api500").inc()
    metrics.jobs_created.labels(namespace="team-a").inc()
    metrics.api_writes.labels(verb="create", resource="job").inc()
    result = subprocess.run(["promtool", "check", "metrics"], input=metrics.exposition(), capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
