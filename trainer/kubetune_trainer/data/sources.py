"""Where records come from: a local file or folder, an s3:// object or prefix, or a Hugging Face dataset.

Every source ends up as a ``datasets.Dataset`` of raw records. s3:// sources are downloaded into
``<work_dir>/data-cache/`` first (under a file lock, so local ranks sharing a pod download once)
and then read like local files.
"""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import datasets

from kubetune_api.dataset import DatasetSpec
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.validate import validate_files, validate_rows
from kubetune_trainer.locations import local_path, location
from kubetune_trainer.storage.paths import parse_s3_uri

FILE_FORMATS: dict[str, str] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
}
"""File extension -> DatasetSpec.file_format."""

BUILDERS: dict[str, str] = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}
"""DatasetSpec.file_format -> the ``datasets`` packaged builder that reads it."""


class ObjectStore(Protocol):
    """The part of kubetune_trainer.storage.store.S3Store (one bucket) the data pipeline uses."""

    def download_file(self, key: str, local_path: Path) -> Any: ...

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]: ...

    def exists(self, key: str) -> bool: ...


BucketStores = Callable[[str], ObjectStore]
"""Bucket name -> a store for it on spec.output's endpoint with spec.output's credentials."""


def load_records(
    source: str,
    *,
    file_format: str | None,
    hf_config: str | None,
    hf_split: str,
    cache_dir: Path,
    stores: BucketStores | None,
    hf_token: str | None = None,
    validate: DatasetSpec | None = None,
) -> datasets.Dataset:
    """Read every record of ``source`` into a Dataset (no shuffling, no filtering).

    With ``validate``, every record is first checked against that spec's format (``validate``), so a bad
    one fails with its file and line before anything is loaded or tokenized.
    """
    # Progress bars would flood the pod log with one line per refresh.
    datasets.disable_progress_bars()
    kind = location(source)
    if kind == "s3":
        if stores is None:
            raise DataError(f"dataset source {source} is on S3 but no S3 connection is configured: set spec.output (endpointUrl, credentialsSecret)")
        local = fetch_s3(source, cache_dir / "data-cache", stores)
        return load_local(local, file_format=file_format, cache_dir=cache_dir, shown_as=source, validate=validate)
    if kind == "local":
        return load_local(local_path(source), file_format=file_format, cache_dir=cache_dir, shown_as=source, validate=validate)
    loaded = load_hub(source, hf_config=hf_config, split=hf_split, cache_dir=cache_dir, token=hf_token)
    if validate is not None:
        validate_rows(loaded, validate, f"{source} ({hf_split})")
    return loaded


def local_stamp(source: str) -> list[tuple[str, int, int]]:
    """Name, size and modification time of a local source's files; empty for other sources."""
    if location(source) != "local":
        return []
    root = local_path(source)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.exists() else []
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def fetch_s3(uri: str, cache_root: Path, stores: BucketStores) -> Path:
    """Download an s3:// object, or every object under a prefix, once; return the local file or folder.

    A URI ending in '/' is a prefix; one without is an object, or a prefix when no object has
    that exact key (s3://bucket/datasets/chat reads the files under datasets/chat/).
    """
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root / digest
    done = cache_root / f"{digest}.done"
    cache_root.mkdir(parents=True, exist_ok=True)
    with locked(cache_root / f"{digest}.lock"):
        if not done.exists():
            bucket, key = _split_uri(uri)
            store = stores(bucket)
            if not uri.endswith("/") and store.exists(key):
                name = key.rsplit("/", 1)[-1]
                store.download_file(key, target / name)
            else:
                name = "."
                if not store.download_prefix(key.rstrip("/"), target):
                    raise DataError(f"no object or prefix at {uri}: upload the dataset there or fix spec.dataset.source")
            done.write_text(name, encoding="utf-8")
        return target / done.read_text(encoding="utf-8")


def _split_uri(uri: str) -> tuple[str, str]:
    try:
        bucket, key = parse_s3_uri(uri)
    except ValueError:
        bucket, key = "", ""
    if not bucket or not key.strip("/"):
        raise DataError(f"dataset source {uri} names no object or prefix: use s3://bucket/file.jsonl or s3://bucket/prefix/")
    return bucket, key


