"""GPU series for every GPU of a pod reach its one /metrics endpoint, with the labels the dashboards query."""

from __future__ import annotations

import multiprocessing
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune_trainer.gpu_metrics import AllocatorFigures, FiguresWriter, GpuCollector, NvmlReader
from tests.support.s3 import free_port
from tests.trainer.test_metrics import promtool_check

pytestmark = pytest.mark.trainer

GIB = 1024**3


def fake_figures(local_rank: int) -> AllocatorFigures:
    """What torch's allocator would report for ``cuda:<local_rank>``; a stand-in, since this machine has no CUDA."""
    return AllocatorFigures(
        gpu=local_rank,
        allocated_bytes=(local_rank + 1) * GIB,
        reserved_bytes=(local_rank + 2) * GIB,
        peak_bytes=(local_rank + 3) * GIB,
        total_bytes=80 * GIB,
    )


def pod_process(local_rank: int, figures_dir: str, port: int, init_file: str, body_file: str) -> None:
    """One of the pod's two training processes, in a gloo group: rank 1 writes its figures, rank 0 serves and scrapes."""
    import torch.distributed as dist

    from kubetune_trainer.metrics import TrainerMetrics

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        if local_rank == 0:
            metrics = TrainerMetrics(
                "team-a",
                "big",
                3,
                {"method": "lora", "base_model": "m", "revision": ""},
                figures_dir=Path(figures_dir),
                read_allocator=lambda: fake_figures(0),
                nvml=NvmlReader(),
            )
            port = metrics.serve("127.0.0.1", port)
            dist.barrier()  # rank 1 has written its figures
            Path(body_file).write_text(urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
            metrics.stop()
            dist.barrier()
        else:
            writer = FiguresWriter(Path(figures_dir), local_rank, read=lambda: fake_figures(local_rank))
            writer.start(interval=0.1)
            writer.write()
            dist.barrier()
            dist.barrier()  # rank 0 has scraped
            writer.stop()
    finally:
        dist.destroy_process_group()


def test_each_gpu_of_a_two_process_pod_reaches_the_one_endpoint(tmp_path: Path) -> None:
    body_file = tmp_path / "body.txt"
    spawn = multiprocessing.get_context("spawn")
    args = (str(tmp_path / "figures"), free_port(), str(tmp_path / "init"), str(body_file))
    processes = [spawn.Process(target=pod_process, args=(rank, *args)) for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0, 0]
    body = body_file.read_text()

    promtool_check(body)
    expected = {
        ("allocated", 0): 1,
        ("allocated", 1): 2,
        ("reserved", 0): 2,
        ("reserved", 1): 3,
        ("peak", 0): 3,
        ("peak", 1): 4,
        ("total", 0): 80,
        ("total", 1): 80,
    }
    labels = {"finetunejob": "big", "namespace": "team-a", "rank": "3"}
    seen = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name.startswith("kubetune_trainer_gpu_"):
                assert {k: v for k, v in sample.labels.items() if k != "gpu"} == labels, sample
                seen[(sample.name.removeprefix("kubetune_trainer_gpu_memory_").removesuffix("_bytes"), int(sample.labels["gpu"]))] = sample.value
    assert seen == {key: float(gib * GIB) for key, gib in expected.items()}
    # One family per series name, however many processes fed it: promtool above and the HELP count here.
    assert body.count("# HELP kubetune_trainer_gpu_memory_allocated_bytes ") == 1
    # The writer leaves nothing behind once its process stops.
    assert not list((tmp_path / "figures").glob("*.json"))


def test_no_nvml_means_no_device_series_and_no_failure() -> None:
    """This machine has nvidia-ml-py but no NVIDIA driver: NVML fails to start, which must cost only its own series."""
    reader = NvmlReader()
    assert reader.read() == []
    families = list(GpuCollector({"namespace": "a", "finetunejob": "b", "rank": "0"}, None, lambda: fake_figures(0), reader).collect())
    assert {f.name for f in families} == {f"kubetune_trainer_gpu_memory_{kind}_bytes" for kind in ("allocated", "reserved", "peak", "total")}


def test_a_cpu_pod_serves_no_gpu_series() -> None:
    assert list(GpuCollector({"namespace": "a", "finetunejob": "b", "rank": "0"}).collect()) == []
