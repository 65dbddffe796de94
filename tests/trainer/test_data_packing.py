"""Padding (collate) and the resumable, sharded batch stream, on synthetic token ids; packing itself is in tests/unit/test_packing.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from kubetune_trainer.data.batches import BatchStream, Collator, eval_batches
from kubetune_trainer.data.packing import IGNORE_INDEX, ExampleDataset
from tests.support.records import PAD, VOCAB, synthetic_records

pytestmark = pytest.mark.trainer


def stream_for(examples: ExampleDataset, *, packing: bool = False, seed: int = 7, rank: int = 0, world_size: int = 1, batch_size: int = 3) -> BatchStream:
    return BatchStream(examples, Collator(pad_token_id=PAD, packing=packing), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)


def test_packed_collate_has_positions_and_no_attention_mask() -> None:
    examples = ExampleDataset.build(synthetic_records([5, 7, 9, 3]), packing=True, max_seq_length=12)
    batch = Collator(pad_token_id=PAD, packing=True).batch([examples[i] for i in range(len(examples))])
    assert set(batch.inputs) == {"input_ids", "labels", "position_ids"}
    width = batch.inputs["input_ids"].shape[1]
    assert width % 8 == 0
    assert batch.num_tokens == 24
    assert batch.num_target_tokens == int((batch.inputs["labels"] != IGNORE_INDEX).sum())
    # Padding forms its own block that starts at position 0, so find_packed_sequence_indices cuts it off.
    for row, example in enumerate(examples[i] for i in range(len(examples))):
        n = len(example["input_ids"])
        if n < width:
            assert batch.inputs["position_ids"][row, n] == 0
            assert (batch.inputs["labels"][row, n:] == IGNORE_INDEX).all()
            assert (batch.inputs["input_ids"][row, n:] == PAD).all()


def test_padding_free_collate_joins_the_batch_into_one_row() -> None:
    examples = ExampleDataset.build(synthetic_records([5, 7, 9, 3]), packing=True, max_seq_length=12)
    batch = Collator(pad_token_id=PAD, packing=True, padding_free=True).batch([examples[i] for i in range(len(examples))])
    assert set(batch.inputs) == {"input_ids", "labels", "position_ids"}
    assert batch.inputs["input_ids"].shape == (1, 24)
    assert (batch.inputs["position_ids"][0] == 0).sum() == 4
    assert batch.num_tokens == 24


def test_unpacked_collate_pads_to_multiple_of_eight_with_attention_mask() -> None:
    examples = ExampleDataset.build(synthetic_records([3, 10]), packing=False, max_seq_length=32)
    inputs = Collator(pad_token_id=PAD, packing=False)([examples[0], examples[1]])
    assert set(inputs) == {"input_ids", "labels", "attention_mask"}
    assert inputs["input_ids"].shape == (2, 16)
    assert inputs["attention_mask"].sum(dim=1).tolist() == [3, 10]
    assert (inputs["labels"][inputs["attention_mask"] == 0] == IGNORE_INDEX).all()


def tiny_llama(attn: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": PAD,
        "attn_implementation": attn,
        "dtype": "float32",
    }
    model: Any = LlamaForCausalLM(LlamaConfig(**shape))
    assert model.config._attn_implementation == attn
    model.eval()
    return model


@pytest.mark.parametrize(("attn", "padding_free"), [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_packed_records_do_not_attend_to_each_other(attn: str, padding_free: bool) -> None:
    """Per-record logits of a packed batch equal the logits of each record run alone."""
    records = synthetic_records([11, 6, 17, 9, 4, 20, 13, 8], seed=1)
    examples = ExampleDataset.build(records, packing=True, max_seq_length=32)
    assert any(len(group) > 1 for group in examples.groups)
    inputs = Collator(pad_token_id=PAD, packing=True, padding_free=padding_free)([examples[i] for i in range(len(examples))])
    rows = [[r for group in examples.groups for r in group]] if padding_free else examples.groups
    assert inputs["input_ids"].shape[0] == len(rows)
    model = tiny_llama(attn)
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits
        causal_only = model(input_ids=inputs["input_ids"], use_cache=False).logits
    leaked = False
    for row, group in enumerate(rows):
        start = 0
        for record in group:
            ids, _ = records.record(record)
            n = len(ids)
            with torch.no_grad():
                alone = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], use_cache=False).logits[0]
            torch.testing.assert_close(packed[row, start : start + n], alone, atol=1e-5, rtol=1e-5)
            if start > 0 and not torch.allclose(causal_only[row, start : start + n], alone, atol=1e-5):
                leaked = True
            start += n
    # Control: without the position restarts the same rows do see earlier records.
    assert leaked


def test_same_seed_same_order_and_different_seed_different_order() -> None:
    examples = ExampleDataset.build(synthetic_records([8] * 40), packing=False, max_seq_length=8)
    first = [next(stream_for(examples)).inputs["input_ids"] for _ in range(1)]
    again = [next(stream_for(examples)).inputs["input_ids"] for _ in range(1)]
    other = [next(stream_for(examples, seed=8)).inputs["input_ids"] for _ in range(1)]
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other[0])


def test_resumed_stream_continues_with_the_next_batch_across_epochs() -> None:
    examples = ExampleDataset.build(synthetic_records([8] * 10), packing=False, max_seq_length=8)
    stream = stream_for(examples)
    assert stream.batches_per_epoch == 4
    reference = [next(stream).inputs["input_ids"] for _ in range(11)]
    interrupted = stream_for(examples)
    for _ in range(6):
        next(interrupted)
    saved = interrupted.state_dict()
    assert (saved["epoch"], saved["batch"]) == (1, 2)
    assert interrupted.epoch_progress == pytest.approx(1.5)
    resumed = stream_for(examples)
    resumed.load_state_dict(saved)
    for expected in reference[6:]:
        assert torch.equal(next(resumed).inputs["input_ids"], expected)


def test_each_epoch_visits_every_example_once() -> None:
    examples = ExampleDataset.build(synthetic_records(list(range(2, 22))), packing=False, max_seq_length=32)
    stream = stream_for(examples, batch_size=4)
    for epoch in range(2):
        seen = [int(i) for _ in range(stream.batches_per_epoch) for i in next(stream).inputs["attention_mask"].sum(dim=1)]
        assert sorted(seen) == list(range(2, 22)), epoch


def test_ranks_get_disjoint_shards_of_equal_batch_counts() -> None:
    examples = ExampleDataset.build(synthetic_records([4] * 9), packing=False, max_seq_length=4)
    shards = [stream_for(examples, rank=r, world_size=2).shard(0) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert set(shards[0]) | set(shards[1]) == set(range(9))
    # Nine examples over two ranks: one example is repeated to even out the shards, no more.
    assert len(set(shards[0]) & set(shards[1])) == 1
    assert stream_for(examples, rank=0, world_size=2).batches_per_epoch == stream_for(examples, rank=1, world_size=2).batches_per_epoch


@pytest.mark.parametrize(("num_examples", "batch_size", "world_size"), [(11, 2, 3), (7, 4, 2), (12, 5, 4), (3, 2, 1)])
def test_eval_batches_cover_each_example_once_in_equal_batch_counts(num_examples: int, batch_size: int, world_size: int) -> None:
    examples = ExampleDataset.build(synthetic_records(list(range(2, 2 + num_examples))), packing=False, max_seq_length=32)
    collator = Collator(pad_token_id=PAD, packing=False)
    per_rank = [list(eval_batches(examples, collator, batch_size=batch_size, rank=r, world_size=world_size)) for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1, "every rank runs the same number of forward passes"
    assert all(b.inputs["input_ids"].shape[0] <= batch_size for batches in per_rank for b in batches)
    lengths = [int(n) for batches in per_rank for b in batches for n in b.inputs["attention_mask"].sum(dim=1)]
    assert sorted(lengths) == list(range(2, 2 + num_examples))


def test_eval_set_smaller_than_world_size_still_feeds_every_rank() -> None:
    examples = ExampleDataset.build(synthetic_records([3, 4]), packing=False, max_seq_length=8)
    collator = Collator(pad_token_id=PAD, packing=False)
    assert [len(list(eval_batches(examples, collator, batch_size=2, rank=r, world_size=4))) for r in range(4)] == [1, 1, 1, 1]


def test_state_from_another_dataset_is_refused() -> None:
    examples = ExampleDataset.build(synthetic_records([8] * 10), packing=False, max_seq_length=8)
    state = stream_for(examples).state_dict()
    smaller = ExampleDataset.build(synthetic_records([8] * 9), packing=False, max_seq_length=8)
    with pytest.raises(Exception, match="dataset or batch settings changed"):
        stream_for(smaller).load_state_dict(state)
