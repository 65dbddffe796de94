"""A local cache of tokenized datasets, shared by the ranks of one pod and by restarted containers.

Every rank needs the same token ids. The first process to take the lock tokenizes and writes
``<work_dir>/data-cache/tokenized-<key>.npz``; the others (local ranks of the pod, or the
trainer after a container restart with the same scratch volume) wait and load it. The key covers
everything that changes the result: the dataset spec, the training seed, the tokenizer
(vocabulary, merges, special tokens and chat template) and, for local sources, the size and
modification time of every file. Remote sources are read once per scratch directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kubetune_api.dataset import DatasetSpec
from kubetune_trainer.data.records import TokenizedRecords
from kubetune_trainer.data.sources import local_stamp, locked

FORMAT_VERSION = 1
"""Bumped whenever tokenization changes, so caches from older trainers are not reused."""


@dataclass(frozen=True)
class Tokenized:
    """The tokenized train (and eval) records of a run and what tokenizing them cut or dropped."""

    train: TokenizedRecords
    eval: TokenizedRecords | None
    truncated_records: int
    dropped_records: int


def tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}".encode())
    extra = [getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()


def cache_key(spec: DatasetSpec, seed: int, tokenizer: Any) -> str:
    document = {
        "version": FORMAT_VERSION,
        "dataset": spec.model_dump(mode="json"),
        "seed": seed,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "files": [local_stamp(spec.source), local_stamp(spec.eval.source) if spec.eval and spec.eval.source else []],
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()[:24]


def cached(path: Path, compute: Callable[[], Tokenized]) -> Tokenized:
    """``compute()`` once per ``path``: load the file when it exists, else compute and write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.with_suffix(".lock")):
        if path.exists():
            return _read(path)
        result = compute()
        _write(result, path)
        return result


def _write(result: Tokenized, path: Path) -> None:
    arrays: dict[str, Any] = {
        "train_ids": result.train.ids,
        "train_mask": result.train.loss_mask,
        "train_offsets": result.train.offsets,
        "stats": np.array([result.truncated_records, result.dropped_records], dtype=np.int64),
    }
    if result.eval is not None:
        arrays.update(eval_ids=result.eval.ids, eval_mask=result.eval.loss_mask, eval_offsets=result.eval.offsets)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    # Readers only ever see a complete file.
    os.replace(partial, path)


def _read(path: Path) -> Tokenized:
    with np.load(path) as data:
        train = TokenizedRecords(data["train_ids"], data["train_mask"], data["train_offsets"])
        evaluation = TokenizedRecords(data["eval_ids"], data["eval_mask"], data["eval_offsets"]) if "eval_ids" in data else None
        truncated, dropped = (int(x) for x in data["stats"])
    return Tokenized(train, evaluation, truncated, dropped)
