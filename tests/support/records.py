"""Synthetic tokenized records for data-pipeline tests: random ids, no tokenizer, no torch."""

from __future__ import annotations

import numpy as np

from kubetune_trainer.data.records import TokenizedRecords

VOCAB = 97
PAD = 0


def synthetic_records(lengths: list[int], seed: int = 0) -> TokenizedRecords:
    """Random token ids; the first half of every record is a prompt (no loss), the rest targets."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]
    masks = [[i >= n // 2 for i in range(n)] for n in lengths]
    return TokenizedRecords.from_lists(ids, masks)
