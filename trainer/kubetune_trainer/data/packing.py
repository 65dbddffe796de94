"""Training examples from tokenized records: one record each, or several packed into one window.

Packing places records into windows of max_seq_length tokens by best-fit decreasing (the fullest
window that still has room takes the next-longest record), so little is left as padding. Records
are never split. Inside a window ``position_ids`` restart at 0 at every record; with no
attention_mask, transformers (masking_utils.find_packed_sequence_indices) reads each restart as a
sequence boundary and builds a block-diagonal causal mask, for sdpa, eager and flash attention
alike, so records never attend to each other. The first token of every record gets label -100:
the last token of the previous record must not learn to predict it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from kubetune_trainer.data.records import IdArray, TokenizedRecords

IGNORE_INDEX = -100
"""Label of a position the loss skips (torch's cross_entropy default, which transformers' losses use too)."""


class Example(TypedDict):
    """One training row before padding."""

    input_ids: IdArray
    labels: IdArray
    position_ids: IdArray


def pack_best_fit(lengths: IdArray, capacity: int) -> list[list[int]]:
    """Group record indices into windows of at most ``capacity`` tokens (best-fit decreasing)."""
    order = np.argsort(-lengths, kind="stable")
    free = _FreeSpace(capacity)
    windows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}
    for index in order.tolist():
        length = int(lengths[index])
        room = free.smallest_at_least(length)
        if room is None:
            window = len(windows)
            windows.append([index])
            left = capacity - length
        else:
            window = by_room[room].pop()
            free.add(room, -1)
            windows[window].append(index)
            left = room - length
        if left > 0:
            by_room.setdefault(left, []).append(window)
            free.add(left, 1)
    return windows


class _FreeSpace:
    """Counts of windows by free room; finds the smallest room >= n in O(log capacity)."""

    def __init__(self, capacity: int) -> None:
        self.size = 1 << max(1, capacity).bit_length()
        self.count = [0] * (2 * self.size)

    def add(self, room: int, delta: int) -> None:
        node = room + self.size
        while node:
            self.count[node] += delta
            node //= 2

    def smallest_at_least(self, need: int) -> int | None:
        return self._search(1, 0, self.size - 1, need)

    def _search(self, node: int, lo: int, hi: int, need: int) -> int | None:
        if hi < need or self.count[node] == 0:
            return None
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        found = self._search(2 * node, lo, mid, need)
        return found if found is not None else self._search(2 * node + 1, mid + 1, hi, need)


class ExampleDataset(Sequence[Example]):
    """Training rows over tokenized records: ``groups[i]`` lists the records in row ``i``."""

    def __init__(self, records: TokenizedRecords, groups: list[list[int]]) -> None:
        self.records = records
        self.groups = groups

    @classmethod
    def build(cls, records: TokenizedRecords, *, packing: bool, max_seq_length: int) -> ExampleDataset:
        if packing:
            return cls(records, pack_best_fit(records.lengths, max_seq_length))
        return cls(records, [[i] for i in range(len(records))])

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        ids, labels, positions = [], [], []
        for record in self.groups[index]:
            record_ids, mask = self.records.record(record)
            target = np.where(mask, record_ids, IGNORE_INDEX).astype(np.int64)
            target[0] = IGNORE_INDEX
            ids.append(record_ids.astype(np.int64))
            labels.append(target)
            positions.append(np.arange(len(record_ids), dtype=np.int64))
        return Example(input_ids=np.concatenate(ids), labels=np.concatenate(labels), position_ids=np.concatenate(positions))

    @property
    def num_tokens(self) -> int:
        return self.records.num_tokens

    def fill_ratio(self, max_seq_length: int) -> float:
        """Share of window slots holding real tokens (1.0 means no padding at all)."""
        return self.records.num_tokens / max(1, len(self.groups) * max_seq_length)
