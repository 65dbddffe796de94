"""The run's products on local disk: the adapter folder (weights, adapter_config.json, tokenizer) and
the optional merged model. ``storage.publish`` uploads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kubetune_api.runtime import TrainerConfig
from kubetune_api.serving import AdapterFacts
from kubetune_trainer import model


def save_adapter(peft_model: Any, tokenizer: Any, adapter_dir: Path, weights: dict[str, Any] | None = None) -> None:
    """Write adapter_model.safetensors, adapter_config.json and the tokenizer files into ``adapter_dir``.

    ``weights``: the adapter gathered from a sharded model (peft's keys), whose own parameters hold shards only."""
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    adapter_dir.mkdir(parents=True)
    if weights is None:
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        peft_model.peft_config[peft_model.active_adapter].save_pretrained(adapter_dir)
        save_file(weights, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(adapter_dir)


def adapter_facts(adapter_dir: Path, peft_model: Any) -> AdapterFacts:
    """What the serving check needs, read back from the saved adapter_config.json and the base model's config."""
    saved = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    targets = saved.get("target_modules") or []
    base_config = peft_model.get_base_model().config
    architectures = getattr(base_config, "architectures", None) or []
    rows = int(peft_model.get_input_embeddings().weight.shape[0])
    return AdapterFacts(
        rank=int(saved.get("r") or 1),
        target_modules=sorted(targets if isinstance(targets, list) else [targets]),
        modules_to_save=sorted(saved.get("modules_to_save") or []),
        architecture=architectures[0] if architectures else None,
        tokenizer_changed=rows != int(getattr(base_config, "vocab_size", rows)),
    )


def save_merged(files: model.ModelFiles, adapter_dir: Path, merged_dir: Path, config: TrainerConfig) -> None:
    """The base model (unquantized, on CPU) with the adapter folded into its weights."""
    # As in model.py: peft (and transformers with it) loads when a run gets this far, not when this module is imported.
    from peft import PeftModel

    # A quantized base cannot hold merged weights: reload it unquantized, in bf16 to bound host memory.
    dtype_name = "float32" if config.effective_quantization() is None else "bfloat16"
    base = model.load_base_model(files, dtype_name=dtype_name, quantization=None, device="cpu", trust_remote_code=config.model.trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    if merged_dir.exists():
        shutil.rmtree(merged_dir)
    merged.save_pretrained(merged_dir, safe_serialization=True)
    model.load_tokenizer(files, config.model.trust_remote_code).save_pretrained(merged_dir)
