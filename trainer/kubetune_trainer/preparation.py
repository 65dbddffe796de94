"""The preparation step: ``python -m kubetune_trainer prepare --config ...``, on a CPU, before any GPU is held.

It reads the model's config.json and tokenizer only (never the weights), validates every record of the
dataset (file and line on error), tokenizes and packs exactly as the trainer would, and writes the result
to ``<run>/prepared/<key>.npz`` (reused as is when a file of that key exists: a retried preparation or a
second job over the same data and tokenizer). It then estimates GPU memory and, with
spec.training.autoFit, picks the micro-batch, accumulation and checkpointing that fit. The report goes
to the termination message, from which the operator fills status.preparation and the trainer Job's
config. CPU runs do the same inside the trainer (``data_report``) unless the operator is told otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune_api import layout
from kubetune_api.estimate import ModelShape, ModelShapeError
from kubetune_api.exitcodes import ExitCode
from kubetune_api.fit import FitDecision, fit
from kubetune_api.output import OutputSpec
from kubetune_api.result import DataReport, LengthQuantiles, PreparationReport, TerminationMessage
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer import logs, model, result
from kubetune_trainer.data.batches import batches_per_epoch
from kubetune_trainer.data.cache import Tokenized, tokenizer_fingerprint
from kubetune_trainer.data.prepare import PreparedData, prepare_data
from kubetune_trainer.data.prepared import Prepared, dataset_sha256, prepared_key, read_prepared, write_prepared
from kubetune_trainer.errors import ConfigError, classify
from kubetune_trainer.storage.paths import parse_s3_uri
from kubetune_trainer.storage.store import S3Store


def data_report(data: PreparedData, config: TrainerConfig, dataset_sha: str, *, micro_batch: int, accumulation: int) -> DataReport:
    """Records, tokens, packing and steps of prepared data, for the given micro-batch and accumulation."""
    from kubetune_trainer.training import total_steps

    lengths = data.train.records.lengths
    quantiles = np.quantile(lengths, [0.5, 0.9, 0.99]) if len(lengths) else np.zeros(3)
    per_epoch = batches_per_epoch(len(data.train), micro_batch, data.world_size)
    training = config.training.model_copy(update={"per_device_batch_size": micro_batch, "gradient_accumulation_steps": accumulation})
    return DataReport(
        train_records=data.num_train_records,
        eval_records=data.num_eval_records,
        tokens=data.train.num_tokens,
        truncated_records=data.truncated_records,
        dropped_records=data.dropped_records,
        sequences=len(data.train),
        packing_efficiency=round(min(1.0, data.train.fill_ratio(config.dataset.max_seq_length)) if config.dataset.packing else 1.0, 4),
        steps_per_epoch=-(-per_epoch // accumulation),
        total_steps=total_steps(training, per_epoch),
        lengths=LengthQuantiles(p50=int(quantiles[0]), p90=int(quantiles[1]), p99=int(quantiles[2]), max=int(lengths.max()) if len(lengths) else 0),
        dataset_sha256=dataset_sha,
    )


def fit_for(config: TrainerConfig, shape: ModelShape, longest: int) -> FitDecision | None:
    """The memory estimate per GPU and, with autoFit, the settings that fit; None for CPU runs."""
    runtime = config.runtime
    gpu_memory = runtime.preparation.gpu_memory_bytes
    if runtime.gpus_per_node == 0 or gpu_memory is None:
        return None
    # Packed sequences fill maxSeqLength; unpacked batches are as long as their longest record (padded to 8).
    seq_len = config.dataset.max_seq_length if config.dataset.packing else min(config.dataset.max_seq_length, -(-longest // 8) * 8)
    return fit(
        config,
        shape,
        gpus=runtime.world_size,
        gpu_memory=gpu_memory,
        source=runtime.preparation.gpu_memory_source,
        headroom=runtime.preparation.headroom,
        seq_len=seq_len,
        auto=config.training.auto_fit,
    )


def model_shape(metadata: Path) -> ModelShape:
    try:
        return ModelShape.from_config(json.loads((metadata / "config.json").read_text(encoding="utf-8")))
    except (ModelShapeError, ValueError) as error:
        raise ConfigError(f"spec.model.source: the memory estimate cannot read config.json: {error}") from error


class Preparation:
    """One preparation run: the store, the tokenizer and the prepared file of a TrainerConfig."""

    def __init__(self, config: TrainerConfig, environment: TrainerEnvironment) -> None:
        self.config = config
        self.environment = environment
        self.work_dir = Path(config.runtime.work_dir)
        self.store = self.store_for(config.output)

    def store_for(self, output: OutputSpec) -> S3Store:
        return S3Store.from_output(output, environment=self.environment)

    def run(self) -> PreparationReport:
        config, started = self.config, time.monotonic()
        metadata = model.fetch_model_metadata(config.model, config.output, self.work_dir, self.store_for, self.environment)
        tokenizer = model.load_tokenizer(model.ModelFiles(str(metadata), None, None), config.model.trust_remote_code)
        shape = model_shape(metadata)

        def stores(bucket: str) -> S3Store:
            return self.store_for(config.output.model_copy(update={"bucket": bucket}))

        digest = dataset_sha256(config.dataset, self.work_dir, stores, self.environment.hf_token)
        fingerprint = tokenizer_fingerprint(tokenizer)
        key = prepared_key(config.dataset, config.training.seed, fingerprint, digest)
        object_key = layout.join_key(layout.prepared_prefix(config.run_prefix), f"{key}.npz")
        local = self.work_dir / "prepared" / f"{key}.npz"
        if self.store.exists(object_key):
            self.store.download_file(object_key, local)
            data = prepare_data(
                config, tokenizer, world_size=config.runtime.world_size, from_file=read_prepared(local, fingerprint, self.store.uri(object_key))
            )
            logs.event("prepared data reused", uri=self.store.uri(object_key), key=key)
        else:
            data = prepare_data(config, tokenizer, world_size=config.runtime.world_size, store_factory=self.store_for, environment=self.environment)
            write_prepared(local, as_prepared(data, fingerprint, key, digest))
            self.store.upload_file(local, object_key)
            logs.event("prepared data written", uri=self.store.uri(object_key), key=key, size_bytes=local.stat().st_size)
        decision = fit_for(config, shape, int(data.train.records.lengths.max()))
        fitted = decision is not None and config.training.auto_fit and decision.fits
        micro = decision.micro_batch if fitted and decision is not None else config.training.per_device_batch_size
        accumulation = decision.gradient_accumulation_steps if fitted and decision is not None else config.training.gradient_accumulation_steps
        report = PreparationReport(
            data=data_report(data, config, digest, micro_batch=micro, accumulation=accumulation),
            cache_uri=self.store.uri(object_key),
            cache_key=key,
            fit=decision,
            model_parameters=shape.parameters,
            duration_seconds=round(time.monotonic() - started, 3),
        )
        logs.event("preparation finished", **report.to_api())
        return report


def as_prepared(data: PreparedData, tokenizer: str, key: str, dataset_sha: str) -> Prepared:
    """The prepared file of data tokenized and packed in this process."""
    tokens = Tokenized(data.train.records, None if data.eval is None else data.eval.records, data.truncated_records, data.dropped_records)
    return Prepared(tokens, data.train.groups, None if data.eval is None else data.eval.groups, tokenizer, key, dataset_sha)


def load_prepared_data(config: TrainerConfig, tokenizer: Any, store_for: Any, *, rank: int, world_size: int) -> tuple[PreparedData, str]:
    """The trainer's side: the preparation step's file instead of tokenizing (the log says how long loading took),
    and the dataset's content digest it was made from."""
    uri = config.runtime.preparation.cache_uri
    assert uri is not None
    began = time.monotonic()
    bucket, key = parse_s3_uri(uri)
    local = Path(config.runtime.work_dir) / "prepared" / key.rsplit("/", 1)[-1]
    if not local.exists():
        store_for(config.output.model_copy(update={"bucket": bucket})).download_file(key, local)
    prepared = read_prepared(local, tokenizer_fingerprint(tokenizer), uri)
    data = prepare_data(config, tokenizer, rank=rank, world_size=world_size, from_file=prepared)
    logs.event("prepared data loaded; no tokenization in this pod", uri=uri, seconds=round(time.monotonic() - began, 3), sequences=len(data.train))
    return data, prepared.dataset_sha256


