"""prepare_data: from the config's dataset spec to sharded, resumable batches of token ids."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from kubetune_api.dataset import DatasetSpec
from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer.data import batches
from kubetune_trainer.data.batches import Batch, BatchStream, Collator
from kubetune_trainer.data.cache import Tokenized, cache_key, cached
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.formats import tokenize_records
from kubetune_trainer.data.packing import Example, ExampleDataset
from kubetune_trainer.data.prepared import Prepared
from kubetune_trainer.data.sources import BucketStores, ObjectStore, load_records
from kubetune_trainer.storage.store import S3Store

log = logging.getLogger(__name__)

StoreFactory = Callable[[OutputSpec], ObjectStore]
"""spec.output (with the bucket to read) -> an S3 store; ``S3Store.from_output`` fits."""


@dataclass
class PreparedData:
    """Tokenized train (and eval) examples of one run, and how to batch them on this rank."""

    train: ExampleDataset
    eval: ExampleDataset | None
    collator: Collator
    num_train_records: int
    num_eval_records: int
    truncated_records: int
    dropped_records: int
    seed: int
    rank: int
    world_size: int

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Pad a list of examples into model inputs (input_ids, labels, and position_ids or attention_mask)."""
        return self.collator(examples)

    def batches_per_epoch(self, per_device_batch_size: int) -> int:
        """Micro-batches each rank runs per epoch."""
        return batches.batches_per_epoch(len(self.train), per_device_batch_size, self.world_size)

    def steps_per_epoch(self, per_device_batch_size: int, grad_accum: int) -> int:
        """Optimizer steps per epoch; the last step of an epoch may accumulate fewer micro-batches."""
        return math.ceil(self.batches_per_epoch(per_device_batch_size) / grad_accum)

    def train_batches(self, per_device_batch_size: int, state: dict[str, Any] | None = None) -> BatchStream:
        """An endless stream of this rank's training batches, resumed from ``state`` when given."""
        stream = BatchStream(
            self.train,
            self.collator,
            batch_size=per_device_batch_size,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
        )
        if state is not None:
            stream.load_state_dict(state)
        return stream

    def eval_batches(self, per_device_batch_size: int) -> Iterator[Batch]:
        """This rank's share of the eval examples, once each; nothing when there is no eval set."""
        if self.eval is None:
            return iter(())
        return batches.eval_batches(self.eval, self.collator, batch_size=per_device_batch_size, rank=self.rank, world_size=self.world_size)


