"""Checkpoint files come back from a bucket others can write to: they are read as tensors and plain values only.

A ``.pt`` file whose pickle would run code on load (``__reduce__``) is refused with an error naming the file, and
its code never runs; what the trainer saves (optimizer, scheduler, every RNG state) loads under the same rule.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kubetune_api.recipe import TrainingSpec
from kubetune_trainer import local_checkpoints, training
from kubetune_trainer.storage.errors import CheckpointDamaged

pytestmark = pytest.mark.trainer


class WritesAFile:
    """Unpickling this calls ``Path.write_text``: what a hostile object in a checkpoint would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (self.target.write_text, ("written while loading a checkpoint",))


def checkpoint_folder(folder: Path) -> Path:
    """A checkpoint as ``local_checkpoints.save`` writes it, from real optimizer and scheduler objects."""
    folder.mkdir(parents=True)
    weights = torch.nn.Parameter(torch.randn(4, 4))
    spec = TrainingSpec(max_steps=10, warmup_steps=2)
    optimizer = training.build_optimizer(spec, [weights], cuda=False)
    scheduler = training.build_scheduler(spec, optimizer, 10)
    weights.grad = torch.ones_like(weights)
    optimizer.step()
    scheduler.step()
    save_file({"weight": weights.detach().clone()}, str(folder / local_checkpoints.ADAPTER_FILE))
    torch.save(optimizer.state_dict(), folder / local_checkpoints.OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), folder / local_checkpoints.SCHEDULER_FILE)
    torch.save(local_checkpoints.capture_rng(), folder / local_checkpoints.rng_file(0))
    (folder / local_checkpoints.STATE_FILE).write_text(json.dumps(local_checkpoints.TrainingState(step=1).to_json()))
    return folder


@pytest.mark.parametrize("name", [local_checkpoints.OPTIMIZER_FILE, local_checkpoints.SCHEDULER_FILE, local_checkpoints.rng_file(0)])
def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path: Path, name: str) -> None:
    folder = checkpoint_folder(tmp_path / "step-20")
    target = tmp_path / "pwned.txt"
    torch.save({"state": WritesAFile(target)}, folder / name)
    with pytest.raises(CheckpointDamaged) as raised:
        local_checkpoints.check(folder)
    assert str(folder / name) in raised.value.message and "weights_only" in raised.value.message
    assert not target.exists(), "the checkpoint's code ran"


def test_what_the_trainer_saves_loads_as_tensors_and_plain_values(tmp_path: Path) -> None:
    folder = checkpoint_folder(tmp_path / "step-1")
    local_checkpoints.check(folder)
    optimizer = local_checkpoints.safe_load(folder / local_checkpoints.OPTIMIZER_FILE)
    assert optimizer["state"][0]["exp_avg"].shape == (4, 4)
    # Every RNG comes back where it was: Python's, numpy's and torch's.
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = local_checkpoints.capture_rng()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.save(saved, tmp_path / "rng.pt")
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    local_checkpoints.restore_rng(local_checkpoints.safe_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    folder = checkpoint_folder(tmp_path / "step-3")
    (folder / local_checkpoints.ADAPTER_FILE).write_bytes(b"\0" * 64)
    with pytest.raises(CheckpointDamaged, match=local_checkpoints.ADAPTER_FILE):
        local_checkpoints.check(folder)
    folder = checkpoint_folder(tmp_path / "step-4")
    (folder / local_checkpoints.STATE_FILE).write_text("{")
    with pytest.raises(CheckpointDamaged, match=local_checkpoints.STATE_FILE):
        local_checkpoints.check(folder)
