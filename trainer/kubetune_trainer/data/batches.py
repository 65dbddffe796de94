"""Batches: padding (collate) and a seeded, sharded, resumable stream of training batches.

Each epoch visits the examples in a permutation seeded by (seed, epoch). The permutation is
wrapped to a multiple of world_size and rank r takes every world_size-th example from r, so every
rank gets its own shard and the same number of batches. A stream's position is (epoch, batch),
a small dict: a resumed run that loads it continues with the very next batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.packing import IGNORE_INDEX, Example

PAD_MULTIPLE = 8


@dataclass(frozen=True)
class Batch:
    """Model inputs plus the token counts a throughput figure needs."""

    inputs: dict[str, torch.Tensor]
    num_tokens: int
    """Real (non-padding) tokens the model processed."""
    num_target_tokens: int
    """Tokens the loss is computed on (labels != -100)."""


class Collator:
    """Pads examples to the longest in the batch, rounded up to a multiple of 8.

    Packed rows get ``position_ids`` and no ``attention_mask`` (the mask comes from the positions);
    padding then forms one more block starting at position 0 that no real token can see. Unpacked
    rows get an ``attention_mask`` with 0 on padding. Labels are -100 on padding either way.

    ``padding_free`` (packing only) joins the whole batch into one row without padding. Flash
    attention needs it: transformers derives its variable-length boundaries from position_ids only
    for a batch of one row (modeling_flash_attention_utils._is_packed_sequence), and would let the
    records of a multi-row packed batch attend to each other. sdpa and eager should not use it:
    their mask over one long row costs (batch x length)^2 instead of batch x length^2.
    """

    def __init__(self, *, pad_token_id: int, packing: bool, padding_free: bool = False) -> None:
        if padding_free and not packing:
            raise ValueError("padding_free needs packing: unpacked rows are told apart by their attention_mask")
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.padding_free = padding_free

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if self.padding_free:
            return {key: torch.from_numpy(np.concatenate([e[key] for e in examples]))[None] for key in ("input_ids", "labels", "position_ids")}
        longest = max(len(e["input_ids"]) for e in examples)
        width = math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE
        rows = len(examples)
        input_ids = np.full((rows, width), self.pad_token_id, dtype=np.int64)
        labels = np.full((rows, width), IGNORE_INDEX, dtype=np.int64)
        attention = np.zeros((rows, width), dtype=np.int64)
        positions = np.zeros((rows, width), dtype=np.int64)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = example["input_ids"]
            labels[row, :n] = example["labels"]
            attention[row, :n] = 1
            positions[row, :n] = example["position_ids"]
            positions[row, n:] = np.arange(width - n)
        batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
        if self.packing:
            batch["position_ids"] = torch.from_numpy(positions)
        else:
            batch["attention_mask"] = torch.from_numpy(attention)
        return batch

    def batch(self, examples: Sequence[Example]) -> Batch:
        inputs = self(examples)
        return Batch(
            inputs=inputs,
            num_tokens=sum(len(e["input_ids"]) for e in examples),
            num_target_tokens=int((inputs["labels"] != IGNORE_INDEX).sum()),
        )


class BatchStream(Iterator[Batch]):
    """Endless training batches for one rank, epoch after epoch; ``state_dict`` saves the position."""

    def __init__(
        self,
        examples: Sequence[Example],
        collator: Collator,
        *,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.examples = examples
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.batch_index = 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(len(self.examples), self.batch_size, self.world_size)

    @property
    def epoch_progress(self) -> float:
        """Epochs done, fractional: 1.5 is half way through the second epoch."""
        return self.epoch + self.batch_index / self.batches_per_epoch

    def shard(self, epoch: int) -> list[int]:
        """Example indices this rank visits in ``epoch``, in order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        per_rank = math.ceil(len(order) / self.world_size)
        wrapped = np.resize(order, per_rank * self.world_size)
        return [int(i) for i in wrapped[self.rank :: self.world_size]]

    def __next__(self) -> Batch:
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
            self._order = None
        if self._order is None:
            self._order = self.shard(self.epoch)
        start = self.batch_index * self.batch_size
        chosen = self._order[start : start + self.batch_size]
        self.batch_index += 1
        return self.collator.batch([self.examples[i] for i in chosen])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self.batch_index,
            "examples": len(self.examples),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def rebatch(self, state: dict[str, Any], batch_size: int) -> None:
        """Go back to the position ``state`` (of this stream) and continue from there in batches of ``batch_size``.

        The samples and their order stay the same; only how many go in one batch changes. The position must fall on
        a boundary of the new size, which holds when ``batch_size`` divides the old one.
        """
        samples = int(state["batch"]) * int(state["batch_size"])
        if samples % batch_size:
            raise ValueError(f"position {samples} is not a multiple of the new batch size {batch_size}")
        self.batch_size = batch_size
        self.epoch = int(state["epoch"])
        self.batch_index = samples // batch_size
        self._order = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("batch_size")
        if isinstance(saved, int) and saved < self.batch_size and self.batch_size % saved == 0:
            # The run had halved its micro-batch after running out of memory: it goes on with the smaller one.
            self.batch_size = saved
        expected = {"examples": len(self.examples), "batch_size": self.batch_size, "world_size": self.world_size, "seed": self.seed}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            raise DataError(
                f"the checkpoint's data position was saved for {found} but this run has {expected}: the dataset or batch "
                "settings changed since the checkpoint; restore them or start a new FinetuneJob"
            )
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch"])
        self._order = None


def batches_per_epoch(num_examples: int, batch_size: int, world_size: int) -> int:
    return max(1, math.ceil(math.ceil(num_examples / world_size) / batch_size))


def eval_shards(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's evaluation batches as example indices.

    Every rank gets the same number of batches (DDP ranks must run the same number of forward
    passes), and each example is visited exactly once across ranks; only an eval set smaller than
    the world size repeats examples, so that no rank is left without one.
    """
    indices = np.arange(num_examples)
    if 0 < num_examples < world_size:
        indices = np.resize(indices, world_size)
    mine = indices[rank::world_size]
    if len(mine) == 0:
        return []
    most = math.ceil(len(indices) / world_size)
    count = math.ceil(most / batch_size)
    return [[int(i) for i in chunk] for chunk in np.array_split(mine, count)]


def eval_batches(examples: Sequence[Example], collator: Collator, *, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
    """This rank's share of the evaluation examples in a fixed order (see ``eval_shards``)."""
    for chunk in eval_shards(len(examples), batch_size, rank, world_size):
        yield collator.batch([examples[i] for i in chunk])
