"""Prometheus metrics of one trainer pod, served by local rank 0 on runtime.metricsPort.

Series names and labels are the contract's (``kubetune_api.metrics``). Training values are pushed by the loop at its log
interval (no extra device syncs); process and GPU values are read when Prometheus scrapes.
NVML is imported only when CUDA is in use: it is absent or not permitted in many containers.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune_api.metrics import LABEL_FINETUNEJOB, LABEL_GPU, LABEL_NAMESPACE, LABEL_RANK, TrainerMetric
from kubetune_trainer.environment import ProcessEnvironment
from kubetune_trainer.storage.settings import Direction

SAVE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ProcessCollector(Collector):
    """Resident memory of this process and GPU memory/utilisation, read at scrape time."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.visible_devices = ProcessEnvironment().cuda_visible_devices
        self._nvml: Any = None
        self._nvml_failed = False

    def collect(self) -> Iterator[GaugeMetricFamily]:
        names = list(self.labels)
        values = list(self.labels.values())
        rss = GaugeMetricFamily(TrainerMetric.RESIDENT_MEMORY, "Resident memory of the trainer process in bytes.", labels=names)
        rss.add_metric(values, float(resident_memory()))
        yield rss
        yield from self._gpu(names, values)

    def _gpu(self, names: list[str], values: list[str]) -> Iterator[GaugeMetricFamily]:
        # Never initialise CUDA from a scrape: only report when the trainer already uses it.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        gpu_names = [*names, LABEL_GPU]
        families = {
            "allocated": GaugeMetricFamily(TrainerMetric.GPU_MEMORY_ALLOCATED, "GPU memory held by tensors in bytes.", labels=gpu_names),
            "reserved": GaugeMetricFamily(TrainerMetric.GPU_MEMORY_RESERVED, "GPU memory reserved by the caching allocator in bytes.", labels=gpu_names),
            "peak": GaugeMetricFamily(TrainerMetric.GPU_MEMORY_PEAK, "Peak GPU memory held by tensors in bytes.", labels=gpu_names),
            "total": GaugeMetricFamily(TrainerMetric.GPU_MEMORY_TOTAL, "Total memory of the GPU in bytes.", labels=gpu_names),
        }
        util = GaugeMetricFamily(TrainerMetric.GPU_UTILIZATION, "GPU busy time ratio reported by NVML (0..1).", labels=gpu_names)
        for index in range(torch.cuda.device_count()):
            label_values = [*values, str(index)]
            families["allocated"].add_metric(label_values, float(torch.cuda.memory_allocated(index)))
            families["reserved"].add_metric(label_values, float(torch.cuda.memory_reserved(index)))
            families["peak"].add_metric(label_values, float(torch.cuda.max_memory_allocated(index)))
            families["total"].add_metric(label_values, float(torch.cuda.get_device_properties(index).total_memory))
            ratio = self._utilization(index)
            if ratio is not None:
                util.add_metric(label_values, ratio)
        yield from families.values()
        yield util

    def _utilization(self, index: int) -> float | None:
        if self._nvml_failed:
            return None
        try:
            if self._nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            # CUDA_VISIBLE_DEVICES renumbers devices; NVML uses physical indices.
            visible = self.visible_devices
            physical = visible.split(",")[index] if visible and not visible.startswith("GPU-") else str(index)
            handle = self._nvml.nvmlDeviceGetHandleByIndex(int(physical))
            return float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0
        except Exception:
            # NVML missing or not permitted in this container: utilisation is simply not reported.
            self._nvml_failed = True
            return None


def resident_memory() -> int:
    """Resident memory of this process in bytes."""
    return int(psutil.Process().memory_info().rss)


class TrainerMetrics:
    """The registry of one pod and typed setters used by the training loop."""

    def __init__(self, namespace: str, finetunejob: str, rank: int, info: dict[str, str]) -> None:
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
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def set(self, gauge: Gauge, value: float) -> None:
        gauge.labels(**self.labels).set(value)

    def add_tokens(self, n: int) -> None:
        self.tokens.labels(**self.labels).inc(n)

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
