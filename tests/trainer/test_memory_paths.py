"""The memory-saving paths give the gradients of the plain path, and a QLoRA base really is quantized.

Activation offload runs its saved-tensor hooks on the CPU too (host-to-host copies), so a wrong
restore shows here as wrong gradients. The quantized bases are loaded through the trainer's own
``load_base_model`` from the tiny model the tier builds.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_api.recipe import FusedKernels, LoraSpec, QuantizationSpec, QuantType, TrainingSpec
from kubetune_trainer.kernels import apply_fused_kernels, use_fused_kernels
from kubetune_trainer.loss import LossModel, build_loss_model
from kubetune_trainer.model import ModelFiles, apply_lora, load_base_model
from kubetune_trainer.offload import ActivationOffload

pytestmark = [
    pytest.mark.trainer,
    # peft 0.21 still asks transformers 5 for the deprecated name when it wraps a checkpointed model.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_model(model_dir: Path, *, gradient_checkpointing: bool, quantization: QuantizationSpec | None = None) -> Any:
    torch.manual_seed(0)
    files = ModelFiles(path=str(model_dir), revision=None, token=None)
    base = load_base_model(files, dtype_name="float32", quantization=quantization, device="cpu", trust_remote_code=False)
    model = apply_lora(base, LoraSpec(r=4, alpha=8, dropout=0.0), gradient_checkpointing=gradient_checkpointing)
    # peft starts lora_B at zero, which would leave the base's input gradients untouched: give it values.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model.train()
    return model


def batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 40), generator=generator)
    labels = ids.clone()
    labels[:, :6] = -100
    return {"input_ids": ids, "labels": labels}


def gradients(model: Any, loss_model: LossModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_model(**inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_offloaded_activations_give_the_plain_gradients(tiny_model_dir: Path, gradient_checkpointing: bool) -> None:
    model = lora_model(tiny_model_dir, gradient_checkpointing=gradient_checkpointing)
    inputs = batch(model.config.vocab_size)
    # chunk_above_bytes=0: the chunked loss, whose chunks are checkpointed too, runs under the hooks as well.
    plain_loss, plain = gradients(model, LossModel(model, chunk_tokens=16, chunk_above_bytes=0), inputs)
    offload = ActivationOffload(min_bytes=0)
    loss, offloaded = gradients(model, LossModel(model, chunk_tokens=16, chunk_above_bytes=0, offload=offload), inputs)
    assert offload.stats.offloaded_tensors > 0 and offload.stats.offloaded_bytes > 0
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert plain and plain.keys() == offloaded.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(offloaded[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpointing_leaves_the_offload_only_the_layer_inputs(tiny_model_dir: Path) -> None:
    """With checkpointing the hooks see each layer's input, not its intermediates: far fewer bytes leave the device."""
    full = ActivationOffload(min_bytes=0)
    model = lora_model(tiny_model_dir, gradient_checkpointing=False)
    gradients(model, LossModel(model, offload=full), batch(model.config.vocab_size))
    checkpointed = ActivationOffload(min_bytes=0)
    model = lora_model(tiny_model_dir, gradient_checkpointing=True)
    gradients(model, LossModel(model, offload=checkpointed), batch(model.config.vocab_size))
    hidden = model.config.hidden_size
    layer_inputs = model.config.num_hidden_layers * 2 * 40 * hidden * 4
    assert checkpointed.stats.offloaded_bytes >= layer_inputs
    assert checkpointed.stats.offloaded_bytes * 3 < full.stats.offloaded_bytes


