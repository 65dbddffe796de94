"""Where a run's files go: the S3 bucket and prefix, the credentials that reach it, and how long it is retried.

The same connection reads s3:// models and datasets. ``SecretKeyRef`` also names the Secrets of other parts of the
spec (notification sinks, hub tokens).
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from kubetune_api.messages import message
from kubetune_api.schema import DOT_SEGMENT_PATTERN, K8S_NAME_PATTERN, ApiModel, cel, validations


class SecretKeyRef(ApiModel):
    """A key in a Secret in the FinetuneJob's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="Name of the Secret, in the FinetuneJob's namespace.",
    )
    key: str = Field(
        min_length=1,
        max_length=253,
        description="Key inside the Secret whose value is used.",
    )


class S3CredentialsRef(ApiModel):
    """A Secret holding S3 credentials; the values reach the trainer only as environment variables."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="Name of the Secret holding the S3 access key pair, in the FinetuneJob's namespace.",
    )
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID",
        max_length=253,
        description="Key in the Secret that holds the access key id.",
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        max_length=253,
        description="Key in the Secret that holds the secret access key.",
    )


PREFIX_PATTERN = r"^([A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*/?)?$"
"""S3's safe key characters in segments joined by single slashes: no leading slash, no empty segment."""


class OutputSpec(ApiModel):
    """Where the adapter, checkpoints and manifest are written. The same S3 connection reads s3:// models and datasets."""

    bucket: str = Field(
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="S3 bucket that receives the adapter and checkpoints.",
    )
    prefix: str = Field(
        default="",
        max_length=512,
        pattern=PREFIX_PATTERN,
        description=(
            "Key prefix inside the bucket: segments of letters, digits and !-_.*'() separated by single slashes, "
            "without a leading slash or '.' and '..' segments. Each run writes <prefix>/<namespace>/<name>/runs/<uid>/adapter/ "
            "(and .../checkpoints/step-N/ while it trains), where <uid> is the FinetuneJob's metadata.uid, and then points "
            "<prefix>/<namespace>/<name>/latest.json at its adapter."
        ),
        json_schema_extra=validations(cel(f"!self.matches('{DOT_SEGMENT_PATTERN}')", message("output.prefix"))),
    )
    endpoint_url: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^https?://.+",
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, GCS interop). Unset means AWS.",
    )
    region: str | None = Field(default=None, max_length=64, description="S3 region, for example us-east-1.")
    credentials_secret: S3CredentialsRef | None = Field(
        default=None,
        description="Secret with the S3 access key pair. Unset means the node's or workload identity's credentials.",
    )
    merged_model: bool = Field(
        default=False,
        description="Also export the base model with the adapter merged in (full size) under .../merged/.",
    )
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        le=1000,
        description=(
            "Complete checkpoints kept in S3 while the run trains: once a newer one is complete, older ones are deleted. "
            "Keep at least 2 so that a damaged newest checkpoint still leaves one to resume from."
        ),
    )
    retry_timeout_seconds: int = Field(
        default=300,
        ge=10,
        le=86400,
        description=(
            "How long one S3 request is retried through an outage (exponential backoff with jitter) before the attempt "
            "fails with StorageUnavailable; the Job's next attempt then resumes from the newest complete checkpoint."
        ),
    )
    keep_checkpoints_after_success: bool = Field(
        default=False,
        description="Keep the run's checkpoints in S3 after the adapter is published; by default they are deleted then.",
    )

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        if re.search(DOT_SEGMENT_PATTERN, prefix):
            raise ValueError(message("output.prefix"))
        return prefix
