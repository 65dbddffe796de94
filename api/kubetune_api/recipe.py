"""The recipe: what to fine-tune, on what data, how, and where the result goes.

These models are the training part of the FinetuneJob API: the operator embeds them in the
FinetuneJob spec (and so in the generated CRD) and renders them, with a ``RuntimeConfig``, into the
ConfigMap the trainer reads. Field descriptions become the CRD's ``kubectl explain`` text; CEL rules
and their Python twins share the texts in ``messages``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict

from kubetune_api.dataset import DatasetSpec
from kubetune_api.messages import message
from kubetune_api.output import OutputSpec, SecretKeyRef
from kubetune_api.quality import DivergenceSpec, EvaluationSpec
from kubetune_api.schema import K8S_NAME_PATTERN, ApiModel, cel, check_source, source_rules, validations

ALL_LINEAR = "all-linear"


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "Where the base model comes from: a Hugging Face model id such as "
            "'meta-llama/Llama-3.1-8B', an 's3://bucket/prefix/' holding a saved model (read with "
            "spec.output's endpoint and credentials), or an absolute local path (for example a "
            "mounted PVC, see cacheVolumeClaim)."
        ),
        json_schema_extra=source_rules("spec.model.source"),
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        description="Git revision (branch, tag or commit) of a Hugging Face model. Pin a commit for reproducible runs.",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a Hugging Face token, for gated or private models. Passed to the trainer as HF_TOKEN.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow model code shipped with the model repository to run. Leave false unless you trust its authors.",
    )
    cache_volume_claim: str | None = Field(
        default=None,
        max_length=253,
        pattern=K8S_NAME_PATTERN,
        description="Name of a PersistentVolumeClaim mounted at /models and used as the model download cache, so restarts do not download again.",
    )

    @field_validator("source")
    @classmethod
    def _check_source(cls, source: str) -> str:
        return check_source(source, "spec.model.source")


class LoraBias(StrEnum):
    NONE = "none"
    ALL = "all"
    LORA_ONLY = "lora_only"


class LoraSpec(ApiModel):
    """Low-rank adapter settings (peft LoraConfig)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator: updates are scaled by alpha/r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout applied to the adapter input during training.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: [ALL_LINEAR],
        min_length=1,
        max_length=64,
        description=(
            "Module names that get adapters, for example ['q_proj', 'v_proj'], or ['all-linear'] for "
            "every linear layer except the output head. Unknown names fail the job with the model's list of linear layers."
        ),
    )
    bias: LoraBias = Field(default=LoraBias.NONE, description="Which biases are trained: none, all, or lora_only.")
    use_rslora: bool = Field(default=False, description="Use rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")


class QuantType(StrEnum):
    NF4 = "nf4"
    FP4 = "fp4"


class ComputeDtype(StrEnum):
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class QuantizationSpec(ApiModel):
    """Quantization of the frozen base model for QLoRA (bitsandbytes)."""

    bits: Literal[4, 8] = Field(default=4, description="Bits per base-model weight: 4 (QLoRA) or 8 (LLM.int8).")
    type: QuantType = Field(default=QuantType.NF4, description="4-bit data type: nf4 (normal float, recommended) or fp4.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too, saving about 0.4 bits per weight.")
    compute_dtype: ComputeDtype = Field(
        default=ComputeDtype.BFLOAT16,
        description="Data type of matrix products with the dequantized weights. Use float16 on GPUs without bfloat16.",
    )


class Method(StrEnum):
    LORA = "lora"
    QLORA = "qlora"


