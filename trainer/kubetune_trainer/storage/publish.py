"""Publication of the finished adapter (and optionally the merged model) to S3.

A publication is a folder of files plus ``manifest.json``, which is written last and lists every
file with its size and SHA-256. A folder counts as published only when its manifest exists and
every listed file is present with that size and checksum, so an upload cut short never looks
complete. Publishing again over a partial (or complete) earlier attempt is safe: the old
manifest is removed first, files already present unchanged are not sent again, and objects the
new publication does not list are deleted before the new manifest appears.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_api import layout
from kubetune_api.runtime import TrainerConfig
from kubetune_trainer.storage.errors import StorageError
from kubetune_trainer.storage.paths import iter_files, parse_s3_uri
from kubetune_trainer.storage.store import S3Store

MANIFEST_SCHEMA_VERSION = 1
RESERVED_MANIFEST_KEYS = frozenset({"schemaVersion", "kind", "created", "files", "sizeBytes"})
LOSS_HISTORY_KEPT = 200


@dataclass(frozen=True)
class ManifestFile:
    """One published file: path relative to the publication folder, hex SHA-256 and size in bytes."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class PublishResult:
    """Where a publication landed and what it holds; ``size_bytes`` excludes the manifest itself."""

    uri: str
    manifest_sha256: str
    size_bytes: int
    files: list[ManifestFile]


def publish_adapter(store: S3Store, local_dir: Path, run_prefix: str, manifest_extra: dict[str, Any]) -> PublishResult:
    """Upload the saved adapter in ``local_dir`` to ``layout.adapter_prefix(run_prefix)`` with its manifest last.

    ``manifest_extra`` adds the run's description (``run_manifest``: base model and revision, dataset,
    hyperparameters, metrics summary) to the manifest.
    """
    return _publish(store, local_dir, layout.adapter_prefix(run_prefix), manifest_extra, kind="AdapterManifest")


def publish_merged(store: S3Store, local_dir: Path, run_prefix: str, manifest_extra: dict[str, Any]) -> PublishResult:
    """Upload the merged model in ``local_dir`` to ``layout.merged_prefix(run_prefix)`` with the same manifest scheme."""
    return _publish(store, local_dir, layout.merged_prefix(run_prefix), manifest_extra, kind="MergedModelManifest")


def _publish(store: S3Store, local_dir: Path, prefix: str, manifest_extra: dict[str, Any], *, kind: str) -> PublishResult:
    clash = RESERVED_MANIFEST_KEYS & manifest_extra.keys()
    if clash:
        raise ValueError(f"manifest_extra may not set {sorted(clash)}: the publication fills them in")
    paths = [path for path in iter_files(local_dir) if path.relative_to(local_dir).as_posix() != layout.MANIFEST]
    if not paths:
        raise StorageError(f"nothing to publish: {local_dir} holds no files")

    manifest_key = layout.join_key(prefix, layout.MANIFEST)
    # Withdraw an earlier manifest before touching its files, so readers never see a manifest
    # that vouches for files in the middle of being replaced.
    store.delete_keys([manifest_key])

    files: list[ManifestFile] = []
    for path in paths:
        relative = path.relative_to(local_dir).as_posix()
        info = store.upload_file(path, layout.join_key(prefix, relative))
        files.append(ManifestFile(path=relative, sha256=info.sha256 or "", size=info.size))

    listed = {layout.join_key(prefix, item.path) for item in files}
    stale = [key for key in store.list_keys(prefix + "/") if key not in listed and key != manifest_key]
    store.delete_keys(stale)

    size_bytes = sum(item.size for item in files)
    manifest = {
        "schemaVersion": MANIFEST_SCHEMA_VERSION,
        "kind": kind,
        "created": datetime.now(UTC).isoformat(),
        "files": [item.to_json() for item in files],
        "sizeBytes": size_bytes,
        **manifest_extra,
    }
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    store.put_bytes(manifest_key, data, content_type="application/json")
    return PublishResult(
        uri=store.uri(prefix + "/"),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=size_bytes,
        files=files,
    )


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


def manifest_files(manifest: dict[str, Any]) -> list[ManifestFile] | None:
    """The file list of a manifest, or None when it is malformed."""
    entries = manifest.get("files")
    if not isinstance(entries, list):
        return None
    files: list[ManifestFile] = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        path, sha, size = entry.get("path"), entry.get("sha256"), entry.get("size")
        if not isinstance(path, str) or not isinstance(sha, str) or not isinstance(size, int):
            return None
        files.append(ManifestFile(path=path, sha256=sha, size=size))
    return files


def verify_publication(store: S3Store, uri: str, *, deep: bool = False) -> bool:
    """True when ``uri`` holds a manifest and every file it lists, with the listed size and SHA-256.

    The SHA-256 compared is the one recorded with each object at upload (after S3 checked the
    bytes it received). ``deep`` downloads every file and hashes it instead, for audits.
    """
    manifest = read_manifest(store, uri)
    if manifest is None or manifest.get("schemaVersion") != MANIFEST_SCHEMA_VERSION:
        return False
    files = manifest_files(manifest)
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
