"""Checkpoint uploads off the training thread: one at a time, so a local checkpoint folder is pruned only after
its upload has ended, and an upload's error is raised on the training thread at the next checkpoint or the end."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kubetune_api.result import CheckpointRef
from kubetune_trainer import logs
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.storage.run import RunFiles


class CheckpointUploads:
    """The background upload of each local checkpoint to the run's folder; ``after_each`` runs once one is stored."""

    def __init__(self, metrics: TrainerMetrics | None, after_each: Callable[[], None]) -> None:
        self.metrics = metrics
        self.after_each = after_each
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-upload")
        self._pending: Future[CheckpointRef] | None = None

    def submit(self, run_files: RunFiles, local: Path, step: int, loss: float | None) -> None:
        """Start uploading ``local``; the previous upload must have been waited for."""
        assert self._pending is None, "one upload at a time: wait() for the previous one first"
        self._pending = self._pool.submit(self._upload, run_files, local, step, loss)

    def wait(self) -> CheckpointRef | None:
        """The checkpoint the pending upload stored (None when none was pending); its error, if it failed."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _upload(self, run_files: RunFiles, local: Path, step: int, loss: float | None) -> CheckpointRef:
        began = time.monotonic()
        uploaded, pruned = run_files.save_checkpoint(local, step, {"loss": loss})
        seconds = time.monotonic() - began
        if self.metrics is not None:
            m = self.metrics
            m.upload_seconds.labels(**m.labels).observe(seconds)
            m.set(m.last_checkpoint_step, step)
        logs.event("checkpoint uploaded", step=step, uri=uploaded.uri, seconds=round(seconds, 3), deleted_steps=pruned)
        self.after_each()
        return uploaded
