"""``spec.notifications``: the HTTP endpoints one FinetuneJob's CloudEvents go to, besides the chart's sinks.

A sink names Secrets by reference only; the operator reads their values when it sends, on its notification
thread, and puts them in request headers, never in an event body, a status, an Event or a log line.
"""

from __future__ import annotations

from pydantic import Field

from kubetune_api.output import SecretKeyRef
from kubetune_api.schema import ApiModel

MAX_SINKS = 8
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
"""An HTTP field name (RFC 9110 token)."""

SECRET_ACCESS = (
    "The operator reads it when it sends, so it needs get on Secrets in this namespace: the chart's namespaced mode "
    "(watchNamespaces) grants that; in cluster-wide mode grant it with a Role bound to the operator's ServiceAccount."
)


class NotificationSink(ApiModel):
    """An HTTP endpoint that receives a CloudEvent (structured JSON, HTTP POST) on every phase change of this FinetuneJob."""

    url: str = Field(
        min_length=8,
        max_length=2048,
        pattern=r"^https?://[^\s]+$",
        description="http:// or https:// URL the events are POSTed to.",
    )
    auth_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key whose value is sent in the authHeader header of each request, for example 'Bearer <token>'. " + SECRET_ACCESS,
    )
    auth_header: str = Field(
        default="Authorization",
        min_length=1,
        max_length=128,
        pattern=HEADER_NAME_PATTERN,
        description="Name of the header that carries the authSecretRef value.",
    )
    signing_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key whose value is an HMAC-SHA256 key: each request body is then signed in the X-Kubetune-Signature header "
        "as sha256=<hex digest>, which the receiver recomputes to check the event came from this operator. " + SECRET_ACCESS,
    )


NOTIFICATIONS_DESCRIPTION = (
    f"Up to {MAX_SINKS} HTTP sinks that receive a CloudEvent on every phase change of this FinetuneJob, in addition to the "
    "operator's cluster-wide sinks; the completion event carries the adapter URI, the GPU usage and the evaluation gate's "
    "verdict. Each event's id is the same for every send of one transition, so a receiver drops the duplicates that a "
    "restarted operator may send. Sending never holds up the job; failed sends are retried with backoff and counted."
)
