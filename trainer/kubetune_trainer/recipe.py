"""One fine-tuning run, top to bottom: setup -> train -> save -> publish -> cleanup.

Runs in every training process (one per GPU, or one on CPU). Rank 0 writes checkpoints and the
adapter; local rank 0 of each pod serves /metrics and writes the termination message. Every
failure ends in ``errors.classify`` so the exit code and reason are the ones in exitcodes.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from kubetune_api.exitcodes import ExitCode
from kubetune_api.recipe import OutputSpec
from kubetune_api.result import CheckpointRef, TerminationMessage, TrainingResult
from kubetune_api.runtime import TrainerConfig
from kubetune_trainer import checkpoints, distributed, export, logs, model, result, training
from kubetune_trainer.distributed import Context
from kubetune_trainer.errors import Interrupted, TrainerError, classify
from kubetune_trainer.loss import LossModel
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.storage import S3Store, StorageObserver

LOCAL_CHECKPOINTS_KEPT = 2


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
class Run:
    """Objects shared by the recipe's steps."""

    config: TrainerConfig
    ctx: Context
    work_dir: Path
    metrics: TrainerMetrics | None
    store: S3Store | None = None
    last_checkpoint: CheckpointRef | None = None
    resumed_from_step: int | None = None
    uploads: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload"))
    pending_upload: Future[CheckpointRef] | None = None

    @property
    def checkpoint_root(self) -> Path:
        return self.work_dir / "checkpoints" / self.config.runtime.namespace / self.config.runtime.job_name


def worker(config_path: str) -> None:
    """Body of one process started by the elastic launcher; a non-zero exit code reports failure.

    Lives here rather than in __main__ so spawned workers can unpickle it by module name.
    """
    from kubetune_trainer.__main__ import read_config

    code = run(read_config(Path(config_path)))
    if code != ExitCode.SUCCESS:
        sys.exit(int(code))


def run(config: TrainerConfig) -> ExitCode:
    """Train, publish and report; returns the process exit code."""
    started = time.monotonic()
    use_cuda = config.runtime.gpus_per_node > 0
    if use_cuda and not torch.cuda.is_available():
        ctx = distributed.init(False)
        return _fail(config, ctx, TrainerError("The pod asked for GPUs but CUDA sees none; check the node's NVIDIA driver and device plugin."), None)
    ctx = distributed.init(use_cuda)
    logs.setup(rank=ctx.rank, namespace=config.runtime.namespace, finetunejob=config.runtime.job_name)
    logs.quiet_libraries()
    stop = StopFlag()
    stop.install()
    metrics = _start_metrics(config, ctx)
    state = Run(config=config, ctx=ctx, work_dir=Path(config.runtime.work_dir), metrics=metrics)
    try:
        return _run(state, stop, started)
    except BaseException as error:
        return _fail(config, ctx, classify(error), state.last_checkpoint)
    finally:
        state.uploads.shutdown(wait=True, cancel_futures=True)
        if metrics is not None:
            metrics.stop()
        distributed.shutdown(ctx)