def in_trainer_report(config: TrainerConfig, data: PreparedData, environment: TrainerEnvironment, store_for: Any) -> PreparationReport:
    """The report of data prepared inside the trainer (CPU runs): the same figures, the local cache as its place."""

    def stores(bucket: str) -> S3Store:
        store: S3Store = store_for(config.output.model_copy(update={"bucket": bucket}))
        return store

    work_dir = Path(config.runtime.work_dir)
    digest = dataset_sha256(config.dataset, work_dir, stores, environment.hf_token)
    training = config.training
    report = data_report(data, config, digest, micro_batch=training.per_device_batch_size, accumulation=training.gradient_accumulation_steps)
    return PreparationReport(data=report, cache_uri=str(work_dir / "data-cache"), cache_key=digest[:24])


@dataclass(frozen=True)
class RunData:
    """What one training process trains on, and how it came to be: read from the preparation Job's cache, or made here."""

    stream: Any
    """The training batches (``state_dict``/``load_state_dict`` resume them where a checkpoint left off)."""
    eval_batches: Callable[[], Any] | None
    num_train_records: int
    tokenized_in_trainer: bool
    seconds: float
    dataset_sha256: str | None
    report: PreparationReport | None
    """The data report made here (a CPU run without a preparation Job); None when the preparation Job made it."""


