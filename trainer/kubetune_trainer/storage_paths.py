"""S3 URIs and keys, and the local files that map to them."""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath

from kubetune_trainer.storage_errors import StorageError


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/prefix`` into ``("bucket", "key/prefix")``; the key may be empty."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def join_key(*parts: str) -> str:
    """Join key segments with single slashes, dropping empty ones."""
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def iter_files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by relative path, so uploads and manifests are deterministic."""
    return sorted((path for path in root.rglob("*") if path.is_file()), key=lambda path: path.relative_to(root).as_posix())


def safe_relative_path(relative: str) -> PurePosixPath:
    """A key suffix as a relative path; rejects absolute paths and '..' so a bucket cannot write outside the target."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts:
        raise StorageError(f"refusing to write object key suffix {relative!r} outside the target directory")
    return path
