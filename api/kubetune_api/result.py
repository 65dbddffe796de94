"""What the trainer reports back: the termination message, its result and checkpoint references.

The trainer writes a ``TerminationMessage`` (``encode``: camelCase JSON within the kubelet's 4 KiB) to its
termination-message path; the operator reads it from the pod status with ``TerminationMessage.decode`` and
copies ``result`` and ``lastCheckpoint`` into the FinetuneJob status. ``PublishedRun`` is the document the
trainer writes to ``layout.LATEST`` after a publication. Nothing here is built by hand on either side.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field, ValidationError

from kubetune_api.exitcodes import REASONS, ExitCode
from kubetune_api.fit import FitDecision
from kubetune_api.quality import EvaluationReport
from kubetune_api.schema import ApiModel
from kubetune_api.serving import AdapterFacts

MAX_BYTES = 4096
"""Kubernetes keeps at most 4 KiB of a termination message."""


class CheckpointRef(ApiModel):
    """A complete checkpoint in S3."""

    step: int = Field(ge=0, description="Step the checkpoint was taken at.")
    uri: str = Field(max_length=2048, description="s3:// URI of the checkpoint folder.")
    time: datetime | None = Field(default=None, description="When it was uploaded.")


MAX_SKIPPED = 4
"""Skipped checkpoints a result lists: enough to explain a fallback, small enough for the termination message."""


class SkippedCheckpoint(ApiModel):
    """A checkpoint the run could not resume from (damaged or unreadable), passed over for an older one."""

    step: int = Field(ge=0, description="Step of the checkpoint passed over.")
    uri: str = Field(max_length=2048, description="s3:// URI of its folder.")
    reason: str = Field(max_length=512, description="Why it could not be used.")


class TrainingResult(ApiModel):
    """The published adapter and what the run took to make it."""

    adapter_uri: str = Field(max_length=2048, description="s3:// URI of the adapter folder (manifest.json inside lists every file).")
    manifest_sha256: str | None = Field(default=None, max_length=64, description="sha256 of manifest.json.")
    size_bytes: int | None = Field(default=None, ge=0, description="Total size of the adapter files.")
    final_loss: float | None = Field(default=None, description="Training loss at the last step.")
    steps: int | None = Field(default=None, ge=0, description="Optimizer steps run.")
    tokens: int | None = Field(default=None, ge=0, description="Tokens trained on.")
    duration_seconds: float | None = Field(default=None, ge=0, description="Wall time of the final attempt.")
    peak_memory_bytes: int | None = Field(default=None, ge=0, description="Peak accelerator (or CPU resident) memory of rank 0.")
    resumed_from_step: int | None = Field(
        default=None, ge=0, description="Step of the checkpoint the final attempt resumed from; absent when it trained from the start."
    )
    skipped_checkpoints: list[SkippedCheckpoint] | None = Field(
        default=None,
        max_length=MAX_SKIPPED,
        description="Newer checkpoints the final attempt found damaged and passed over before resuming from resumedFromStep.",
    )
    tokenized_in_trainer: bool | None = Field(
        default=None, description="False when the trainer loaded the preparation step's data and tokenized nothing; True when it prepared the data itself."
    )
    data_seconds: float | None = Field(default=None, ge=0, description="Seconds the trainer spent getting its data ready (loading or tokenizing).")
    micro_batch: int | None = Field(default=None, ge=1, description="Micro-batch the run ended with (smaller than asked after out-of-memory adjustments).")
    oom_adjustments: int | None = Field(
        default=None, ge=0, description="Times the trainer halved the micro-batch (doubling accumulation) after running out of GPU memory."
    )
    adapter: AdapterFacts | None = Field(default=None, description="Rank, target modules and base architecture of the adapter, for the serving check.")


class PublishedRun(ApiModel):
    """``latest.json``: the newest run of a FinetuneJob name whose adapter was published, written after its manifest."""

    run_uid: str = Field(max_length=128, description="The run (the FinetuneJob's metadata.uid) that published it.")
    adapter_uri: str = Field(max_length=2048, description="s3:// URI of the run's adapter folder.")
    manifest_sha256: str = Field(max_length=64, description="sha256 of the adapter's manifest.json.")
    merged_uri: str | None = Field(default=None, max_length=2048, description="s3:// URI of the merged model, when one was published.")
    published: datetime = Field(description="When the publication completed.")


class LengthQuantiles(ApiModel):
    """Token lengths of the training records after truncation."""

    p50: int = Field(ge=0, description="Median record length in tokens.")
    p90: int = Field(ge=0, description="90th percentile.")
    p99: int = Field(ge=0, description="99th percentile.")
    max: int = Field(ge=0, description="Longest record.")


class DataReport(ApiModel):
    """What the dataset turned into once validated, tokenized and packed."""

    train_records: int = Field(ge=0, description="Training records kept.")
    eval_records: int = Field(default=0, ge=0, description="Evaluation records kept.")
    tokens: int = Field(ge=0, description="Tokens in the training records.")
    truncated_records: int = Field(default=0, ge=0, description="Records cut to maxSeqLength.")
    dropped_records: int = Field(default=0, ge=0, description="Records dropped for having no target token within maxSeqLength.")
    sequences: int = Field(ge=0, description="Training sequences (packed windows, or one per record without packing).")
    packing_efficiency: float = Field(ge=0, le=1, description="Share of sequence slots holding real tokens (1.0: no padding).")
    steps_per_epoch: int = Field(ge=0, description="Optimizer steps per epoch with the chosen micro-batch and accumulation.")
    total_steps: int = Field(ge=0, description="Optimizer steps of the run.")
    lengths: LengthQuantiles = Field(description="Record lengths in tokens.")
    dataset_sha256: str = Field(max_length=64, description="SHA-256 over the dataset's files (or the Hugging Face revision): part of the cache key.")


class PreparationReport(ApiModel):
    """The preparation step's result: the data report, the prepared-data cache and the memory fit."""

    data: DataReport = Field(description="Records, tokens and steps of the prepared data.")
    cache_uri: str = Field(max_length=2048, description="Where the tokenized, packed data is (s3:// or a local path); the trainer loads it.")
    cache_key: str = Field(max_length=64, description="Digest of everything that decides the prepared data.")
    fit: FitDecision | None = Field(default=None, description="Memory estimate per GPU and the settings chosen; absent for CPU jobs.")
    model_parameters: int | None = Field(
        default=None,
        ge=0,
        description="Parameters of the base model, from its config.json: the size of the trainer's scratch volume when spec.resources.scratchSize is unset.",
    )
    duration_seconds: float | None = Field(default=None, ge=0, description="Wall time of the preparation.")


