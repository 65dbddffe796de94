"""The training loop: micro-batches, gradient accumulation, optimizer steps, logging, checkpoints.

A plain torch loop. The host reads device values only every ``log_every`` steps (loss) and at
checkpoints, so GPUs stay busy between; token counts come from the batches on the host. With
several processes the SIGTERM flag is agreed every step over a gloo group on the CPU, which does
not wait for the GPU.
Checkpointing, publication and metrics belong to the recipe, reached through ``Hooks``.

A step that runs out of GPU memory is taken again from its first sample with half the micro-batch and
twice the accumulation (the same samples in the same order, the same effective batch), at most
``MAX_OOM_ADJUSTMENTS`` times, in one process only (ranks of a distributed run cannot agree on it
mid-step, so there it fails as before). ``DeviceMemory`` is where the loop meets the allocator.
"""

from __future__ import annotations

import contextlib
import gc
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
from kubetune_trainer.errors import OOM_ADVICE, NumericError, OutOfMemoryError
from kubetune_trainer.local_checkpoints import TrainingState
from kubetune_trainer.loss import LossModel
from kubetune_trainer.optimizer_sync import sync_once


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

    batch_size: int

    def __next__(self) -> BatchLike: ...

    def state_dict(self) -> dict[str, Any]: ...

    def rebatch(self, state: dict[str, Any], batch_size: int) -> None: ...

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


MAX_OOM_ADJUSTMENTS = 4
"""Halvings of the micro-batch a run may make before an out-of-memory error ends it."""


class DeviceMemory:
    """The loop's view of the device allocator: tells an out-of-memory error and gives cached memory back.

    ``check`` runs before every micro-batch; the real allocator needs nothing there (CUDA raises on its own).
    Tests pass a subclass whose ``check`` raises as a GPU of limited size would.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def check(self, micro_batch: int) -> None:
        """Called before the forward pass of each micro-batch of ``micro_batch`` sequences."""

    def is_out_of_memory(self, error: BaseException) -> bool:
        return isinstance(error, torch.OutOfMemoryError)

    def release(self) -> None:
        """Free what the failed attempt left: Python references first, then the allocator's cached blocks."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class MemoryAdjustment:
    """One halving of the micro-batch after an out-of-memory error."""

    step: int
    """The step that ran out of memory and was taken again."""
    micro_batch: int
    accumulation: int


@dataclass
class Hooks:
    """Callbacks into the recipe; the loop knows nothing about S3 or Prometheus."""

    on_log: Callable[[Progress], None]
    on_eval: Callable[[int, float], None]
    on_checkpoint: Callable[[TrainingState], None]
    stop_requested: Callable[[], bool]
    on_memory_adjustment: Callable[[MemoryAdjustment], None] | None = None


