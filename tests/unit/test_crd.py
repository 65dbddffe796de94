"""The generated CRD: up to date, structural, fully described, and carrying its CEL rules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from kubetune_api.messages import message
from kubetune_operator import api, crdgen

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def load_crd() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "crds" / "finetunejob.yaml").read_text())
    return loaded


def walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, prop in schema.get("properties", {}).items():
        yield from walk(prop, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_committed_crds_match_the_models() -> None:
    assert crdgen.main(["--root", str(ROOT), "--check"]) == 0, "run `make crds` and commit the result"


def test_chart_crd_is_the_same_file() -> None:
    assert (ROOT / "crds/finetunejob.yaml").read_text() == (ROOT / "charts/kubetune/files/crds/finetunejob.yaml").read_text()


def test_schema_is_structural() -> None:
    root = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = yaml.safe_dump(root)
    for forbidden in ("$ref", "$defs", "anyOf", "allOf", "x-kubernetes-preserve-unknown-fields", "title:"):
        assert forbidden not in text, forbidden
    for path, node in walk(root):
        if path in ("", ".metadata"):
            continue
        assert "type" in node, f"{path} has no type"
        if node["type"] == "object":
            assert "properties" in node or "additionalProperties" in node, f"{path} is an untyped object"
        assert node.get("additionalProperties") is not False, path


def test_every_field_is_described_and_there_are_many() -> None:
    root = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    fields = [(p, n) for p, n in walk(root["properties"]["spec"], "spec") if p != "spec" and not p.endswith(("[]", "{}"))]
    undescribed = [p for p, n in fields if not n.get("description")]
    assert undescribed == []
    assert len(fields) >= 60
    status = [(p, n) for p, n in walk(root["properties"]["status"], "status") if p != "status" and not p.endswith(("[]", "{}"))]
    assert [p for p, n in status if not n.get("description")] == []


def test_cel_rules_have_messages_that_name_a_field() -> None:
    root = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rules = [rule for _, node in walk(root) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 5
    for rule in rules:
        assert rule["message"].startswith("spec"), rule


def test_names_columns_and_subresources() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Phase", "Progress", "Loss", "GPUs", "Age"} <= set(columns)


class Inner(BaseModel):
    """Inner doc."""

    size: int = Field(default=1, gt=0, description="A size.")


class Outer(BaseModel):
    inner: Inner | None = Field(default=None, description="Optional inner.")
    required_inner: Inner = Field(description="Required inner.")
    items: list[Inner] = Field(default_factory=list, description="Some inners.")
    ratio: float | None = Field(default=None, gt=0, lt=1, description="A ratio.")


def test_post_processor_inlines_refs_and_turns_null_into_nullable() -> None:
    schema = crdgen.to_structural(Outer.model_json_schema())
    inner = schema["properties"]["inner"]
    assert inner["nullable"] is True
    assert inner["description"] == "Optional inner."  # the field's description wins over the model's
    assert inner["properties"]["size"] == {"default": 1, "description": "A size.", "minimum": 0, "exclusiveMinimum": True, "type": "integer"}
    assert "nullable" not in schema["properties"]["required_inner"]
    assert schema["properties"]["items"]["items"]["properties"]["size"]["type"] == "integer"
    ratio = schema["properties"]["ratio"]
    assert ratio == {
        "type": "number",
        "nullable": True,
        "minimum": 0,
        "exclusiveMinimum": True,
        "maximum": 1,
        "exclusiveMaximum": True,
        "description": "A ratio.",
    }
    assert "$ref" not in yaml.safe_dump(schema) and "anyOf" not in yaml.safe_dump(schema)


def test_post_processor_refuses_real_unions() -> None:
    class Union_(BaseModel):
        value: int | str

    with pytest.raises(ValueError, match="anyOf"):
        crdgen.to_structural(Union_.model_json_schema())


def test_the_immutability_rule_covers_every_spec_field_but_the_mutable_ones() -> None:
    """Derived from the model: a new spec field is immutable unless it is marked mutable."""
    spec = load_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    (rule,) = [r for r in spec["x-kubernetes-validations"] if r.get("reason") == "FieldValueForbidden"]
    guarded = {name for name in spec["properties"] if f"self.{name} == oldSelf.{name}" in rule["rule"]}
    assert guarded == set(spec["properties"]) - set(api.MUTABLE_FIELDS)
    assert set(api.MUTABLE_FIELDS) == {"suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"}
    assert rule["message"] == message("spec.immutable", mutable="suspend, backoffLimit, activeDeadlineSeconds and ttlSecondsAfterFinished")
