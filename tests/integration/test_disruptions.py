"""Evictions past spec.maxDisruptions stop the trainer Job, on the real apiserver: the Job would replace evicted pods forever."""

from __future__ import annotations

import pytest

from tests.integration.harness import NAMESPACE, Harness

pytestmark = pytest.mark.integration


def evict(harness: Harness, pod_name: str) -> None:
    """What the kubelet reports for a pod it evicted under disk pressure."""
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet", "message": "The node was low on resource: ephemeral-storage."}
    status = {"phase": "Failed", "reason": "Evicted", "conditions": [condition]}
    harness.core.patch_namespaced_pod_status(pod_name, NAMESPACE, {"status": status}, _content_type="application/merge-patch+json")


def test_evictions_past_the_limit_fail_the_job_and_suspend_its_trainer(harness: Harness) -> None:
    running = harness.running("evicted", maxDisruptions=0)
    assert running["spec"]["maxDisruptions"] == 0
    evict(harness, "evicted-trainer-0")
    harness.pod_changed("evicted")
    status = harness.status("evicted")
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (status["phase"], status["disruptions"], failed["reason"]) == ("Failed", 1, "DisruptionLimitExceeded")
    assert "spec.maxDisruptions=0" in status["message"]
    job = harness.job("evicted")
    assert job is not None and job["spec"]["suspend"] is True
