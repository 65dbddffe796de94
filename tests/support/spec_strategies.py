"""Generated FinetuneJob specs, valid and invalid, drawn from the schema the API models produce.

A spec starts as the tiny CPU example (valid) and gets up to a few changes at field paths taken from the
structural schema of ``api.FinetuneJobSpec``: a value drawn from that field's own schema (inside and just outside
its bounds, from its enum or pattern), a value of the wrong type, an explicit null, the field removed, or an
unknown field beside it. Both the apiserver and the operator's model judge the result.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from kubetune_operator import api, crdgen

Schema = dict[str, Any]
FieldPath = tuple[str, ...]

ROOT = Path(__file__).resolve().parents[2]
INT64 = (-(2**63), 2**63 - 1)
# Strings a source, prefix or name field meets in practice: the forms each accepts and the typos each refuses.
TELLING_STRINGS = (
    "",
    "s3://",
    "s3:/bucket/key",
    "s3://bucket/data/../x.jsonl",
    "s3://bucket/./x",
    "s3://kubetune-demo/models/tiny-llama/",
    "gs://bucket/model",
    "file:///models/name",
    "/models/name",
    "org/name",
    "../up",
    "runs//team",
    "a",
    "Bad_Name",
    "8Gi",
    "500m",
    "all-linear",
)


def base_spec() -> dict[str, Any]:
    """The spec of the tiny CPU example, which the apiserver and the model both accept."""
    example: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-cpu-lora.yaml").read_text())
    return copy.deepcopy(example["spec"])


def spec_schema() -> Schema:
    """The structural schema of the spec, as the CRD carries it (generated from the models)."""
    return crdgen.model_schema(api.FinetuneJobSpec)


def field_paths(schema: Schema, path: FieldPath = ()) -> list[tuple[FieldPath, Schema]]:
    """Every named property below ``schema``, with its own schema (list items and map values are reached through their parent)."""
    found: list[tuple[FieldPath, Schema]] = []
    for name, prop in schema.get("properties", {}).items():
        found.append(((*path, name), prop))
        found.extend(field_paths(prop, (*path, name)))
    return found


def _numbers(node: Schema, integral: bool) -> st.SearchStrategy[Any]:
    low, high = node.get("minimum"), node.get("maximum")
    edges = [edge + step for edge in (low, high) if edge is not None for step in (-1, 0, 1)]
    if integral:
        lower = INT64[0] if low is None else max(INT64[0], int(low) - 3)
        upper = INT64[1] if high is None else min(INT64[1], int(high) + 3)
        return st.sampled_from([int(edge) for edge in edges] or [0]) | st.integers(lower, upper)
    small = [edge + nudge for edge in (low, high) if edge is not None for nudge in (-1e-6, 0.0, 1e-6)]
    return st.sampled_from([float(edge) for edge in [*edges, *small]] or [0.0]) | st.floats(
        -1e6 if low is None else low - 1, 1e6 if high is None else high + 1, allow_nan=False, allow_infinity=False
    )


def _strings(node: Schema) -> st.SearchStrategy[str]:
    choices: list[st.SearchStrategy[str]] = [st.sampled_from(TELLING_STRINGS)]
    if "enum" in node:
        choices.append(st.sampled_from(node["enum"]))
    if "pattern" in node:
        pattern: str = node["pattern"]
        choices.append(st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) <= node.get("maxLength", sys.maxsize)))
    limit = node.get("maxLength")
    if limit is not None:
        choices.append(st.sampled_from(["x" * limit, "x" * (limit + 1)]))
    choices.append(st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=12))
    return st.one_of(choices)


def _wrong_type(node: Schema) -> st.SearchStrategy[Any]:
    others: dict[str, Any] = {"string": "7", "integer": 7, "number": 0.5, "boolean": True, "object": {}, "array": []}
    kind = node.get("type")
    return st.sampled_from([value for name, value in others.items() if name != kind and not (kind == "number" and name == "integer")])


def values(node: Schema, depth: int = 0) -> st.SearchStrategy[Any]:
    """A value for a field with schema ``node``: mostly of its type, near its bounds, sometimes the wrong type or null."""
    kind = node.get("type")
    own: st.SearchStrategy[Any]
    if kind == "boolean":
        own = st.booleans()
    elif kind in ("integer", "number"):
        own = _numbers(node, kind == "integer")
    elif kind == "string":
        own = _strings(node)
    elif kind == "array":
        own = st.just([])
        if depth < 3:
            own |= st.lists(values(node["items"], depth + 1), max_size=min(3, node.get("maxItems", 3) + 1), unique_by=_hashable)
    elif kind == "object" and "properties" in node and depth < 3:
        own = st.fixed_dictionaries({}, optional={name: values(prop, depth + 1) for name, prop in node["properties"].items()})
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        own = st.dictionaries(st.sampled_from(["gpu", "zone", "Bad Key"]), values(node["additionalProperties"], depth + 1), max_size=2)
    else:
        own = st.just({})
    return st.one_of(own, _wrong_type(node), st.none())


def _hashable(value: Any) -> str:
    return repr(value)


@dataclass(frozen=True)
class Change:
    """One change to the base spec: ``kind`` is set, delete or unknown (an extra field beside ``path``'s last part)."""

    kind: str
    path: FieldPath
    value: Any = None

    def apply(self, spec: dict[str, Any]) -> None:
        node = spec
        for part in self.path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        leaf = self.path[-1]
        if self.kind == "delete":
            node.pop(leaf, None)
        elif self.kind == "unknown":
            node[f"{leaf}Typo"] = self.value
        else:
            node[leaf] = copy.deepcopy(self.value)

    def __str__(self) -> str:
        where = "spec." + ".".join(self.path)
        return f"{self.kind} {where}" + ("" if self.kind == "delete" else f" = {self.value!r}")


FIELDS = field_paths(spec_schema())


@st.composite
def changed_specs(draw: st.DrawFn, max_changes: int = 3) -> tuple[dict[str, Any], list[Change]]:
    """The base spec with up to ``max_changes`` changes; returns the spec and the changes made, in order."""
    spec = base_spec()
    changes: list[Change] = []
    for _ in range(draw(st.integers(0, max_changes))):
        path, node = draw(st.sampled_from(FIELDS))
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "unknown"]))
        change = Change(kind, path, None if kind == "delete" else draw(values(node)))
        change.apply(spec)
        changes.append(change)
    return spec, changes


FIELD_IN_MESSAGE = re.compile(r"\bspec(\.[A-Za-z][A-Za-z0-9]*)+")


def names_a_field(text: str) -> bool:
    """True when ``text`` names a spec field by its path (spec.x.y)."""
    return FIELD_IN_MESSAGE.search(text) is not None
