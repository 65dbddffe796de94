"""The memory estimator and the fit decision, on the shape of a real 8B config.json (no torch)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kubetune_api.estimate import EstimateInput, ModelShape, ModelShapeError, estimate, inputs_for, lora_parameter_count, optimizer_bytes
from kubetune_api.fit import GpuMemorySource, fit, parse_quantity
from kubetune_api.recipe import Optimizer, TrainingRecipe

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parents[1] / "fixtures"
GI = 1024**3


def shape_8b() -> ModelShape:
    return ModelShape.from_config(json.loads((FIXTURES / "llama-8b" / "config.json").read_text()))


def recipe(**training: object) -> TrainingRecipe:
    return TrainingRecipe.model_validate(
        {
            "model": {"source": "meta-llama/Llama-3.1-8B"},
            "dataset": {"source": "s3://data/train.jsonl", "maxSeqLength": 2048},
            "training": {"maxSteps": 10, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 4, **training},
            "output": {"bucket": "adapters"},
        }
    )


def test_the_8b_shape_has_the_published_parameter_count() -> None:
    assert shape_8b().parameters == 8_030_261_248


def test_the_8b_adapters_at_rank_16_on_every_linear_layer_have_peft_s_count() -> None:
    """peft's print_trainable_parameters shows 41,943,040 for Llama-3-8B, r=16, all linear layers."""
    assert lora_parameter_count(shape_8b(), 16, ("all-linear",))[0] == 41_943_040


def test_a_config_without_a_dimension_names_the_missing_key() -> None:
    config = json.loads((FIXTURES / "llama-8b" / "config.json").read_text())
    del config["intermediate_size"]
    with pytest.raises(ModelShapeError, match="intermediate_size"):
        ModelShape.from_config(config)


def test_unknown_target_modules_are_named_with_the_known_ones() -> None:
    with pytest.raises(ModelShapeError, match="c_attn.*q_proj"):
        estimate(EstimateInput(shape_8b(), 1, 128, True, lora_targets=("c_attn",)))


def test_four_bit_weights_take_about_a_quarter_of_bf16() -> None:
    base = EstimateInput(shape_8b(), 1, 2048, True)
    bf16, nf4 = estimate(base), estimate(replace(base, quant_bits=4))
    linear_bf16 = bf16.base_weights - nf4.base_weights
    assert nf4.quantized_weights == linear_bf16 // 4
    # Double quantization: about 0.127 bits per weight of constants instead of 0.5.
    single = estimate(replace(base, quant_bits=4, double_quant=False))
    assert nf4.quantization_constants < single.quantization_constants / 3


def test_eight_bit_optimizers_keep_about_a_quarter_of_adamw_s_states() -> None:
    base = EstimateInput(shape_8b(), 1, 2048, True)
    adamw, eight = optimizer_bytes(base), optimizer_bytes(replace(base, optimizer=Optimizer.ADAMW_8BIT))
    assert 0.24 < eight / adamw < 0.27
    paged = estimate(replace(base, optimizer=Optimizer.PAGED_ADAMW_8BIT))
    assert paged.paged_optimizer_states == paged.optimizer_states > 0


def test_checkpointing_and_chunked_loss_shrink_activations_and_logits() -> None:
    base = EstimateInput(shape_8b(), 4, 2048, False)
    full, checkpointed = estimate(base), estimate(replace(base, gradient_checkpointing=True))
    assert checkpointed.activations < full.activations / 10
    # 8k tokens x 128k vocabulary in fp32 is 4 GiB; the chunked loss holds one 1,024-token chunk.
    assert full.logits < 2 * GI


def test_offloaded_layer_inputs_leave_two_layers_of_them_on_the_gpu() -> None:
    spec = recipe(gradientCheckpointing=True, perDeviceBatchSize=2, offloadActivations=True)
    offloaded = inputs_for(spec, shape_8b(), gpus=1)
    assert offloaded.offload_activations
    kept = estimate(replace(offloaded, offload_activations=False))
    # 30 of the 32 layer inputs (micro-batch 2 x 2,048 tokens x 4,096 hidden x 2 bytes = 32 MiB each) wait in host memory.
    assert kept.activations - estimate(offloaded).activations == 30 * 2 * 2048 * 4096 * 2
    # Without checkpointing every intermediate would wait in host memory, which the estimate cannot bound: no saving.
    without_checkpointing = replace(offloaded, gradient_checkpointing=False)
    assert estimate(without_checkpointing) == estimate(replace(without_checkpointing, offload_activations=False))