@contextmanager
def locked(path: Path) -> Iterator[None]:
    # Local ranks of one pod share work_dir; the lock makes one of them download while the others wait.
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def infer_format(path: Path, file_format: str | None, shown_as: str) -> str:
    if file_format is not None:
        return file_format
    found = FILE_FORMATS.get(path.suffix.lower())
    if found is None:
        raise DataError(
            f"cannot tell the file format of {shown_as} from its extension '{path.suffix}': "
            f"set spec.dataset.fileFormat to one of jsonl, json, parquet, csv (known extensions: {', '.join(sorted(FILE_FORMATS))})"
        )
    return found


def data_files(folder: Path, file_format: str | None, shown_as: str) -> tuple[list[Path], str]:
    """The data files under a folder and their single format."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if file_format is not None:
        suffixes = {s for s, f in FILE_FORMATS.items() if f == file_format or (file_format == "json" and f == "jsonl")}
        chosen = [p for p in files if p.suffix.lower() in suffixes]
        if not chosen:
            raise DataError(f"no {file_format} files under {shown_as}; files there: {_listing(files, folder)}")
        return chosen, file_format
    known = [p for p in files if p.suffix.lower() in FILE_FORMATS]
    if not known:
        raise DataError(
            f"no jsonl/json/parquet/csv files under {shown_as} (files there: {_listing(files, folder)}); "
            "upload data files with one of those extensions or set spec.dataset.fileFormat"
        )
    formats = {FILE_FORMATS[p.suffix.lower()] for p in known}
    if formats <= {"json", "jsonl"}:
        return known, "jsonl"
    if len(formats) > 1:
        raise DataError(f"{shown_as} mixes file formats ({', '.join(sorted(formats))}): keep one format per dataset or set spec.dataset.fileFormat")
    return known, formats.pop()


def _listing(files: list[Path], folder: Path) -> str:
    names = [str(p.relative_to(folder)) for p in files[:10]]
    return ", ".join(names) + (f" and {len(files) - 10} more" if len(files) > 10 else "") if names else "none"


def source_files(path: Path, file_format: str | None, shown_as: str) -> tuple[list[Path], str]:
    """The data files of a local file or folder and their format; a DataError when there are none."""
    if not path.exists():
        raise DataError(f"dataset {shown_as} does not exist: check spec.dataset.source (local paths are inside the trainer pod)")
    if path.is_dir():
        files, fmt = data_files(path, file_format, shown_as)
    else:
        files, fmt = [path], infer_format(path, file_format, shown_as)
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"dataset {shown_as} is empty (0 bytes): upload records, one JSON object per line for jsonl")
    return files, fmt


def load_local(path: Path, *, file_format: str | None, cache_dir: Path, shown_as: str, validate: DatasetSpec | None = None) -> datasets.Dataset:
    files, fmt = source_files(path, file_format, shown_as)
    if validate is not None:

        def display(file: Path) -> str:
            return shown_as if file == path else f"{shown_as.rstrip('/')}/{file.relative_to(path)}"

        validate_files(files, fmt, validate, display)
    try:
        loaded = datasets.load_dataset(
            BUILDERS[fmt],
            data_files=[str(p) for p in files],
            split="train",
            cache_dir=str(cache_dir / "datasets"),
        )
    except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as error:
        raise DataError(f"cannot read {shown_as} as {fmt}: {_root_cause(error)}; check the file contents or spec.dataset.fileFormat") from error
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def load_hub(dataset_id: str, *, hf_config: str | None, split: str, cache_dir: Path, token: str | None) -> datasets.Dataset:
    try:
        loaded = datasets.load_dataset(
            dataset_id,
            hf_config,
            split=split,
            token=token or None,
            cache_dir=str(cache_dir / "datasets"),
        )
    except FileNotFoundError as error:
        raise DataError(
            f"Hugging Face dataset '{dataset_id}' (config {hf_config}, split {split}) was not found: check "
            "spec.dataset.source/config/split, and for private or gated datasets spec.model.tokenSecretRef, whose token is used here too "
            f"({_root_cause(error)})"
        ) from error
    except ValueError as error:
        raise DataError(f"cannot load Hugging Face dataset '{dataset_id}': {_root_cause(error)}") from error
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"Hugging Face dataset '{dataset_id}' did not yield one split; set spec.dataset.split")
    return loaded


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
