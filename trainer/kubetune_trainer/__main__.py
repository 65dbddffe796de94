"""Entry point: ``python -m kubetune_trainer --config /etc/kubetune/config.yaml``.

Reads the TrainerConfig, then either runs the recipe in this process or, when the run spans
several processes (GPUs per pod > 1 or several pods), starts them through torch's elastic launcher
and exits with the first failing worker's code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune_api.runtime import TrainerConfig, load_trainer_config
from kubetune_trainer import logs, result
from kubetune_trainer.errors import ConfigError, TrainerError

DEFAULT_CONFIG = Path("/etc/kubetune/config.yaml")
DEFAULT_TERMINATION_PATH = "/dev/termination-log"


def read_config(path: Path) -> TrainerConfig:
    """The config at ``path``; unreadable or invalid files raise ConfigError naming the problem."""
    try:
        return load_trainer_config(path)
    except FileNotFoundError as error:
        raise ConfigError(f"No training config at {path}; the operator mounts it from the ConfigMap <name>-config.") from error
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()[:10])
        raise ConfigError(f"The training config {path} is invalid: {problems}") from error
    except (OSError, ValueError) as error:
        raise ConfigError(f"The training config {path} cannot be read: {error}") from error


def _termination_path(config_path: Path) -> str:
    """runtime.terminationMessagePath of a config that failed validation, if it can be read at all."""
    try:
        document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        path = document["runtime"]["terminationMessagePath"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return DEFAULT_TERMINATION_PATH
    return path if isinstance(path, str) and path else DEFAULT_TERMINATION_PATH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune_trainer", description="Fine-tune a model with LoRA/QLoRA from a TrainerConfig file.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML or JSON TrainerConfig (default: %(default)s).")
    args = parser.parse_args(argv)
    logs.setup(pod=os.environ.get("KUBETUNE_POD_NAME", ""))
    try:
        config = read_config(args.config)
    except TrainerError as error:
        logs.event("run failed", level=40, reason=error.reason, exit_code=int(error.exit_code), error=error.message)
        result.write(_termination_path(args.config), result.failure(error, None))
        return int(error.exit_code)

    from kubetune_trainer import distributed

    topo = distributed.topology(config.runtime)
    if topo.world_size > 1 and not distributed.is_worker():
        logs.event(
            "starting workers",
            nnodes=topo.nnodes,
            node_rank=topo.node_rank,
            nproc_per_node=topo.nproc_per_node,
            master=f"{topo.master_addr}:{topo.master_port}",
        )
        from kubetune_trainer.recipe import worker

        return distributed.launch(topo, worker, str(args.config))

    from kubetune_trainer import recipe

    return int(recipe.run(config))


if __name__ == "__main__":
    sys.exit(main())
