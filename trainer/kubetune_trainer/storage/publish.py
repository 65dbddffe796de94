"""Publication of the finished adapter (and optionally the merged model) to S3, and the job's latest pointer.

A publication is a folder of files plus ``manifest.json``, which is written last and lists every
file with its size and SHA-256, and the run and attempt that wrote it. A folder counts as published
only when its manifest exists and every listed file is present with that size and checksum, so an
upload cut short never looks complete. Publishing again over a partial (or complete) earlier attempt
of the same run is safe: the old manifest is removed first, files already present unchanged are not
sent again, and objects the new publication does not list are deleted before the new manifest
appears. Every step is fenced (``fencing.Attempt.check``): an attempt that another has taken over
writes nothing. After the adapter, ``layout.LATEST`` is pointed at it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api import layout
from kubetune_api.result import PublishedRun, TrainingResult
from kubetune_api.runtime import TrainerConfig
from kubetune_trainer.storage.errors import PreconditionFailed, StorageError
from kubetune_trainer.storage.fencing import Attempt
from kubetune_trainer.storage.paths import ListedFile, iter_files, json_bytes, listed_files, parse_s3_uri
from kubetune_trainer.storage.store import S3Store

MANIFEST_SCHEMA_VERSION = 1
RESERVED_MANIFEST_KEYS = frozenset({"schemaVersion", "kind", "created", "files", "sizeBytes", "runUid", "attempt", "pod"})
LOSS_HISTORY_KEPT = 200
POINTER_TRIES = 5


@dataclass(frozen=True)
class PublishResult:
    """Where a publication landed and what it holds; ``size_bytes`` excludes the manifest itself."""

    uri: str
    manifest_sha256: str
    size_bytes: int
    files: list[ListedFile]


def publish_adapter(store: S3Store, local_dir: Path, attempt: Attempt, manifest_extra: dict[str, Any]) -> PublishResult:
    """Upload the saved adapter in ``local_dir`` to ``layout.adapter_prefix`` of the attempt's run, manifest last.

    ``manifest_extra`` adds the run's description (``run_manifest``: base model and revision, dataset,
    hyperparameters, metrics summary) to the manifest.
    """
    return _publish(store, local_dir, layout.adapter_prefix(attempt.run_prefix), attempt, manifest_extra, kind="AdapterManifest")


def publish_rejected(store: S3Store, local_dir: Path, attempt: Attempt, manifest_extra: dict[str, Any]) -> PublishResult:
    """Keep an adapter that failed the evaluation gate under ``layout.rejected_prefix`` of the attempt's run, never where adapters are published."""
    return _publish(store, local_dir, layout.rejected_prefix(attempt.run_prefix), attempt, manifest_extra, kind="RejectedAdapterManifest")


def publish_merged(store: S3Store, local_dir: Path, attempt: Attempt, manifest_extra: dict[str, Any]) -> PublishResult:
    """Upload the merged model in ``local_dir`` to ``layout.merged_prefix`` of the attempt's run, same manifest scheme."""
    return _publish(store, local_dir, layout.merged_prefix(attempt.run_prefix), attempt, manifest_extra, kind="MergedModelManifest")


def _publish(store: S3Store, local_dir: Path, prefix: str, attempt: Attempt, manifest_extra: dict[str, Any], *, kind: str) -> PublishResult:
    clash = RESERVED_MANIFEST_KEYS & manifest_extra.keys()
    if clash:
        raise ValueError(f"manifest_extra may not set {sorted(clash)}: the publication fills them in")
    paths = [path for path in iter_files(local_dir) if path.relative_to(local_dir).as_posix() != layout.MANIFEST]
    if not paths:
        raise StorageError(f"nothing to publish: {local_dir} holds no files")

    manifest_key = layout.join_key(prefix, layout.MANIFEST)
    attempt.check()
    # Withdraw an earlier manifest before touching its files, so readers never see a manifest
    # that vouches for files in the middle of being replaced.
    store.delete_keys([manifest_key])

    files: list[ListedFile] = []
    for path in paths:
        relative = path.relative_to(local_dir).as_posix()
        attempt.check()
        info = store.upload_file(path, layout.join_key(prefix, relative))
        files.append(ListedFile(path=relative, sha256=info.sha256 or "", size=info.size))

    listed = {layout.join_key(prefix, item.path) for item in files}
    stale = [key for key in store.list_keys(prefix + "/") if key not in listed and key != manifest_key]
    store.delete_keys(stale)

    size_bytes = sum(item.size for item in files)
    manifest = {**attempt.listing(MANIFEST_SCHEMA_VERSION, files, kind=kind, sizeBytes=size_bytes), **manifest_extra}
    data = json_bytes(manifest)
    attempt.check()
    # Created, never replaced: if another writer's manifest appeared since the withdrawal, this one loses.
    store.put_bytes(manifest_key, data, content_type="application/json", create=True)
    return PublishResult(uri=store.uri(prefix + "/"), manifest_sha256=hashlib.sha256(data).hexdigest(), size_bytes=size_bytes, files=files)


