"""The base of every API model: camelCase on the wire, unknown fields rejected, CEL rules attached."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict, JsonValue

from kubetune_api.messages import message

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DOT_SEGMENT_PATTERN = r"(^|/)[.]{1,2}(/|$)"
"""A '.' or '..' key segment: mapped to a local path or joined into a prefix, it would name a folder outside the one meant.
(A bucket name cannot start with a dot, so on a whole s3:// URI it finds only segments of the key.)"""
SCHEME_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*:"
"""Something that starts like a URI scheme; only s3:// and file:// are sources, anything else is a typo or unsupported."""
S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


def cel(rule: str, message: str, **extra: str) -> JsonDict:
    """One ``x-kubernetes-validations`` entry: a CEL rule and the message a user sees when it fails."""
    return {"rule": rule, "message": message, **extra}


def validations(*rules: JsonDict) -> JsonDict:
    """Schema extra carrying CEL rules; the CRD generator keeps them where the field or model lands."""
    items: list[JsonValue] = list(rules)
    return {"x-kubernetes-validations": items}


class ApiModel(BaseModel):
    """Base for API objects: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=False,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as it appears in YAML/JSON: camelCase keys, unset optionals omitted."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def source_problem(source: str) -> str | None:
    """The ``messages`` key of what is wrong with a model or dataset source, or None when its form is valid."""
    if source.startswith(S3_SCHEME):
        return "source.s3" if not re.match(S3_URI_PATTERN, source) or re.search(DOT_SEGMENT_PATTERN, source) else None
    if not source.startswith(FILE_SCHEME) and re.match(SCHEME_PATTERN, source):
        return "source.scheme"
    return None


def check_source(source: str, field: str) -> str:
    """Python twin of ``source_rules``: the source, or ValueError with the message naming ``field``."""
    problem = source_problem(source)
    if problem is not None:
        raise ValueError(message(problem, field=field))
    return source


def source_rules(field: str) -> JsonDict:
    """The CEL rules of a source field (``field`` is its path, for the messages); ``check_source`` is their twin."""
    return validations(
        cel(
            f"!self.startsWith('{S3_SCHEME}') || (self.matches('{S3_URI_PATTERN}') && !self.matches('{DOT_SEGMENT_PATTERN}'))",
            message("source.s3", field=field),
        ),
        cel(
            f"self.startsWith('{S3_SCHEME}') || self.startsWith('{FILE_SCHEME}') || !self.matches('{SCHEME_PATTERN}')",
            message("source.scheme", field=field),
        ),
    )


def without_nulls(model: type[BaseModel], data: Any) -> Any:
    """``data`` for ``model`` without the explicit nulls of fields that cannot be null, at every depth.

    The apiserver treats such a null as the field left out (it prunes it, or applies the field's default), so the
    model must too; a null where null is allowed is kept."""
    if not isinstance(data, dict):
        return data
    fields = {info.alias or name: info.annotation for name, info in model.model_fields.items()}
    kept: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            kept[key] = value
        elif value is not None or _allows_none(fields[key]):
            kept[key] = _without_nulls_in(fields[key], value)
    return kept


def _allows_none(annotation: Any) -> bool:
    return annotation is None or annotation is type(None) or any(_allows_none(arg) for arg in _union_members(annotation))


def _union_members(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union else ()


def _without_nulls_in(annotation: Any, value: Any) -> Any:
    """The nulls inside ``value`` (a model, a list of models, a map) dropped as ``without_nulls`` does."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _without_nulls_in(typing.get_args(annotation)[0], value)
    members = _union_members(annotation)
    if members:
        inner = [member for member in members if member is not type(None)]
        return _without_nulls_in(inner[0], value) if len(inner) == 1 else value
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return without_nulls(annotation, value)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and isinstance(value, list):
        return [_without_nulls_in(args[0], item) for item in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {key: _without_nulls_in(args[1], item) for key, item in value.items() if item is not None or _allows_none(args[1])}
    return value