@dataclass(frozen=True)
class Outcome:
    state: TrainingState
    interrupted: bool
    final_loss: float | None
    eval_loss: float | None
    micro_batch: int | None = None
    adjustments: tuple[MemoryAdjustment, ...] = ()


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
    return sync_once(optimizer)


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
    memory: DeviceMemory | None = None,
) -> Outcome:
    """Run optimizer steps from ``state.step`` to ``steps``; stops early (after a checkpoint) on request.

    ``memory`` (the device's allocator by default) is the injection point for out-of-memory handling."""
    memory = memory or DeviceMemory(ctx.device)
    effective = spec.per_device_batch_size * spec.gradient_accumulation_steps
    adjustments: list[MemoryAdjustment] = []
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
        # A resumed run may go on with a micro-batch an earlier attempt had halved (the stream keeps its size).
        accumulation = max(1, effective // stream.batch_size)
        start = stream.state_dict()
        out_of_memory = False
        try:
            step_loss, step_tokens = _micro_batches(model, stream, accumulation, ctx=ctx, precision=precision, scaler=scaler, memory=memory)
        except BaseException as error:
            if not memory.is_out_of_memory(error):
                raise
            out_of_memory = True
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if out_of_memory:
            # Outside the except block: its traceback no longer pins the failed attempt's tensors.
            optimizer.zero_grad(set_to_none=True)
            memory.release()
            adjustment = _halve(stream, start, effective, state.step + 1, len(adjustments), ctx, reason)
            adjustments.append(adjustment)
            if hooks.on_memory_adjustment is not None:
                hooks.on_memory_adjustment(adjustment)
            continue
        running_loss += step_loss
        interval_tokens += step_tokens
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
            # Reported before stopping, so the loss gauge (and the KubetuneLossNotFinite alert) shows the NaN.
            if not math.isfinite(final_loss):
                raise NumericError(
                    f"The training loss became {final_loss} at step {state.step}. Lower spec.training.learningRate, "
                    "keep spec.training.maxGradNorm above 0, or use precision bf16 instead of fp16; check the data for empty or broken records."
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
                return Outcome(state, True, final_loss, eval_loss, stream.batch_size, tuple(adjustments))
    if eval_batches is not None and (spec.eval_every is None or state.step % spec.eval_every != 0):
        eval_loss = evaluate(model, eval_batches(), ctx=ctx, precision=precision)
        hooks.on_eval(state.step, eval_loss)
    state.data = stream.state_dict()
    return Outcome(state, False, final_loss, eval_loss, stream.batch_size, tuple(adjustments))


def _micro_batches(
    model: Any, stream: Stream, accumulation: int, *, ctx: Context, precision: Precision, scaler: Any, memory: DeviceMemory
) -> tuple[torch.Tensor, int]:
    """Forward and backward of one step's micro-batches; returns the step's loss (on the device) and its tokens."""
    step_loss = torch.zeros((), dtype=torch.float32, device=ctx.device)
    tokens = 0
    for micro in range(accumulation):
        batch = next(stream)
        tokens += batch.num_tokens
        memory.check(int(batch.inputs["input_ids"].shape[0]))
        inputs = to_device(batch.inputs, ctx.device)
        sync = micro == accumulation - 1
        # DDP all-reduces gradients only on the last micro-batch of a step; FSDP reduce-scatters each one (it has no no_sync).
        no_sync = model.no_sync() if ctx.distributed and not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:
            with autocast(precision, ctx.device):
                loss = forward_loss(model, inputs) / accumulation
            (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach().float()
    return step_loss, tokens


def _halve(stream: Stream, start: dict[str, Any], effective: int, step: int, done: int, ctx: Context, reason: str) -> MemoryAdjustment:
    """Rewind ``stream`` to the step's first sample with half the micro-batch (a divisor of the effective batch)."""
    current = stream.batch_size
    smaller = next((size for size in range(current // 2, 0, -1) if effective % size == 0), None)
    why = ""
    if ctx.distributed:
        why = "a distributed run cannot shrink its micro-batch mid-step"
    elif done >= MAX_OOM_ADJUSTMENTS:
        why = f"the micro-batch was already halved {done} times"
    elif smaller is None:
        why = f"micro-batch {current} cannot be halved again"
    if why or smaller is None:
        raise OutOfMemoryError(f"The GPU ran out of memory at step {step} with micro-batch {current} ({reason}); {why}. {OOM_ADVICE}")
    stream.rebatch(start, smaller)
    return MemoryAdjustment(step=step, micro_batch=smaller, accumulation=effective // smaller)


def _reduce_interval(running_loss: torch.Tensor, tokens: int, steps: int, ctx: Context) -> tuple[float, int]:
    """Mean loss per step over the interval and tokens trained, both summed over all ranks."""
    packed = torch.stack([running_loss.double(), torch.tensor(float(tokens), dtype=torch.float64, device=running_loss.device)])
    all_reduce_sum(packed, ctx)
    loss_sum, token_sum = packed.tolist()
    return loss_sum / max(1, steps) / ctx.world_size, int(token_sum)
