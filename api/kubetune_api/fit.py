"""Fit a run to a GPU: the largest micro-batch whose estimated peak leaves the headroom free.

The effective batch (micro-batch x gradient accumulation, per GPU) stays what the spec asks for, so
a fitted run takes the same optimizer steps over the same samples. Gradient checkpointing is turned
on only when no micro-batch fits without it. When nothing fits, the decision says what would: QLoRA,
shorter sequences, or more GPUs with the weights sharded. The operator, the preparation step and
``kubetune estimate`` all decide with ``fit``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from enum import StrEnum

from pydantic import Field

from kubetune_api.estimate import EstimateInput, MemoryBreakdown, ModelShape, estimate, format_bytes, inputs_for
from kubetune_api.recipe import Method, TrainingRecipe
from kubetune_api.schema import ApiModel

DEFAULT_HEADROOM = 0.10
"""Share of the GPU left free for the allocator's fragmentation and what the estimate misses."""
MIB = 1024**2
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_UNITS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1024, "Mi": MIB, "Gi": 1024**3, "Ti": 1024**4}


class GpuMemorySource(StrEnum):
    SPEC = "spec"
    NODE_LABEL = "nodeLabel"
    DEFAULT = "default"


class FitDecision(ApiModel):
    """The settings chosen for a GPU of a given size, and why."""

    fits: bool = Field(description="True when the chosen settings fit the GPU with the headroom left free.")
    gpu_memory_bytes: int = Field(ge=0, description="Memory of one GPU the decision was made for.")
    gpu_memory_source: GpuMemorySource = Field(
        description="Where that figure came from: spec (spec.resources.gpuMemory), nodeLabel (nvidia.com/gpu.memory) or default (the operator's setting)."
    )
    usable_bytes: int = Field(ge=0, description="The GPU memory less the headroom: what the estimate must stay under.")
    micro_batch: int = Field(ge=1, description="Sequences per GPU per micro-batch (perDeviceBatchSize) chosen.")
    gradient_accumulation_steps: int = Field(ge=1, description="Micro-batches per optimizer step chosen, keeping the effective batch.")
    gradient_checkpointing: bool = Field(description="Whether gradient checkpointing is on.")
    estimate: MemoryBreakdown = Field(description="The estimate for the chosen settings (the smallest tried when nothing fits).")
    suggestions: list[str] = Field(default_factory=list, max_length=8, description="What would fit, when nothing does.")
    message: str = Field(default="", max_length=2048, description="The decision in one sentence.")


