"""The full training state on local disk: saving a checkpoint folder, loading one, pruning old ones.

A checkpoint folder ``step-<N>`` holds the adapter weights (safetensors), the optimizer and
scheduler states, each rank's RNG states and ``trainer_state.json`` (step, data position, token
count, loss history). ``trainer_state.json`` is written last: a folder without it is incomplete
and never resumed from. Uploading and downloading the folder is ``storage.checkpoints``' job; this
module only reads and writes local disk. peft is imported where adapters are read or written: it
brings transformers, seconds of import that the modules of the training loop do not otherwise pay.

The files come back from a bucket that others may write to, so nothing is unpickled: the ``.pt``
files are read with ``torch.load(weights_only=True)``, which accepts tensors and plain values only,
and every state is saved in that form (RNG states as tensors and numbers, not numpy objects). A
file that holds anything else fails the load with ``CheckpointDamaged`` naming it; nothing in it runs.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kubetune_trainer.loss import LossModel
from kubetune_trainer.storage.errors import CheckpointDamaged

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
    """Every RNG state of this process, as tensors and plain values (what ``torch.load(weights_only=True)`` reads)."""
    version, internal, gauss = random.getstate()
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bitGenerator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "hasGauss": int(has_gauss),
            "cachedGaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    python, numpy = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(int(value) for value in python["state"].tolist()), python["gauss"]))
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["bitGenerator"], keys, numpy["position"], numpy["hasGauss"], numpy["cachedGaussian"]))
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
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step-<state.step>`` under ``root``; ``rng_states`` holds one entry per rank.

    ``gathered`` is a sharded run's adapter and optimizer state (``sharding.gather_trainable``), used instead of the
    model's and optimizer's own."""
    target = step_dir(root, state.step)
    if target.exists():
        shutil.rmtree(target)
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    adapter, optimizer_state = gathered if gathered is not None else (adapter_state(model), optimizer.state_dict())
    save_file(adapter, str(partial / ADAPTER_FILE))
    torch.save(optimizer_state, partial / OPTIMIZER_FILE)
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


def safe_load(path: Path, map_location: Any = None) -> Any:
    """A ``.pt`` file's tensors and plain values; ``CheckpointDamaged`` naming the file when it holds anything else
    (a pickled object would run code on load) or cannot be read."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointDamaged(
            f"checkpoint file {path} cannot be loaded safely ({first[:200]}): only tensors and plain values are read "
            "from checkpoints (torch.load weights_only=True); it was not written by kubetune or is damaged"
        ) from error


def _state(directory: Path) -> TrainingState:
    path = directory / STATE_FILE
    try:
        return TrainingState.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointDamaged(f"checkpoint file {path} cannot be read ({error})") from error


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_FILE
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointDamaged(f"checkpoint file {path} cannot be read ({error})") from error


def check(directory: Path) -> None:
    """Read every file of a checkpoint as ``load`` will (on CPU, into nothing); ``CheckpointDamaged`` names the first
    that does not load, so a damaged checkpoint is passed over before the run commits to it."""
    _weights(directory)
    for name in sorted(p.name for p in directory.glob("*.pt")):
        safe_load(directory / name, map_location="cpu")
    _state(directory)


def load(directory: Path, *, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int, sharded: bool = False) -> TrainingState:
    """Restore a checkpoint written by ``save`` into the given objects; returns the training state.

    ``sharded``: the model is sharded (FSDP2); every rank loads the full state and keeps its shard."""
    from peft import set_peft_model_state_dict

    inner = peft_model_of(model)
    if sharded:
        from kubetune_trainer import sharding

        sharding.load_trainable(inner, optimizer, _weights(directory), safe_load(directory / OPTIMIZER_FILE, map_location="cpu"))
    else:
        result = set_peft_model_state_dict(inner, _weights(directory))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"checkpoint {directory} does not match the adapter layout (unexpected keys {unexpected[:5]})")
        device = next(p.device for p in inner.parameters() if p.requires_grad)
        optimizer.load_state_dict(safe_load(directory / OPTIMIZER_FILE, map_location=device))
    scheduler.load_state_dict(safe_load(directory / SCHEDULER_FILE))
    rng_path = directory / rng_file(rank)
    if rng_path.is_file():
        restore_rng(safe_load(rng_path))
    return _state(directory)


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete local checkpoints (local disk is scratch)."""
    if not root.is_dir():
        return
    steps = sorted((int(c.name[5:]), c) for c in root.iterdir() if c.is_dir() and c.name.startswith("step-") and c.name[5:].isdigit())
    for _, path in steps[:-keep] if keep > 0 else steps:
        shutil.rmtree(path, ignore_errors=True)