def test_the_spec_turns_offload_on_and_fused_kernels_stay_off_on_cpu(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir, gradient_checkpointing=True)
    norms = {name: type(module) for name, module in model.named_modules() if "norm" in name}
    off = build_loss_model(model, TrainingSpec(max_steps=1), torch.device("cpu"))
    on = build_loss_model(model, TrainingSpec(max_steps=1, offload_activations=True), torch.device("cpu"))
    assert off.offload is None and isinstance(on.offload, ActivationOffload)
    assert off.fused_loss is None and on.fused_loss is None
    assert apply_fused_kernels(model.get_base_model(), FusedKernels.AUTO, torch.device("cpu")) is None
    assert {name: type(module) for name, module in model.named_modules() if "norm" in name} == norms


def test_fused_kernels_only_on_cuda_for_supported_models_when_installed() -> None:
    cuda = torch.device("cuda")
    assert use_fused_kernels(FusedKernels.AUTO, device=cuda, model_type="llama", installed=True)
    assert not use_fused_kernels(FusedKernels.OFF, device=cuda, model_type="llama", installed=True)
    assert not use_fused_kernels(FusedKernels.AUTO, device=torch.device("cpu"), model_type="llama", installed=True)
    assert not use_fused_kernels(FusedKernels.AUTO, device=cuda, model_type="llama", installed=False)
    assert not use_fused_kernels(FusedKernels.AUTO, device=cuda, model_type="gpt2", installed=True)


def test_a_fused_loss_replaces_the_chunked_one_in_training_only(tiny_model_dir: Path) -> None:
    """LossModel hands the head weight, hidden states and shifted targets to the fused loss (here the plain maths)."""
    calls: list[int] = []

    def reference(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(targets.numel())
        return torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)

    model = lora_model(tiny_model_dir, gradient_checkpointing=False)
    inputs = batch(model.config.vocab_size)
    _, chunked = gradients(model, LossModel(model, chunk_above_bytes=0), inputs)
    _, fused = gradients(model, LossModel(model, chunk_above_bytes=0, fused_loss=reference), inputs)
    assert calls == [2 * 39]
    for name, grad in chunked.items():
        torch.testing.assert_close(fused[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        LossModel(model, chunk_above_bytes=0, fused_loss=reference)(**inputs)
    assert calls == [2 * 39]


@pytest.mark.parametrize("quant_type", [QuantType.NF4, QuantType.FP4])
def test_a_qlora_base_is_4bit_in_every_adapted_linear_layer(tiny_model_dir: Path, quant_type: QuantType) -> None:
    bnb: Any = importlib.import_module("bitsandbytes")
    model = lora_model(tiny_model_dir, gradient_checkpointing=False, quantization=QuantizationSpec(bits=4, type=quant_type, double_quant=True))
    layers = base_layers(model)
    assert len(layers) == model.config.num_hidden_layers * len(TARGETS)
    for name, layer in layers.items():
        assert isinstance(layer, bnb.nn.Linear4bit), name
        weight: Any = layer.weight
        assert weight.dtype == torch.uint8 and weight.quant_type == quant_type.value, name
        assert weight.quant_state.nested, name
        assert weight.numel() * 2 == layer.in_features * layer.out_features, name
    # The output head stays in the compute dtype (bitsandbytes never quantizes it).
    assert not isinstance(model.get_base_model().lm_head, bnb.nn.Linear4bit)


def test_an_8bit_base_is_int8_in_every_adapted_linear_layer(tiny_model_dir: Path) -> None:
    bnb: Any = importlib.import_module("bitsandbytes")
    model = lora_model(tiny_model_dir, gradient_checkpointing=False, quantization=QuantizationSpec(bits=8))
    layers = base_layers(model)
    assert len(layers) == model.config.num_hidden_layers * len(TARGETS)
    for name, layer in layers.items():
        assert isinstance(layer, bnb.nn.Linear8bitLt), name
        assert layer.weight.dtype == torch.int8 and tuple(layer.weight.shape) == (layer.out_features, layer.in_features), name


def base_layers(model: Any) -> dict[str, torch.nn.Module]:
    """The frozen layer under each LoRA-adapted projection, by module name."""
    return {name: module.base_layer for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS and hasattr(module, "base_layer")}
