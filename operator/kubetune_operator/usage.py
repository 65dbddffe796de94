"""GPU time of a FinetuneJob over all its attempts, from pod timestamps (pure), and its operator metrics.

Each trainer pod counts GPUs x the time its trainer container ran (startedAt to finishedAt, or to now while it
runs), so a restarted operator computes the same figures again. A pod that has gone (a replaced Job, a TTL)
keeps the figures the status recorded for it. The work lost to a restart is what an attempt did after its newest
checkpoint: the next attempt resumes from there and does it again. In steps: the highest step the operator saw
the attempt reach (metrics reads, termination message) less the step of its newest checkpoint. In time: from
that checkpoint's upload to the attempt's end, or where the checkpoint time is unknown (a killed trainer writes
no termination message), the attempt's time in proportion to the steps redone. The cost is each pod's GPU hours
times the price of the GPU product of its node.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune_operator import podspec
from kubetune_operator.api import FinetuneJob
from kubetune_operator.progress import TrainerSample
from kubetune_operator.usagespec import AttemptUsage, GpuPrices, Usage
from kubetune_operator.verdict import termination_message

MAX_ATTEMPTS_KEPT = 32


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == podspec.CONTAINER_NAME:
            return dict(container.get("state") or {})
    return {}


def _highest(*steps: int | None) -> int | None:
    known = [s for s in steps if s is not None]
    return max(known) if known else None


def _lowest(*steps: int | None) -> int | None:
    known = [s for s in steps if s is not None]
    return min(known) if known else None


@dataclass(frozen=True)
class Seen:
    """What the operator knows about a job's pods beyond the pods themselves."""

    gpus: int
    now: datetime
    sample: TrainerSample | None = None
    """A metrics read made now, of the running pods."""
    products: Mapping[str, str] = field(default_factory=dict)
    """The GPU product label of each node, by node name."""
    prices: GpuPrices = field(default_factory=GpuPrices)


def attempt_of(pod: dict[str, Any], seen: Seen, before: AttemptUsage | None = None) -> AttemptUsage | None:
    """GPU time and lost work of one trainer pod; None before its trainer container started. ``before``: the figures
    the status holds for it, which keep the steps read from its metrics while it ran."""
    state = _container_state(pod)
    running, terminated = state.get("running") or {}, state.get("terminated") or {}
    started = _time(running.get("startedAt") or terminated.get("startedAt"))
    if started is None:
        return None
    finished = _time(terminated.get("finishedAt")) if terminated else None
    seconds = max(0.0, ((finished or seen.now) - started).total_seconds())
    first, reached, checkpoint = (before.first_step, before.reached_step, before.checkpoint_step) if before else (None, None, None)
    if running and not terminated and seen.sample is not None:
        first = _lowest(first, seen.sample.progress.step)
        reached = _highest(reached, seen.sample.progress.step)
        checkpoint = _highest(checkpoint, seen.sample.last_checkpoint_step)
    message = termination_message(pod) if terminated else None
    last = message.last_checkpoint if message is not None else None
    if last is not None:
        checkpoint = _highest(checkpoint, last.step)
    if message is not None and message.result is not None:
        reached = _highest(reached, message.result.steps)
    redone, lost = 0, 0.0
    if terminated and terminated.get("exitCode") not in (0, None):
        redone = max(0, (reached or 0) - (checkpoint or 0)) if reached is not None else 0
        if last is not None and last.time is not None:
            lost = max(0.0, ((finished or seen.now) - max(last.time, started)).total_seconds())
        elif reached is not None and checkpoint is not None:
            lost = seconds * min(1.0, redone / max(1, reached - (first or 0)))
        else:
            # No checkpoint known: the whole attempt is done again.
            lost = seconds
    node = (pod.get("spec") or {}).get("nodeName") or None
    product = seen.products.get(node) if node else None
    price = seen.prices.of(product)
    gpu_seconds = seen.gpus * seconds
    return AttemptUsage(
        pod=str((pod.get("metadata") or {}).get("name") or ""),
        node=node,
        gpu_product=product,
        gpus=seen.gpus,
        seconds=round(seconds, 1),
        gpu_seconds=round(gpu_seconds, 1),
        first_step=first,
        reached_step=reached,
        checkpoint_step=checkpoint,
        redone_steps=redone,
        lost_seconds=round(lost, 1),
        lost_gpu_seconds=round(seen.gpus * lost, 1),
        estimated_cost=None if price is None else round(gpu_seconds / 3600 * price, 4),
    )


