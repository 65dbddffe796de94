"""The training loop in this process, set up exactly as the recipe sets it up (model, data, optimizer, LossModel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api.recipe import Precision
from kubetune_api.runtime import TrainerConfig


@dataclass
class LoopRun:
    """What one in-process run left: the trained model, its tokenizer, the loop's outcome and what the hooks saw."""

    peft_model: Any
    tokenizer: Any
    outcome: Any
    stream_state: dict[str, Any]
    losses: list[tuple[int, float]] = field(default_factory=list)
    adjustments: list[Any] = field(default_factory=list)


def train_in_process(config: TrainerConfig, memory: Any = None, seed: int | None = None) -> LoopRun:
    """Run the loop over ``config`` (``memory``: the allocator the loop sees, the device's by default)."""
    import torch

    from kubetune_trainer import distributed, model, training
    from kubetune_trainer.data.prepare import prepare_data
    from kubetune_trainer.local_checkpoints import TrainingState
    from kubetune_trainer.loss import LossModel

    if seed is not None:
        torch.manual_seed(seed)
    ctx = distributed.init(False)
    files = model.fetch_model(config.model, config.output, Path(config.runtime.work_dir), store_factory=None)  # type: ignore[arg-type]
    tokenizer = model.load_tokenizer(files, False)
    quant = config.effective_quantization()
    base = model.load_base_model(files, dtype_name="float32", quantization=quant, device="cpu", trust_remote_code=False)
    peft_model = model.apply_lora(base, config.lora, gradient_checkpointing=config.training.gradient_checkpointing)
    stream = prepare_data(config, tokenizer).train_batches(config.training.per_device_batch_size)
    optimizer = training.build_optimizer(config.training, [p for p in peft_model.parameters() if p.requires_grad], cuda=False)
    steps = training.total_steps(config.training, stream.batches_per_epoch)
    scheduler = training.build_scheduler(config.training, optimizer, steps)
    run = LoopRun(peft_model, tokenizer, None, {})
    hooks = training.Hooks(
        on_log=lambda p: run.losses.append((p.step, p.loss)),
        on_eval=lambda step, loss: None,
        on_checkpoint=lambda state: None,
        stop_requested=lambda: False,
        on_memory_adjustment=run.adjustments.append,
    )
    # As in the recipe: the loss comes from the chunked LossModel around the peft model.
    run.outcome = training.train(
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
        memory=memory,
    )
    run.stream_state = stream.state_dict()
    assert run.outcome.state.step == steps and not run.outcome.interrupted
    return run