class Scheduler(StrEnum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


class Precision(StrEnum):
    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw_8bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADAMW = "paged_adamw"
    SGD = "sgd"


class FusedKernels(StrEnum):
    AUTO = "auto"
    OFF = "off"


class Sharding(StrEnum):
    NONE = "none"
    FSDP = "fsdp"


class TrainingSpec(ApiModel):
    """Optimisation settings. Set exactly one of epochs or maxSteps."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.epochs) != has(self.maxSteps)",
                message("training.one_of"),
            ),
            cel(
                "!has(self.warmupSteps) || !has(self.maxSteps) || self.warmupSteps < self.maxSteps",
                message("training.warmup"),
            ),
        )
    )

    epochs: float | None = Field(default=None, gt=0, le=1000, description="Passes over the training data (may be fractional). Exclusive with maxSteps.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run. Exclusive with epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Scheduler = Field(default=Scheduler.COSINE, description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warmup from 0 to the peak learning rate.")
    per_device_batch_size: int = Field(default=4, ge=1, le=4096, description="Sequences per device per micro-batch.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step.")
    gradient_checkpointing: bool = Field(default=True, description="Recompute activations in the backward pass: much less memory, about 30% more compute.")
    offload_activations: bool = Field(
        default=False,
        description=(
            "Keep the activations saved for the backward pass (with gradientCheckpointing: each layer's input) in pinned host "
            "memory instead of on the GPU, copied on a side stream that overlaps compute. Saves about layers x micro-batch x "
            "sequence length x hidden size x 2 bytes of GPU memory (1 GiB for an 8B model at micro-batch 2 and 2,048 tokens) "
            "for some PCIe traffic; needs that much free host memory per GPU. Runs on CPU too, where it saves nothing."
        ),
    )
    fused_kernels: FusedKernels = Field(
        default=FusedKernels.AUTO,
        description=(
            "auto uses Liger's fused Triton kernels (RMSNorm, SwiGLU, RoPE and a linear cross entropy that never holds the "
            "logits) on CUDA GPUs when the trainer image has the liger-kernel package and the model is one Liger supports; "
            "off keeps the model's own layers and kubetune's chunked loss. CPU runs never use them."
        ),
    )
    auto_fit: bool = Field(
        default=False,
        description=(
            "Fit the run to the GPU before it starts: the preparation step estimates GPU memory from the model's config.json and "
            "picks the largest perDeviceBatchSize that fits (keeping perDeviceBatchSize x gradientAccumulationSteps as the effective "
            "batch) and turns on gradientCheckpointing only if needed. The GPU size comes from spec.resources.gpuMemory, else the "
            "nvidia.com/gpu.memory label of the GPU nodes, else the operator's default. When nothing fits the job fails with reason "
            "DoesNotFit, the estimate and what would fit, before any GPU is requested. Ignored on CPU (gpus: 0)."
        ),
    )
    precision: Precision = Field(
        default=Precision.AUTO,
        description="Training precision. auto picks bf16 on GPUs that support it, else fp16 on GPUs, and fp32 on CPU.",
    )
    optimizer: Optimizer = Field(
        default=Optimizer.ADAMW,
        description="Optimizer: adamw, adamw_8bit, paged_adamw_8bit (bitsandbytes; least memory), paged_adamw, or sgd.",
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="Decoupled weight decay of the adapter weights.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Clip the global gradient norm to this value; 0 disables clipping.")
    sharding: Sharding = Field(
        default=Sharding.NONE,
        description=(
            "How the processes of a multi-GPU run share the model. none: every GPU holds the whole model (data parallel, DDP). "
            "fsdp: each GPU holds 1/N of the base weights, gathered layer by layer as they are used (FSDP2), for base models "
            "larger than one GPU; with qlora the 4-bit weights are stored in the compute dtype so every shard is alike. "
            "Checkpoints gather the adapter and optimizer state and resume on the same number of processes. Ignored with one process."
        ),
    )
    seed: int = Field(default=42, ge=0, description="Seed for initialisation, shuffling and dropout.")
    checkpoint_every: int = Field(
        default=100,
        ge=1,
        description="Save and upload a resumable checkpoint every this many optimizer steps (and always on SIGTERM).",
    )
    eval_every: int | None = Field(default=None, ge=1, description="Evaluate every this many steps; requires spec.dataset.eval.")
    log_every: int = Field(default=10, ge=1, description="Log progress and update metrics every this many steps.")
    divergence: DivergenceSpec = Field(
        default_factory=DivergenceSpec, description="When a finite loss that runs away counts as divergence, and whether the run then stops."
    )


RECIPE_RULES: list[JsonDict] = [
    cel(
        "!has(self.quantization) || self.method == 'qlora'",
        message("quantization.method"),
    ),
    cel(
        "!has(self.training.evalEvery) || has(self.dataset.eval)",
        message("training.eval_every"),
    ),
    cel(
        "!has(self.evaluation) || has(self.dataset.eval)",
        message("evaluation.eval"),
    ),
]
"""CEL twins of ``cross_field_errors``, attached to every schema that embeds a recipe."""


class TrainingRecipe(ApiModel):
    """What to train and how: the part of a FinetuneJob spec that the trainer consumes."""

    model_config = ConfigDict(json_schema_extra=validations(*RECIPE_RULES))

    model: ModelSpec = Field(description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(description="The training data and how records become token sequences.")
    method: Method = Field(
        default=Method.LORA,
        description="lora trains adapters on a bf16/fp16/fp32 base model; qlora quantizes the frozen base model (see quantization).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings.")
    quantization: QuantizationSpec | None = Field(
        default=None,
        description="Base-model quantization, only with method qlora. Defaults to 4-bit nf4 with double quantization.",
    )
    training: TrainingSpec = Field(description="Optimisation settings.")
    output: OutputSpec = Field(description="Where the adapter and checkpoints go (S3).")
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="A gate on the eval loss (needs spec.dataset.eval): an adapter that fails it is kept as a rejected candidate, not published.",
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> TrainingRecipe:
        errors = cross_field_errors(self)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def effective_quantization(self) -> QuantizationSpec | None:
        """Quantization in force: the given settings for qlora (defaults if unset), none for lora."""
        if self.method is Method.QLORA:
            return self.quantization or QuantizationSpec()
        return None


def cross_field_errors(config: TrainingRecipe) -> list[str]:
    """Rules that span fields; the CRD states the same rules in CEL so the apiserver rejects them first."""
    errors: list[str] = []
    training = config.training
    if (training.epochs is None) == (training.max_steps is None):
        errors.append(message("training.one_of"))
    if training.max_steps is not None and training.warmup_steps >= training.max_steps:
        errors.append(message("training.warmup"))
    if config.quantization is not None and config.method is not Method.QLORA:
        errors.append(message("quantization.method"))
    if training.eval_every is not None and config.dataset.eval is None:
        errors.append(message("training.eval_every"))
    if config.evaluation is not None and config.dataset.eval is None:
        errors.append(message("evaluation.eval"))
    if config.dataset.eval is not None and (config.dataset.eval.ratio is None) == (config.dataset.eval.source is None):
        errors.append(message("dataset.eval.one_of"))
    return errors
