"""``status.usage``: GPU time of a FinetuneJob over all its attempts, the work lost to restarts, and its estimated cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field

from kubetune_api.schema import ApiModel

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
"""The node label NVIDIA's GPU feature discovery sets to the GPU model, for example NVIDIA-H100-80GB-HBM3."""


class AttemptUsage(ApiModel):
    """GPU time of one trainer pod, and what of its work the next attempt did again."""

    pod: str = Field(max_length=253, description="Name of the trainer pod.")
    node: str | None = Field(default=None, max_length=253, description="Node the pod ran on.")
    gpu_product: str | None = Field(default=None, max_length=253, description=f"The node's {GPU_PRODUCT_LABEL} label: the GPU model the price is looked up by.")
    gpus: int = Field(ge=0, description="GPUs the pod held.")
    seconds: float = Field(ge=0, description="How long its trainer container ran.")
    gpu_seconds: float = Field(ge=0, description="gpus x seconds.")
    first_step: int | None = Field(default=None, ge=0, description="Lowest optimizer step the operator read from this attempt (about where it resumed).")
    reached_step: int | None = Field(default=None, ge=0, description="Highest optimizer step the operator saw this attempt reach.")
    checkpoint_step: int | None = Field(
        default=None, ge=0, description="Step of the newest complete checkpoint this attempt wrote, which the next attempt resumes from."
    )
    redone_steps: int = Field(default=0, ge=0, description="Steps this failed attempt ran after its newest checkpoint: the next attempt runs them again.")
    lost_seconds: float = Field(default=0.0, ge=0, description="Running time of those redone steps.")
    lost_gpu_seconds: float = Field(default=0.0, ge=0, description="gpus x lostSeconds.")
    estimated_cost: float | None = Field(default=None, ge=0, description="gpuSeconds / 3600 x the operator's price per GPU-hour of gpuProduct.")


class Usage(ApiModel):
    """GPU time of the FinetuneJob over all its attempts, from pod timestamps, and the work lost to restarts."""

    gpu_seconds: float = Field(default=0.0, ge=0, description="GPUs x running time, summed over every trainer pod.")
    redone_steps: int = Field(default=0, ge=0, description="Optimizer steps run again after restarts (work after the newest checkpoint of failed attempts).")
    lost_seconds: float = Field(default=0.0, ge=0, description="Running time of the redone steps.")
    lost_gpu_seconds: float = Field(default=0.0, ge=0, description="GPU-seconds lost to restarts (GPUs x lostSeconds).")
    estimated_cost: float | None = Field(
        default=None,
        ge=0,
        description="GPU hours x the price per GPU-hour the operator is given for each pod's GPU product (chart value cost.gpuHourPrices), "
        "summed over the attempts; unset when no price applies.",
    )
    currency: str | None = Field(default=None, max_length=16, description="Currency of estimatedCost, as the chart's cost.currency names it.")
    attempts: list[AttemptUsage] = Field(default_factory=list, max_length=32, description="Per trainer pod, oldest first.")


@dataclass(frozen=True)
class GpuPrices:
    """Price of one GPU-hour by GPU product (the node label), with a default for products not listed."""

    by_product: dict[str, float] = field(default_factory=dict)
    default: float | None = None
    currency: str = "USD"

    def of(self, product: str | None) -> float | None:
        return self.by_product.get(product, self.default) if product else self.default

    @property
    def priced(self) -> bool:
        return bool(self.by_product) or self.default is not None
