"""Tokenized records: token ids and a loss mask per record, stored flat in numpy arrays.

One flat array of ids, one of booleans (True where the token is a training target) and record
offsets: compact (5 bytes a token), cheap to index and independent of the tokenizer afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int64]
MaskArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class TokenizedRecords:
    """Records ``i`` spans ``ids[offsets[i]:offsets[i + 1]]``; ``loss_mask`` marks target tokens."""

    ids: npt.NDArray[np.int32]
    loss_mask: MaskArray
    offsets: IdArray

    @classmethod
    def from_lists(cls, ids: Sequence[Sequence[int] | npt.NDArray[np.int32]], masks: Sequence[Sequence[bool] | MaskArray]) -> TokenizedRecords:
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat_ids = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]) if ids else np.zeros(0, dtype=np.int32)
        flat_mask = np.concatenate([np.asarray(x, dtype=np.bool_) for x in masks]) if masks else np.zeros(0, dtype=np.bool_)
        return cls(flat_ids, flat_mask, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> IdArray:
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def record(self, index: int) -> tuple[npt.NDArray[np.int32], MaskArray]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[start:end], self.loss_mask[start:end]
