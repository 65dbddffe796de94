"""Out-of-memory in a step: the loop halves the micro-batch, doubles accumulation and takes the step again.

There is no GPU here, so ``LimitedDevice`` stands in for CUDA's allocator (a test double): it raises
torch.OutOfMemoryError, as CUDA does, for micro-batches larger than a GPU of its size would hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_api.runtime import TrainerConfig
from kubetune_trainer.training import DeviceMemory, MemoryAdjustment, Outcome
from tests.trainer.conftest import trainer_config
from tests.trainer.inprocess import train_in_process

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


class LimitedDevice(DeviceMemory):
    """Test double for the GPU allocator: micro-batches of more than ``capacity`` sequences run out of memory,
    once ``after`` micro-batches have run (memory fragmenting as a run goes on)."""

    def __init__(self, capacity: int, after: int = 0) -> None:
        super().__init__(torch.device("cpu"))
        self.capacity = capacity
        self.after = after
        self.calls = 0
        self.released = 0

    def check(self, micro_batch: int) -> None:
        self.calls += 1
        if self.calls > self.after and micro_batch > self.capacity:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {micro_batch} sequences")

    def release(self) -> None:
        self.released += 1
        super().release()


def train(config: TrainerConfig, memory: DeviceMemory | None) -> tuple[Outcome, list[tuple[int, float]], list[MemoryAdjustment], dict[str, Any]]:
    """Set up as the recipe does (same seed, same data) and run the loop with ``memory`` as the allocator."""
    run = train_in_process(config, memory, seed=0)
    return run.outcome, run.losses, run.adjustments, run.stream_state


def config(tiny_model_dir: Path, data: Path, tmp_path: Path, micro_batch: int, accumulation: int) -> TrainerConfig:
    training = {"maxSteps": 8, "logEvery": 1, "perDeviceBatchSize": micro_batch, "gradientAccumulationSteps": accumulation}
    return TrainerConfig.model_validate(trainer_config(tiny_model_dir, data, "unused", "http://127.0.0.1:1", tmp_path, training=training))


def test_an_oom_halves_the_micro_batch_and_the_loss_curve_matches_a_run_with_the_smaller_one(
    tiny_model_dir: Path, memorise_jsonl: Path, tmp_path: Path, isolated_threads: None
) -> None:
    memory = LimitedDevice(capacity=2)
    outcome, losses, adjustments, position = train(config(tiny_model_dir, memorise_jsonl, tmp_path, 4, 1), memory)
    assert adjustments == [MemoryAdjustment(step=1, micro_batch=2, accumulation=2)] and memory.released == 1
    assert outcome.state.step == 8 and outcome.micro_batch == 2
    reference, reference_losses, none, reference_position = train(config(tiny_model_dir, memorise_jsonl, tmp_path, 2, 2), None)
    assert none == [] and reference.micro_batch == 2
    assert [step for step, _ in losses] == [step for step, _ in reference_losses]
    assert [loss for _, loss in losses] == pytest.approx([loss for _, loss in reference_losses], rel=1e-5)
    assert position == reference_position


def test_an_oom_later_in_the_run_continues_from_the_same_step_over_the_same_samples(
    tiny_model_dir: Path, memorise_jsonl: Path, tmp_path: Path, isolated_threads: None
) -> None:
    outcome, losses, adjustments, position = train(config(tiny_model_dir, memorise_jsonl, tmp_path, 4, 1), LimitedDevice(capacity=1, after=5))
    # Step 6 runs out of memory twice: 4 -> 2 -> 1 sequences per micro-batch, 4 micro-batches per step.
    assert [(a.step, a.micro_batch, a.accumulation) for a in adjustments] == [(6, 2, 2), (6, 1, 4)]
    assert [step for step, _ in losses] == list(range(1, 9)) and outcome.state.step == 8
    _, _, _, uninterrupted = train(config(tiny_model_dir, memorise_jsonl, tmp_path, 4, 1), None)
    samples = position["batch"] * position["batch_size"] + position["epoch"] * 10**6
    assert samples == uninterrupted["batch"] * uninterrupted["batch_size"] + uninterrupted["epoch"] * 10**6


def test_when_one_sequence_does_not_fit_the_run_fails_with_advice(tiny_model_dir: Path, memorise_jsonl: Path, tmp_path: Path, isolated_threads: None) -> None:
    from kubetune_trainer.errors import OutOfMemoryError

    with pytest.raises(OutOfMemoryError, match="at step 1 with micro-batch 1 .*cannot be halved again.*gradientCheckpointing"):
        train(config(tiny_model_dir, memorise_jsonl, tmp_path, 4, 1), LimitedDevice(capacity=0))
