"""Prometheus metrics of one trainer pod, served by local rank 0 on runtime.metricsPort.

Series names and labels are the contract's (``kubetune_api.metrics``). Training values are pushed by the loop at its log
interval (no extra device syncs); process and GPU values are read when Prometheus scrapes, the GPU ones for every GPU
of the pod (``kubetune_trainer.gpu_metrics``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_api.metrics import LABEL_FINETUNEJOB, LABEL_NAMESPACE, LABEL_RANK, TrainerMetric
from kubetune_trainer.gpu_metrics import AllocatorReader, GpuCollector, NvmlReader, cuda_allocator_figures
from kubetune_trainer.storage.settings import Direction

if TYPE_CHECKING:
    from kubetune_trainer.training import Progress

SAVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ProcessCollector(Collector):
    """Resident memory of the serving process, read at scrape time."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rss = GaugeMetricFamily(TrainerMetric.RESIDENT_MEMORY, "Resident memory of the trainer process in bytes.", labels=list(self.labels))
        rss.add_metric(list(self.labels.values()), float(resident_memory()))
        yield rss


def resident_memory() -> int:
    """Resident memory of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


class TrainerMetrics:
    """The registry of one pod and typed setters used by the training loop."""

    def __init__(
        self,
        namespace: str,
        finetunejob: str,
        rank: int,
        info: dict[str, str],
        *,
        figures_dir: Path | None = None,
        read_allocator: AllocatorReader = cuda_allocator_figures,
        nvml: NvmlReader | None = None,
    ) -> None:
        """``figures_dir`` is where the pod's other training processes write their GPU figures (``FiguresWriter``)."""
        # *_created series double the output and no dashboard uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {LABEL_NAMESPACE: namespace, LABEL_FINETUNEJOB: finetunejob, LABEL_RANK: str(rank)}
        names = list(self.labels)
        r = self.registry

        def gauge(name: TrainerMetric, doc: str, *, initial: bool = True) -> Gauge:
            created = Gauge(name, doc, names, registry=r)
            if initial:
                # Materialise the series so a scrape before the first step already shows it.
                created.labels(**self.labels)
            return created

        self.step = gauge(TrainerMetric.STEP, "Optimizer steps done.")
        self.total_steps = gauge(TrainerMetric.TOTAL_STEPS, "Optimizer steps the run will take.")
        self.epoch = gauge(TrainerMetric.EPOCH, "Passes over the training data done (fractional).")
        self.progress = gauge(TrainerMetric.PROGRESS, "Share of the run done (0..1).")
        self.loss = gauge(TrainerMetric.LOSS, "Mean training loss over the latest log interval.", initial=False)
        self.eval_loss = gauge(TrainerMetric.EVAL_LOSS, "Loss on the evaluation set at the latest evaluation.", initial=False)
        self.base_eval_loss = gauge(TrainerMetric.BASE_EVAL_LOSS, "Loss of the base model on the evaluation set, before the first step.", initial=False)
        self.diverged = gauge(TrainerMetric.DIVERGED, "1 once the smoothed training loss has diverged (spec.training.divergence), else 0.")
        self.learning_rate = gauge(TrainerMetric.LEARNING_RATE, "Current learning rate.", initial=False)
        self.tokens_per_second = gauge(
            TrainerMetric.TOKENS_PER_SECOND, "Trained (non-padding) tokens per second in this pod over the latest log interval.", initial=False
        )
        self.eta = gauge(TrainerMetric.ETA, "Estimated seconds until training ends.")
        self.last_checkpoint_step = gauge(TrainerMetric.LAST_CHECKPOINT_STEP, "Step of the newest uploaded checkpoint.")
        self.tokens = Counter(TrainerMetric.TOKENS, "Trained (non-padding) tokens in this pod.", names, registry=r)
        self.oom_adjustments = Counter(
            TrainerMetric.OOM_ADJUSTMENTS, "Times the micro-batch was halved (accumulation doubled) after running out of GPU memory.", names, registry=r
        )
        self.oom_adjustments.labels(**self.labels)
        self.micro_batch = gauge(TrainerMetric.MICRO_BATCH, "Sequences per micro-batch the loop runs now.", initial=False)
        self.retries = Counter(TrainerMetric.S3_RETRIES, "S3 requests retried.", names, registry=r)
        self.s3_bytes = Counter(TrainerMetric.S3_BYTES, "Bytes moved to or from S3.", [*names, "direction"], registry=r)
        self.save_seconds = Histogram(TrainerMetric.CHECKPOINT_SAVE_SECONDS, "Time to write a checkpoint locally.", names, registry=r, buckets=SAVE_BUCKETS)
        self.upload_seconds = Histogram(TrainerMetric.CHECKPOINT_UPLOAD_SECONDS, "Time to upload a checkpoint to S3.", names, registry=r, buckets=SAVE_BUCKETS)
        info_gauge = Gauge(TrainerMetric.INFO, "Static facts about the run; always 1.", [*names, *sorted(info)], registry=r)
        info_gauge.labels(**self.labels, **info).set(1)
        for direction in ("upload", "download"):
            self.s3_bytes.labels(**self.labels, direction=direction)
        for labelled in (self.tokens, self.retries, self.save_seconds, self.upload_seconds):
            labelled.labels(**self.labels)
        self.registry.register(ProcessCollector(self.labels))
        self.registry.register(GpuCollector(self.labels, figures_dir, read_allocator, nvml))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(**self.labels).set(value)

    def add_tokens(self, n: int) -> None:
        self.tokens.labels(**self.labels).inc(n)

    def record_start(self, step: int, total_steps: int, last_checkpoint_step: int | None) -> None:
        """Where a run starts (0, or the step it resumed from), before its first log interval."""
        self.set(self.total_steps, total_steps)
        self.set(self.step, step)
        self.set(self.progress, step / total_steps)
        if last_checkpoint_step is not None:
            self.set(self.last_checkpoint_step, last_checkpoint_step)

    def record_progress(self, p: Progress, processes: int, local_processes: int) -> None:
        """One log interval; throughput and tokens are this pod's share (its ``local_processes`` of ``processes``)."""
        self.set(self.step, p.step)
        self.set(self.epoch, p.epoch)
        self.set(self.progress, p.step / p.total_steps)
        self.set(self.loss, p.loss)
        self.set(self.learning_rate, p.learning_rate)
        self.set(self.tokens_per_second, p.tokens_per_second / processes * local_processes)
        self.set(self.eta, p.eta_seconds)
        self.add_tokens(int(p.interval_tokens / processes * local_processes))

    # StorageObserver protocol, so S3 traffic is counted without storage importing metrics.
    def on_bytes(self, direction: Direction, n: int) -> None:
        self.s3_bytes.labels(**self.labels, direction=direction).inc(n)

    def on_retry(self) -> None:
        self.retries.labels(**self.labels).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port (useful with port 0)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._server, self._thread = server, thread
        return int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def linger(self, seconds: float) -> None:
        """Keep serving for ``seconds`` after a run that the loss stopped, so Prometheus scrapes the final loss."""
        if self._server is not None and seconds > 0:
            time.sleep(seconds)