def parse_quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity such as '80Gi' or '141G'; raises ValueError naming the accepted forms."""
    found = _QUANTITY.match(text.strip())
    if found is None:
        raise ValueError(f"{text!r} is not a memory quantity: use a number with an optional unit, for example 80Gi, 24Gi or 141G")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _fits(inputs: EstimateInput, usable: int) -> tuple[bool, MemoryBreakdown]:
    breakdown = estimate(inputs)
    return breakdown.total <= usable, breakdown


def choose(base: EstimateInput, effective_batch: int, usable: int) -> tuple[EstimateInput, MemoryBreakdown] | None:
    """The largest micro-batch dividing the effective batch that fits, without checkpointing if any does."""
    for checkpointing in (False, True):
        for micro in divisors_descending(effective_batch):
            candidate = replace(base, micro_batch=micro, gradient_checkpointing=checkpointing)
            ok, breakdown = _fits(candidate, usable)
            if ok:
                return candidate, breakdown
    return None


def fit(
    recipe: TrainingRecipe,
    shape: ModelShape,
    *,
    gpus: int,
    gpu_memory: int,
    source: GpuMemorySource,
    headroom: float = DEFAULT_HEADROOM,
    seq_len: int | None = None,
    auto: bool = True,
) -> FitDecision:
    """Decide the micro-batch, accumulation and checkpointing for ``gpus`` GPUs of ``gpu_memory`` bytes each.

    ``auto`` False checks the spec's own settings and changes nothing. ``seq_len`` is the longest
    sequence the data yields (maxSeqLength when unknown).
    """
    training = recipe.training
    effective = training.per_device_batch_size * training.gradient_accumulation_steps
    usable = int(gpu_memory * (1 - headroom))
    given = inputs_for(recipe, shape, gpus=gpus, seq_len=seq_len)
    where = f"{format_bytes(usable)} usable of a {format_bytes(gpu_memory)} GPU ({source.value})"
    if not auto:
        ok, breakdown = _fits(given, usable)
        verdict = "fits" if ok else "does not fit"
        text = f"the spec's settings need {format_bytes(breakdown.total)}: {verdict} {where}"
        return _decision(ok, given, effective, breakdown, gpu_memory, source, usable, [], text)
    chosen = choose(given, effective, usable)
    if chosen is not None:
        inputs, breakdown = chosen
        text = (
            f"micro-batch {inputs.micro_batch} x {effective // inputs.micro_batch} accumulation steps"
            f"{' with' if inputs.gradient_checkpointing else ' without'} gradient checkpointing needs {format_bytes(breakdown.total)}: fits {where}"
        )
        return _decision(True, inputs, effective, breakdown, gpu_memory, source, usable, [], text)
    smallest = replace(given, micro_batch=1, gradient_checkpointing=True)
    breakdown = estimate(smallest)
    text = f"even micro-batch 1 with gradient checkpointing needs {format_bytes(breakdown.total)}: more than {where}"
    return _decision(False, smallest, effective, breakdown, gpu_memory, source, usable, suggestions(recipe, shape, smallest, effective, usable), text)


def suggestions(recipe: TrainingRecipe, shape: ModelShape, smallest: EstimateInput, effective: int, usable: int) -> list[str]:
    """Changes that would make the run fit, each checked with the estimate."""
    found: list[str] = []
    if recipe.method is Method.LORA:
        for bits in (8, 4):
            qlora = replace(smallest, quant_bits=bits, double_quant=True, compute_bytes=2)
            chosen = choose(qlora, effective, usable)
            if chosen is not None:
                found.append(f"method: qlora with quantization.bits {bits} fits at micro-batch {chosen[0].micro_batch} ({format_bytes(chosen[1].total)})")
                break
    length = smallest.seq_len // 2
    while length >= 128:
        shorter = choose(replace(smallest, seq_len=length), effective, usable)
        if shorter is not None:
            found.append(f"spec.dataset.maxSeqLength: {length} fits at micro-batch {shorter[0].micro_batch} ({format_bytes(shorter[1].total)})")
            break
        length //= 2
    gpus = 2
    while gpus <= 64:
        sharded = choose(replace(smallest, gpus=gpus, sharded=True), effective, usable)
        if sharded is not None:
            found.append(f"{gpus} GPUs with the weights, gradients and optimizer states sharded (FSDP) fit at {format_bytes(sharded[1].total)} per GPU")
            break
        gpus *= 2
    if not found:
        found.append("a GPU with more memory: no setting tried fits this one")
    return found


def _decision(
    ok: bool,
    inputs: EstimateInput,
    effective: int,
    breakdown: MemoryBreakdown,
    gpu_memory: int,
    source: GpuMemorySource,
    usable: int,
    advice: list[str],
    text: str,
) -> FitDecision:
    return FitDecision(
        fits=ok,
        gpu_memory_bytes=gpu_memory,
        gpu_memory_source=source,
        usable_bytes=usable,
        micro_batch=inputs.micro_batch,
        gradient_accumulation_steps=max(1, effective // inputs.micro_batch),
        gradient_checkpointing=inputs.gradient_checkpointing,
        estimate=breakdown,
        suggestions=advice,
        message=text,
    )


def training_overrides(decision: FitDecision) -> dict[str, object]:
    """The spec.training fields a fitted run overrides, by their Python names."""
    return {
        "per_device_batch_size": decision.micro_batch,
        "gradient_accumulation_steps": decision.gradient_accumulation_steps,
        "gradient_checkpointing": decision.gradient_checkpointing,
    }


__all__ = ["DEFAULT_HEADROOM", "FitDecision", "GpuMemorySource", "ModelShape", "choose", "fit", "parse_quantity", "training_overrides"]
