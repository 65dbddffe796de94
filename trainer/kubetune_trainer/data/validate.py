"""Every record checked before anything is tokenized, each error naming its file and 1-based line (or row).

The checks are the format's own (``formats.check_record``): the fields the format reads exist and have
the right types, chat messages have a role and a content. jsonl lines are read with a size limit, so a
runaway line (a file without newlines) is refused before it is parsed into memory; bytes that are not
UTF-8 and malformed JSON name their line too. Parquet names the row, CSV the line of the record.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

from kubetune_api.dataset import DatasetSpec
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.formats import check_record

MAX_LINE_BYTES = 64 * 1024**2
"""Longest jsonl line accepted: far above any training record, far below what would exhaust the pod's memory."""

Display = Callable[[Path], str]
"""A local file -> how the user knows it (its s3:// URI or its path)."""


def validate_files(files: list[Path], file_format: str, spec: DatasetSpec, display: Display) -> int:
    """Check every record of ``files``; returns how many there are."""
    count = 0
    for path in files:
        name = display(path)
        if file_format == "parquet":
            rows = _parquet_rows(path, name)
        elif file_format == "csv":
            rows = _csv_rows(path, name)
        elif file_format == "json" and _is_json_document(path):
            rows = _json_items(path, name)
        else:
            rows = _jsonl_rows(path, name)
        for where, record in rows:
            check_record(record, spec, where)
            count += 1
    return count


def validate_rows(records: datasets.Dataset, spec: DatasetSpec, shown_as: str) -> None:
    """Check the records of a Hugging Face dataset, naming the 1-based row of the split."""
    for index, record in enumerate(records):
        check_record(record, spec, f"{shown_as} row {index + 1}")


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(
                    f"{name} line {number} is longer than {MAX_LINE_BYTES // 1024**2} MiB: jsonl needs one record per line; "
                    "check that the file has newlines, or split the record"
                )
            yield from _json_line(raw, number, name)


def _json_line(raw: bytes, number: int, name: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    where = f"{name} line {number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: byte {error.start + 1} of the line is not UTF-8; save the file as UTF-8") from error
    if not text.strip():
        return
    try:
        record = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        raise DataError(f"{where}, column {error.colno}: not valid JSON ({error.msg}); each line must hold one JSON object") from error
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with the record's fields, got a {type(record).__name__}")
    yield where, record


def _is_json_document(path: Path) -> bool:
    """True for a .json file holding one JSON array (the other .json form is JSON lines)."""
    with path.open("rb") as handle:
        start = handle.read(4096).lstrip()
    return start.startswith(b"[")


def _json_items(path: Path, name: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        items = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{name}: byte {error.start + 1} is not UTF-8; save the file as UTF-8") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{name} line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from error
    for index, record in enumerate(items):
        where = f"{name} item {index + 1}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object with the record's fields, got a {type(record).__name__}")
        yield where, record


def _parquet_rows(path: Path, name: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    import pyarrow.parquet  # type: ignore[import-untyped]

    try:
        table = pyarrow.parquet.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid for any unreadable file
        raise DataError(f"{name}: not a readable parquet file ({error}); check the file or spec.dataset.fileFormat") from error
    row = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{name} row {row}", record


def _csv_rows(path: Path, name: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{name} line {line}: not UTF-8; save the file as UTF-8") from error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for record in reader:
        yield f"{name} line {reader.line_num}", record
