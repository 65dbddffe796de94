"""spec.resources of a FinetuneJob: GPUs, nodes, CPU and memory per pod, volumes, and where the pods may run."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from kubetune_api.messages import message
from kubetune_api.schema import K8S_NAME_PATTERN, ApiModel, cel, validations

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
Quantity = Annotated[str, Field(max_length=32, pattern=QUANTITY_PATTERN)]
ShortString = Annotated[str, Field(max_length=253)]


class Toleration(ApiModel):
    """A Kubernetes toleration, as in a Pod spec."""

    key: str | None = Field(default=None, max_length=253, description="Taint key the toleration applies to; empty with operator Exists matches all keys.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal (key and value must match).")
    value: str | None = Field(default=None, max_length=253, description="Taint value to match with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(default=None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(default=None, ge=0, description="How long a NoExecute taint is tolerated.")


class NodeSelectorRequirement(ApiModel):
    """A node label requirement."""

    key: str = Field(max_length=253, description="Node label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"] = Field(description="Relation between the label and values.")
    values: list[ShortString] = Field(default_factory=list, max_length=64, description="Values for In/NotIn (any) and Gt/Lt (one integer).")


class NodeSelectorTerm(ApiModel):
    """Requirements that must all hold (AND)."""

    match_expressions: list[NodeSelectorRequirement] = Field(max_length=32, description="Label requirements, all of which must match.")


class RequiredNodeAffinity(ApiModel):
    """Hard node constraints."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=16, description="Terms of which at least one must match (OR).")


class PreferredNodeTerm(ApiModel):
    """A weighted soft node preference."""

    weight: int = Field(ge=1, le=100, description="Weight of this preference, 1-100.")
    preference: NodeSelectorTerm = Field(description="The preferred node labels.")


class NodeAffinity(ApiModel):
    """Node affinity, as in a Pod spec."""

    required_during_scheduling_ignored_during_execution: RequiredNodeAffinity | None = Field(default=None, description="Nodes the trainer pods must run on.")
    preferred_during_scheduling_ignored_during_execution: list[PreferredNodeTerm] = Field(
        default_factory=list, max_length=16, description="Nodes the trainer pods prefer."
    )


class Affinity(ApiModel):
    """Scheduling affinity of the trainer pods."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Node affinity of the trainer pods.")


HOSTNAME_LABEL = "kubernetes.io/hostname"
"""The node label a multi-node job's pods spread over, one per value."""


class ResourcesSpec(ApiModel):
    """Where and on how much hardware the trainer runs."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(f"!has(self.nodes) || self.nodes == 1 || !has(self.nodeSelector) || !('{HOSTNAME_LABEL}' in self.nodeSelector)", message("resources.multinode"))
        )
    )

    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node (pod). 0 runs a CPU-only trainer (tests and demos), with gloo across nodes.")
    nodes: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Number of nodes; above 1 the trainer runs as an Indexed Job with one pod per node (required pod anti-affinity on "
        "kubernetes.io/hostname), its ranks meeting through a headless Service.",
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=r"^[a-z0-9.\-]+/[a-z0-9.\-]+$",
        description="Extended resource name of the GPUs, for example nvidia.com/gpu or amd.com/gpu.",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit per pod, for example '8' or '500m'.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit per pod, for example '64Gi'.")
    shm_size: Quantity = Field(default="8Gi", description="Size of the memory-backed /dev/shm used by data loaders and NCCL.")
    scratch_size: Quantity | None = Field(
        default=None,
        description="Size limit of the scratch volume (the Hugging Face download cache, local checkpoints, the merged model). "
        "Unset: room for the base model's weights twice over (16-bit) plus a margin and 20Gi, when the preparation step read "
        "the model's size, else 200Gi. A trainer that fills it fails with reason DiskFull naming this field.",
    )
    tmp_size: Quantity = Field(default="10Gi", description="Size limit of the /tmp volume (temporary files of the libraries).")
    ephemeral_storage: Quantity | None = Field(
        default=None,
        description="Ephemeral storage requested and limited per pod, so that the scheduler only picks a node with that much local disk. "
        "Unset requests none; the scratch and /tmp volumes are bounded by scratchSize and tmpSize either way.",
    )
    node_selector: dict[str, ShortString] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 32},
        description="Node labels the trainer pods must match.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Extra tolerations. The GPU taint (<gpuResourceName>:NoSchedule) is tolerated automatically when gpus > 0.",
    )
    affinity: Affinity | None = Field(default=None, description="Node affinity of the trainer pods.")
    priority_class_name: str | None = Field(default=None, max_length=253, pattern=K8S_NAME_PATTERN, description="PriorityClass of the trainer pods.")
    image: str | None = Field(default=None, max_length=1024, description="Trainer image to use instead of the operator's default.")
    gpu_memory: Quantity | None = Field(
        default=None,
        description=(
            "Memory of one GPU, for example '80Gi', used by the memory estimate and spec.training.autoFit. Unset: the "
            "nvidia.com/gpu.memory label (MiB) that NVIDIA's GPU feature discovery puts on GPU nodes, else the operator's default."
        ),
    )
