"""The chart's ValidatingAdmissionPolicy on the real apiserver: what a FinetuneJob author may run, as the admin set it.

FinetuneJobs are sent with server-side dry run, which runs admission in full and stores nothing.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_operator import api
from tests.integration.harness import NAMESPACE, SPEC, ControlPlane
from tests.support.chart import of_kind, render

pytestmark = pytest.mark.integration

POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
VALUES = {
    "admissionPolicy": {
        "enabled": True,
        "allowedImagePrefixes": ["registry.example.com/ml/"],
        "allowTrustRemoteCode": False,
        "allowedPriorityClasses": ["training"],
    }
}
POLICY_TAKES_EFFECT_SECONDS = 60.0


def policy_objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs = render(values, [])
    return [doc for kind in POLICY_KINDS for doc in of_kind(docs, kind)]


def dry_run_create(plane: ControlPlane, **resources_and_model: Any) -> str | None:
    """The apiserver's refusal of a FinetuneJob with these spec parts, or None when it would be admitted."""
    spec = copy.deepcopy(SPEC)
    for part, fields in resources_and_model.items():
        spec[part] = {**spec[part], **fields}
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "admission", "namespace": NAMESPACE}, "spec": spec}
    try:
        client.CustomObjectsApi(plane.admin).create_namespaced_custom_object(
            api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, body, dry_run="All", _preload_content=False
        )
    except ApiException as error:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    return None


@pytest.fixture
def admission_policy(control_plane: ControlPlane) -> Iterator[ControlPlane]:
    objects = {"apiVersion": "v1", "kind": "List", "items": policy_objects(VALUES)}
    control_plane.kubectl_run("apply", "--server-side", "-f", "-", stdin=json.dumps(objects))
    try:
        # The apiserver compiles and starts enforcing a new policy asynchronously.
        deadline = time.monotonic() + POLICY_TAKES_EFFECT_SECONDS
        while dry_run_create(control_plane, model={"trustRemoteCode": True}) is None:
            assert time.monotonic() < deadline, f"the policy was not enforced within {POLICY_TAKES_EFFECT_SECONDS:.0f}s"
            time.sleep(0.5)
        yield control_plane
    finally:
        for kind in ("validatingadmissionpolicybinding", "validatingadmissionpolicy"):
            control_plane.kubectl_run("delete", kind, "kubetune-finetunejobs", "--ignore-not-found")


def test_default_values_install_no_policy() -> None:
    assert policy_objects({}) == []
    permissive = {"admissionPolicy": {"enabled": True, "allowedImagePrefixes": [], "allowTrustRemoteCode": True, "allowedPriorityClasses": []}}
    assert policy_objects(permissive) == []


def test_denied_specs_are_rejected_at_admission_with_the_policy_message(admission_policy: ControlPlane) -> None:
    image = dry_run_create(admission_policy, resources={"image": "docker.io/someone/trainer:latest"})
    assert image is not None and "spec.resources.image: this cluster runs trainer images that start with registry.example.com/ml/ only" in image
    remote_code = dry_run_create(admission_policy, model={"trustRemoteCode": True})
    assert remote_code is not None and "spec.model.trustRemoteCode: this cluster does not run code shipped with a model" in remote_code
    priority = dry_run_create(admission_policy, resources={"priorityClassName": "system-cluster-critical"})
    assert priority is not None and "spec.resources.priorityClassName: FinetuneJobs may use the PriorityClasses training only" in priority


def test_allowed_specs_are_admitted(admission_policy: ControlPlane) -> None:
    assert dry_run_create(admission_policy) is None
    assert dry_run_create(admission_policy, resources={"image": "registry.example.com/ml/trainer:1.2", "priorityClassName": "training"}) is None
    assert dry_run_create(admission_policy, model={"trustRemoteCode": False}) is None
