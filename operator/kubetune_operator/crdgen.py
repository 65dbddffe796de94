"""Generate the FinetuneJob CustomResourceDefinition from the pydantic API models.

Pydantic emits JSON Schema 2020-12 (``$defs``/``$ref``, ``anyOf: [T, null]``, numeric
``exclusiveMinimum``); a CRD wants structural OpenAPI v3.0 (inlined objects, ``nullable: true``,
boolean ``exclusiveMinimum``, no ``additionalProperties: false`` next to ``properties``).
``to_structural`` does that translation; ``build_crd`` wraps the result in the CRD object.

Run ``python -m kubetune_operator.crdgen`` (``make crds``) to rewrite the committed files.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune_operator import api

Schema = dict[str, Any]

DROPPED_KEYS = frozenset({"title", "$defs", "discriminator"})
CRD_PATHS = (Path("crds/finetunejob.yaml"), Path("charts/kubetune/files/crds/finetunejob.yaml"))

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progressText", "description": "Completion in percent."},
    {"name": "Loss", "type": "string", "jsonPath": ".status.lossText", "description": "Latest training loss."},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpus", "description": "GPUs per node."},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes", "priority": 1, "description": "Nodes."},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1, "description": "lora or qlora."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1, "description": "Optimizer steps done."},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1, "description": "What is happening now."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def to_structural(schema: Schema) -> Schema:
    """Translate a pydantic JSON schema (with its ``$defs``) into a structural CRD schema."""
    defs: dict[str, Schema] = schema.get("$defs", {})
    return _convert(schema, defs)


def _resolve_ref(node: Schema, defs: dict[str, Schema]) -> Schema:
    ref = node.get("$ref")
    if ref is None and len(node.get("allOf", [])) == 1 and "$ref" in node["allOf"][0]:
        ref = node["allOf"][0]["$ref"]
    if ref is None:
        return node
    target = copy.deepcopy(defs[ref.rsplit("/", 1)[-1]])
    # Siblings of the reference (the field's own description, default) win over the model's.
    siblings = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
    rules = target.get("x-kubernetes-validations", []) + siblings.pop("x-kubernetes-validations", [])
    target.update(siblings)
    if rules:
        target["x-kubernetes-validations"] = rules
    return target


def _convert(node: Schema, defs: dict[str, Schema]) -> Schema:
    node = _resolve_ref(node, defs)
    out: Schema = {}
    variants = node.get("anyOf")
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express anyOf with {len(non_null)} non-null variants in a CRD: {variants}")
        inner = _convert(non_null[0], defs)
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        merged = {**inner, **_convert(rest, defs)}
        if len(non_null) != len(variants) and not ("enum" in merged and merged.get("default") is None):
            # A null the apiserver keeps is checked against the enum, which cannot list null; without nullable it prunes
            # the null instead, and a field left out is what the model's None default means.
            merged["nullable"] = True
        if merged.get("default", ...) is None:
            del merged["default"]
        return merged
    for key, value in node.items():
        if key in DROPPED_KEYS or key in ("$ref", "allOf"):
            continue
        if key == "properties":
            out[key] = {name: _convert(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _convert(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = copy.deepcopy(value)
    if "enum" in out and "type" not in out:
        out["type"] = _enum_type(out["enum"])
    if "properties" in out:
        out.setdefault("type", "object")
        _default_nested_objects(out)
    return out


def _enum_type(values: list[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "boolean"
    if all(isinstance(v, int) for v in values):
        return "integer"
    return "string"


def _default_nested_objects(obj: Schema) -> None:
    """Give optional, non-nullable object properties ``default: {}`` so their own defaults apply."""
    required = set(obj.get("required", []))
    for name, prop in obj["properties"].items():
        if name in required or prop.get("nullable") or "default" in prop:
            continue
        if prop.get("type") == "object" and "properties" in prop:
            prop["default"] = {}


def model_schema(model: type[BaseModel]) -> Schema:
    """Structural schema of one pydantic model, camelCase field names."""
    return to_structural(model.model_json_schema(by_alias=True, mode="validation"))


def status_schema() -> Schema:
    """The status schema: the status model's fields plus its computed (printer column) fields, derived from the model."""
    schema = model_schema(api.FinetuneJobStatus)
    for name, computed in api.FinetuneJobStatus.model_computed_fields.items():
        schema["properties"][computed.alias or name] = {"type": "string", "maxLength": 32, "description": computed.description or ""}
    return schema


def build_crd() -> dict[str, Any]:
    """The complete FinetuneJob CustomResourceDefinition."""
    spec = model_schema(api.FinetuneJobSpec)
    spec["description"] = (api.FinetuneJobSpec.__doc__ or "").strip()
    root: Schema = {
        "type": "object",
        "description": "FinetuneJob fine-tunes a base model with LoRA or QLoRA and publishes the adapter to S3.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object: kubetune.io/v1alpha1."},
            "kind": {"type": "string", "description": "Kind of this object: FinetuneJob."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kubetune", "all"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render() -> str:
    """The CRD as the YAML text committed to the repository."""
    header = "# Generated by `make crds` from kubetune_operator/api.py. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="Repository root.")
    parser.add_argument("--check", action="store_true", help="Exit 1 if a committed file differs.")
    args = parser.parse_args(argv)
    text = render()
    stale = [p for p in CRD_PATHS if not (args.root / p).is_file() or (args.root / p).read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    for path in CRD_PATHS:
        (args.root / path).parent.mkdir(parents=True, exist_ok=True)
        (args.root / path).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
