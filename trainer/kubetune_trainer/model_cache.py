"""s3:// models on the model-cache volume (spec.model.cacheVolumeClaim), downloaded once per content.

``<cache>/s3/<bucket>/<digest>/`` holds one version of a model. The digest is taken over the source URI and
every object's key, size and ETag, from a listing (no GET), so a retried attempt and any other job reading
the same upload find the folder and download nothing, while a changed upload gets a folder of its own. Two
pods filling the cache at once: an exclusive lock file per digest; the pod holding it downloads into a
temporary folder beside the target and renames it into place (atomic on one filesystem), the other waits for
the lock and then finds the complete folder. Hugging Face models are cached by huggingface_hub itself under
``<cache>/hub`` (HF_HUB_CACHE), keyed by repository and commit, with its own locks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from kubetune_trainer.data.sources import locked
from kubetune_trainer.storage.store import S3Store

COMPLETE = ".kubetune-complete"
"""Written into a cached folder once every file is in place."""


def content_digest(uri: str, store: S3Store, prefix: str) -> tuple[str, list[str]]:
    """(digest of what is under ``prefix`` by key, size and ETag; the keys)."""
    objects = store.list_objects(prefix)
    digest = hashlib.sha256(uri.encode())
    for info in objects:
        digest.update(f"\n{info.key}\t{info.size}\t{info.etag or ''}".encode())
    return digest.hexdigest()[:32], [info.key for info in objects]


def cached_s3_model(uri: str, store: S3Store, prefix: str, cache_root: Path) -> tuple[Path, str]:
    """The local folder of the s3:// model under ``prefix`` (downloaded unless cached) and its content digest."""
    root = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    digest, keys = content_digest(uri, store, root)
    folder = cache_root / store.bucket / digest
    if (folder / COMPLETE).is_file():
        return folder, digest
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.parent / f"{digest}.lock"):
        if not (folder / COMPLETE).is_file():
            partial = folder.parent / f"{digest}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            for key in keys:
                store.download_file(key, partial / key[len(root) :])
            (partial / COMPLETE).write_text(uri, encoding="utf-8")
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
    return folder, digest


def local_revision(path: Path) -> str:
    """A digest of a local model's config.json and weights index (or weight file names and sizes, without an index)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    indexes = sorted(path.glob("*.index.json"))
    for index in indexes:
        digest.update(index.read_bytes())
    if not indexes:
        for weights in sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")):
            digest.update(f"{weights.name}\t{weights.stat().st_size}".encode())
    return digest.hexdigest()[:32]
