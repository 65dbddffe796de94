"""GPU time of a FinetuneJob over all its attempts, from pod timestamps (pure), and its operator metrics.

Each trainer pod counts GPUs x the time its trainer container ran (startedAt to finishedAt, or to now while it
runs), so a restarted operator computes the same figures again. A pod that has gone (a replaced Job, a TTL)
keeps the figures the status recorded for it. The work lost to a restart is the GPU time an attempt spent after
its newest checkpoint: the next attempt resumes from there and does it again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune_operator import manifests
from kubetune_operator.api import AttemptUsage, FinetuneJob, Usage
from kubetune_operator.verdict import termination_message

MAX_ATTEMPTS_KEPT = 32


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _container_state(pod: dict[str, Any]) -> dict[str, Any]:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == manifests.CONTAINER_NAME:
            return dict(container.get("state") or {})
    return {}


def attempt_of(pod: dict[str, Any], gpus: int, now: datetime) -> AttemptUsage | None:
    """GPU time of one trainer pod; None before its trainer container started."""
    state = _container_state(pod)
    running, terminated = state.get("running") or {}, state.get("terminated") or {}
    started = _time(running.get("startedAt") or terminated.get("startedAt"))
    if started is None:
        return None
    finished = _time(terminated.get("finishedAt")) if terminated else None
    seconds = max(0.0, ((finished or now) - started).total_seconds())
    lost = 0.0
    if terminated and terminated.get("exitCode") not in (0, None):
        message = termination_message(pod)
        checkpoint = message.last_checkpoint if message is not None else None
        since = checkpoint.time if checkpoint is not None and checkpoint.time is not None else None
        # No checkpoint, or one of unknown time: the whole attempt is done again.
        lost = seconds if since is None or checkpoint is None else max(0.0, ((finished or now) - max(since, started)).total_seconds())
    name = str((pod.get("metadata") or {}).get("name") or "")
    return AttemptUsage(pod=name, gpus=gpus, seconds=round(seconds, 1), gpu_seconds=round(gpus * seconds, 1), lost_gpu_seconds=round(gpus * lost, 1))


def usage(spec: FinetuneJob, pods: list[dict[str, Any]], now: datetime) -> Usage | None:
    """The job's GPU time: observed pods, plus the attempts recorded before whose pods are gone."""
    gpus = spec.spec.resources.gpus
    seen = {a.pod: a for a in (attempt_of(pod, gpus, now) for pod in pods) if a is not None}
    before = spec.status.usage.attempts if spec.status is not None and spec.status.usage is not None else []
    attempts = [a for a in before if a.pod not in seen] + sorted(seen.values(), key=lambda a: a.pod)
    if not attempts:
        return spec.status.usage if spec.status is not None else None
    attempts = attempts[-MAX_ATTEMPTS_KEPT:]
    return Usage(
        gpu_seconds=round(sum(a.gpu_seconds for a in attempts), 1),
        lost_gpu_seconds=round(sum(a.lost_gpu_seconds for a in attempts), 1),
        attempts=attempts,
    )


class UsageTable(Collector):
    """GPU-seconds and lost GPU-seconds of every FinetuneJob, exported as counters from its status."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._usage: dict[tuple[str, str], tuple[float, float]] = {}

    def set(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        found = status.get("usage") or {}
        with self._lock:
            self._usage[(namespace, name)] = (float(found.get("gpuSeconds") or 0.0), float(found.get("lostGpuSeconds") or 0.0))

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._usage.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            usage = dict(self._usage)
        labels = ["namespace", "finetunejob"]
        used = CounterMetricFamily("kubetune_finetunejob_gpu_seconds", "GPU-seconds of a FinetuneJob over all its attempts.", labels=labels)
        lost = CounterMetricFamily(
            "kubetune_finetunejob_lost_work_gpu_seconds", "GPU-seconds spent after the newest checkpoint of failed attempts (done again).", labels=labels
        )
        for (namespace, name), (gpu_seconds, lost_seconds) in sorted(usage.items()):
            used.add_metric([namespace, name], gpu_seconds)
            lost.add_metric([namespace, name], lost_seconds)
        yield used
        yield lost
