"""One attempt's dealings with its run's folder in S3, in the order the recipe needs them.

``published`` first (a run whose adapter is already published reports it instead of training again),
then ``begin`` (take the run over, abort the uploads earlier attempts left unfinished, find the checkpoint to resume from),
``save_checkpoint`` while training (keeping the newest ``spec.output.keepCheckpoints``), and ``publish``
at the end (adapter, merged model, the job's latest pointer, then the checkpoints go unless the spec
keeps them). Every write is fenced by the attempt (``fencing``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_api.result import CheckpointRef, PublishedRun, TrainingResult
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer import logs
from kubetune_trainer.storage import checkpoints
from kubetune_trainer.storage.checkpoints import ResumePoint
from kubetune_trainer.storage.errors import StorageError
from kubetune_trainer.storage.fencing import Attempt
from kubetune_trainer.storage.publish import PublishResult, point_latest, publish_adapter, publish_merged, publish_rejected, published_result
from kubetune_trainer.storage.store import S3Store


@dataclass(frozen=True)
class Publication:
    """What ``RunFiles.publish`` wrote and removed."""

    adapter: PublishResult
    merged: PublishResult | None
    latest: bool
    """Whether latest.json now names this run (False: a namesake published later)."""
    deleted_steps: list[int]


class RunFiles:
    """The run's folder as one attempt sees it."""

    def __init__(self, store: S3Store, config: TrainerConfig, environment: TrainerEnvironment) -> None:
        self.store = store
        self.config = config
        self.attempt = Attempt.of(store, config, environment)

    def published(self) -> TrainingResult | None:
        """The run's result when an earlier attempt already published it completely."""
        return published_result(self.store, self.config.run_prefix, self.config.run_id, merged=self.config.output.merged_model)

    def begin(self, local_dir: Callable[[int], Path], check: Callable[[Path], None]) -> ResumePoint:
        """Take the run over, abort the multipart uploads earlier attempts left unfinished, and bring the newest sound
        checkpoint to ``local_dir(step)`` (``checkpoints.resume_point``), warning about each damaged one passed over."""
        self.attempt.claim()
        aborted = self.store.abort_uploads(self.config.run_prefix + "/")
        logs.event("run taken over", run=self.config.run_id, attempt=self.attempt.token, aborted_uploads=aborted)
        point = checkpoints.resume_point(self.store, self.config.run_prefix, self.config.run_id, local_dir, check)
        for skipped in point.skipped:
            logs.event("damaged checkpoint passed over", level=30, step=skipped.step, uri=skipped.uri, reason=skipped.reason)
        return point

    def fetch(self, step: int, local_dir: Path) -> Path:
        """Bring the checkpoint of ``step`` (chosen by ``begin`` on another pod) to ``local_dir``."""
        marker = checkpoints.read_marker(self.store, self.config.run_prefix, step, self.config.run_id)
        if marker is None:
            raise StorageError(f"the checkpoint of step {step} in {self.store.uri(self.config.run_prefix)} disappeared before this pod could fetch it")
        return checkpoints.download_checkpoint(self.store, marker, local_dir)

    def save_checkpoint(self, local: Path, step: int, meta: dict[str, Any]) -> tuple[CheckpointRef, list[int]]:
        """Upload and commit a checkpoint, then delete those older than the newest keepCheckpoints; returns it and the deleted steps."""
        uri = checkpoints.upload_checkpoint(self.store, local, self.attempt, step, meta)
        pruned = checkpoints.prune(self.store, self.attempt, self.config.output.keep_checkpoints)
        # The time lets the operator count the work an attempt that fails later loses (status.usage).
        return CheckpointRef(step=step, uri=uri, time=datetime.now(UTC).replace(microsecond=0)), pruned

    def keep_rejected(self, adapter_dir: Path, manifest: dict[str, Any]) -> PublishResult:
        """Keep an adapter that failed the evaluation gate in the run's rejected folder; nothing is published."""
        return publish_rejected(self.store, adapter_dir, self.attempt, manifest)

    def publish(self, adapter_dir: Path, merged_dir: Path | None, manifest: dict[str, Any]) -> Publication:
        adapter = publish_adapter(self.store, adapter_dir, self.attempt, manifest)
        merged = publish_merged(self.store, merged_dir, self.attempt, manifest) if merged_dir is not None else None
        pointer = PublishedRun(
            run_uid=self.config.run_id,
            adapter_uri=adapter.uri,
            manifest_sha256=adapter.manifest_sha256,
            merged_uri=merged.uri if merged is not None else None,
            published=datetime.now(UTC),
        )
        latest = point_latest(self.store, self.config.job_prefix, self.attempt, pointer)
        deleted = [] if self.config.output.keep_checkpoints_after_success else checkpoints.delete_all(self.store, self.attempt)
        merged_uri = merged.uri if merged is not None else None
        logs.event("adapter published", uri=adapter.uri, size_bytes=adapter.size_bytes, merged=merged_uri, latest=latest, deleted_checkpoints=deleted)
        return Publication(adapter=adapter, merged=merged, latest=latest, deleted_steps=deleted)
