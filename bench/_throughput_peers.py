"""The peer contenders of bench/trainer_throughput.py, one per process.

    python bench/_throughput_peers.py {hf-padded|trl-packed|bare} SETTINGS_JSON OUT_JSON

- hf-padded: transformers ``Trainer`` + peft, one record per row, ``DataCollatorForLanguageModeling``
  padding to the longest row (no packing): the script most users write.
- trl-packed: TRL's ``SFTTrainer`` with ``packing=True`` (its default best-fit strategy, padding-free rows).
- trl-packed-liger: the same with ``use_liger_kernel=True`` (Liger's fused kernels; needs a GPU and liger-kernel).
- unsloth: Unsloth's ``FastLanguageModel`` (its patched model, LoRA and checkpointing) under the same SFTTrainer.
- bare: a torch loop over the very batches kubetune's data pipeline yields (packed, same order),
  without metrics, logging, status or checkpoints: the floor kubetune's overhead is measured against.

With ``Settings.quantized`` the base is loaded in 4-bit (nf4, double quantization, bf16 compute) as
kubetune's QLoRA loads it, without peft's upcasting ``prepare_model_for_kbit_training`` (kubetune does
not upcast either). The data file may hold text records or pre-tokenized ``input_ids`` rows.

Tokens are real (non-padding) input tokens, counted when a batch is collated; time runs from the
end of optimizer step ``warmup_steps`` to the end of the last step, the device synced at both.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

# Run as a script, only bench/ itself is on the path; its sibling modules are imported as the bench package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._throughput_common import LORA_TARGETS, Settings, StepClock


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def dtype(settings: Settings) -> torch.dtype:
    # kubetune's precision "auto": bf16 weights and autocast on a GPU, fp32 on CPU.
    return torch.bfloat16 if settings.cuda else torch.float32


def load_model(settings: Settings, targets: Any) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    auto: Any = AutoModelForCausalLM
    device = "cuda" if settings.cuda else "cpu"
    if settings.quantized:
        model = auto.from_pretrained(settings.model_dir, dtype=dtype(settings), quantization_config=qlora_config(settings), device_map={"": device})
    else:
        model = auto.from_pretrained(settings.model_dir, dtype=dtype(settings))
        model.to(device)
    model.config.use_cache = False
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    return get_peft_model(model, config)


def qlora_config(settings: Settings) -> Any:
    from transformers import BitsAndBytesConfig

    config: Any = BitsAndBytesConfig
    return config(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype(settings))


# ---- transformers Trainer and TRL -------------------------------------------------------------


def training_arguments(settings: Settings, output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by the Trainer-based peers; the same optimisation as kubetune's run."""
    return {
        "output_dir": output_dir,
        "max_steps": settings.steps,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "learning_rate": settings.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": settings.optimizer or ("adamw_torch_fused" if settings.cuda else "adamw_torch"),
        "bf16": settings.cuda,
        "use_cpu": not settings.cuda,
        "logging_steps": settings.log_every,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": settings.seed,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }


class TokenCounter:
    """Wraps a data collator and counts the non-padding input tokens of every batch it makes."""

    def __init__(self, collate: Callable[[Any], dict[str, torch.Tensor]], pad_id: int) -> None:
        self.collate = collate
        self.pad_id = pad_id
        self.tokens = 0

    def __call__(self, examples: Any) -> dict[str, torch.Tensor]:
        batch = self.collate(examples)
        if "attention_mask" in batch:
            self.tokens += int(batch["attention_mask"].sum())
        else:
            self.tokens += int((batch["input_ids"] != self.pad_id).sum())
        return batch


def clock_callback(clock: StepClock, counter: TokenCounter, cuda: bool) -> Any:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if clock.wants(state.global_step):
                sync(cuda)
                clock.mark(state.global_step, time.perf_counter(), counter.tokens)

    return Clock()


def run_hf_padded(settings: Settings) -> tuple[StepClock, str]:
    import datasets
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
    raw = datasets.load_dataset("json", data_files=settings.data_path, split="train")

    def tokenize(rows: dict[str, list[str]]) -> Any:
        # BOS from the tokenizer, EOS appended: the same ids kubetune's text format trains on.
        return tokenizer([t + tokenizer.eos_token for t in rows["text"]], truncation=True, max_length=settings.seq_len)

    train = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    torch.manual_seed(settings.seed)
    model = load_model(settings, "all-linear")
    counter = TokenCounter(DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False), tokenizer.pad_token_id)
    clock = StepClock(settings.warmup_steps, settings.steps)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**training_arguments(settings, out)),
            train_dataset=train,
            data_collator=counter,
            callbacks=[clock_callback(clock, counter, settings.cuda)],
        )
        trainer.train()
    return clock, f"{len(train)} records, padded rows"


