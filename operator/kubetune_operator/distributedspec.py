"""``spec.distributed``: how long the pods of a multi-node run wait for each other, at the start and in each collective."""

from __future__ import annotations

from pydantic import Field

from kubetune_api.runtime import DEFAULT_COLLECTIVE_TIMEOUT_S, DEFAULT_JOIN_TIMEOUT_S
from kubetune_api.schema import ApiModel


class DistributedSpec(ApiModel):
    """Timeouts of a run spread over several processes (GPUs of a pod, or pods)."""

    join_timeout_seconds: int = Field(
        default=DEFAULT_JOIN_TIMEOUT_S,
        ge=10,
        le=86400,
        description=(
            "How long the pods of a multi-node job wait at the rendezvous for every rank, at the start and after a rank "
            "restarted. A rank still missing then (its pod Pending on a cordoned or full node) fails the job with reason "
            "RendezvousTimeout, naming the rank and its pod."
        ),
    )
    collective_timeout_seconds: int = Field(
        default=DEFAULT_COLLECTIVE_TIMEOUT_S,
        ge=10,
        le=86400,
        description=(
            "How long one collective operation (gloo on CPU, NCCL on GPUs) may wait for the other ranks before the run "
            "stops with reason CollectiveTimeout and is retried from its newest checkpoint (within backoffLimit)."
        ),
    )
