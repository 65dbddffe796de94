"""The operator reads a spec as strictly as the CRD's schema does: no value of the wrong JSON type is coerced."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest
from pydantic import ValidationError

from kubetune_operator import crdgen
from kubetune_operator.api import FinetuneJob, FinetuneJobSpec
from kubetune_operator.snapshots import short_errors
from tests.support.spec_strategies import base_spec

pytestmark = pytest.mark.unit

# Each of these the apiserver refuses with "must be of type ..."; a lax model would take it.
WRONG_TYPES = [
    (("lora", "r"), "8", "spec.lora.r"),
    (("lora", "dropout"), "0.1", "spec.lora.dropout"),
    (("training", "gradientCheckpointing"), "yes", "spec.training.gradientCheckpointing"),
    (("training", "gradientCheckpointing"), 1, "spec.training.gradientCheckpointing"),
    (("training", "maxSteps"), True, "spec.training.maxSteps"),
]


def body(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneJob", "metadata": {"name": "typed", "namespace": "ml"}, "spec": spec}


@pytest.mark.parametrize(("path", "value", "field"), WRONG_TYPES, ids=lambda v: str(v))
def test_a_value_of_the_wrong_type_is_refused_naming_its_field(path: tuple[str, str], value: Any, field: str) -> None:
    spec = base_spec()
    spec[path[0]][path[1]] = value
    with pytest.raises(ValidationError) as refused:
        FinetuneJob.from_body(body(spec))
    assert short_errors(refused.value).startswith(field), short_errors(refused.value)


def test_a_kopf_body_with_a_status_parses() -> None:
    status = {"phase": "Running", "conditions": [{"type": "Running", "status": "True", "reason": "Training", "lastTransitionTime": "2026-11-27T08:00:00Z"}]}
    raw = {**body(base_spec()), "status": status}
    parsed = FinetuneJob.from_body(kopf.Body(copy.deepcopy(raw)))  # type: ignore[arg-type]
    assert parsed.spec.lora.r == 8 and parsed.status is not None and parsed.status.conditions[0].last_transition_time.year == 2026


def test_a_null_counts_as_the_field_left_out_as_the_apiserver_counts_it() -> None:
    """The apiserver prunes a null where the schema allows none, or puts the field's default in its place."""
    spec = base_spec()
    spec["lora"]["useRslora"] = None
    spec["resources"]["nodeSelector"] = {"zone": None}
    spec["dataset"]["fileFormat"] = None
    parsed = FinetuneJob.from_body(body(spec))
    assert parsed.spec.lora.use_rslora is False and parsed.spec.resources.node_selector == {} and parsed.spec.dataset.file_format is None
    spec["model"] = None
    with pytest.raises(ValidationError, match="spec.model"):
        FinetuneJob.from_body(body(spec))


def test_an_optional_enum_is_not_nullable_in_the_crd() -> None:
    """A kept null fails the enum check, so the CRD lets the apiserver prune it, as the model's None means."""
    dataset = crdgen.model_schema(FinetuneJobSpec)["properties"]["dataset"]["properties"]
    assert "nullable" not in dataset["fileFormat"] and None not in dataset["fileFormat"]["enum"]
