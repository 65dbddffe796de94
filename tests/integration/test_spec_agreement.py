"""Generated specs: the real apiserver (CRD schema and CEL rules) and the operator's model agree on each.

Every drawn spec is sent with server-side dry run (admission in full, nothing stored, unknown fields refused as
kubectl refuses them) and parsed by ``api.FinetuneJob``. Either both accept it or both refuse it, and every
refusal names the field at fault, on both sides.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune_operator import api
from kubetune_operator.snapshots import short_errors
from tests.integration.harness import NAMESPACE, ControlPlane
from tests.support.spec_strategies import Change, base_spec, changed_specs, names_a_field

pytestmark = pytest.mark.integration

EXAMPLES = 300
"""A few seconds against the apiserver: each example is one dry-run request and one model parse."""


def apiserver_verdict(plane: ControlPlane, spec: dict[str, object]) -> str | None:
    """The apiserver's refusal of ``spec``, or None when it would admit it."""
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "generated", "namespace": NAMESPACE}, "spec": spec}
    try:
        client.CustomObjectsApi(plane.admin).create_namespaced_custom_object(
            api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, body, dry_run="All", field_validation="Strict", _preload_content=False
        )
    except ApiException as error:
        assert error.status in (400, 422), f"the apiserver failed, not refused: {error.status} {error.body!r}"
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    return None


def model_verdict(spec: dict[str, object]) -> str | None:
    """The operator model's refusal of ``spec``, as the operator reports it, or None when it parses."""
    try:
        api.FinetuneJob.from_body({"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "generated"}, "spec": spec})
    except ValidationError as error:
        return short_errors(error)
    return None


def test_the_base_spec_is_accepted_by_both(control_plane: ControlPlane) -> None:
    assert apiserver_verdict(control_plane, base_spec()) is None
    assert model_verdict(base_spec()) is None


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=changed_specs())
def test_apiserver_and_model_agree_on_generated_specs(control_plane: ControlPlane, drawn: tuple[dict[str, object], list[Change]]) -> None:
    spec, changes = drawn
    what = "; ".join(str(change) for change in changes) or "no change"
    by_apiserver, by_model = apiserver_verdict(control_plane, spec), model_verdict(spec)
    assert (by_apiserver is None) == (by_model is None), f"{what}: apiserver says {by_apiserver!r}, the model says {by_model!r}"
    for refusal in (by_apiserver, by_model):
        assert refusal is None or names_a_field(refusal), f"{what}: the refusal names no field: {refusal!r}"