def prepare_data(
    config: TrainerConfig,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    store_factory: StoreFactory | None = None,
    padding_free: bool = False,
    environment: TrainerEnvironment | None = None,
    from_file: Prepared | None = None,
) -> PreparedData:
    """Load, split, tokenize and pack the dataset of ``config``; every rank computes the same result.

    ``store_factory`` builds the S3 store for s3:// sources from spec.output with the source's
    bucket; it is called only for them, and defaults to ``S3Store.from_output`` with ``environment``'s
    credentials. Hugging Face datasets are read with its HF_TOKEN. Pass ``padding_free=True`` when
    the model runs flash attention (see ``Collator``); it only takes effect with packing. ``prepared``
    ``from_file`` (the preparation step's file, see ``prepared``) replaces loading, tokenizing and packing.
    """
    spec = config.dataset
    seed = config.training.seed
    work_dir = Path(config.runtime.work_dir)
    environment = environment or TrainerEnvironment()
    output = config.output

    def default_factory(bucket_output: OutputSpec) -> ObjectStore:
        return S3Store.from_output(bucket_output, environment=environment)

    factory = store_factory if store_factory is not None else default_factory

    def stores(bucket: str) -> ObjectStore:
        return factory(output.model_copy(update={"bucket": bucket}))

    if from_file is not None:
        tokens = from_file.tokens
        train_set = ExampleDataset(tokens.train, from_file.train_groups)
        eval_set = None if tokens.eval is None or from_file.eval_groups is None else ExampleDataset(tokens.eval, from_file.eval_groups)
    else:
        key = cache_key(spec, seed, tokenizer)
        tokens = cached(work_dir / "data-cache" / f"tokenized-{key}.npz", lambda: _tokenize(spec, seed, tokenizer, work_dir, stores, environment.hf_token))
        eval_set = None if tokens.eval is None else ExampleDataset.build(tokens.eval, packing=spec.packing, max_seq_length=spec.max_seq_length)
        train_set = ExampleDataset.build(tokens.train, packing=spec.packing, max_seq_length=spec.max_seq_length)
    prepared = PreparedData(
        train=train_set,
        eval=eval_set,
        collator=Collator(pad_token_id=_pad_id(tokenizer), packing=spec.packing, padding_free=padding_free and spec.packing),
        num_train_records=len(tokens.train),
        num_eval_records=0 if tokens.eval is None else len(tokens.eval),
        truncated_records=tokens.truncated_records,
        dropped_records=tokens.dropped_records,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
    log.info(
        "dataset ready: %d train records (%d tokens) in %d sequences, fill %.1f%%; %d eval records; %d truncated to %d tokens, %d dropped",
        prepared.num_train_records,
        train_set.num_tokens,
        len(train_set),
        100 * train_set.fill_ratio(spec.max_seq_length) if spec.packing else 100.0,
        prepared.num_eval_records,
        prepared.truncated_records,
        spec.max_seq_length,
        prepared.dropped_records,
    )
    return prepared


def _tokenize(spec: DatasetSpec, seed: int, tokenizer: Any, work_dir: Path, stores: BucketStores, hf_token: str | None) -> Tokenized:
    """Load, shuffle, cap at maxSamples, split off the eval records, and tokenize both sets."""
    records = _load(spec.source, spec, spec.split, work_dir, stores, hf_token)
    records = records.select(np.random.default_rng(seed).permutation(len(records)))
    if spec.max_samples is not None and spec.max_samples < len(records):
        records = records.select(range(spec.max_samples))
    eval_records: datasets.Dataset | None = None
    if spec.eval is not None and spec.eval.ratio is not None:
        records, eval_records = _split(records, spec.eval.ratio, spec.source)
    elif spec.eval is not None and spec.eval.source is not None:
        eval_records = _load(spec.eval.source, spec, spec.eval.split, work_dir, stores, hf_token)

    train, stats = tokenize_records(records, spec, tokenizer, shown_as=spec.source)
    if len(train) == 0:
        raise DataError(
            f"every record of {spec.source} was dropped: none has a target token within maxSeqLength={spec.max_seq_length} "
            "(prompts too long, or chats without an assistant turn); raise spec.dataset.maxSeqLength or fix the data"
        )
    if eval_records is None:
        return Tokenized(train, None, stats.truncated_records, stats.dropped_records)
    shown_as = spec.eval.source if spec.eval is not None and spec.eval.source else spec.source
    evaluation, eval_stats = tokenize_records(eval_records, spec, tokenizer, shown_as=shown_as)
    if len(evaluation) == 0:
        raise DataError(
            f"no evaluation record keeps a target token within maxSeqLength={spec.max_seq_length}; raise spec.dataset.maxSeqLength or fix the evaluation data"
        )
    return Tokenized(train, evaluation, stats.truncated_records + eval_stats.truncated_records, stats.dropped_records + eval_stats.dropped_records)


def _load(source: str, spec: DatasetSpec, split: str, work_dir: Path, stores: BucketStores, hf_token: str | None) -> datasets.Dataset:
    return load_records(
        source, file_format=spec.file_format, hf_config=spec.config, hf_split=split, cache_dir=work_dir, stores=stores, hf_token=hf_token, validate=spec
    )


def _split(records: datasets.Dataset, ratio: float, source: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out round(ratio * n) records (at least one) of the already shuffled records for evaluation."""
    held_out = max(1, round(ratio * len(records)))
    if held_out >= len(records):
        raise DataError(
            f"dataset {source} has {len(records)} records: too few to hold out eval ratio {ratio} and keep training records; "
            "add records, lower spec.dataset.eval.ratio or use spec.dataset.eval.source"
        )
    return records.select(range(held_out, len(records))), records.select(range(held_out))


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
