"""Packing tokenized records into windows, on synthetic token ids (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from kubetune_trainer.data.packing import IGNORE_INDEX, ExampleDataset, pack_best_fit
from tests.support.records import synthetic_records

pytestmark = pytest.mark.unit


def test_best_fit_places_every_record_once_and_fills_windows() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 65, size=500)
    windows = pack_best_fit(lengths, 64)
    placed = sorted(i for window in windows for i in window)
    assert placed == list(range(500))
    assert all(sum(int(lengths[i]) for i in window) <= 64 for window in windows)
    lower_bound = int(np.ceil(lengths.sum() / 64))
    assert len(windows) <= lower_bound * 1.05 + 1, (len(windows), lower_bound)


def test_packed_example_restarts_positions_and_masks_record_starts() -> None:
    records = synthetic_records([5, 7, 4])
    examples = ExampleDataset.build(records, packing=True, max_seq_length=16)
    assert len(examples) == 1
    example = examples[0]
    starts = [i for i, p in enumerate(example["position_ids"].tolist()) if p == 0]
    assert len(starts) == 3
    for start in starts:
        assert example["labels"][start] == IGNORE_INDEX
    for window_record, start in zip(examples.groups[0], starts, strict=True):
        ids, mask = records.record(window_record)
        n = len(ids)
        assert example["input_ids"][start : start + n].tolist() == ids.tolist()
        expected = [int(t) if m and i > 0 else IGNORE_INDEX for i, (t, m) in enumerate(zip(ids, mask, strict=True))]
        assert example["labels"][start : start + n].tolist() == expected
        assert example["position_ids"][start : start + n].tolist() == list(range(n))
