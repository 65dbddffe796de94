"""The estimator's persistent parts equal the summed tensor bytes of the real tiny model loaded by the trainer's code.

Weights per quantization (bitsandbytes 4-bit with and without double quantization, 8-bit, none), the LoRA
adapters and the optimizer states after a real step, counted tensor by tensor (each storage once).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_api.estimate import EstimateInput, ModelShape, estimate, optimizer_bytes
from kubetune_api.recipe import LoraSpec, Optimizer, QuantizationSpec, TrainingSpec
from kubetune_trainer.model import ModelFiles, apply_lora, load_base_model
from kubetune_trainer.training import build_optimizer

# peft calls a transformers name deprecated in v5 on every model wrap (the trainer silences it the same way).
pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


def _bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def measured(model: Any) -> dict[str, int]:
    """Bytes of the quantized weights, their constants, the other frozen weights and the adapters."""
    quantized: list[torch.Tensor] = []
    constants: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    adapters: list[torch.Tensor] = []
    for param in model.parameters():
        kind = type(param).__name__
        if param.requires_grad:
            adapters.append(param)
        elif kind in ("Params4bit", "Int8Params"):
            quantized.append(param)
            state = getattr(param, "quant_state", None)
            if state is not None:
                constants += [state.absmax, state.code]
                if state.nested:
                    constants += [state.state2.absmax, state.state2.code, state.offset]
            scale = getattr(param, "SCB", None)
            if scale is not None:
                constants.append(scale)
        else:
            plain.append(param)
    return {"quantized": _bytes(quantized), "constants": _bytes(constants), "plain": _bytes(plain), "adapters": _bytes(adapters)}


def load(model_dir: Path, quant: QuantizationSpec | None, dtype: str, lora: LoraSpec) -> Any:
    base = load_base_model(ModelFiles(str(model_dir), None, None), dtype_name=dtype, quantization=quant, device="cpu", trust_remote_code=False)
    return apply_lora(base, lora, gradient_checkpointing=False)


CASES = [
    pytest.param(None, "float32", id="lora-fp32"),
    pytest.param(None, "bfloat16", id="lora-bf16"),
    pytest.param(QuantizationSpec(bits=4), "bfloat16", id="qlora-nf4-double-quant"),
    pytest.param(QuantizationSpec(bits=4, double_quant=False), "bfloat16", id="qlora-nf4"),
    pytest.param(QuantizationSpec(bits=8), "bfloat16", id="qlora-8bit"),
]


@pytest.mark.parametrize(("quant", "dtype"), CASES)
def test_weights_and_adapters_match_the_loaded_model(tiny_model_dir: Path, quant: QuantizationSpec | None, dtype: str) -> None:
    lora = LoraSpec(r=8, target_modules=["all-linear"])
    model = load(tiny_model_dir, quant, dtype, lora)
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    breakdown = estimate(
        EstimateInput(
            shape,
            1,
            16,
            False,
            compute_bytes=torch.tensor([], dtype=getattr(torch, dtype)).element_size(),
            quant_bits=quant.bits if quant else None,
            double_quant=quant.double_quant if quant else True,
            lora_r=8,
        )
    )
    found = measured(model)
    assert found == {
        "quantized": breakdown.quantized_weights,
        "constants": breakdown.quantization_constants,
        "plain": breakdown.base_weights,
        "adapters": breakdown.lora_parameters,
    }


def test_adapters_on_some_layers_only(tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir, QuantizationSpec(bits=4), "bfloat16", LoraSpec(r=4, target_modules=["q_proj", "down_proj"]))
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    breakdown = estimate(EstimateInput(shape, 1, 16, False, quant_bits=4, lora_r=4, lora_targets=("q_proj", "down_proj")))
    assert measured(model)["adapters"] == breakdown.lora_parameters


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]
    return _bytes(tensors)


def _one_step(model: Any, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def test_adamw_states_after_a_step(tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir, None, "float32", LoraSpec(r=8))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(TrainingSpec(max_steps=1), params, cuda=False)
    _one_step(model, optimizer)
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    assert _optimizer_state_bytes(optimizer) == optimizer_bytes(EstimateInput(shape, 1, 16, False, lora_r=8))


def test_eight_bit_adamw_states_after_a_step(tiny_model_dir: Path) -> None:
    """bitsandbytes' AdamW8bit on CPU: 8-bit moments for tensors of 4,096 values or more, 32-bit below (r=32 has both)."""
    import bitsandbytes

    model = load(tiny_model_dir, None, "float32", LoraSpec(r=32))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.numel() >= 4096 for p in params} == {True, False}
    optim: Any = bitsandbytes.optim
    optimizer = optim.AdamW8bit(params, lr=1e-3)
    _one_step(model, optimizer)
    shape = ModelShape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    assert _optimizer_state_bytes(optimizer) == optimizer_bytes(EstimateInput(shape, 1, 16, False, lora_r=32, optimizer=Optimizer.ADAMW_8BIT))
