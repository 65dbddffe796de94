"""The full training state on local disk: saving a checkpoint folder, loading one, pruning old ones.

A checkpoint folder ``step-<N>`` holds the adapter weights (safetensors), the optimizer and
scheduler states, each rank's RNG states and ``trainer_state.json`` (step, data position, token
count, loss history). ``trainer_state.json`` is written last: a folder without it is incomplete
and never resumed from. Uploading and downloading the folder is ``storage.checkpoints``' job; this
module only reads and writes local disk. peft is imported where adapters are read or written: it
brings transformers, seconds of import that the modules of the training loop do not otherwise pay.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kubetune_trainer.loss import LossModel

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


@dataclass
class TrainingState:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    data: dict[str, Any] = field(default_factory=dict)
    """Position of this process's batch stream (epoch, batch)."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, mean loss) at every log interval so far: the loss curve, continued across restarts."""
    elapsed_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingState:
        return cls(
            step=int(data["step"]),
            tokens=int(data.get("tokens", 0)),
            data=dict(data.get("data", {})),
            losses=[(int(s), float(v)) for s, v in data.get("losses", [])],
            elapsed_seconds=float(data.get("elapsed_seconds", 0.0)),
        )


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peft_model_of(model: Any) -> Any:
    """The peft model inside DistributedDataParallel and LossModel wrappers."""
    inner = getattr(model, "module", model)
    return inner.model if isinstance(inner, LossModel) else inner


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """Trainable adapter weights of a (possibly wrapped) peft model, on CPU."""
    from peft import get_peft_model_state_dict

    inner = peft_model_of(model)
    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(inner).items()}


def save(
    root: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    rng_states: list[dict[str, Any]],
) -> Path:
    """Write checkpoint ``step-<state.step>`` under ``root``; ``rng_states`` holds one entry per rank."""
    target = step_dir(root, state.step)
    if target.exists():
        shutil.rmtree(target)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    save_file(adapter_state(model), str(partial / ADAPTER_FILE))
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    torch.save(scheduler.state_dict(), partial / SCHEDULER_FILE)
    for rank, rng in enumerate(rng_states):
        torch.save(rng, partial / rng_file(rank))
    (partial / STATE_FILE).write_text(json.dumps(state.to_json()), encoding="utf-8")
    partial.rename(target)
    return target


def is_complete(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file() and (directory / ADAPTER_FILE).is_file()


def newest(root: Path) -> Path | None:
    """The complete local checkpoint with the highest step under ``root``."""
    if not root.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith("step-") and child.name[5:].isdigit() and is_complete(child):
            found.append((int(child.name[5:]), child))
    return max(found)[1] if found else None


def load(directory: Path, *, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int) -> TrainingState:
    """Restore a checkpoint written by ``save`` into the given objects; returns the training state."""
    from peft import set_peft_model_state_dict

    inner = peft_model_of(model)
    weights = load_file(str(directory / ADAPTER_FILE))
    result = set_peft_model_state_dict(inner, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"checkpoint {directory} does not match the adapter layout (unexpected keys {unexpected[:5]})")
    device = next(p.device for p in inner.parameters() if p.requires_grad)
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=False))
    rng_path = directory / rng_file(rank)
    if rng_path.is_file():
        restore_rng(torch.load(rng_path, weights_only=False))
    return TrainingState.from_json(json.loads((directory / STATE_FILE).read_text(encoding="utf-8")))


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete local checkpoints (local disk is scratch)."""
    if not root.is_dir():
        return
    steps = sorted((int(c.name[5:]), c) for c in root.iterdir() if c.is_dir() and c.name.startswith("step-") and c.name[5:].isdigit())
    for _, path in steps[:-keep] if keep > 0 else steps:
        shutil.rmtree(path, ignore_errors=True)
