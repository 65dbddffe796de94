"""The base of every API model: camelCase on the wire, unknown fields rejected, CEL rules attached."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict, JsonValue

S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


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


def check_s3_source(value: str) -> str:
    """Python twin of the CEL rule on s3:// sources."""
    if value.startswith("s3://") and not re.match(S3_URI_PATTERN, value):
        raise ValueError("an s3:// source must look like s3://bucket/prefix")
    return value


Source = Annotated[str, AfterValidator(check_s3_source)]
