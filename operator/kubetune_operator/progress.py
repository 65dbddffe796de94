"""Read a running trainer's progress from its Prometheus endpoint."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from kubetune_api.metrics import PREFIX, TrainerMetric
from kubetune_operator.api import Progress


class ScrapeError(Exception):
    """The trainer's /metrics could not be read or parsed."""


@dataclass(frozen=True)
class TrainerSample:
    """What one read of the trainer metrics says: progress and the newest complete checkpoint."""

    progress: Progress
    last_checkpoint_step: int | None = None
    diverged: bool = False


def _values(text: str) -> dict[str, list[float]]:
    """Sample values by metric name; several when labels differ (gpus, ranks)."""
    values: dict[str, list[float]] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as error:
        raise ScrapeError(f"unparsable metrics: {error}") from error
    for family in families:
        for sample in family.samples:
            if sample.name.startswith(PREFIX) and math.isfinite(sample.value):
                values.setdefault(sample.name, []).append(sample.value)
    return values


def parse_metrics(texts: Iterable[str], now: datetime) -> TrainerSample | None:
    """Combine the /metrics texts of a job's pods: rank 0 first; throughput is summed over pods.

    Returns None when the trainer has not published its step counter yet (still loading).
    """
    per_pod = [_values(text) for text in texts]
    if not per_pod or TrainerMetric.STEP not in per_pod[0]:
        return None
    first = per_pod[0]

    def one(name: TrainerMetric) -> float | None:
        found = first.get(name)
        return found[0] if found else None

    step = int(one(TrainerMetric.STEP) or 0)
    total = one(TrainerMetric.TOTAL_STEPS)
    ratio = one(TrainerMetric.PROGRESS)
    if ratio is None and total:
        ratio = step / total
    percent = min(100, max(0, math.floor((ratio or 0.0) * 100)))
    throughput = [sum(pod[TrainerMetric.TOKENS_PER_SECOND]) for pod in per_pod if TrainerMetric.TOKENS_PER_SECOND in pod]
    eta = one(TrainerMetric.ETA)
    checkpoint = one(TrainerMetric.LAST_CHECKPOINT_STEP)
    progress = Progress(
        step=max(step, 0),
        total_steps=int(total) if total is not None and total >= 0 else None,
        epoch=one(TrainerMetric.EPOCH),
        percent=percent,
        loss=one(TrainerMetric.LOSS),
        eval_loss=one(TrainerMetric.EVAL_LOSS),
        learning_rate=one(TrainerMetric.LEARNING_RATE),
        tokens_per_second=sum(throughput) if throughput else None,
        eta_seconds=int(eta) if eta is not None and eta >= 0 else None,
        last_update_time=now.replace(microsecond=0),
    )
    return TrainerSample(
        progress=progress,
        last_checkpoint_step=int(checkpoint) if checkpoint is not None and checkpoint > 0 else None,
        diverged=bool(one(TrainerMetric.DIVERGED)),
    )


def fetch_metrics(host: str, port: int, timeout: float) -> str:
    """GET http://host:port/metrics; raises ScrapeError on any failure."""
    address = f"[{host}]" if ":" in host else host
    url = f"http://{address}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read(4 * 1024 * 1024)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ScrapeError(f"cannot read {url}: {error}") from error
    return body.decode("utf-8", errors="replace")


def scrape(hosts: list[str], port: int, timeout: float, now: datetime) -> TrainerSample | None:
    """Read every pod (rank 0 first) and combine; pods that do not answer are left out."""
    texts: list[str] = []
    for index, host in enumerate(hosts):
        try:
            texts.append(fetch_metrics(host, port, timeout))
        except ScrapeError:
            if index == 0:
                raise
    return parse_metrics(texts, now)
