"""Entry point: ``python -m kubetune_trainer [train|prepare] --config /etc/kubetune/config.yaml``.

With credentials in the environment the trainer runs as a child whose output is redacted (see
``redacted_output``). ``prepare`` runs the preparation step (kubetune_trainer.preparation) in this process. ``train`` (the
default) reads the TrainerConfig, then either runs the recipe in this process or, when the run spans
several processes (GPUs per pod > 1 or several pods), starts them through torch's elastic launcher
and exits with the first failing worker's code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer import logs, redacted_output, result
from kubetune_trainer.config import DEFAULT_CONFIG, read_config, termination_path
from kubetune_trainer.errors import TrainerError, credentials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description="Fine-tune a model with LoRA/QLoRA from a TrainerConfig file.")
    parser.add_argument(
        "mode",
        nargs="?",
        choices=("train", "prepare"),
        default="train",
        help="train (default), or prepare: validate, tokenize and pack the data and estimate GPU memory, on a CPU.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML or JSON TrainerConfig (default: %(default)s).")
    args = parser.parse_args(argv)
    environment = TrainerEnvironment()
    logs.setup(environment=environment, pod=environment.pod_name)
    try:
        config = read_config(args.config)
    except TrainerError as error:
        return int(result.report_failure(error, None, termination_path(args.config), environment))

    # Imported once the config is known to be valid: a bad config is reported without waiting for torch.
    if args.mode == "prepare":
        from kubetune_trainer import preparation

        return int(preparation.run(config, environment))
    from kubetune_trainer import distributed, entry

    topo = distributed.topology(config.runtime, environment.completion_index)
    if topo.world_size > 1 and not distributed.is_worker():
        logs.event(
            "starting workers",
            nnodes=topo.nodes,
            node_rank=topo.node_rank,
            nproc_per_node=topo.processes_per_node,
            master=f"{topo.rendezvous_host}:{topo.rendezvous_port}",
        )
        try:
            return distributed.launch(topo, entry.worker, str(args.config))
        except TrainerError as error:
            return int(result.report_failure(error, None, config.runtime.termination_message_path, environment))
    return int(entry.run(config, environment))


def entrypoint(argv: list[str] | None = None) -> int:
    """What the container runs: ``main`` itself, or, with credentials in the environment, ``main`` in a child whose output is redacted."""
    argv = sys.argv[1:] if argv is None else argv
    secrets = credentials(TrainerEnvironment())
    if redacted_output.CHILD_FLAG in argv or not secrets:
        return main([arg for arg in argv if arg != redacted_output.CHILD_FLAG])
    # Output that bypasses the logger (C extensions, the launcher) may end up in the pod's termination message.
    return redacted_output.run([sys.executable, "-m", "kubetune_trainer", redacted_output.CHILD_FLAG, *argv], secrets)


if __name__ == "__main__":
    sys.exit(entrypoint())