def _run(run_state: Run, stop: StopFlag, started: float) -> ExitCode:
    config, ctx = run_state.config, run_state.ctx
    torch.manual_seed(config.training.seed + ctx.rank)

    # ---- setup: storage, model, data, optimizer ----
    observer: StorageObserver | None = run_state.metrics
    run_state.store = S3Store.from_output(config.output, observer=observer)

    def store_factory(output: OutputSpec) -> S3Store:
        return S3Store.from_output(output, observer=observer)

    found = _fetch_checkpoint(run_state)
    files = model.fetch_model(config.model, config.output, run_state.work_dir, store_factory) if ctx.is_local_main else None
    distributed.barrier(ctx)
    if files is None:
        files = model.fetch_model(config.model, config.output, run_state.work_dir, store_factory)
    tokenizer = model.load_tokenizer(files, config.model.trust_remote_code)
    precision = model.resolve_precision(
        config.training.precision,
        cuda=ctx.device.type == "cuda",
        bf16_supported=ctx.device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    quant = config.effective_quantization()
    base = model.load_base_model(
        files,
        dtype_name=quant.compute_dtype.value if quant is not None else model.precision_dtype_name(precision),
        quantization=quant,
        device=str(ctx.device),
        trust_remote_code=config.model.trust_remote_code,
    )
    peft_model = model.apply_lora(base, config.lora, gradient_checkpointing=config.training.gradient_checkpointing)
    data = _prepare_data(config, tokenizer, ctx, store_factory)
    # The chunked loss never holds full-vocabulary fp32 logits: the largest item of QLoRA's peak memory.
    train_model: Any = LossModel(peft_model)
    if ctx.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = training.build_optimizer(config.training, params, cuda=ctx.device.type == "cuda")
    steps = training.total_steps(config.training, data.stream.batches_per_epoch)
    scheduler = training.build_scheduler(config.training, optimizer, steps)
    progress = _resume(run_state, found, train_model, optimizer, scheduler, data.stream)
    logs.event(
        "training started",
        step=progress.step,
        total_steps=steps,
        train_records=data.num_train_records,
        trainable_parameters=sum(p.numel() for p in params),
        precision=precision.value,
        world_size=ctx.world_size,
        device=str(ctx.device),
    )
    _set_static_metrics(run_state, steps, progress.step)

    # ---- train ----
    hooks = training.Hooks(
        on_log=lambda p: _on_log(run_state, p),
        on_eval=lambda step, loss: _on_eval(run_state, step, loss),
        on_checkpoint=lambda s: _checkpoint(run_state, train_model, optimizer, scheduler, s),
        stop_requested=stop,
    )
    outcome = training.train(
        train_model,
        optimizer,
        scheduler,
        data.stream,
        spec=config.training,
        steps=steps,
        state=progress,
        ctx=ctx,
        precision=precision,
        hooks=hooks,
        eval_batches=data.eval_batches,
    )
    _wait_for_upload(run_state)
    if outcome.interrupted:
        raise Interrupted(f"Stopped by SIGTERM at step {outcome.state.step}; the checkpoint of that step was uploaded and the next attempt resumes from it.")

    # ---- save and publish (rank 0) ----
    published = None
    if ctx.is_main:
        adapter_dir = run_state.work_dir / "output" / config.runtime.namespace / config.runtime.job_name / "adapter"
        export.save_adapter(peft_model, tokenizer, adapter_dir)
        assert run_state.store is not None
        published = export.publish(run_state.store, config, adapter_dir, outcome, files)
    distributed.barrier(ctx)

    # ---- cleanup: result ----
    if ctx.is_local_main:
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else _rss()
        # Only the pod of rank 0 published; the others report success without a result.
        trained = (
            TrainingResult(
                adapter_uri=published.uri,
                manifest_sha256=published.manifest_sha256,
                size_bytes=published.size_bytes,
                final_loss=outcome.final_loss,
                steps=outcome.state.step,
                tokens=outcome.state.tokens,
                duration_seconds=round(time.monotonic() - started, 3),
                peak_memory_bytes=int(peak),
                resumed_from_step=run_state.resumed_from_step,
            )
            if published is not None
            else None
        )
        message = TerminationMessage.succeeded(trained, run_state.last_checkpoint)
        result.write(config.runtime.termination_message_path, message)
        logs.event("run succeeded", **message.to_api())
    return ExitCode.SUCCESS


# ---- setup helpers ----------------------------------------------------------------------------


def _start_metrics(config: TrainerConfig, ctx: Context) -> TrainerMetrics | None:
    if not ctx.is_local_main:
        return None
    metrics = TrainerMetrics(
        config.runtime.namespace,
        config.runtime.job_name,
        ctx.node_rank,
        {"method": config.method.value, "base_model": config.model.source, "revision": config.model.revision or ""},
    )
    host = os.environ.get("KUBETUNE_METRICS_HOST") or "0.0.0.0"
    port = metrics.serve(host, config.runtime.metrics_port)
    logs.event("metrics endpoint listening", host=host, port=port)
    return metrics


@dataclass
class _Data:
    stream: Any
    eval_batches: Any
    num_train_records: int


def _prepare_data(config: TrainerConfig, tokenizer: Any, ctx: Context, store_factory: Any) -> _Data:
    from kubetune_trainer.data import prepare_data

    prepared = prepare_data(config, tokenizer, rank=ctx.rank, world_size=ctx.world_size, store_factory=store_factory)
    stream = prepared.train_batches(config.training.per_device_batch_size)
    eval_batches = None
    if prepared.eval is not None:

        def eval_batches() -> Any:
            return prepared.eval_batches(config.training.per_device_batch_size)

    return _Data(stream, eval_batches, int(prepared.num_train_records))


def _fetch_checkpoint(run_state: Run) -> CheckpointRef | None:
    """Find the newest complete checkpoint in S3 and bring it to local disk; None for a fresh start.

    Runs before the model loads, so a wrong bucket or missing permission fails the run at once.
    """
    from kubetune_trainer import remote_checkpoints

    config, ctx = run_state.config, run_state.ctx
    assert run_state.store is not None
    newest = remote_checkpoints.newest_complete(run_state.store, config.run_prefix) if ctx.is_main else None
    # Every pod resumes from rank 0's choice, even if another checkpoint completes meanwhile.
    found = distributed.broadcast_object(newest, ctx)
    if found is not None and ctx.is_local_main:
        # Files already here with the right sha256 (a container restart on the same node) are kept.
        remote_checkpoints.download_checkpoint(run_state.store, found.uri, checkpoints.step_dir(run_state.checkpoint_root, found.step))
    distributed.barrier(ctx)
    return None if found is None else CheckpointRef(step=found.step, uri=found.uri)


def _resume(run_state: Run, found: CheckpointRef | None, train_model: Any, optimizer: Any, scheduler: Any, stream: Any) -> checkpoints.TrainingState:
    """Load a fetched checkpoint into the model, optimizer, scheduler and data stream."""
    if found is None:
        return checkpoints.TrainingState()
    directory = checkpoints.step_dir(run_state.checkpoint_root, found.step)
    state = checkpoints.load(directory, model=train_model, optimizer=optimizer, scheduler=scheduler, rank=run_state.ctx.rank)
    stream.load_state_dict(state.data)
    run_state.last_checkpoint = found
    run_state.resumed_from_step = found.step
    logs.event("resumed from checkpoint", step=found.step, uri=found.uri)
    return state


def _set_static_metrics(run_state: Run, steps: int, step: int) -> None:
    if run_state.metrics is None:
        return
    m = run_state.metrics
    m.set(m.total_steps, steps)
    m.set(m.step, step)
    m.set(m.progress, step / steps)
    if run_state.last_checkpoint is not None:
        m.set(m.last_checkpoint_step, run_state.last_checkpoint.step)


# ---- hooks ------------------------------------------------------------------------------------


def _on_log(run_state: Run, p: training.Progress) -> None:
    pod_share = p.interval_tokens / run_state.ctx.world_size * run_state.ctx.local_world_size
    if run_state.metrics is not None:
        m = run_state.metrics
        m.set(m.step, p.step)
        m.set(m.epoch, p.epoch)
        m.set(m.progress, p.step / p.total_steps)
        m.set(m.loss, p.loss)
        m.set(m.learning_rate, p.learning_rate)
        m.set(m.tokens_per_second, p.tokens_per_second / run_state.ctx.world_size * run_state.ctx.local_world_size)
        m.set(m.eta, p.eta_seconds)
        m.add_tokens(int(pod_share))
    if run_state.ctx.is_main:
        logs.event(
            "progress",
            step=p.step,
            total_steps=p.total_steps,
            progress=round(p.step / p.total_steps, 4),
            epoch=round(p.epoch, 4),
            loss=p.loss,
            learning_rate=p.learning_rate,
            tokens_per_second=round(p.tokens_per_second, 1),
            tokens=p.tokens,
            eta_seconds=round(p.eta_seconds, 1),
        )


def _on_eval(run_state: Run, step: int, loss: float) -> None:
    if run_state.metrics is not None:
        run_state.metrics.set(run_state.metrics.eval_loss, loss)
    if run_state.ctx.is_main:
        logs.event("evaluation", step=step, eval_loss=loss)


def _checkpoint(run_state: Run, train_model: Any, optimizer: Any, scheduler: Any, state: checkpoints.TrainingState) -> None:
    """Save locally (rank 0, every rank's RNG included), then upload in the background."""
    ctx = run_state.ctx
    rng_states = distributed.gather_objects(checkpoints.capture_rng(), ctx)
    if not ctx.is_main:
        return
    began = time.monotonic()
    local = checkpoints.save(run_state.checkpoint_root, model=train_model, optimizer=optimizer, scheduler=scheduler, state=state, rng_states=rng_states)
    if run_state.metrics is not None:
        run_state.metrics.save_seconds.labels(**run_state.metrics.labels).observe(time.monotonic() - began)
    logs.event("checkpoint saved", step=state.step, path=str(local))
    # One upload at a time: the previous must finish before its folder may be pruned.
    _wait_for_upload(run_state)
    checkpoints.prune(run_state.checkpoint_root, LOCAL_CHECKPOINTS_KEPT)
    run_state.pending_upload = run_state.uploads.submit(_upload, run_state, local, state.step, state.losses[-1][1] if state.losses else None)


def _upload(run_state: Run, local: Path, step: int, loss: float | None) -> CheckpointRef:
    from kubetune_trainer import remote_checkpoints

    assert run_state.store is not None
    began = time.monotonic()
    uri = remote_checkpoints.upload_checkpoint(run_state.store, local, run_state.config.run_prefix, step, {"loss": loss})
    seconds = time.monotonic() - began
    if run_state.metrics is not None:
        m = run_state.metrics
        m.upload_seconds.labels(**m.labels).observe(seconds)
        m.set(m.last_checkpoint_step, step)
    logs.event("checkpoint uploaded", step=step, uri=uri, seconds=round(seconds, 3))
    return CheckpointRef(step=step, uri=uri)


def _wait_for_upload(run_state: Run) -> None:
    if run_state.pending_upload is not None:
        run_state.last_checkpoint = run_state.pending_upload.result()
        run_state.pending_upload = None


# ---- failure ----------------------------------------------------------------------------------


def _fail(config: TrainerConfig, ctx: Context, error: TrainerError, last: CheckpointRef | None) -> ExitCode:
    logs.event("run failed", level=40, reason=error.reason, exit_code=int(error.exit_code), error=error.message)
    if ctx.is_local_main:
        result.write(config.runtime.termination_message_path, result.failure(error, last))
    return error.exit_code


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)
