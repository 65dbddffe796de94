"""Fused GPU kernels (Liger's Triton RMSNorm, SwiGLU, RoPE and linear cross entropy) where they pay.

``spec.training.fusedKernels: auto`` turns them on only for a CUDA device, a model type Liger
patches, and a trainer image that has the ``liger-kernel`` package (the ``kernels`` extra: it needs
Triton, which GPU builds of torch bring and CPU builds lack). Anything else keeps the model's own
layers and ``loss.chunked_cross_entropy``. Liger patches the model instance in place: its norms,
MLPs and rotary embedding run fused kernels, and the loss comes from ``fused_linear_cross_entropy``,
which never materialises the logits.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from kubetune_api.recipe import FusedKernels
from kubetune_trainer import logs

LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "granite", "olmo2"})
"""config.model_type values Liger patches (RMSNorm, SwiGLU/GeGLU and RoPE) and whose head is a plain linear layer."""

FusedLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(head weight, hidden states [tokens, hidden], targets [tokens]) -> mean cross entropy over targets != -100."""


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def use_fused_kernels(setting: FusedKernels, *, device: torch.device, model_type: str | None, installed: bool) -> bool:
    """Whether the run uses Liger's kernels: ``auto`` on CUDA, for a supported model, with the package installed."""
    return setting is FusedKernels.AUTO and device.type == "cuda" and installed and model_type in LIGER_MODEL_TYPES


def apply_fused_kernels(base: Any, setting: FusedKernels, device: torch.device) -> FusedLoss | None:
    """Patch ``base`` (a transformers model, before peft wraps it) with Liger's kernels when ``setting`` allows;
    returns the fused linear cross entropy to use for the loss, or None to keep the chunked one."""
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if not use_fused_kernels(setting, device=device, model_type=model_type, installed=liger_installed()):
        return None
    transformers_api: Any = importlib.import_module("liger_kernel.transformers")
    try:
        # The loss is computed by LossModel (below); Liger's patched forward of the whole model is not used.
        transformers_api._apply_liger_kernel_to_instance(
            model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
        )
    except (TypeError, ValueError, AttributeError, ImportError) as error:
        # A Liger release that does not know this transformers version: train with the model's own layers.
        logs.event("fused kernels not applied", level=30, model_type=model_type, error=str(error))
        return None
    loss: Any = transformers_api.LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")
    logs.event("fused kernels applied", model_type=model_type, kernels="rms_norm,swiglu,rope,fused_linear_cross_entropy")

    def fused(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value: torch.Tensor = loss(weight, hidden, targets)
        return value

    return fused
