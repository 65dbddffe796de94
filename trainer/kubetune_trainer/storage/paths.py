"""S3 URIs, the local files that map to keys, and the SHA-256 digests of both (key names come from ``kubetune_api.layout``)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune_api.schema import DOT_SEGMENT_PATTERN, S3_SCHEME
from kubetune_trainer.storage.errors import StorageError


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key/prefix`` into ``("bucket", "key/prefix")``; the key may be empty.

    Keys become local paths (downloads) and prefixes of other keys, so '.' and '..' segments are refused.
    """
    if not uri.startswith(S3_SCHEME):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    if re.search(DOT_SEGMENT_PATTERN, key):
        raise ValueError(f"s3 URI with a '.' or '..' segment in its key: {uri!r}")
    return bucket, key


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted by relative path, so uploads and manifests are deterministic."""
    return sorted((path for path in root.rglob("*") if path.is_file()), key=lambda path: path.relative_to(root).as_posix())


@dataclass(frozen=True)
class ListedFile:
    """One file a manifest or checkpoint marker lists: path relative to its folder, hex SHA-256 and size in bytes."""

    path: str
    sha256: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


def listed_files(entries: Any) -> list[ListedFile] | None:
    """The file list of a manifest or marker (its "files"), or None when it is malformed."""
    if not isinstance(entries, list):
        return None
    files: list[ListedFile] = []
    for entry in entries:
        if not isinstance(entry, dict):
            return None
        path, sha, size = entry.get("path"), entry.get("sha256"), entry.get("size")
        if not isinstance(path, str) or not isinstance(sha, str) or not isinstance(size, int):
            return None
        files.append(ListedFile(path=path, sha256=sha, size=size))
    return files


def json_bytes(document: Any) -> bytes:
    """How JSON documents (markers, manifests, pointers) are written: indented, keys sorted, so a hash of them is stable."""
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8")


def safe_relative_path(relative: str) -> PurePosixPath:
    """A key suffix as a relative path; rejects absolute paths, '..' and backslashes so a bucket cannot write outside the target."""
    path = PurePosixPath(relative)
    if not relative or path.is_absolute() or ".." in path.parts or "\\" in relative or "\x00" in relative:
        raise StorageError(f"refusing to write object key suffix {relative!r} outside the target directory")
    return path


def object_sha256(response: Mapping[str, Any]) -> str | None:
    """Hex SHA-256 of the whole object from S3's own checksum, or None when S3 has none for it.

    A multipart object's SHA-256 checksum is a checksum of its part checksums (COMPOSITE), not the
    file's digest, so it is only used for single-part objects (ETag without a "-N" part count).
    """
    value = response.get("ChecksumSHA256")
    multipart = "-" in str(response.get("ETag", "")) or response.get("ChecksumType") == "COMPOSITE"
    if not isinstance(value, str) or multipart or "-" in value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == 32 else None
