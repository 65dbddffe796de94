"""Causal-LM loss without materialising the full logits tensor.

A model's own ``forward(labels=...)`` builds logits for every position over the whole vocabulary
and upcasts them to fp32: for a 128k vocabulary, micro-batch 2 and 2,048 tokens that is 2 GiB, plus
as much again for its gradient, the largest single item of QLoRA's peak memory. ``LossModel``
runs the decoder and computes the cross entropy in
chunks whose logits are recomputed in the backward pass instead of stored, when the logits would be large
(small vocabularies and micro-batches keep the model's own, faster loss). Given an ``ActivationOffload``
it runs the forward pass under its hooks, so what the backward pass needs waits in host memory. It is
an ``nn.Module`` so DistributedDataParallel can wrap it like the model itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kubetune_api.recipe import TrainingSpec
from kubetune_trainer.data.packing import IGNORE_INDEX
from kubetune_trainer.kernels import FusedLoss, apply_fused_kernels
from kubetune_trainer.offload import ActivationOffload

DEFAULT_CHUNK_TOKENS = 1024
CHUNK_ABOVE_BYTES = 256 * 1024**2
"""Chunk only when a micro-batch's fp32 logits would exceed this; below it the model's own loss is faster."""
# Configurations whose forward transforms the logits (soft-capping, scaling): their own loss is used.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def supports_chunked_loss(model: Any) -> bool:
    """True when the model exposes a decoder and an output head whose product is the logits."""
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, name, None) for name in LOGIT_TRANSFORMS):
        return False
    return callable(getattr(base, "get_decoder", None)) and callable(getattr(base, "get_output_embeddings", None)) and base.get_output_embeddings() is not None


def _base_model(model: Any) -> Any:
    """The transformers model under peft's wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean next-token cross entropy of ``head(hidden)`` against ``labels`` (shifted by one, -100 ignored).

    Shapes stay static and the target count stays on the device, so the host never waits for the GPU here.
    """
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, head, states[part], targets[part], use_reentrant=False)
    return total / count


class LossModel(torch.nn.Module):
    """Wraps a causal LM (optionally peft-wrapped); ``forward(**batch)`` returns the mean loss."""

    def __init__(
        self,
        model: Any,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        chunk_above_bytes: int = CHUNK_ABOVE_BYTES,
        offload: ActivationOffload | None = None,
        fused_loss: FusedLoss | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.offload = offload
        self.fused_loss = fused_loss
        self.chunk_tokens = chunk_tokens
        self.chunk_above_bytes = chunk_above_bytes
        self.chunked = supports_chunked_loss(model)
        self.vocab_size = int(getattr(_base_model(model).config, "vocab_size", 0) or 0)

    def forward(self, labels: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        # Evaluation saves nothing for a backward pass, so there is nothing to offload.
        if self.offload is None or not torch.is_grad_enabled():
            return self._loss(labels, inputs)
        with self.offload():
            return self._loss(labels, inputs)

    def _loss(self, labels: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.chunked or labels.numel() * self.vocab_size * 4 <= self.chunk_above_bytes:
            loss: torch.Tensor = self.model(**inputs, labels=labels, use_cache=False).loss
            return loss
        base = _base_model(self.model)
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = base.get_output_embeddings()
        if self.fused_loss is not None and torch.is_grad_enabled() and getattr(head, "bias", None) is None:
            states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            return self.fused_loss(head.weight, states, labels[:, 1:].reshape(-1))
        return chunked_cross_entropy(head, hidden, labels, self.chunk_tokens)


def build_loss_model(model: Any, spec: TrainingSpec, device: torch.device) -> LossModel:
    """The LossModel a run trains: fused kernels and activation offload as ``spec`` (spec.training) asks."""
    fused = apply_fused_kernels(_base_model(model), spec.fused_kernels, device)
    return LossModel(model, offload=ActivationOffload() if spec.offload_activations else None, fused_loss=fused)
