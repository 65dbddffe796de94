"""GPU series for every GPU of a pod, served by the pod's one endpoint (local rank 0).

Two sources, because neither alone is right on every GPU:

- torch's allocator counters (allocated, reserved, peak) exist only inside the process that owns the memory. Each
  training process reads its own device and, when it is not the one serving, writes the figures to a small file in
  the pod's scratch folder (``figures_dir``); the serving process reads its own figures and every peer's file at
  scrape time.
- NVML's device-wide figures (memory used by every process including CUDA contexts, total memory, utilisation) are
  read by the serving process for every GPU the pod can see.

The ``gpu`` label is the CUDA device index inside the pod (``CUDA_VISIBLE_DEVICES`` order), the ``rank`` label the
pod's node rank, as the chart's dashboards and alerts query them. NVML missing or not permitted: no NVML series, and
nothing fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, ValidationError

from kubetune_api.metrics import LABEL_GPU, TrainerMetric
from kubetune_trainer.environment import ProcessEnvironment

FIGURES_INTERVAL_SECONDS = 5.0
FIGURES_SUFFIX = ".gpu.json"


class AllocatorFigures(BaseModel):
    """One training process's allocator figures for the GPU it trains on."""

    model_config = ConfigDict(frozen=True)

    gpu: int
    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int
    total_bytes: int


class DeviceFigures(BaseModel):
    """NVML's view of one GPU, across every process on it."""

    model_config = ConfigDict(frozen=True)

    gpu: int
    used_bytes: int
    total_bytes: int
    utilization_ratio: float


AllocatorReader = Callable[[], "AllocatorFigures | None"]


def cuda_allocator_figures() -> AllocatorFigures | None:
    """This process's figures for its current CUDA device; None when it does not use CUDA.

    Never initialises CUDA: a process that has not touched the GPU has nothing to report.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device()
    return AllocatorFigures(
        gpu=index,
        allocated_bytes=torch.cuda.memory_allocated(index),
        reserved_bytes=torch.cuda.memory_reserved(index),
        peak_bytes=torch.cuda.max_memory_allocated(index),
        total_bytes=torch.cuda.get_device_properties(index).total_memory,
    )


class NvmlReader:
    """Device-wide figures of every GPU this pod sees, through NVML (``nvidia-ml-py``)."""

    def __init__(self, process: ProcessEnvironment | None = None) -> None:
        self.visible = (process or ProcessEnvironment()).cuda_visible_devices
        self._nvml: Any = None
        self._failed = False

    def read(self) -> list[DeviceFigures]:
        if self._failed:
            return []
        try:
            nvml = self._init()
            return [self._device(nvml, index, handle) for index, handle in enumerate(self._handles(nvml))]
        except Exception:
            # NVML missing, no driver, or not permitted in this container: these series are simply not reported.
            self._failed = True
            return []

    def _init(self) -> Any:
        if self._nvml is None:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        return self._nvml

    def _handles(self, nvml: Any) -> list[Any]:
        # CUDA_VISIBLE_DEVICES renumbers devices for CUDA; NVML knows them by physical index or UUID.
        ids = [part.strip() for part in self.visible.split(",") if part.strip()]
        if not ids:
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        return [nvml.nvmlDeviceGetHandleByUUID(i) if i.startswith(("GPU-", "MIG-")) else nvml.nvmlDeviceGetHandleByIndex(int(i)) for i in ids]

    @staticmethod
    def _device(nvml: Any, index: int, handle: Any) -> DeviceFigures:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        return DeviceFigures(gpu=index, used_bytes=int(memory.used), total_bytes=int(memory.total), utilization_ratio=float(busy) / 100.0)


class FiguresWriter:
    """A training process that does not serve /metrics: its allocator figures, written for the serving process."""

    def __init__(self, figures_dir: Path, local_rank: int, read: AllocatorReader = cuda_allocator_figures) -> None:
        self.path = figures_dir / f"local-rank-{local_rank}{FIGURES_SUFFIX}"
        self.read = read
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        figures = self.read()
        if figures is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so a scrape never reads half a file.
        staged = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        staged.write_text(figures.model_dump_json())
        staged.replace(self.path)

    def start(self, interval: float = FIGURES_INTERVAL_SECONDS) -> None:
        """Write now and then every ``interval`` seconds, on a daemon thread, until ``stop``."""

        def loop() -> None:
            while True:
                with contextlib.suppress(OSError):
                    self.write()
                if self._stopped.wait(interval):
                    return

        self._thread = threading.Thread(target=loop, name="gpu-figures", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


def read_peer_figures(figures_dir: Path | None) -> list[AllocatorFigures]:
    """The figures every other process of the pod wrote; unreadable files are skipped (a peer mid-start)."""
    if figures_dir is None or not figures_dir.is_dir():
        return []
    found = []
    for path in sorted(figures_dir.glob(f"*{FIGURES_SUFFIX}")):
        with contextlib.suppress(OSError, ValidationError):
            found.append(AllocatorFigures.model_validate_json(path.read_text()))
    return found


class GpuCollector(Collector):
    """Every GPU series of the pod, one family per series name, read at scrape time."""

    def __init__(
        self,
        labels: dict[str, str],
        figures_dir: Path | None = None,
        read_own: AllocatorReader = cuda_allocator_figures,
        nvml: NvmlReader | None = None,
    ) -> None:
        self.labels = labels
        self.figures_dir = figures_dir
        self.read_own = read_own
        self.nvml = nvml or NvmlReader()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        own = self.read_own()
        if own is None:
            # This pod does not train on GPUs (or has not started to): no GPU series at all.
            return
        allocators = {f.gpu: f for f in read_peer_figures(self.figures_dir)}
        allocators[own.gpu] = own
        devices = {d.gpu: d for d in self.nvml.read()}
        names = [*self.labels, LABEL_GPU]

        def family(name: TrainerMetric, doc: str, values: dict[int, float]) -> GaugeMetricFamily:
            created = GaugeMetricFamily(name, doc, labels=names)
            for gpu, value in sorted(values.items()):
                created.add_metric([*self.labels.values(), str(gpu)], value)
            return created

        yield family(TrainerMetric.GPU_MEMORY_ALLOCATED, "GPU memory held by tensors in bytes.", {g: f.allocated_bytes for g, f in allocators.items()})
        yield family(
            TrainerMetric.GPU_MEMORY_RESERVED, "GPU memory reserved by the caching allocator in bytes.", {g: f.reserved_bytes for g, f in allocators.items()}
        )
        yield family(TrainerMetric.GPU_MEMORY_PEAK, "Peak GPU memory held by tensors in bytes.", {g: f.peak_bytes for g, f in allocators.items()})
        totals: dict[int, float] = {g: f.total_bytes for g, f in allocators.items()}
        totals.update({g: d.total_bytes for g, d in devices.items()})
        yield family(TrainerMetric.GPU_MEMORY_TOTAL, "Total memory of the GPU in bytes.", totals)
        if devices:
            yield family(
                TrainerMetric.GPU_MEMORY_USED,
                "GPU memory in use by every process on the device (CUDA contexts included), reported by NVML, in bytes.",
                {g: d.used_bytes for g, d in devices.items()},
            )
            yield family(TrainerMetric.GPU_UTILIZATION, "GPU busy time ratio reported by NVML (0..1).", {g: d.utilization_ratio for g, d in devices.items()})
