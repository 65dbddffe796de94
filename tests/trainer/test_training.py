"""LoRA and QLoRA on the tiny model, in-process: the loss falls and the saved adapter reproduces the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_api.runtime import TrainerConfig
from tests.trainer.conftest import trainer_config
from tests.trainer.inprocess import train_in_process

pytestmark = [
    pytest.mark.trainer,
    # transformers 5 deprecates the gradient-checkpointing names peft still calls.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


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
    run = train_in_process(config)
    trained, tokenizer, losses = run.peft_model, run.tokenizer, run.losses

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
