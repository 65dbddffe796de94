"""The training loop: micro-batches, gradient accumulation, optimizer steps, logging, checkpoints.

A plain torch loop. The host reads device values only every ``log_every`` steps (loss) and at
checkpoints, so GPUs stay busy between; token counts come from the batches on the host. With
several processes the SIGTERM flag is agreed every step over a gloo group on the CPU, which does
not wait for the GPU.
Checkpointing, publication and metrics belong to the recipe, reached through ``Hooks``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import torch

from kubetune_api.recipe import Optimizer, Precision, Scheduler, TrainingSpec
from kubetune_trainer.distributed import Context, all_reduce_sum, any_true
from kubetune_trainer.errors import NumericError
from kubetune_trainer.local_checkpoints import TrainingState
from kubetune_trainer.loss import LossModel


class BatchLike(Protocol):
    """One micro-batch: model inputs on the host and the token counts throughput needs."""

    @property
    def inputs(self) -> dict[str, torch.Tensor]: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_target_tokens(self) -> int: ...


class Stream(Protocol):
    """A resumable, endless iterator of training batches for this rank."""

    def __next__(self) -> BatchLike: ...

    def state_dict(self) -> dict[str, Any]: ...

    @property
    def epoch_progress(self) -> float: ...


@dataclass(frozen=True)
class Progress:
    """What the loop reports at every log interval."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    interval_tokens: int
    tokens: int
    eta_seconds: float


class StopFlag:
    """Set by SIGTERM; the loop checks it after every optimizer step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()


@dataclass
class Hooks:
    """Callbacks into the recipe; the loop knows nothing about S3 or Prometheus."""

    on_log: Callable[[Progress], None]
    on_eval: Callable[[int, float], None]
    on_checkpoint: Callable[[TrainingState], None]
    stop_requested: Callable[[], bool]


@dataclass(frozen=True)
class Outcome:
    state: TrainingState
    interrupted: bool
    final_loss: float | None
    eval_loss: float | None


def total_steps(spec: TrainingSpec, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: maxSteps, or epochs worth of micro-batches divided by accumulation."""
    if spec.max_steps is not None:
        return spec.max_steps
    epochs = spec.epochs or 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / spec.gradient_accumulation_steps))


def build_optimizer(spec: TrainingSpec, params: list[torch.nn.Parameter], *, cuda: bool) -> torch.optim.Optimizer:
    """The optimizer over the trainable (adapter) parameters."""
    kind = spec.optimizer
    if kind is Optimizer.SGD:
        return torch.optim.SGD(params, lr=spec.learning_rate, momentum=0.9, weight_decay=spec.weight_decay)
    if kind is Optimizer.ADAMW or not cuda:
        # bitsandbytes' 8-bit and paged optimizers need a GPU; on CPU AdamW is the same maths.
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=cuda)
    # Only GPU runs load bitsandbytes' optimizers: the import takes seconds and warns on CPU-only builds.
    import bitsandbytes.optim

    bnb_optim: Any = bitsandbytes.optim
    classes = {
        Optimizer.ADAMW_8BIT: bnb_optim.AdamW8bit,
        Optimizer.PAGED_ADAMW_8BIT: bnb_optim.PagedAdamW8bit,
        Optimizer.PAGED_ADAMW: bnb_optim.PagedAdamW,
    }
    optimizer: torch.optim.Optimizer = classes[kind](params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    return optimizer


def build_scheduler(spec: TrainingSpec, optimizer: torch.optim.Optimizer, steps: int) -> Any:
    # transformers takes seconds to import; the loop itself needs only torch.
    from transformers import get_scheduler

    name = {
        Scheduler.COSINE: "cosine",
        Scheduler.LINEAR: "linear",
        Scheduler.CONSTANT: "constant",
        Scheduler.CONSTANT_WITH_WARMUP: "constant_with_warmup",
    }[spec.scheduler]
    warmup = min(spec.warmup_steps, max(0, steps - 1))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type != "cuda" or precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision is Precision.BF16 else torch.float16)


