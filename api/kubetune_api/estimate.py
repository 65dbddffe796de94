"""GPU memory of one training process, estimated from the model's config.json and the recipe (no torch).

The model is this trainer as it runs (kubetune_trainer.model, loss, training), not a textbook:

- The frozen base stays in its load dtype (no fp32 upcast of norms, embeddings or the head). QLoRA
  quantizes every linear layer but the output head with bitsandbytes: 4-bit weights pack two to a
  byte with one absmax per 64 weights (fp32, or with double quantization one byte plus an fp32 absmax
  per 256 of those, and a 256-entry code), 8-bit weights keep one fp32 scale per output row.
- peft keeps the adapters in fp32 (it upcasts bf16/fp16 adapters, ``autocast_adapter_dtype``); their
  gradients and AdamW's two moments are fp32 too. bitsandbytes' 8-bit optimizers keep one byte per
  moment and an fp32 absmax per 256 values for tensors of at least 4,096 values, 32-bit moments below.
  Paged optimizers put their states in CUDA unified memory, which the driver may move to the host.
- Activations: what autograd saves in a Llama-style decoder layer with adapters (RMSNorm keeps an fp32
  copy of its input; each adapted layer's dropout keeps its mask and output; attention keeps q, k, v,
  its output and the log-sum-exp; the gated MLP keeps three intermediate tensors). With gradient
  checkpointing only each layer's input is kept and one layer is recomputed at a time. With
  offloadActivations (and checkpointing) those inputs wait in host memory; the GPU holds the layer
  being computed and the next one in transfer.
- The loss (``LossModel``): above 256 MiB of fp32 logits per micro-batch the cross entropy runs in
  chunks of 1,024 tokens recomputed in the backward pass; below, the model's own loss holds the logits.

``estimate`` gives the breakdown; ``kubetune_api.fit`` picks a micro-batch that fits a GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from kubetune_api.recipe import ALL_LINEAR, Method, Optimizer, Precision, TrainingRecipe
from kubetune_api.schema import ApiModel

GIB = 1024**3
MIB = 1024**2
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-style decoder layer, the names peft's targetModules match."""
BLOCK_4BIT = 64
NESTED_BLOCK = 256
CODE_ENTRIES = 256
NF4_ENTRIES = 16
OPTIMIZER_BLOCK = 256
MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps 32-bit optimizer states for tensors smaller than this."""
CHUNK_TOKENS = 1024
CHUNK_ABOVE_BYTES = 256 * MIB
"""The same thresholds as kubetune_trainer.loss."""
CUDA_CONTEXT_BYTES = 512 * MIB
"""The CUDA context and kernels of one process: on the GPU, outside torch's allocator."""
ADAPTER_BYTES = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class ModelShapeError(ValueError):
    """config.json lacks what the estimate needs; the message names the key."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder-only transformer, as config.json states them."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = ""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read a Hugging Face config.json (Llama, Mistral, Qwen2/3 and others of that shape)."""
        data = dict(config.get("text_config") or config)

        def need(key: str) -> int:
            value = data.get(key)
            if not isinstance(value, int) or value <= 0:
                raise ModelShapeError(f"config.json has no positive integer '{key}': the memory estimate needs a Llama-style decoder config")
            return value

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(
            hidden_size=hidden,
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=int(data.get("num_key_value_heads") or heads),
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            head_dim=int(data.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", data.get("model_type") == "qwen2")),
            model_type=str(data.get("model_type") or ""),
        )

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def parameters(self) -> int:
        linear = sum(a * b for a, b in self.linear_layers().values()) * self.num_hidden_layers
        return linear + self._embedding_parameters + self._norm_parameters + self._bias_parameters

    @property
    def _embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def _norm_parameters(self) -> int:
        return (2 * self.num_hidden_layers + 1) * self.hidden_size

    @property
    def _bias_parameters(self) -> int:
        if not self.attention_bias:
            return 0
        layers = self.linear_layers()
        return self.num_hidden_layers * sum(layers[name][1] for name in ("q_proj", "k_proj", "v_proj"))


class MemoryBreakdown(ApiModel):
    """Estimated GPU memory of one training process, in bytes."""

    quantized_weights: int = Field(ge=0, description="Quantized linear weights of the base model (0 without quantization).")
    quantization_constants: int = Field(ge=0, description="bitsandbytes scales of the quantized weights (absmax, codes).")
    base_weights: int = Field(
        ge=0, description="Weights kept in the compute dtype: every weight for lora; embeddings, output head, norms and biases for qlora."
    )
    lora_parameters: int = Field(ge=0, description="The trainable adapter matrices (fp32).")
    gradients: int = Field(ge=0, description="Gradients of the adapters (and DDP's bucket copy with several GPUs).")
    optimizer_states: int = Field(ge=0, description="Optimizer moments of the adapters.")
    paged_optimizer_states: int = Field(default=0, ge=0, description="The part of optimizerStates in unified memory (paged optimizers), evictable to the host.")
    activations: int = Field(ge=0, description="Tensors saved for the backward pass at its start, plus the layer being recomputed with checkpointing.")
    logits: int = Field(ge=0, description="Logits and loss at their peak: one 1,024-token chunk with the chunked loss, the whole micro-batch without.")
    overhead: int = Field(ge=0, description="Transients of the backward pass (activation gradients, dequantized weights) and the CUDA context.")
    total: int = Field(ge=0, description="The sum: the GPU memory one training process needs at its peak.")

    @property
    def allocated_peak(self) -> int:
        """What torch.cuda.max_memory_allocated would show: the total less the CUDA context and unified memory."""
        return self.total - CUDA_CONTEXT_BYTES - self.paged_optimizer_states

    def rows(self) -> list[tuple[str, int]]:
        """(label, bytes) for a table, in breakdown order."""
        return [
            ("quantized weights", self.quantized_weights),
            ("quantization constants", self.quantization_constants),
            ("base weights (unquantized)", self.base_weights),
            ("LoRA parameters", self.lora_parameters),
            ("gradients", self.gradients),
            ("optimizer states", self.optimizer_states),
            ("activations", self.activations),
            ("logits / loss", self.logits),
            ("overhead", self.overhead),
            ("total", self.total),
        ]


@dataclass(frozen=True)
class EstimateInput:
    """Everything that decides the memory of one training process."""

    shape: ModelShape
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    compute_bytes: int = 2
    """Bytes per element of the base model's unquantized weights and activations (bf16/fp16: 2, fp32: 4)."""
    quant_bits: int | None = None
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    lora_dropout: bool = True
    optimizer: Optimizer = Optimizer.ADAMW
    gpus: int = 1
    sharded: bool = False
    """Weights, gradients and optimizer states split across the GPUs (FSDP) instead of replicated (DDP)."""
    chunked_loss: bool = True
    """kubetune's LossModel (chunked above 256 MiB of logits); False: the model's own loss over all logits."""
    offload_activations: bool = False
    """Saved activations kept in pinned host memory between the forward and the backward pass (kubetune_trainer.offload)."""
    fp32_unquantized: bool = False
    """QLoRA with the unquantized weights upcast to fp32, as peft's prepare_model_for_kbit_training does (kubetune does not)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def targeted(shape: ModelShape, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """The linear layers of one decoder layer that get adapters; unknown names raise with the known ones."""
    layers = shape.linear_layers()
    if ALL_LINEAR in targets:
        return layers
    unknown = [t for t in targets if t not in layers]
    if unknown:
        raise ModelShapeError(f"spec.lora.targetModules: {', '.join(unknown)} not in this model's linear layers ({', '.join(layers)}) or '{ALL_LINEAR}'")
    return {name: layers[name] for name in targets}


def lora_parameter_count(shape: ModelShape, r: int, targets: tuple[str, ...]) -> tuple[int, int]:
    """(parameters, tensors) of the adapters: A is r x in, B is out x r, in every decoder layer."""
    layers = targeted(shape, targets)
    per_layer = sum(r * (a + b) for a, b in layers.values())
    return per_layer * shape.num_hidden_layers, 2 * len(layers) * shape.num_hidden_layers


def quantized_bytes(numel: int, out_features: int, bits: int, double_quant: bool) -> tuple[int, int]:
    """(weight bytes, constant bytes) of one linear weight quantized by bitsandbytes."""
    if bits == 8:
        return numel, 4 * out_features
    blocks = math.ceil(numel / BLOCK_4BIT)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 * CODE_ENTRIES + 4
    else:
        constants = 4 * blocks
    return math.ceil(numel / 2), constants + 4 * NF4_ENTRIES


def weight_bytes(inputs: EstimateInput) -> tuple[int, int, int]:
    """(quantized, constants, unquantized) bytes of the frozen base model on one GPU."""
    shape, p = inputs.shape, inputs.compute_bytes
    plain = (shape._embedding_parameters + shape._norm_parameters + shape._bias_parameters) * p
    linear = shape.linear_layers()
    if inputs.quant_bits is None:
        return 0, 0, plain + sum(a * b for a, b in linear.values()) * shape.num_hidden_layers * p
    if inputs.fp32_unquantized:
        plain = plain * 4 // p
    quantized = constants = 0
    for a, b in linear.values():
        weights, scales = quantized_bytes(a * b, b, inputs.quant_bits, inputs.double_quant)
        quantized += weights * shape.num_hidden_layers
        constants += scales * shape.num_hidden_layers
    return quantized, constants, plain


def optimizer_bytes(inputs: EstimateInput) -> int:
    """Optimizer states of the adapters, tensor by tensor (bitsandbytes decides 8-bit or 32-bit per tensor)."""
    shape, r = inputs.shape, inputs.lora_r
    sizes: list[int] = []
    for a, b in targeted(shape, inputs.lora_targets).values():
        sizes += [r * a, r * b]
    sizes *= shape.num_hidden_layers
    kind = inputs.optimizer
    if kind is Optimizer.SGD:
        return sum(sizes) * ADAPTER_BYTES
    if kind in (Optimizer.ADAMW, Optimizer.PAGED_ADAMW):
        # torch's AdamW also keeps a one-element fp32 step per tensor.
        return sum(2 * ADAPTER_BYTES * n + 4 for n in sizes)
    total = 2 * 4 * CODE_ENTRIES
    for n in sizes:
        total += 2 * n + 2 * 4 * math.ceil(n / OPTIMIZER_BLOCK) if n >= MIN_8BIT_SIZE else 2 * ADAPTER_BYTES * n
    return total


def layer_activation_bytes(inputs: EstimateInput) -> int:
    """Bytes one decoder layer saves for the backward pass over a micro-batch."""
    shape, t, p, r = inputs.shape, inputs.tokens, inputs.compute_bytes, inputs.lora_r
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    # Two RMSNorms, each keeping an fp32 copy of its input and the inverse root.
    total = 2 * t * (4 * h + 4)
    # Attention (sdpa): rotated q and k, v, the output and the log-sum-exp per head.
    total += t * (2 * q + 2 * kv) * p + t * shape.num_attention_heads * 4
    # Gated MLP: the gate and up projections and SiLU(gate).
    total += 3 * t * i * p
    for a, _ in targeted(shape, inputs.lora_targets).values():
        # peft casts each adapted layer's input to the adapters' fp32 and autocast casts it back for lora_A, which
        # saves that copy (one per adapted layer, never shared); dropout adds its mask (one byte an element).
        total += t * a * (p + (1 if inputs.lora_dropout else 0))
        total += t * r * ADAPTER_BYTES  # lora_A's output, lora_B's input
    return total


def loss_bytes(inputs: EstimateInput) -> tuple[int, bool]:
    """(bytes at the loss's peak, chunked?) as kubetune_trainer.loss computes it."""
    shape, t, p = inputs.shape, inputs.tokens, inputs.compute_bytes
    vocab = shape.vocab_size
    if not inputs.chunked_loss or t * vocab * 4 <= CHUNK_ABOVE_BYTES:
        # The model's own loss: logits in the compute dtype, their fp32 copy, log-softmax and its gradient.
        return t * vocab * (p + 12), False
    chunk = min(CHUNK_TOKENS, t)
    # One chunk's logits (compute dtype, fp32, log-softmax, gradient) plus the gradient of the final hidden states.
    return chunk * vocab * (p + 12) + t * shape.hidden_size * 4, True


def estimate(inputs: EstimateInput) -> MemoryBreakdown:
    """The memory breakdown of one training process."""
    shape, t, p = inputs.shape, inputs.tokens, inputs.compute_bytes
    h, i, layers = shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers
    quantized, constants, plain = weight_bytes(inputs)
    adapters, _ = lora_parameter_count(shape, inputs.lora_r, inputs.lora_targets)
    lora = adapters * ADAPTER_BYTES
    optimizer = optimizer_bytes(inputs)
    paged = optimizer if inputs.optimizer in (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT) else 0
    gradients = lora * (2 if inputs.gpus > 1 and not inputs.sharded else 1)
    if inputs.sharded and inputs.gpus > 1:
        quantized, constants, plain = (math.ceil(x / inputs.gpus) for x in (quantized, constants, plain))
        lora, gradients, optimizer, paged = (math.ceil(x / inputs.gpus) for x in (lora, gradients, optimizer, paged))
    per_layer = layer_activation_bytes(inputs)
    # The final norm's fp32 input copy and the final hidden states feed the loss.
    tail = t * h * (4 + p)
    # Offloaded, a layer's input is on the GPU only while that layer runs and while the next one's is copied. Without
    # checkpointing every intermediate would go to host memory, which nothing here bounds: no saving is counted then.
    resident_layers = min(layers, 2) if inputs.offload_activations and inputs.gradient_checkpointing else layers
    if inputs.gradient_checkpointing:
        activations = resident_layers * t * h * p + per_layer + tail
    else:
        activations = resident_layers * per_layer + tail
    logits, _ = loss_bytes(inputs)
    # Backward through a layer: activation gradients of the MLP (two intermediate-sized, two hidden-sized) and,
    # for quantized weights, the largest weight dequantized to the compute dtype.
    transient = 2 * t * i * p + 2 * t * h * p
    if inputs.quant_bits is not None:
        transient += max(a * b for a, b in shape.linear_layers().values()) * p
    overhead = transient + CUDA_CONTEXT_BYTES
    parts = [quantized, constants, plain, lora, gradients, optimizer, activations, logits, overhead]
    return MemoryBreakdown(
        quantized_weights=quantized,
        quantization_constants=constants,
        base_weights=plain,
        lora_parameters=lora,
        gradients=gradients,
        optimizer_states=optimizer,
        paged_optimizer_states=paged,
        activations=activations,
        logits=logits,
        overhead=overhead,
        total=sum(parts),
    )


def compute_bytes(recipe: TrainingRecipe, *, gpus: int) -> int:
    """Bytes per element of what the trainer keeps unquantized: the compute dtype (qlora) or the precision (lora)."""
    quant = recipe.effective_quantization()
    if quant is not None:
        return DTYPE_BYTES[quant.compute_dtype.value]
    precision = recipe.training.precision
    if gpus == 0 or precision is Precision.FP32:
        return 4
    return 2


def inputs_for(
    recipe: TrainingRecipe,
    shape: ModelShape,
    *,
    gpus: int,
    micro_batch: int | None = None,
    seq_len: int | None = None,
    gradient_checkpointing: bool | None = None,
    sharded: bool = False,
) -> EstimateInput:
    """The estimate's input for a recipe, with the micro-batch, sequence length or checkpointing overridden."""
    quant = recipe.effective_quantization()
    training = recipe.training
    return EstimateInput(
        shape=shape,
        micro_batch=micro_batch or training.per_device_batch_size,
        seq_len=seq_len or recipe.dataset.max_seq_length,
        gradient_checkpointing=training.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing,
        compute_bytes=compute_bytes(recipe, gpus=gpus),
        quant_bits=quant.bits if quant is not None and recipe.method is Method.QLORA else None,
        double_quant=quant.double_quant if quant is not None else True,
        lora_r=recipe.lora.r,
        lora_targets=tuple(recipe.lora.target_modules),
        lora_dropout=recipe.lora.dropout > 0,
        optimizer=training.optimizer,
        gpus=max(1, gpus),
        sharded=sharded,
        offload_activations=training.offload_activations,
    )


def format_bytes(value: int) -> str:
    """Binary units, as kubectl shows quantities: 1.5Gi, 300Mi."""
    for unit, size in (("Ti", 1024**4), ("Gi", GIB), ("Mi", MIB), ("Ki", 1024)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value}B"
