"""The run's products: the adapter folder (weights, adapter_config.json, tokenizer), the optional merged
model, and their publication through publish.py with a manifest describing the run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kubetune_api.runtime import TrainerConfig
from kubetune_trainer import logs, model, training
from kubetune_trainer.publish import PublishResult, publish_adapter, publish_merged
from kubetune_trainer.storage import S3Store

LOSS_HISTORY_KEPT = 200


def save_adapter(peft_model: Any, tokenizer: Any, adapter_dir: Path) -> None:
    """Write adapter_model.safetensors, adapter_config.json and the tokenizer files into ``adapter_dir``."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    adapter_dir.mkdir(parents=True)
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    tokenizer.save_pretrained(adapter_dir)


def manifest_extra(config: TrainerConfig, outcome: training.Outcome) -> dict[str, Any]:
    """What the manifest records about the run besides the file list: inputs, settings, results."""
    quantization = config.effective_quantization()
    return {
        "baseModel": {"source": config.model.source, "revision": config.model.revision},
        "dataset": config.dataset.to_api(),
        "method": config.method.value,
        "lora": config.lora.to_api(),
        "quantization": quantization.to_api() if quantization else None,
        "training": config.training.to_api(),
        "metrics": {
            "steps": outcome.state.step,
            "finalLoss": outcome.final_loss,
            "evalLoss": outcome.eval_loss,
            "tokens": outcome.state.tokens,
            "lossHistory": outcome.state.losses[-LOSS_HISTORY_KEPT:],
        },
    }


def publish(store: S3Store, config: TrainerConfig, adapter_dir: Path, outcome: training.Outcome, files: model.ModelFiles) -> PublishResult:
    """Upload the adapter (manifest last), then the merged model when spec.output.mergedModel asks for it."""
    extra = manifest_extra(config, outcome)
    published = publish_adapter(store, adapter_dir, config.run_prefix, extra)
    logs.event("adapter published", uri=published.adapter_uri, size_bytes=published.size_bytes)
    if config.output.merged_model:
        merged_dir = adapter_dir.parent / "merged"
        save_merged(files, adapter_dir, merged_dir, config)
        merged = publish_merged(store, merged_dir, config.run_prefix, extra)
        logs.event("merged model published", uri=merged.uri, size_bytes=merged.size_bytes)
    return published


def save_merged(files: model.ModelFiles, adapter_dir: Path, merged_dir: Path, config: TrainerConfig) -> None:
    """The base model (unquantized, on CPU) with the adapter folded into its weights."""
    from peft import PeftModel

    # A quantized base cannot hold merged weights: reload it unquantized, in bf16 to bound host memory.
    dtype_name = "float32" if config.effective_quantization() is None else "bfloat16"
    base = model.load_base_model(files, dtype_name=dtype_name, quantization=None, device="cpu", trust_remote_code=config.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    merged.save_pretrained(merged_dir, safe_serialization=True)
    model.load_tokenizer(files, config.model.trust_remote_code).save_pretrained(merged_dir)