def forward_loss(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss of one micro-batch from a LossModel (chunked, returns the loss) or a plain causal LM."""
    inner = getattr(model, "module", model)
    if isinstance(inner, LossModel):
        loss: torch.Tensor = model(**inputs)
        return loss
    # The KV cache is useless in training, and packed rows need it off for their per-record mask.
    return model(**inputs, use_cache=False).loss  # type: ignore[no-any-return]


def to_device(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}


def evaluate(model: Any, batches: Iterable[BatchLike], *, ctx: Context, precision: Precision) -> float:
    """Token-weighted mean loss over this rank's evaluation batches, combined across ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    with torch.no_grad():
        for batch in batches:
            targets = batch.num_target_tokens
            if targets == 0:
                continue
            with autocast(precision, ctx.device):
                loss = forward_loss(model, to_device(batch.inputs, ctx.device))
            totals[0] += loss.detach().double() * targets
            totals[1] += targets
    all_reduce_sum(totals, ctx)
    if was_training:
        model.train()
    count = float(totals[1].item())
    return float(totals[0].item()) / count if count else float("nan")


def train(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stream: Stream,
    *,
    spec: TrainingSpec,
    steps: int,
    state: TrainingState,
    ctx: Context,
    precision: Precision,
    hooks: Hooks,
    eval_batches: Callable[[], Iterator[BatchLike]] | None,
) -> Outcome:
    """Run optimizer steps from ``state.step`` to ``steps``; stops early (after a checkpoint) on request."""
    accumulation = spec.gradient_accumulation_steps
    scaler = torch.amp.GradScaler("cuda") if precision is Precision.FP16 and ctx.device.type == "cuda" else None
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    running_loss = torch.zeros((), dtype=torch.float32, device=ctx.device)
    interval_tokens = 0
    interval_start = time.monotonic()
    interval_first_step = state.step
    final_loss: float | None = state.losses[-1][1] if state.losses else None
    eval_loss: float | None = None
    while state.step < steps:
        for micro in range(accumulation):
            batch = next(stream)
            interval_tokens += batch.num_tokens
            inputs = to_device(batch.inputs, ctx.device)
            sync = micro == accumulation - 1
            # DDP all-reduces gradients only on the last micro-batch of a step.
            no_sync = model.no_sync() if ctx.distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with autocast(precision, ctx.device):
                    loss = forward_loss(model, inputs) / accumulation
                (scaler.scale(loss) if scaler else loss).backward()  # type: ignore[no-untyped-call]
            running_loss += loss.detach().float()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if spec.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        log_now = state.step % spec.log_every == 0 or state.step == steps
        checkpoint_now = state.step % spec.checkpoint_every == 0
        stop = any_true(hooks.stop_requested(), ctx)
        if log_now or checkpoint_now or stop:
            final_loss, tokens = _reduce_interval(running_loss, interval_tokens, state.step - interval_first_step, ctx)
            if not math.isfinite(final_loss):
                raise NumericError(
                    f"The training loss became {final_loss} at step {state.step}. Lower spec.training.learningRate, "
                    "keep spec.training.maxGradNorm above 0, or use precision bf16 instead of fp16; check the data for empty or broken records."
                )
            now = time.monotonic()
            elapsed = max(now - interval_start, 1e-9)
            state.tokens += tokens
            state.elapsed_seconds += elapsed
            state.losses.append((state.step, final_loss))
            step_seconds = elapsed / max(1, state.step - interval_first_step)
            hooks.on_log(
                Progress(
                    step=state.step,
                    total_steps=steps,
                    epoch=stream.epoch_progress,
                    loss=final_loss,
                    learning_rate=float(scheduler.get_last_lr()[0]),
                    tokens_per_second=tokens / elapsed,
                    interval_tokens=tokens,
                    tokens=state.tokens,
                    eta_seconds=step_seconds * (steps - state.step),
                )
            )
            running_loss.zero_()
            interval_tokens = 0
            interval_start = now
            interval_first_step = state.step
        if eval_batches is not None and spec.eval_every is not None and state.step % spec.eval_every == 0:
            eval_loss = evaluate(model, eval_batches(), ctx=ctx, precision=precision)
            hooks.on_eval(state.step, eval_loss)
        if checkpoint_now or stop:
            state.data = stream.state_dict()
            hooks.on_checkpoint(state)
            if stop:
                return Outcome(state, True, final_loss, eval_loss)
    if eval_batches is not None and (spec.eval_every is None or state.step % spec.eval_every != 0):
        eval_loss = evaluate(model, eval_batches(), ctx=ctx, precision=precision)
        hooks.on_eval(state.step, eval_loss)
    state.data = stream.state_dict()
    return Outcome(state, False, final_loss, eval_loss)


def _reduce_interval(running_loss: torch.Tensor, tokens: int, steps: int, ctx: Context) -> tuple[float, int]:
    """Mean loss per step over the interval and tokens trained, both summed over all ranks."""
    packed = torch.stack([running_loss.double(), torch.tensor(float(tokens), dtype=torch.float64, device=running_loss.device)])
    all_reduce_sum(packed, ctx)
    loss_sum, token_sum = packed.tolist()
    return loss_sum / max(1, steps) / ctx.world_size, int(token_sum)
