"""Every example is a valid FinetuneJob; a table of invalid specs is rejected with a message naming the field.

The CRD's structural schema is checked with a JSON-schema validator (OpenAPI v3.0 semantics: boolean
exclusiveMinimum); its CEL rules are twinned by the pydantic models' validators. The end-to-end suite sends
the same table to a real apiserver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pydantic
import pytest
import yaml

from kubetune_operator.api import FinetuneJob
from tests.support.invalid_specs import INVALID_SPECS, InvalidSpec, apply_change

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def crd_validator() -> jsonschema.Draft4Validator:
    crd = yaml.safe_load((ROOT / "crds" / "finetunejob.yaml").read_text())
    return jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def rejection(body: dict[str, Any]) -> str | None:
    """The first reason the schema or the model rejects a FinetuneJob, as '<field path>: <message>'."""
    errors = sorted(crd_validator().iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required":  # name the missing property, as the apiserver does
            path.append(str(error.message).split("'")[1])
        return ".".join(path) + ": " + str(error.message)
    try:
        FinetuneJob.model_validate(body)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        return "spec." + ".".join(str(p) for p in first["loc"][1:]) + ": " + str(first["msg"])
    return None


def test_there_are_examples_for_each_use() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"tiny-cpu-lora.yaml", "llama-8b-qlora.yaml", "multi-gpu-lora.yaml", "chat-from-s3.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    # A file may hold the objects the job needs (a Kueue queue) before its one FinetuneJob.
    (body,) = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "FinetuneJob"]
    assert rejection(body) is None
    job = FinetuneJob.model_validate(body)
    assert job.spec.output.bucket


def base_spec() -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-cpu-lora.yaml").read_text())
    return body


def test_the_table_is_large_enough() -> None:
    assert len(INVALID_SPECS) >= 12


@pytest.mark.parametrize("case", INVALID_SPECS, ids=lambda c: c.name)
def test_invalid_spec_is_rejected_naming_the_field(case: InvalidSpec) -> None:
    message = rejection(apply_change(base_spec(), case))
    assert message is not None, f"{case.name} was accepted"
    assert case.field in message, message
