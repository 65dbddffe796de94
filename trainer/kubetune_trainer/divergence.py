"""Divergence of a finite loss: the smoothed logged loss stays above ``factor`` times its lowest value.

A non-finite loss stops the loop at once (``training``); a loss that only runs away is watched here at each log
interval. The watch is rebuilt from the logged losses a checkpoint carries, so a resumed run judges the whole
curve, not just the part since the restart.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from kubetune_api.quality import DivergenceAction, DivergenceSpec


@dataclass(frozen=True)
class Divergence:
    """The moment the watch called the run diverged."""

    step: int
    smoothed_loss: float
    lowest_loss: float
    spec: DivergenceSpec

    @property
    def stops(self) -> bool:
        return self.spec.on_divergence is DivergenceAction.STOP

    def describe(self) -> str:
        spec = self.spec
        return (
            f"The training loss diverged at step {self.step}: its smoothed value {self.smoothed_loss:.4g} stayed above "
            f"{spec.factor:g} times its lowest value {self.lowest_loss:.4g} for {spec.patience} logged steps. "
            "Lower spec.training.learningRate, add spec.training.warmupSteps, keep spec.training.maxGradNorm above 0, "
            "or raise spec.training.divergence.factor if the curve is expected to climb."
        )


class DivergenceWatch:
    """Exponential moving average of the logged loss, its minimum, and how long it has stayed above the threshold."""

    def __init__(self, spec: DivergenceSpec) -> None:
        self.spec = spec
        self.smoothed: float | None = None
        self.lowest = math.inf
        self.above = 0
        self.diverged: Divergence | None = None

    def replay(self, losses: Iterable[tuple[int, float]]) -> None:
        """Feed the logged losses of a resumed run."""
        for step, loss in losses:
            self.observe(step, loss)

    def observe(self, step: int, loss: float) -> Divergence | None:
        """Add one logged loss; returns the divergence the first time the run is judged diverged."""
        if not math.isfinite(loss):
            return None
        weight = self.spec.smoothing
        self.smoothed = loss if self.smoothed is None else weight * self.smoothed + (1.0 - weight) * loss
        self.lowest = min(self.lowest, self.smoothed)
        # A loss that falls to (or below) zero has no meaningful ratio: nothing to diverge from.
        if self.lowest > 0 and self.smoothed > self.spec.factor * self.lowest:
            self.above += 1
        else:
            self.above = 0
        if self.diverged is None and self.above >= self.spec.patience:
            self.diverged = Divergence(step=step, smoothed_loss=self.smoothed, lowest_loss=self.lowest, spec=self.spec)
            return self.diverged
        return None
