"""Resumable checkpoints in S3: ``layout.step_prefix(run, N)`` folders with ``checkpoint.json`` last.

An attempt uploads the files of a step into a folder of its own (``layout.step_files_prefix``) and then
commits the step with ``checkpoint.json`` (``layout.CHECKPOINT_MARKER``), a conditional write that names
the run and the attempt and lists each file with its size and SHA-256. A step folder without a marker
was cut short (a kill, an outage) and is skipped. A marker that cannot be trusted (not JSON, another
run's, a listed file missing or of another size, a download whose SHA-256 differs, a file that does not
load) makes the checkpoint damaged: the run resumes from the newest older sound one instead and reports
which it passed over. While the run trains, only the newest ``spec.output.keepCheckpoints`` complete
checkpoints are kept; each deletion removes the marker first, so one cut short never looks complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_api import layout
from kubetune_api.result import MAX_SKIPPED, CheckpointRef, SkippedCheckpoint
from kubetune_trainer.storage.errors import CheckpointDamaged, StorageError
from kubetune_trainer.storage.fencing import TOKEN_PATTERN, Attempt
from kubetune_trainer.storage.paths import ListedFile, iter_files, listed_files, safe_relative_path, sha256_file
from kubetune_trainer.storage.store import S3Store

CHECKPOINT_SCHEMA_VERSION = 2
_STEP_NUMBER = re.compile(r"(\d+)/$")


@dataclass(frozen=True)
class Marker:
    """A step's completion marker, read and checked against what the folder holds."""

    step: int
    prefix: str
    attempt: str
    files: list[ListedFile]

    @property
    def files_prefix(self) -> str:
        """Where the attempt that committed the step put its files."""
        return layout.join_key(self.prefix, self.attempt) + "/"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from (None: from the start) and the newer ones it had to pass over."""

    checkpoint: CheckpointRef | None
    skipped: list[SkippedCheckpoint] = field(default_factory=list)


def upload_checkpoint(store: S3Store, local_ckpt_dir: Path, attempt: Attempt, step: int, meta: dict[str, Any]) -> str:
    """Upload a saved checkpoint folder for ``step`` and commit it with its marker; returns its s3:// URI."""
    prefix = layout.step_prefix(attempt.run_prefix, step)
    files_prefix = layout.step_files_prefix(attempt.run_prefix, step, attempt.token)
    marker_key = prefix + layout.CHECKPOINT_MARKER
    attempt.check()
    earlier = store.get_versioned(marker_key)
    if earlier is not None and _attempt_of(earlier[0]) == attempt.token:
        # This attempt saves the step again: its marker must not vouch for files that are being replaced.
        store.delete_keys([marker_key])
    files: list[ListedFile] = []
    for path in iter_files(local_ckpt_dir):
        relative = path.relative_to(local_ckpt_dir).as_posix()
        if relative == layout.CHECKPOINT_MARKER:
            continue
        # The attempt's own folder, written by nobody else: nothing there can be identical, so no HEAD first.
        info = store.upload_file(path, files_prefix + relative, skip_if_identical=False)
        files.append(ListedFile(path=relative, sha256=info.sha256 or "", size=info.size))
    if not files:
        raise StorageError(f"checkpoint folder {local_ckpt_dir} is empty")
    document = attempt.listing(CHECKPOINT_SCHEMA_VERSION, files, step=step, meta=meta)
    attempt.check()
    # A marker still there is another attempt's (a stale writer's, or a damaged one passed over): replaced as read.
    current = store.get_versioned(marker_key)
    store.put_json(marker_key, document, create=current is None, replacing=current[1] if current is not None else None)
    # The files the replaced marker listed are nobody's now.
    store.delete_keys([key for key in store.list_keys(prefix) if key != marker_key and not key.startswith(files_prefix)])
    return store.uri(prefix)


def _attempt_of(marker: bytes) -> str | None:
    try:
        document = json.loads(marker)
    except ValueError:
        return None
    return document.get("attempt") if isinstance(document, dict) else None


def steps(store: S3Store, run_prefix: str) -> list[int]:
    """Step numbers of every checkpoint folder, complete or not, newest first."""
    found: list[int] = []
    for folder in store.list_prefixes(layout.checkpoints_prefix(run_prefix)):
        match = _STEP_NUMBER.search(folder)
        # Only folders named exactly as the layout names a step count, not e.g. step-10.partial/.
        if match and folder == layout.step_prefix(run_prefix, int(match.group(1))):
            found.append(int(match.group(1)))
    return sorted(found, reverse=True)