def point_latest(store: S3Store, job_prefix: str, attempt: Attempt, run: PublishedRun) -> bool:
    """Point ``layout.latest_key(job_prefix)`` at ``run`` unless it names a publication completed later (a namesake's);
    returns whether it now names ``run``."""
    key = layout.latest_key(job_prefix)
    for _ in range(POINTER_TRIES):
        current = store.get_versioned(key)
        if current is not None:
            named = _published_run(current[0])
            if named is not None and named.published > run.published:
                return False
        attempt.check()
        try:
            store.put_bytes(key, json_bytes(run.to_api()), content_type="application/json", create=current is None, replacing=current[1] if current else None)
            return True
        except PreconditionFailed:
            continue  # another run of this name published in between: compare with that one
    raise StorageError(f"could not update {store.uri(key)}: it changed on each of {POINTER_TRIES} tries")


def _published_run(data: bytes) -> PublishedRun | None:
    try:
        return PublishedRun.model_validate_json(data)
    except ValueError:
        return None


def _prefix_of(store: S3Store, uri: str) -> str:
    bucket, key = parse_s3_uri(uri)
    if bucket != store.bucket:
        raise ValueError(f"{uri} is not in bucket {store.bucket}")
    return key.strip("/")


def read_manifest(store: S3Store, uri: str) -> dict[str, Any] | None:
    """The manifest of the publication at ``uri`` (an s3:// folder), or None when it has none."""
    document = store.get_json(layout.join_key(_prefix_of(store, uri), layout.MANIFEST))
    if document is None:
        return None
    if not isinstance(document, dict):
        raise StorageError(f"{uri}{layout.MANIFEST} is not a JSON object")
    return document


def verify_publication(store: S3Store, uri: str, *, deep: bool = False) -> bool:
    """True when ``uri`` holds a manifest and every file it lists, with the listed size and SHA-256.

    The SHA-256 compared is the one recorded with each object at upload (after S3 checked the
    bytes it received). ``deep`` downloads every file and hashes it instead, for audits.
    """
    manifest = read_manifest(store, uri)
    if manifest is None or manifest.get("schemaVersion") != MANIFEST_SCHEMA_VERSION:
        return False
    files = listed_files(manifest.get("files"))
    if not files:
        return False
    prefix = _prefix_of(store, uri)
    for item in files:
        key = layout.join_key(prefix, item.path)
        info = store.head(key)
        if info is None or info.size != item.size:
            return False
        if deep:
            if store.sha256_object(key) != item.sha256:
                return False
        elif info.sha256 != item.sha256:
            return False
    return True


def published_result(store: S3Store, run_prefix: str, run_uid: str, *, merged: bool) -> TrainingResult | None:
    """The result of the run, when its adapter (and the merged model, with ``merged``) is already published by this
    run and verifies: a repeated attempt then reports it instead of training again."""
    uri = store.uri(layout.adapter_prefix(run_prefix) + "/")
    data = store.get_bytes(layout.join_key(layout.adapter_prefix(run_prefix), layout.MANIFEST))
    try:
        manifest = json.loads(data) if data is not None else None
    except ValueError:
        return None
    if not isinstance(manifest, dict) or manifest.get("runUid") != run_uid or not verify_publication(store, uri):
        return None
    if merged and not verify_publication(store, store.uri(layout.merged_prefix(run_prefix) + "/")):
        return None
    metrics: dict[str, Any] = manifest["metrics"] if isinstance(manifest.get("metrics"), dict) else {}
    return TrainingResult(
        adapter_uri=uri,
        manifest_sha256=hashlib.sha256(data or b"").hexdigest(),
        size_bytes=manifest.get("sizeBytes"),
        final_loss=metrics.get("finalLoss"),
        steps=metrics.get("steps"),
        tokens=metrics.get("tokens"),
    )


def run_manifest(
    config: TrainerConfig, *, steps: int, tokens: int, final_loss: float | None, eval_loss: float | None, losses: list[tuple[int, float]]
) -> dict[str, Any]:
    """What a publication's manifest records about the run besides the file list: inputs, settings, results."""
    quantization = config.effective_quantization()
    return {
        "baseModel": {"source": config.model.source, "revision": config.model.revision},
        "dataset": config.dataset.to_api(),
        "method": config.method.value,
        "lora": config.lora.to_api(),
        "quantization": quantization.to_api() if quantization else None,
        "training": config.training.to_api(),
        "metrics": {
            "steps": steps,
            "finalLoss": final_loss,
            "evalLoss": eval_loss,
            "tokens": tokens,
            "lossHistory": losses[-LOSS_HISTORY_KEPT:],
        },
    }
