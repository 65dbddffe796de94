"""kubetune's training loop against a bare torch loop on the same model, batches and optimizer (bench/gpu_suite.py).

The bare loop is the step and nothing else: forward, backward, clipping, optimizer and scheduler steps.
kubetune's run is ``training.train`` with the recipe's work on: metrics pushed at every log step
(``TrainerMetrics``, as the pod serves them) and a local checkpoint (adapter, optimizer, scheduler, RNG)
every ``checkpoint_every`` steps, which is what blocks the step in a pod (the upload runs in a thread).
Both start after the same warm-up steps and are timed with the device synced at both ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_report import GIB, SyntheticStream, peak_flops, train_one_process
from kubetune_api.recipe import LoraSpec, Optimizer, Precision, QuantizationSpec, TrainingSpec
from kubetune_trainer import local_checkpoints
from kubetune_trainer.local_checkpoints import TrainingState
from kubetune_trainer.loss import build_loss_model
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.model import ModelFiles, apply_lora, load_base_model
from kubetune_trainer.training import Hooks, Progress, autocast, build_optimizer, build_scheduler, forward_loss, to_device

WARMUP_STEPS = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, stream: SyntheticStream, steps: int, device: torch.device) -> float:
    """Seconds of ``steps`` plain optimizer steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    precision = Precision.BF16 if device.type == "cuda" else Precision.FP32
    sync(device)
    began = time.perf_counter()
    for _ in range(steps):
        inputs = to_device(next(stream).inputs, device)
        with autocast(precision, device):
            loss = forward_loss(model, inputs)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - began


def overhead_rows(
    name: str, model_dir: Path, quant: QuantizationSpec | None, *, seq: int, steps: int, checkpoint_every: int, device: str, work: Path
) -> list[dict[str, Any]]:
    """A row for the bare loop and one for kubetune's loop, with the overhead (1 - kubetune / bare tokens/s)."""
    torch_device = torch.device(device)
    files = ModelFiles(path=str(model_dir), revision=None, token=None)
    base = load_base_model(files, dtype_name="bfloat16", quantization=quant, device=device, trust_remote_code=False)
    model = apply_lora(base, LoraSpec(r=16, alpha=32, dropout=0.0), gradient_checkpointing=True)
    log_every = max(1, min(10, steps // 3))
    optimizer_kind = Optimizer.PAGED_ADAMW_8BIT if quant is not None else Optimizer.ADAMW
    spec = TrainingSpec(
        max_steps=steps, log_every=log_every, checkpoint_every=checkpoint_every, optimizer=optimizer_kind, gradient_checkpointing=True, precision=Precision.BF16
    )
    loss_model = build_loss_model(model, spec, torch_device)
    params = [p for p in model.parameters() if p.requires_grad]
    stream = SyntheticStream(2, seq, model.config.vocab_size)
    tokens_per_step = 2 * seq

    def fresh() -> tuple[torch.optim.Optimizer, Any]:
        optimizer = build_optimizer(spec, params, cuda=torch_device.type == "cuda")
        return optimizer, build_scheduler(spec, optimizer, steps + WARMUP_STEPS)

    optimizer, scheduler = fresh()
    bare_loop(loss_model, optimizer, scheduler, stream, WARMUP_STEPS, torch_device)
    bare_seconds = bare_loop(loss_model, optimizer, scheduler, stream, steps, torch_device)

    optimizer, scheduler = fresh()
    metrics = TrainerMetrics("bench", name, 0, {"method": name})
    checkpoints: list[int] = []
    root = work / "overhead-checkpoints"

    def on_log(p: Progress) -> None:
        metrics.set(metrics.step, p.step)
        metrics.set(metrics.loss, p.loss)
        metrics.set(metrics.tokens_per_second, p.tokens_per_second)
        metrics.set(metrics.learning_rate, p.learning_rate)
        metrics.add_tokens(p.interval_tokens)

    def on_checkpoint(state: TrainingState) -> None:
        local_checkpoints.save(root, model=loss_model, optimizer=optimizer, scheduler=scheduler, state=state, rng_states=[local_checkpoints.capture_rng()])
        local_checkpoints.prune(root, 2)
        checkpoints.append(state.step)

    hooks = Hooks(on_log=on_log, on_eval=lambda *_: None, on_checkpoint=on_checkpoint, stop_requested=lambda: False)
    sync(torch_device)
    began = time.perf_counter()
    train_one_process(loss_model, optimizer, scheduler, stream, spec, hooks)
    sync(torch_device)
    kubetune_seconds = time.perf_counter() - began
    metrics.stop()
    params_count = sum(p.numel() for p in model.parameters())
    peak = round(torch.cuda.max_memory_allocated() / GIB, 2) if torch_device.type == "cuda" else None
    bare_tps = steps * tokens_per_step / bare_seconds
    ours_tps = steps * tokens_per_step / kubetune_seconds
    return [
        {"case": f"bare-{name}", "tokens_per_second": round(bare_tps, 1), "mfu": round(bare_tps * 4 * params_count / peak_flops(), 4), "steps": steps},
        {
            "case": f"overhead-{name}",
            "tokens_per_second": round(ours_tps, 1),
            "mfu": round(ours_tps * 4 * params_count / peak_flops(), 4),
            "peak_vram_gib": peak,
            "bare_tokens_per_second": round(bare_tps, 1),
            "overhead": round(1 - ours_tps / bare_tps, 4),
            "steps": steps,
            "checkpoint_every": checkpoint_every,
            "checkpoints": checkpoints,
        },
    ]