def read_marker(store: S3Store, run_prefix: str, step: int, run_uid: str) -> Marker | None:
    """The marker of ``step`` once every file it lists is present with the listed size; None when the step has no
    marker (it was cut short). Raises ``CheckpointDamaged`` for a marker that cannot be trusted."""
    prefix = layout.step_prefix(run_prefix, step)
    where = store.uri(prefix + layout.CHECKPOINT_MARKER)
    data = store.get_bytes(prefix + layout.CHECKPOINT_MARKER)
    if data is None:
        return None
    try:
        document = json.loads(data)
    except ValueError as error:
        raise CheckpointDamaged(f"{where} is not valid JSON ({error})") from error
    files = listed_files(document.get("files")) if isinstance(document, dict) else None
    attempt = document.get("attempt") if isinstance(document, dict) else None
    if not files or not isinstance(attempt, str) or not TOKEN_PATTERN.match(attempt) or document.get("step") != step:
        raise CheckpointDamaged(f"{where} is not a checkpoint marker of step {step} (schema version {CHECKPOINT_SCHEMA_VERSION})")
    if document.get("runUid") != run_uid:
        raise CheckpointDamaged(f"{where} belongs to run {document.get('runUid')!r}, not to this run ({run_uid}): it is never resumed from")
    for item in files:
        try:
            safe_relative_path(item.path)
        except StorageError as error:
            raise CheckpointDamaged(f"{where} lists {item.path!r}, a path outside its folder") from error
    marker = Marker(step=step, prefix=prefix, attempt=attempt, files=files)
    present = {info.key: info.size for info in store.list_objects(marker.files_prefix)}
    for item in files:
        if present.get(marker.files_prefix + item.path) != item.size:
            raise CheckpointDamaged(f"{store.uri(marker.files_prefix + item.path)}, listed in {where}, is missing or has another size")
    return marker


def complete_checkpoints(store: S3Store, run_prefix: str, run_uid: str) -> list[CheckpointRef]:
    """Every checkpoint of the run whose marker and files are in place, newest first."""
    found: list[CheckpointRef] = []
    for step in steps(store, run_prefix):
        try:
            marker = read_marker(store, run_prefix, step, run_uid)
        except CheckpointDamaged:
            continue
        if marker is not None:
            found.append(CheckpointRef(step=step, uri=store.uri(marker.prefix)))
    return found


def download_checkpoint(store: S3Store, marker: Marker, local_dir: Path) -> Path:
    """Copy a checkpoint into ``local_dir`` and check every file against its marker; ``CheckpointDamaged`` on a mismatch.

    Files already in ``local_dir`` with the listed SHA-256 are kept, so a pod restarted on the
    same node does not download them again.
    """
    for item in marker.files:
        relative = safe_relative_path(item.path)
        target = local_dir / relative
        if target.is_file() and target.stat().st_size == item.size and sha256_file(target) == item.sha256:
            continue
        store.download_file(marker.files_prefix + relative.as_posix(), target)
        if sha256_file(target) != item.sha256:
            raise CheckpointDamaged(f"{store.uri(marker.files_prefix)}{relative} does not match the sha256 in its {layout.CHECKPOINT_MARKER}")
    return local_dir


def resume_point(store: S3Store, run_prefix: str, run_uid: str, local_dir: Callable[[int], Path], check: Callable[[Path], None]) -> ResumePoint:
    """Bring the newest sound checkpoint of the run to ``local_dir(step)``, checked by ``check`` (which raises
    ``CheckpointDamaged`` for files that do not load), passing over damaged newer ones."""
    skipped: list[SkippedCheckpoint] = []
    for step in steps(store, run_prefix):
        uri = store.uri(layout.step_prefix(run_prefix, step))
        try:
            marker = read_marker(store, run_prefix, step, run_uid)
            if marker is None:
                continue
            check(download_checkpoint(store, marker, local_dir(step)))
        except CheckpointDamaged as damaged:
            skipped.append(SkippedCheckpoint(step=step, uri=uri, reason=damaged.message[:512]))
            continue
        return ResumePoint(CheckpointRef(step=step, uri=uri), skipped[:MAX_SKIPPED])
    return ResumePoint(None, skipped[:MAX_SKIPPED])


def prune(store: S3Store, attempt: Attempt, keep_last: int) -> list[int]:
    """Delete checkpoints older than the newest ``keep_last`` complete ones; returns the deleted steps.

    Incomplete or damaged folders newer than the oldest kept checkpoint are left alone (one may be
    uploading right now).
    """
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1")
    kept = complete_checkpoints(store, attempt.run_prefix, attempt.run_uid)[:keep_last]
    if len(kept) < keep_last:
        return []
    doomed = [step for step in steps(store, attempt.run_prefix) if step < kept[-1].step]
    _delete(store, attempt, doomed)
    return sorted(doomed)


def delete_all(store: S3Store, attempt: Attempt) -> list[int]:
    """Delete every checkpoint of the run (after its adapter is published); returns the deleted steps."""
    doomed = steps(store, attempt.run_prefix)
    _delete(store, attempt, doomed)
    return sorted(doomed)


def _delete(store: S3Store, attempt: Attempt, doomed: list[int]) -> None:
    if not doomed:
        return
    attempt.check()
    for step in doomed:
        prefix = layout.step_prefix(attempt.run_prefix, step)
        # The marker goes first: a deletion cut short leaves an incomplete folder, never a complete-looking one.
        store.delete_keys([prefix + layout.CHECKPOINT_MARKER])
        store.delete_prefix(prefix)