def test_the_total_is_the_sum_of_the_parts() -> None:
    breakdown = estimate(EstimateInput(shape_8b(), 2, 1024, True, quant_bits=4))
    assert breakdown.total == sum(value for label, value in breakdown.rows() if label != "total")


def test_fit_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch() -> None:
    spec = recipe(gradientCheckpointing=True)
    small = fit(spec, shape_8b(), gpus=1, gpu_memory=80 * GI, source=GpuMemorySource.SPEC)
    large = fit(spec, shape_8b(), gpus=1, gpu_memory=141 * GI, source=GpuMemorySource.NODE_LABEL)
    for decision in (small, large):
        assert decision.fits and decision.estimate.total <= decision.usable_bytes
        assert decision.micro_batch * decision.gradient_accumulation_steps == 16
    assert (large.micro_batch, not large.gradient_checkpointing) >= (small.micro_batch, not small.gradient_checkpointing)
    # The next micro-batch up, with the same checkpointing, would not have fit.
    if small.micro_batch < 16:
        bigger = inputs_for(spec, shape_8b(), gpus=1, micro_batch=small.micro_batch * 2, gradient_checkpointing=small.gradient_checkpointing)
        assert estimate(bigger).total > small.usable_bytes


def test_checkpointing_is_turned_on_only_when_needed() -> None:
    one = recipe(gradientCheckpointing=True, perDeviceBatchSize=1, gradientAccumulationSteps=1)
    roomy = fit(one, shape_8b(), gpus=1, gpu_memory=141 * GI, source=GpuMemorySource.SPEC)
    assert roomy.fits and roomy.gradient_checkpointing is False
    tight = fit(recipe(perDeviceBatchSize=1, gradientAccumulationSteps=1), shape_8b(), gpus=1, gpu_memory=24 * GI, source=GpuMemorySource.SPEC)
    assert tight.fits and tight.gradient_checkpointing is True


def test_nothing_fits_says_what_would() -> None:
    decision = fit(recipe(), shape_8b(), gpus=1, gpu_memory=16 * GI, source=GpuMemorySource.DEFAULT)
    assert not decision.fits
    assert decision.micro_batch == 1 and decision.gradient_checkpointing
    text = " | ".join(decision.suggestions)
    assert "method: qlora" in text and "sharded" in text
    assert "16.00Gi GPU (default)" in decision.message


def test_without_auto_fit_the_spec_s_settings_are_only_checked() -> None:
    decision = fit(recipe(), shape_8b(), gpus=1, gpu_memory=16 * GI, source=GpuMemorySource.SPEC, auto=False)
    assert not decision.fits and decision.micro_batch == 4 and decision.gradient_accumulation_steps == 4 and decision.suggestions == []


@pytest.mark.parametrize(("text", "expected"), [("80Gi", 80 * GI), ("141G", 141 * 10**9), ("81559Mi", 81559 * 1024**2), ("1.5Gi", int(1.5 * GI))])
def test_quantities(text: str, expected: int) -> None:
    assert parse_quantity(text) == expected


def test_a_bad_quantity_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="for example 80Gi"):
        parse_quantity("80 gigs")


BASELINE = Path(__file__).parents[2] / "bench" / "results" / "gpu-h200-baseline.json"


@pytest.mark.parametrize("case", ["qlora-8b", "lora-bf16-8b"])
def test_the_recorded_h200_peaks_of_the_earlier_trainer(case: str) -> None:
    """bench/results/gpu-h200-baseline.json was measured at commit 294a88c, before this trainer: it ran the model's own
    loss over all logits (no LossModel) and upcast QLoRA's unquantized weights to fp32 (peft's
    prepare_model_for_kbit_training), with adapters at dropout 0. Told those two differences, the estimate must be within
    10% of the measured peak and never more than 5% below it."""
    run = next(r for r in json.loads(BASELINE.read_text()) if r["case"] == case)
    qlora = case.startswith("qlora")
    inputs = EstimateInput(
        shape_8b(),
        run["micro_batch"],
        run["seq_len"],
        run["gradient_checkpointing"],
        quant_bits=4 if qlora else None,
        lora_dropout=False,
        optimizer=Optimizer(run["optimizer"]),
        chunked_loss=False,
        fp32_unquantized=qlora,
    )
    ratio = estimate(inputs).allocated_peak / (run["peak_vram_gib"] * GI)
    assert 0.95 <= ratio <= 1.10, ratio