def run_trl_packed(settings: Settings, *, liger: bool = False, model: Any = None, tokenizer: Any = None) -> tuple[StepClock, str]:
    import datasets
    import trl
    from transformers import AutoTokenizer

    # trl's __init__ re-exports lazily, which mypy does not see.
    trl_module: Any = trl
    SFTConfig, SFTTrainer = trl_module.SFTConfig, trl_module.SFTTrainer

    tokenizer = tokenizer or AutoTokenizer.from_pretrained(settings.model_dir)
    raw = datasets.load_dataset("json", data_files=settings.data_path, split="train")
    torch.manual_seed(settings.seed)
    model = model or load_model(settings, "all-linear")
    clock = StepClock(settings.warmup_steps, settings.steps)
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        options = {**training_arguments(settings, out), "use_liger_kernel": liger}
        args = SFTConfig(**options, packing=True, max_length=settings.seq_len, dataset_text_field="text")
        trainer: Any = SFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer)
        counter = TokenCounter(trainer.data_collator, tokenizer.pad_token_id)
        trainer.data_collator = counter
        trainer.add_callback(clock_callback(clock, counter, settings.cuda))
        trainer.train()
        rows = len(trainer.train_dataset)
    return clock, f"trl {trl.__version__}, {rows} packed rows, strategy {args.packing_strategy}{', liger kernels' if liger else ''}"


def run_trl_packed_liger(settings: Settings) -> tuple[StepClock, str]:
    return run_trl_packed(settings, liger=True)


def run_unsloth(settings: Settings) -> tuple[StepClock, str]:
    # Unsloth patches transformers when imported, so it must come first (and in a process of its own).
    import importlib

    unsloth: Any = importlib.import_module("unsloth")
    model, tokenizer = unsloth.FastLanguageModel.from_pretrained(
        settings.model_dir, max_seq_length=settings.seq_len, dtype=dtype(settings), load_in_4bit=settings.quantized
    )
    model = unsloth.FastLanguageModel.get_peft_model(
        model,
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=LORA_TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth" if settings.gradient_checkpointing else False,
        random_state=settings.seed,
    )
    # Unsloth turns checkpointing on itself; the Trainer must not wrap the model a second time.
    clock, note = run_trl_packed(replace(settings, gradient_checkpointing=False), model=model, tokenizer=tokenizer)
    return clock, f"unsloth {getattr(unsloth, '__version__', '?')}, {note}"


# ---- bare loop --------------------------------------------------------------------------------


def run_bare(settings: Settings) -> tuple[StepClock, str]:
    from transformers import AutoTokenizer, get_scheduler

    from kubetune_api.runtime import TrainerConfig
    from kubetune_trainer.data.prepare import prepare_data

    with tempfile.TemporaryDirectory(prefix="bench-bare-") as work:
        config = TrainerConfig.model_validate(
            {
                "model": {"source": settings.model_dir},
                "dataset": {"source": settings.data_path, "maxSeqLength": settings.seq_len, "packing": True},
                "training": {"maxSteps": settings.steps, "seed": settings.seed},
                "output": {"bucket": "unused"},
                "runtime": {"workDir": work},
            }
        )
        tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
        prepared = prepare_data(config, tokenizer)
    stream = prepared.train_batches(settings.batch_size)
    torch.manual_seed(settings.seed)
    model = load_model(settings, LORA_TARGETS)
    device = torch.device("cuda" if settings.cuda else "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0, fused=settings.cuda)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=settings.steps)
    clock = StepClock(settings.warmup_steps, settings.steps)
    tokens = 0
    model.train()
    for step in range(1, settings.steps + 1):
        for _ in range(settings.grad_accum):
            batch = next(stream)
            tokens += batch.num_tokens
            inputs = {k: v.to(device, non_blocking=settings.cuda) for k, v in batch.inputs.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=settings.cuda):
                loss = model(**inputs, use_cache=False).loss / settings.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if clock.wants(step):
            sync(settings.cuda)
            clock.mark(step, time.perf_counter(), tokens)
    return clock, f"{len(prepared.train)} packed rows (kubetune's pipeline)"


RUNNERS: dict[str, Callable[[Settings], tuple[StepClock, str]]] = {
    "hf-padded": run_hf_padded,
    "trl-packed": run_trl_packed,
    "trl-packed-liger": run_trl_packed_liger,
    "unsloth": run_unsloth,
    "bare": run_bare,
}


def main(argv: list[str]) -> int:
    name, settings_path, out_path = argv
    settings = Settings.from_json(Path(settings_path).read_text(encoding="utf-8"))
    if settings.cuda:
        torch.cuda.reset_peak_memory_stats()
    clock, note = RUNNERS[name](settings)
    peak = int(torch.cuda.max_memory_allocated()) if settings.cuda else 0
    replace(clock.measurement(name, note), peak_memory_bytes=peak).save(Path(out_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
