"""One fine-tuning run, top to bottom: ``LoRARecipe`` setup -> train -> save -> cleanup.

Runs in every training process (one per GPU, or one on CPU). Rank 0 writes checkpoints and the
adapter; local rank 0 of each pod serves /metrics and writes the termination message. Every
failure ends in ``errors.classify`` so the exit code and reason are the ones in exitcodes.py.
``kubetune_trainer.entry`` drives one process through the recipe.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from kubetune_api import layout
from kubetune_api.exitcodes import ExitCode
from kubetune_api.output import OutputSpec
from kubetune_api.quality import EvaluationReport
from kubetune_api.recipe import Precision
from kubetune_api.result import CheckpointRef, SkippedCheckpoint, TerminationMessage, TrainingResult
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer import disk, distributed, evaluation, export, local_checkpoints, log_archive, logs, model, result, sharding, training
from kubetune_trainer.distributed import Context
from kubetune_trainer.divergence import DivergenceWatch
from kubetune_trainer.errors import DivergedError, Interrupted, TrainerError, classify
from kubetune_trainer.local_checkpoints import TrainingState
from kubetune_trainer.loss import build_loss_model
from kubetune_trainer.metrics import TrainerMetrics, resident_memory
from kubetune_trainer.preparation import RunData, load_run_data
from kubetune_trainer.storage.publish import PublishResult, run_manifest
from kubetune_trainer.storage.run import RunFiles
from kubetune_trainer.storage.store import S3Store
from kubetune_trainer.storage.uploads import CheckpointUploads
from kubetune_trainer.training import StopFlag

LOCAL_CHECKPOINTS_KEPT = 2


class LoRARecipe:
    """LoRA or QLoRA fine-tuning of a causal LM in one training process, data parallel across processes.

    ``setup`` fetches the newest checkpoint, the model and the data and builds the optimizer (or finds the
    run already published by an earlier attempt, which ``report_published`` then reports);
    ``train`` runs the loop, with the hooks below reporting progress and taking checkpoints;
    ``save`` writes and publishes the adapter and reports the result; ``cleanup`` releases what
    ``setup`` started.
    """

    def __init__(
        self,
        config: TrainerConfig,
        ctx: Context,
        environment: TrainerEnvironment,
        *,
        metrics: TrainerMetrics | None = None,
        stop: StopFlag | None = None,
        started: float | None = None,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.environment = environment
        self.metrics = metrics
        self.stop = stop or StopFlag()
        self.started = time.monotonic() if started is None else started
        self.sharded = sharding.enabled(config.training, ctx)
        runtime = config.runtime
        self.work_dir = Path(runtime.work_dir)
        # Scratch folders named as their S3 counterparts are (kubetune_api.layout).
        self.checkpoint_root = self.work_dir / layout.CHECKPOINTS_FOLDER / runtime.namespace / runtime.job_name
        self.output_dir = self.work_dir / "output" / runtime.namespace / runtime.job_name
        self.last_checkpoint: CheckpointRef | None = None
        self.resumed_from_step: int | None = None
        self.skipped: list[SkippedCheckpoint] = []
        self.published: TrainingResult | None = None
        self.watch = DivergenceWatch(config.training.divergence)
        self.base_eval_loss: float | None = None
        self.log_archive = log_archive.attach() if ctx.is_main else None
        self.uploads = CheckpointUploads(metrics, after_each=self._upload_log)
        # Bound by setup(), not here: that is where a run can first fail, and a failure is reported through this object.
        self.store: S3Store
        self.run_files: RunFiles
        self.files: model.ModelFiles
        self.tokenizer: Any
        self.peft_model: Any
        self.model: Any
        self.precision: Precision
        self.optimizer: torch.optim.Optimizer
        self.scheduler: Any
        self.data: RunData
        self.total_steps: int
        self.state: TrainingState

    # ---- setup: storage, model, data, optimizer, resume ---------------------------------------

    def setup(self) -> None:
        config, ctx = self.config, self.ctx
        torch.manual_seed(config.training.seed + ctx.rank)
        self.store = self.store_for(config.output)
        self.run_files = RunFiles(self.store, config, self.environment)
        # An attempt that follows a successful one (a re-created Job) reports the published result again.
        self.published = distributed.broadcast_object(self.run_files.published() if ctx.is_main else None, ctx)
        if self.published is not None:
            logs.event("adapter already published by this run", uri=self.published.adapter_uri)
            return
        found = self._fetch_checkpoint()
        cache = Path(config.runtime.model_cache_dir) if config.runtime.model_cache_dir else None
        files = model.fetch_model(config.model, config.output, self.work_dir, self.store_for, self.environment, cache) if ctx.is_local_main else None
        distributed.barrier(ctx)
        if files is None:
            files = model.fetch_model(config.model, config.output, self.work_dir, self.store_for, self.environment, cache)
        self.files = files
        self.tokenizer = model.load_tokenizer(files, config.model.trust_remote_code)
        self.peft_model, self.precision = model.load_for_training(config, files, ctx.device, sharded=self.sharded)
        self.data = load_run_data(
            config, self.tokenizer, self.store_for, self.environment, rank=ctx.rank, world_size=ctx.world_size, local_main=ctx.is_local_main
        )
        # The chunked loss never holds full-vocabulary fp32 logits: the largest item of QLoRA's peak memory.
        self.model = build_loss_model(self.peft_model, config.training, ctx.device)
        if self.sharded:
            self.model = sharding.shard(self.model, self.peft_model, ctx)
        elif ctx.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = training.build_optimizer(config.training, params, cuda=ctx.device.type == "cuda")
        self.total_steps = training.total_steps(config.training, self.data.stream.batches_per_epoch)
        self.scheduler = training.build_scheduler(config.training, self.optimizer, self.total_steps)
        self.state = self._resume(found)
        self.watch.replay(self.state.losses)
        self._measure_base()
        logs.event(
            "training started",
            step=self.state.step,
            total_steps=self.total_steps,
            train_records=self.data.num_train_records,
            trainable_parameters=sum(p.numel() for p in params),
            precision=self.precision.value,
            world_size=ctx.world_size,
            device=str(ctx.device),
        )
        if self.metrics is not None:
            self.metrics.record_start(self.state.step, self.total_steps, self.last_checkpoint.step if self.last_checkpoint is not None else None)

    def store_for(self, output: OutputSpec) -> S3Store:
        """A store for ``output`` (spec.output, or it with another bucket) that feeds this pod's metrics."""
        return S3Store.from_output(output, environment=self.environment, observer=self.metrics)

    def _fetch_checkpoint(self) -> CheckpointRef | None:
        """Take the run over (fencing older attempts), find the newest sound checkpoint and bring it to local disk;
        None for a fresh start. Damaged newer ones are passed over, each with a warning.

        Runs before the model loads, so a wrong bucket or missing permission fails the run at once.
        """
        ctx = self.ctx
        point = self.run_files.begin(lambda step: local_checkpoints.step_dir(self.checkpoint_root, step), local_checkpoints.check) if ctx.is_main else None
        # Every pod resumes from rank 0's choice, even if another checkpoint completes meanwhile.
        found: CheckpointRef | None
        found, self.skipped = distributed.broadcast_object((point.checkpoint, point.skipped) if point is not None else None, ctx)
        if found is not None and ctx.is_local_main and not ctx.is_main:
            # Files already here with the right sha256 (a container restart on the same node) are kept.
            self.run_files.fetch(found.step, local_checkpoints.step_dir(self.checkpoint_root, found.step))
        distributed.barrier(ctx)
        return found

    def _resume(self, found: CheckpointRef | None) -> TrainingState:
        """Load a fetched checkpoint into the model, optimizer, scheduler and data stream."""
        if found is None:
            return TrainingState()
        directory = local_checkpoints.step_dir(self.checkpoint_root, found.step)
        state = local_checkpoints.load(
            directory, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, rank=self.ctx.rank, sharded=self.sharded
        )
        self.data.stream.load_state_dict(state.data)
        self.last_checkpoint = found
        self.resumed_from_step = found.step
        logs.event("resumed from checkpoint", step=found.step, uri=found.uri)
        return state

    def _measure_base(self) -> None:
        """Eval loss of the base model before the first step: the baseline of the evaluation gate."""
        self.base_eval_loss = evaluation.base_eval_loss(self.peft_model, self.model, self.data.eval_batches, ctx=self.ctx, precision=self.precision)
        if self.base_eval_loss is None:
            return
        if self.metrics is not None:
            self.metrics.set(self.metrics.base_eval_loss, self.base_eval_loss)
        if self.ctx.is_main:
            logs.event("base evaluation", eval_loss=self.base_eval_loss)

    # ---- train ----------------------------------------------------------------------------------

    def train(self) -> training.Outcome:
        hooks = training.Hooks(
            on_log=self.on_log, on_eval=self.on_eval, on_checkpoint=self.on_checkpoint, stop_requested=self.stop, on_memory_adjustment=self.on_memory_adjustment
        )
        outcome = training.train(
            self.model,
            self.optimizer,
            self.scheduler,
            self.data.stream,
            spec=self.config.training,
            steps=self.total_steps,
            state=self.state,
            ctx=self.ctx,
            precision=self.precision,
            hooks=hooks,
            eval_batches=self.data.eval_batches,
        )
        self._wait_for_upload()
        if outcome.interrupted:
            raise Interrupted(
                f"Stopped by SIGTERM at step {outcome.state.step}; the checkpoint of that step was uploaded and the next attempt resumes from it."
            )
        return outcome

    # ---- hooks ----------------------------------------------------------------------------------

    def on_log(self, p: training.Progress) -> None:
        ctx = self.ctx
        if self.metrics is not None:
            self.metrics.record_progress(p, ctx.world_size, ctx.local_world_size)
        if ctx.is_main:
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
        self._watch_divergence(p)

    def _watch_divergence(self, p: training.Progress) -> None:
        """Every rank sees the same reduced loss, so every rank stops together; no checkpoint of the diverged state is taken."""
        found = self.watch.observe(p.step, p.loss)
        if found is None:
            return
        if self.metrics is not None:
            self.metrics.set(self.metrics.diverged, 1)
        if self.ctx.is_main:
            logs.event("loss diverged", level=30, step=found.step, action=found.spec.on_divergence.value, advice=found.describe())
        if found.stops:
            raise DivergedError(found.describe() + " The run stopped; its last good checkpoint is kept.")

    def on_memory_adjustment(self, adjustment: training.MemoryAdjustment) -> None:
        if self.metrics is not None:
            self.metrics.oom_adjustments.labels(**self.metrics.labels).inc()
            self.metrics.set(self.metrics.micro_batch, adjustment.micro_batch)
        logs.event(
            "out of GPU memory: micro-batch halved, accumulation doubled, step taken again",
            level=30,
            step=adjustment.step,
            micro_batch=adjustment.micro_batch,
            gradient_accumulation_steps=adjustment.accumulation,
        )

    def on_eval(self, step: int, loss: float) -> None:
        if self.metrics is not None:
            self.metrics.set(self.metrics.eval_loss, loss)
        if self.ctx.is_main:
            logs.event("evaluation", step=step, eval_loss=loss)

    def on_checkpoint(self, state: TrainingState) -> None:
        """Save locally (rank 0, every rank's RNG included), then upload in the background."""
        ctx = self.ctx
        rng_states = distributed.gather_objects(local_checkpoints.capture_rng(), ctx)
        gathered = sharding.gather_trainable(self.peft_model, self.optimizer) if self.sharded else None
        if not ctx.is_main:
            return
        began = time.monotonic()
        local = local_checkpoints.save(
            self.checkpoint_root, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, state=state, rng_states=rng_states, gathered=gathered
        )
        if self.metrics is not None:
            self.metrics.save_seconds.labels(**self.metrics.labels).observe(time.monotonic() - began)
        logs.event("checkpoint saved", step=state.step, path=str(local))
        # One upload at a time: the previous must finish before its folder may be pruned.
        self._wait_for_upload()
        local_checkpoints.prune(self.checkpoint_root, LOCAL_CHECKPOINTS_KEPT)
        self.uploads.submit(self.run_files, local, state.step, state.losses[-1][1] if state.losses else None)

    def _wait_for_upload(self) -> None:
        uploaded = self.uploads.wait()
        if uploaded is not None:
            self.last_checkpoint = uploaded

    # ---- save: adapter, publication, result -----------------------------------------------------

    def save(self, outcome: training.Outcome) -> None:
        """Rank 0 saves and publishes the adapter (and the merged model when asked); every pod reports.

        An adapter that fails spec.evaluation is kept under the run's rejected folder instead, and the run fails.
        """
        report = evaluation.judge(self.config.evaluation, self.base_eval_loss, outcome.eval_loss)
        # A sharded adapter is gathered by every rank, kept or published; rank 0 writes it.
        weights = sharding.gather_trainable(self.peft_model, self.optimizer)[0] if self.sharded else None
        if evaluation.failed(report):
            assert report is not None
            manifest = self._manifest(outcome, report.to_api())
            kept = evaluation.keep_rejected(self.run_files, self.peft_model, self.tokenizer, self.output_dir, manifest, weights) if self.ctx.is_main else None
            distributed.barrier(self.ctx)
            raise evaluation.rejected(report, kept)
        published = self._publish(outcome, report.to_api() if report else None, weights) if self.ctx.is_main else None
        distributed.barrier(self.ctx)
        if self.ctx.is_local_main:
            self._report_success(outcome, published, report)

    def _manifest(self, outcome: training.Outcome, report: dict[str, Any] | None) -> dict[str, Any]:
        state = outcome.state
        manifest = run_manifest(
            self.config, steps=state.step, tokens=state.tokens, final_loss=outcome.final_loss, eval_loss=outcome.eval_loss, losses=state.losses
        )
        return {**manifest, "evaluation": report}

    def _publish(self, outcome: training.Outcome, report: dict[str, Any] | None, weights: dict[str, torch.Tensor] | None) -> PublishResult:
        config = self.config
        adapter_dir = self.output_dir / layout.ADAPTER_FOLDER
        export.save_adapter(self.peft_model, self.tokenizer, adapter_dir, weights)
        manifest = self._manifest(outcome, report)
        # Provenance: exactly which base model and data went in (the data cache key covers the dataset digest).
        manifest["baseModel"]["resolvedRevision"] = self.files.resolved or getattr(getattr(self.peft_model, "config", None), "_commit_hash", None)
        manifest["dataset"]["contentSha256"] = self.data.dataset_sha256
        if self.data.report is not None:
            manifest["dataReport"] = self.data.report.data.to_api()
        merged_dir = self.output_dir / layout.MERGED_FOLDER if config.output.merged_model else None
        if merged_dir is not None:
            export.save_merged(self.files, adapter_dir, merged_dir, config)
        done = self.run_files.publish(adapter_dir, merged_dir, manifest)
        if done.deleted_steps:
            self.last_checkpoint = None
        return done.adapter

    def _report_success(self, outcome: training.Outcome, published: PublishResult | None, report: EvaluationReport | None) -> None:
        ctx = self.ctx
        peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else resident_memory()
        # Only the pod of rank 0 published; the others report success without a result.
        trained = (
            TrainingResult(
                adapter_uri=published.uri,
                manifest_sha256=published.manifest_sha256,
                size_bytes=published.size_bytes,
                final_loss=outcome.final_loss,
                steps=outcome.state.step,
                tokens=outcome.state.tokens,
                duration_seconds=round(time.monotonic() - self.started, 3),
                peak_memory_bytes=int(peak),
                resumed_from_step=self.resumed_from_step,
                skipped_checkpoints=self.skipped or None,
                tokenized_in_trainer=self.data.tokenized_in_trainer,
                data_seconds=self.data.seconds,
                micro_batch=outcome.micro_batch,
                oom_adjustments=len(outcome.adjustments),
                adapter=export.adapter_facts(self.output_dir / layout.ADAPTER_FOLDER, self.peft_model),
            )
            if published is not None
            else None
        )
        message = TerminationMessage.succeeded(trained, self.last_checkpoint, report).model_copy(update={"preparation": self.data.report})
        result.report_success(message, self.config.runtime.termination_message_path)

    def report_published(self) -> None:
        """Report the result an earlier attempt of this run published (found by ``setup``), without training."""
        if self.ctx.is_local_main:
            message = TerminationMessage.succeeded(self.published if self.ctx.is_main else None, None)
            result.report_success(message, self.config.runtime.termination_message_path)

    # ---- failure and cleanup --------------------------------------------------------------------

    def fail(self, error: BaseException) -> ExitCode:
        """Report ``error`` as the run's end; returns the exit code it maps to."""
        path = self.config.runtime.termination_message_path if self.ctx.is_local_main else None
        failure = disk.full(error, self.work_dir) or classify(error)
        return result.report_failure(failure, self.last_checkpoint, path, self.environment)

    def _upload_log(self) -> None:
        """Rank 0's log next to the checkpoints; a failed upload is logged, never fatal."""
        store: S3Store | None = getattr(self, "store", None)
        if self.log_archive is None or store is None:
            return
        key = log_archive.key_for(self.config.run_prefix, self.environment.pod_name)
        try:
            self.log_archive.upload(store, key)
        except (TrainerError, OSError) as error:
            logs.event("trainer log upload failed", level=30, key=key, error=str(error))

    def cleanup(self) -> None:
        self.uploads.close()
        self._upload_log()
        log_archive.detach(self.log_archive)
        if self.metrics is not None:
            self.metrics.stop()
        distributed.shutdown(self.ctx)