class TerminationMessage(ApiModel):
    """The trainer's last word, read by the operator when the pod ends."""

    status: Literal["Succeeded", "Failed"] = Field(description="How the run ended.")
    reason: str = Field(max_length=64, description="CamelCase reason (one of exitcodes.REASONS).")
    message: str | None = Field(default=None, description="What went wrong and what to do; credentials redacted.")
    exit_code: int = Field(default=0, ge=0, le=255, description="The process exit code.")
    result: TrainingResult | None = Field(default=None, description="The published adapter, when the run succeeded.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="The newest complete checkpoint of the run.")
    preparation: PreparationReport | None = Field(default=None, description="What the preparation step found, when this process prepared the data.")
    evaluation: EvaluationReport | None = Field(default=None, description="Base and final eval loss and the gate's verdict, when the run had an eval split.")

    @classmethod
    def succeeded(cls, result: TrainingResult | None, last_checkpoint: CheckpointRef | None, evaluation: EvaluationReport | None = None) -> TerminationMessage:
        return cls(status="Succeeded", reason=REASONS[ExitCode.SUCCESS], result=result, last_checkpoint=last_checkpoint, evaluation=evaluation)

    @classmethod
    def failed(cls, code: ExitCode, message: str, last_checkpoint: CheckpointRef | None, evaluation: EvaluationReport | None = None) -> TerminationMessage:
        return cls(status="Failed", reason=REASONS[code], message=message, exit_code=int(code), last_checkpoint=last_checkpoint, evaluation=evaluation)

    def encode(self) -> bytes:
        """Compact camelCase JSON within MAX_BYTES, shortening the free-text message if needed."""
        data = self.model_dump_json(by_alias=True, exclude_none=True).encode()
        text = self.message or ""
        while len(data) > MAX_BYTES and len(text) > 3:
            text = text[: max(0, len(text) - (len(data) - MAX_BYTES) - 16)] + "..."
            data = self.model_copy(update={"message": text}).model_dump_json(by_alias=True, exclude_none=True).encode()
        return data

    @classmethod
    def decode(cls, text: str) -> TerminationMessage | None:
        """The message a trainer wrote, or None for anything else (a log tail the kubelet fell back to)."""
        try:
            return cls.model_validate_json(text)
        except (ValidationError, ValueError):
            return None
