"""A kubelet eviction, in the words the kubelet uses, turned into the spec field to raise."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator.evictions import eviction_advice
from kubetune_operator.resourcesspec import ResourcesSpec
from kubetune_operator.status import compute_status
from tests.unit.test_status import conditions_by_type, ftj, job, observe, pod, terminated

pytestmark = pytest.mark.unit

# The kubelet's eviction messages (pkg/kubelet/eviction), one per way a trainer pod outgrows its disk or its node.
KUBELET_MESSAGES = {
    'Usage of EmptyDir volume "scratch" exceeds the limit "200Gi". ': "spec.resources.scratchSize",
    'Usage of EmptyDir volume "tmp" exceeds the limit "10Gi". ': "spec.resources.tmpSize",
    'Usage of EmptyDir volume "dshm" exceeds the limit "8Gi". ': "spec.resources.shmSize",
    'Container trainer exceeded its local ephemeral storage limit "300Gi". ': "spec.resources.ephemeralStorage",
    "Pod ephemeral local storage usage exceeds the total limit of containers 300Gi. ": "spec.resources.ephemeralStorage",
    "The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, available: 2Gi. ": "spec.resources.ephemeralStorage",
    "The node was low on resource: memory. Threshold quantity: 100Mi, available: 20Mi. ": "spec.resources.memory",
}


@pytest.mark.parametrize(("text", "field"), KUBELET_MESSAGES.items(), ids=lambda value: str(value)[:40])
def test_each_kubelet_eviction_names_the_field_to_raise(text: str, field: str) -> None:
    advice = eviction_advice(text, ResourcesSpec())
    assert advice is not None and field in advice


def test_an_eviction_without_a_resource_names_no_field() -> None:
    assert eviction_advice("Preempted by a pod of higher priority", ResourcesSpec()) is None


def evicted_by_kubelet(i: int, text: str) -> dict[str, Any]:
    """A trainer pod the kubelet evicted: Failed, reason Evicted, its message in the status and the condition."""
    condition = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet", "message": text}
    found = pod("Failed", state=terminated(137, reason="Error"), conditions=[condition], created=f"2026-11-27T07:0{i}:00Z", name=f"evicted-{i}")
    found["status"].update(reason="Evicted", message=text)
    return found


def test_the_disruption_limit_message_names_the_volume_to_raise() -> None:
    text = 'Usage of EmptyDir volume "scratch" exceeds the limit "200Gi". '
    pods = [evicted_by_kubelet(i, text) for i in (2, 1, 0)]
    status = compute_status(ftj(maxDisruptions=2), observe(job=job(failed=0), pods=pods))
    failed = conditions_by_type(status)["Failed"]
    assert failed["reason"] == "DisruptionLimitExceeded"
    assert "raise spec.resources.scratchSize" in failed["message"] and "200Gi" in failed["message"]


def test_a_retry_after_an_eviction_says_which_field_to_raise() -> None:
    text = 'Usage of EmptyDir volume "tmp" exceeds the limit "10Gi". '
    status = compute_status(ftj(maxDisruptions=5), observe(job=job(failed=0), pods=[evicted_by_kubelet(0, text)]))
    assert status["phase"] != "Failed"
    assert "raise spec.resources.tmpSize" in status["message"], status["message"]
