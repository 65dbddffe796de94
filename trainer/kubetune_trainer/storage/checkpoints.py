"""Resumable checkpoints in S3: ``layout.step_prefix(run, N)`` folders with ``checkpoint.json`` last.

``checkpoint.json`` (``layout.CHECKPOINT_MARKER``) is the completion marker: it is written only after
every file of the step is uploaded and verified, and it lists each file with its size and SHA-256. A
restarted trainer resumes from the newest step whose marker exists and whose listed files are all
present, so a checkpoint cut short by a kill or an outage is skipped, never half-loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_api import layout
from kubetune_api.result import CheckpointRef
from kubetune_trainer.storage.errors import StorageError
from kubetune_trainer.storage.paths import iter_files, parse_s3_uri, safe_relative_path, sha256_file
from kubetune_trainer.storage.store import S3Store

CHECKPOINT_SCHEMA_VERSION = 1
_STEP_NUMBER = re.compile(r"(\d+)/$")


@dataclass(frozen=True)
class DownloadedCheckpoint:
    """A checkpoint copied to local disk."""

    step: int
    path: Path


def upload_checkpoint(store: S3Store, local_ckpt_dir: Path, run_prefix: str, step: int, meta: dict[str, Any]) -> str:
    """Upload a saved checkpoint folder for ``step`` and mark it complete; returns its s3:// URI."""
    prefix = layout.step_prefix(run_prefix, step)
    marker = prefix + layout.CHECKPOINT_MARKER
    # Uploading the same step again (after a restart) must not leave the old marker vouching
    # for files that are being replaced.
    store.delete_keys([marker])
    files: list[dict[str, Any]] = []
    for path in iter_files(local_ckpt_dir):
        relative = path.relative_to(local_ckpt_dir).as_posix()
        if relative == layout.CHECKPOINT_MARKER:
            continue
        # A step folder is written once: nothing there can be identical, so no HEAD first.
        info = store.upload_file(path, prefix + relative, skip_if_identical=False)
        files.append({"path": relative, "sha256": info.sha256, "size": info.size})
    if not files:
        raise StorageError(f"checkpoint folder {local_ckpt_dir} is empty")
    store.put_json(
        marker,
        {
            "schemaVersion": CHECKPOINT_SCHEMA_VERSION,
            "step": step,
            "created": datetime.now(UTC).isoformat(),
            "files": files,
            "meta": meta,
        },
    )
    return store.uri(prefix)


def _steps(store: S3Store, run_prefix: str) -> list[int]:
    """Step numbers of every checkpoint folder, complete or not, newest first."""
    steps: list[int] = []
    for folder in store.list_prefixes(layout.checkpoints_prefix(run_prefix)):
        match = _STEP_NUMBER.search(folder)
        # Only folders named exactly as the layout names a step count, not e.g. step-10.partial/.
        if match and folder == layout.step_prefix(run_prefix, int(match.group(1))):
            steps.append(int(match.group(1)))
    return sorted(steps, reverse=True)


def _complete_marker(store: S3Store, prefix: str) -> dict[str, Any] | None:
    """The step's marker when it and every file it lists (with the listed size) are present."""
    marker = store.get_json(prefix + layout.CHECKPOINT_MARKER)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list) or not marker["files"]:
        return None
    present = {info.key: info.size for info in store.list_objects(prefix)}
    for entry in marker["files"]:
        if not isinstance(entry, dict) or present.get(prefix + str(entry.get("path"))) != entry.get("size"):
            return None
    return marker


def complete_checkpoints(store: S3Store, run_prefix: str) -> list[CheckpointRef]:
    """Every complete checkpoint of the run, newest first."""
    found: list[CheckpointRef] = []
    for step in _steps(store, run_prefix):
        prefix = layout.step_prefix(run_prefix, step)
        if _complete_marker(store, prefix) is not None:
            found.append(CheckpointRef(step=step, uri=store.uri(prefix)))
    return found


def newest_complete(store: S3Store, run_prefix: str) -> CheckpointRef | None:
    """The newest checkpoint that has its marker and all its files, or None when there is none."""
    for step in _steps(store, run_prefix):
        prefix = layout.step_prefix(run_prefix, step)
        if _complete_marker(store, prefix) is not None:
            return CheckpointRef(step=step, uri=store.uri(prefix))
    return None


def download_checkpoint(store: S3Store, uri: str, local_dir: Path) -> DownloadedCheckpoint:
    """Copy the checkpoint at ``uri`` into ``local_dir`` and check every file against its marker.

    Files already in ``local_dir`` with the listed SHA-256 are kept, so a pod restarted on the
    same node does not download them again.
    """
    bucket, key = parse_s3_uri(uri)
    if bucket != store.bucket:
        raise ValueError(f"{uri} is not in bucket {store.bucket}")
    prefix = key.strip("/") + "/"
    marker = _complete_marker(store, prefix)
    if marker is None:
        raise StorageError(f"{uri} is not a complete checkpoint (its {layout.CHECKPOINT_MARKER} or one of its files is missing)")
    for entry in marker["files"]:
        relative = safe_relative_path(str(entry["path"]))
        target = local_dir / relative
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            continue
        store.download_file(prefix + relative.as_posix(), target)
        if sha256_file(target) != entry["sha256"]:
            raise StorageError(f"{uri}{relative} does not match the sha256 in its {layout.CHECKPOINT_MARKER}")
    return DownloadedCheckpoint(step=int(marker["step"]), path=local_dir)


def prune(store: S3Store, run_prefix: str, keep_last: int) -> list[int]:
    """Delete checkpoints older than the newest ``keep_last`` complete ones; returns the deleted steps.

    Incomplete folders newer than the oldest kept checkpoint are left alone (one may be
    uploading right now). Each folder loses its marker first, so a deletion cut short leaves an
    incomplete folder, never a complete-looking one with files missing.
    """
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    kept = complete_checkpoints(store, run_prefix)[:keep_last]
    if len(kept) < keep_last:
        return []
    oldest_kept = kept[-1].step
    deleted: list[int] = []
    for step in _steps(store, run_prefix):
        if step >= oldest_kept:
            continue
        prefix = layout.step_prefix(run_prefix, step)
        store.delete_keys([prefix + layout.CHECKPOINT_MARKER])
        store.delete_prefix(prefix)
        deleted.append(step)
    return sorted(deleted)