def usage(spec: FinetuneJob, pods: list[dict[str, Any]], seen: Seen) -> Usage | None:
    """The job's GPU time: observed pods, plus the attempts recorded before whose pods are gone."""
    before = spec.status.usage.attempts if spec.status is not None and spec.status.usage is not None else []
    recorded = {a.pod: a for a in before}
    # Attempts in the order their pods were made (the names' random suffixes say nothing of it).
    ordered = sorted(pods, key=lambda pod: (str((pod.get("metadata") or {}).get("creationTimestamp") or ""), str((pod.get("metadata") or {}).get("name"))))
    found = (attempt_of(pod, seen, recorded.get(str((pod.get("metadata") or {}).get("name") or ""))) for pod in ordered)
    observed = {a.pod: a for a in found if a is not None}
    attempts = [a for a in before if a.pod not in observed] + list(observed.values())
    if not attempts:
        return spec.status.usage if spec.status is not None else None
    attempts = attempts[-MAX_ATTEMPTS_KEPT:]
    costs = [a.estimated_cost for a in attempts if a.estimated_cost is not None]
    return Usage(
        gpu_seconds=round(sum(a.gpu_seconds for a in attempts), 1),
        redone_steps=sum(a.redone_steps for a in attempts),
        lost_seconds=round(sum(a.lost_seconds for a in attempts), 1),
        lost_gpu_seconds=round(sum(a.lost_gpu_seconds for a in attempts), 1),
        estimated_cost=round(sum(costs), 4) if costs else None,
        currency=seen.prices.currency if costs else None,
        attempts=attempts,
    )


USAGE_SERIES = (
    ("gpuSeconds", "kubetune_finetunejob_gpu_seconds", "GPU-seconds of a FinetuneJob over all its attempts."),
    ("lostGpuSeconds", "kubetune_finetunejob_lost_work_gpu_seconds", "GPU-seconds spent after the newest checkpoint of failed attempts (done again)."),
    ("lostSeconds", "kubetune_finetunejob_lost_work_seconds", "Running time of the steps failed attempts ran after their newest checkpoint (done again)."),
    ("redoneSteps", "kubetune_finetunejob_redone_steps", "Optimizer steps run again after restarts."),
)
"""status.usage field, counter name (exported with _total), help: one counter per FinetuneJob each."""


class UsageTable(Collector):
    """Usage of every FinetuneJob, exported from its status: counters of GPU time and lost work, and a gauge of the
    estimated cost (a price change can lower it, so it is no counter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[tuple[str, str], dict[str, Any]] = {}

    def set(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with self._lock:
            self._usage[(namespace, name)] = dict(status.get("usage") or {})

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._usage.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            usage = sorted(self._usage.items())
        labels = ["namespace", "finetunejob"]
        for field_name, metric, text in USAGE_SERIES:
            family = CounterMetricFamily(metric, text, labels=labels)
            for (namespace, name), found in usage:
                family.add_metric([namespace, name], float(found.get(field_name) or 0.0))
            yield family
        cost = GaugeMetricFamily(
            "kubetune_finetunejob_estimated_cost",
            "Estimated cost of a FinetuneJob's GPU hours at the operator's GPU-hour prices.",
            labels=[*labels, "currency"],
        )
        for (namespace, name), found in usage:
            if found.get("estimatedCost") is not None:
                cost.add_metric([namespace, name, str(found.get("currency") or "")], float(found["estimatedCost"]))
        yield cost
