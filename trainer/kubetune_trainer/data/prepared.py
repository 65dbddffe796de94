"""Prepared data: the tokenized records and their packing, in one file the trainer loads instead of tokenizing.

The preparation step writes ``<run>/prepared/<key>.npz`` (kubetune_api.layout.prepared_prefix). The key
covers everything that decides the file: the dataset's content (SHA-256 over its files, or a Hugging Face
dataset's fingerprint), the tokenizer (vocabulary, merges, special tokens, chat template), the format
settings, maxSeqLength, packing, maxSamples, the eval split and the training seed. The file also
records the tokenizer's fingerprint, so a trainer whose tokenizer differs refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from kubetune_api.dataset import DatasetSpec
from kubetune_trainer.data.cache import Tokenized
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.records import TokenizedRecords
from kubetune_trainer.data.sources import BucketStores, fetch_s3, load_hub, source_files
from kubetune_trainer.locations import local_path, location

PREPARED_VERSION = 1
"""Bumped whenever tokenization or packing changes, so files of older trainers are not reused."""
HASH_CHUNK = 1024**2

Groups = list[list[int]]


@dataclass(frozen=True)
class Prepared:
    """What a prepared file holds."""

    tokens: Tokenized
    train_groups: Groups
    eval_groups: Groups | None
    tokenizer: str
    key: str
    dataset_sha256: str = ""


def prepared_key(spec: DatasetSpec, seed: int, tokenizer: str, dataset_sha256: str) -> str:
    """Digest of everything that decides the prepared data (24 hex digits)."""
    decisive = spec.model_dump(mode="json", exclude={"source", "config", "split", "file_format"})
    document = {"version": PREPARED_VERSION, "dataset": decisive, "content": dataset_sha256, "tokenizer": tokenizer, "seed": seed}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:24]


def files_sha256(files: list[Path], root: Path) -> str:
    """SHA-256 over the files' names (relative to ``root``) and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(files):
        name = path.name if path == root else str(path.relative_to(root))
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def source_sha256(source: str, spec: DatasetSpec, split: str, work_dir: Path, stores: BucketStores | None, hf_token: str | None) -> str:
    """Content digest of one dataset source: its files (s3:// downloaded once), or a hub dataset's fingerprint."""
    kind = location(source)
    if kind == "hub":
        loaded = load_hub(source, hf_config=spec.config, split=split, cache_dir=work_dir, token=hf_token)
        return hashlib.sha256(f"{source}:{spec.config}:{split}:{loaded._fingerprint}".encode()).hexdigest()
    if kind == "s3":
        if stores is None:
            raise DataError(f"dataset source {source} is on S3 but no S3 connection is configured: set spec.output (endpointUrl, credentialsSecret)")
        root = fetch_s3(source, work_dir / "data-cache", stores)
    else:
        root = local_path(source)
    files, _ = source_files(root, spec.file_format, source)
    return files_sha256(files, root)


def dataset_sha256(spec: DatasetSpec, work_dir: Path, stores: BucketStores | None, hf_token: str | None) -> str:
    """Content digest of the training source and, when separate, the evaluation source."""
    digest = source_sha256(spec.source, spec, spec.split, work_dir, stores, hf_token)
    if spec.eval is not None and spec.eval.source is not None:
        second = source_sha256(spec.eval.source, spec, spec.eval.split, work_dir, stores, hf_token)
        digest = hashlib.sha256(f"{digest}:{second}".encode()).hexdigest()
    return digest


def _flat(groups: Groups) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    lengths = np.fromiter((len(g) for g in groups), dtype=np.int64, count=len(groups))
    offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for g in groups for i in g), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _groups(flat: npt.NDArray[np.int64], offsets: npt.NDArray[np.int64]) -> Groups:
    return [flat[offsets[i] : offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def write_prepared(path: Path, prepared: Prepared) -> None:
    """Write ``prepared`` to ``path`` atomically (a reader sees the whole file or none)."""
    tokens = prepared.tokens
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "train_ids": tokens.train.ids,
        "train_mask": tokens.train.loss_mask,
        "train_offsets": tokens.train.offsets,
        "stats": np.array([tokens.truncated_records, tokens.dropped_records], dtype=np.int64),
        "meta": np.array([json.dumps({"version": PREPARED_VERSION, "tokenizer": prepared.tokenizer, "key": prepared.key, "dataset": prepared.dataset_sha256})]),
    }
    arrays["train_groups"], arrays["train_group_offsets"] = _flat(prepared.train_groups)
    if tokens.eval is not None and prepared.eval_groups is not None:
        arrays.update(eval_ids=tokens.eval.ids, eval_mask=tokens.eval.loss_mask, eval_offsets=tokens.eval.offsets)
        arrays["eval_groups"], arrays["eval_group_offsets"] = _flat(prepared.eval_groups)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)  # type: ignore[arg-type]
    os.replace(partial, path)


def read_prepared(path: Path, tokenizer: str, shown_as: str) -> Prepared:
    """Load a prepared file, refusing one written by another trainer version or for another tokenizer."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"][0]))
        if meta.get("version") != PREPARED_VERSION:
            raise DataError(f"the prepared data {shown_as} was written by another trainer version ({meta.get('version')}); run the preparation again")
        if meta.get("tokenizer") != tokenizer:
            raise DataError(
                f"the prepared data {shown_as} was tokenized with another tokenizer (fingerprint {str(meta.get('tokenizer'))[:12]}, this model's "
                f"is {tokenizer[:12]}): the model's tokenizer changed since the preparation; run the preparation again"
            )
        train = TokenizedRecords(data["train_ids"], data["train_mask"], data["train_offsets"])
        evaluation = TokenizedRecords(data["eval_ids"], data["eval_mask"], data["eval_offsets"]) if "eval_ids" in data else None
        truncated, dropped = (int(x) for x in data["stats"])
        train_groups = _groups(data["train_groups"], data["train_group_offsets"])
        eval_groups = _groups(data["eval_groups"], data["eval_group_offsets"]) if "eval_groups" in data else None
    tokens = Tokenized(train, evaluation, truncated, dropped)
    return Prepared(tokens, train_groups, eval_groups, str(meta["tokenizer"]), str(meta["key"]), str(meta.get("dataset", "")))
