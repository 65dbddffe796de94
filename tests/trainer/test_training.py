"""LoRA and QLoRA on the tiny model, in-process: the loss falls and the saved adapter reproduces the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune_api.recipe import Precision
from kubetune_api.runtime import TrainerConfig
from tests.trainer.conftest import trainer_config

pytestmark = [
    pytest.mark.trainer,
    # transformers 5 deprecates the gradient-checkpointing names peft still calls.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _train(config: TrainerConfig, steps_seen: list[tuple[int, float]]) -> tuple[Any, Any]:
    """Set up exactly as the recipe does and run the loop; returns (peft model, tokenizer)."""
    from kubetune_trainer import distributed, model, training
    from kubetune_trainer.data.prepare import prepare_data
    from kubetune_trainer.local_checkpoints import TrainingState
    from kubetune_trainer.loss import LossModel

    ctx = distributed.init(False)
    files = model.fetch_model(config.model, config.output, Path(config.runtime.work_dir), store_factory=None)  # type: ignore[arg-type]
    tokenizer = model.load_tokenizer(files, False)
    quant = config.effective_quantization()
    base = model.load_base_model(files, dtype_name="float32", quantization=quant, device="cpu", trust_remote_code=False)
    peft_model = model.apply_lora(base, config.lora, gradient_checkpointing=config.training.gradient_checkpointing)
    data = prepare_data(config, tokenizer)
    stream = data.train_batches(config.training.per_device_batch_size)
    optimizer = training.build_optimizer(config.training, [p for p in peft_model.parameters() if p.requires_grad], cuda=False)
    steps = training.total_steps(config.training, stream.batches_per_epoch)
    scheduler = training.build_scheduler(config.training, optimizer, steps)
    hooks = training.Hooks(
        on_log=lambda p: steps_seen.append((p.step, p.loss)),
        on_eval=lambda step, loss: None,
        on_checkpoint=lambda state: None,
        stop_requested=lambda: False,
    )
    # As in the recipe: the loss comes from the chunked LossModel around the peft model.
    outcome = training.train(
        LossModel(peft_model),
        optimizer,
        scheduler,
        stream,
        spec=config.training,
        steps=steps,
        state=TrainingState(),
        ctx=ctx,
        precision=Precision.FP32,
        hooks=hooks,
        eval_batches=None,
    )
    assert outcome.state.step == steps and not outcome.interrupted
    return peft_model, tokenizer


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_loss_falls_and_adapter_reproduces_logits(method: str, tiny_model_dir: Path, memorise_jsonl: Path, tmp_path: Path, isolated_threads: None) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kubetune_trainer import model
    from kubetune_trainer.export import save_adapter

    overrides: dict[str, object] = {"method": method, "training": {"maxSteps": 30, "gradientCheckpointing": method == "qlora"}}
    if method == "qlora":
        overrides["quantization"] = {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"}
    config = TrainerConfig.model_validate(trainer_config(tiny_model_dir, memorise_jsonl, "unused-bucket", "http://127.0.0.1:1", tmp_path, **overrides))
    losses: list[tuple[int, float]] = []
    trained, tokenizer = _train(config, losses)

    first, last = losses[0][1], losses[-1][1]
    assert last < first * 0.75, f"loss did not fall clearly: {losses}"

    adapter_dir = tmp_path / "adapter"
    save_adapter(trained, tokenizer, adapter_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "tokenizer.json").is_file()

    files = model.ModelFiles(str(tiny_model_dir), None, None)
    if method == "qlora":
        base = model.load_base_model(files, dtype_name="float32", quantization=config.effective_quantization(), device="cpu", trust_remote_code=False)
    else:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    probe = tokenizer(["The morning train left the station at seven"], return_tensors="pt")
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = trained(**probe).logits
        actual = reloaded(**probe).logits
        untrained = base.get_base_model()(**probe).logits if hasattr(base, "get_base_model") else None
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), reloaded.disable_adapter():
        plain = reloaded(**probe).logits
    assert not torch.allclose(plain, expected, atol=1e-2), "the adapter changed nothing"
    del untrained
