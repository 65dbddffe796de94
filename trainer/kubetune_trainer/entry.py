"""One process's run: the metrics endpoint, the recipe from setup to cleanup, and the exit code.

``run`` drives one process through ``recipe.LoRARecipe``; ``worker`` is what the elastic launcher starts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from kubetune_api.exitcodes import ExitCode
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer import distributed, logs, result
from kubetune_trainer.config import read_config
from kubetune_trainer.distributed import Context
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.gpu_metrics import FiguresWriter
from kubetune_trainer.metrics import TrainerMetrics
from kubetune_trainer.recipe import LoRARecipe
from kubetune_trainer.training import StopFlag

GPU_FIGURES_FOLDER = "gpu-figures"


def figures_dir(config: TrainerConfig) -> Path:
    """Where the pod's training processes leave their GPU figures for the one that serves /metrics."""
    return Path(config.runtime.work_dir) / GPU_FIGURES_FOLDER


def serve_metrics(config: TrainerConfig, ctx: Context, environment: TrainerEnvironment) -> TrainerMetrics | None:
    """The pod's metrics endpoint, served by local rank 0 on the pod's IP (every address when unknown)."""
    if not ctx.is_local_main:
        return None
    metrics = TrainerMetrics(
        config.runtime.namespace,
        config.runtime.job_name,
        ctx.node_rank,
        {"method": config.method.value, "base_model": config.model.source, "revision": config.model.revision or ""},
        figures_dir=figures_dir(config),
    )
    host = environment.pod_ip or "0.0.0.0"
    port = metrics.serve(host, config.runtime.metrics_port)
    logs.event("metrics endpoint listening", host=host, port=port)
    return metrics


def run(config: TrainerConfig, environment: TrainerEnvironment | None = None) -> ExitCode:
    """Train, publish and report in this process; returns the process exit code."""
    started = time.monotonic()
    environment = environment or TrainerEnvironment()
    use_cuda = config.runtime.gpus_per_node > 0
    if use_cuda and not torch.cuda.is_available():
        error = TrainerError("The pod asked for GPUs but CUDA sees none; check the node's NVIDIA driver and device plugin.")
        path = config.runtime.termination_message_path if distributed.init(False).is_local_main else None
        return result.report_failure(error, None, path, environment)
    ctx = distributed.init(use_cuda, environment.completion_index, collective_timeout_s=config.runtime.collective_timeout_seconds)
    logs.setup(environment=environment, rank=ctx.rank, namespace=config.runtime.namespace, finetunejob=config.runtime.job_name)
    logs.quiet_libraries()
    stop = StopFlag()
    stop.install()
    metrics = serve_metrics(config, ctx, environment)
    # The other processes of a GPU pod hand their allocator figures to the serving one.
    figures = FiguresWriter(figures_dir(config), ctx.local_rank) if use_cuda and not ctx.is_local_main else None
    if figures is not None:
        figures.start()
    recipe = LoRARecipe(config, ctx, environment, metrics=metrics, stop=stop, started=started)
    try:
        recipe.setup()
        if recipe.published is None:
            recipe.save(recipe.train())
        else:
            recipe.report_published()
    except BaseException as error:
        code = recipe.fail(error)
        if metrics is not None and code in (ExitCode.NUMERIC_ERROR, ExitCode.DIVERGED):
            metrics.linger(config.runtime.metrics_linger_seconds)
        return code
    finally:
        if figures is not None:
            figures.stop()
        recipe.cleanup()
    return ExitCode.SUCCESS


def worker(config_path: str) -> None:
    """Body of one process started by the elastic launcher; a non-zero exit code reports failure.

    Spawned workers unpickle it by module and name, so it lives here and not in __main__.
    """
    code = run(read_config(Path(config_path)))
    if code != ExitCode.SUCCESS:
        sys.exit(int(code))