def load_run_data(
    config: TrainerConfig, tokenizer: Any, store_for: Any, environment: TrainerEnvironment, *, rank: int, world_size: int, local_main: bool
) -> RunData:
    """This process's share of the data: the preparation Job's cached result when the config names one, else prepared here."""
    began = time.monotonic()
    report: PreparationReport | None = None
    sha: str | None = None
    if config.runtime.preparation.cache_uri:
        prepared, sha = load_prepared_data(config, tokenizer, store_for, rank=rank, world_size=world_size)
    else:
        prepared = prepare_data(config, tokenizer, rank=rank, world_size=world_size, store_factory=store_for, environment=environment)
        if local_main:
            # Prepared here: the same report the preparation Job gives, in this pod's termination message.
            report = in_trainer_report(config, prepared, environment, store_for)
            sha = report.data.dataset_sha256
            logs.event("data report", **report.data.to_api())
    batch_size = config.training.per_device_batch_size
    evaluation = prepared.eval

    def eval_batches() -> Any:
        assert evaluation is not None
        return prepared.eval_batches(batch_size)

    return RunData(
        stream=prepared.train_batches(batch_size),
        eval_batches=eval_batches if evaluation is not None else None,
        num_train_records=int(prepared.num_train_records),
        tokenized_in_trainer=not config.runtime.preparation.cache_uri,
        seconds=round(time.monotonic() - began, 3),
        dataset_sha256=sha,
        report=report,
    )


def run(config: TrainerConfig, environment: TrainerEnvironment | None = None) -> ExitCode:
    """The preparation step in this process; returns the exit code (the report is the termination message)."""
    environment = environment or TrainerEnvironment()
    logs.setup(environment=environment, namespace=config.runtime.namespace, finetunejob=config.runtime.job_name)
    logs.quiet_libraries()
    path = config.runtime.termination_message_path
    try:
        report = Preparation(config, environment).run()
    except BaseException as error:
        return result.report_failure(classify(error), None, path, environment)
    message = TerminationMessage.succeeded(None, None).model_copy(update={"preparation": report})
    result.report_success(message, path)
    return ExitCode.SUCCESS
