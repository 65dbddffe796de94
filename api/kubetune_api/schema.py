"""The base of every API model: camelCase on the wire, unknown fields rejected, CEL rules attached."""

from __future__ import annotations

import re
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
