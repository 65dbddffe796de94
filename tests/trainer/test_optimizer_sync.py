"""bitsandbytes' optimizers step with at most one device sync, and to the same weights.

bitsandbytes' 8-bit optimizers also run on the CPU, where its sync helper is a no-op; the test counts
the calls to that helper (a spy in its place), which on a GPU are whole-device waits.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from kubetune_api.recipe import Optimizer, TrainingSpec
from kubetune_trainer.training import build_optimizer

pytestmark = [pytest.mark.trainer, pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU:UserWarning")]


def parameters() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 256, generator=generator)) for _ in range(6)]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    return params


@pytest.mark.parametrize(("kind", "syncs"), [(Optimizer.ADAMW_8BIT, 0), (Optimizer.PAGED_ADAMW_8BIT, 1)])
def test_a_step_waits_for_the_device_at_most_once(kind: Optimizer, syncs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    module: Any = importlib.import_module("bitsandbytes.optim.optimizer")
    calls: list[torch.Size] = []
    monkeypatch.setattr(module, "sync_gpu", lambda tensor: calls.append(tensor.shape))
    bnb: Any = importlib.import_module("bitsandbytes.optim")
    reference_params = parameters()
    reference = {Optimizer.ADAMW_8BIT: bnb.AdamW8bit, Optimizer.PAGED_ADAMW_8BIT: bnb.PagedAdamW8bit}[kind](reference_params, lr=1e-2, weight_decay=0.0)
    reference.step()
    assert len(calls) >= len(reference_params)  # bitsandbytes' own step: one per parameter
    calls.clear()
    params = parameters()
    optimizer = build_optimizer(TrainingSpec(max_steps=1, optimizer=kind, learning_rate=1e-2), params, cuda=True)
    optimizer.step()
    assert len(calls) == syncs
    assert module.sync_gpu is not None and module.sync_gpu.__name__ == "<lambda>"  # the helper is put back
    for ours, theirs, before in zip(params, reference_params, parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
        assert not torch.equal(ours, before)
