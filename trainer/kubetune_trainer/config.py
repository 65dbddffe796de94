"""Reading the TrainerConfig the operator mounts, with errors that say what is wrong with it."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune_api.runtime import CONFIG_PATH, TERMINATION_MESSAGE_PATH, TrainerConfig, load_trainer_config
from kubetune_trainer.errors import ConfigError

DEFAULT_CONFIG = Path(CONFIG_PATH)


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


def termination_path(config_path: Path) -> str:
    """runtime.terminationMessagePath of a config that failed validation, if it can be read at all."""
    try:
        document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        path = document["runtime"]["terminationMessagePath"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return TERMINATION_MESSAGE_PATH
    return path if isinstance(path, str) and path else TERMINATION_MESSAGE_PATH
