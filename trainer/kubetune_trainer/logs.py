"""Structured logging: one JSON object per line on stderr, credentials redacted."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import warnings
from datetime import UTC, datetime
from typing import Any

from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.errors import credentials, redact_values

LOGGER_NAME = "kubetune_trainer"
_FIELDS = "kubetune_fields"


class JsonFormatter(logging.Formatter):
    """Renders a record as {"time", "level", "msg", ...fields} with a timezone-aware timestamp."""

    def __init__(self, static: dict[str, Any] | None = None, environment: TrainerEnvironment | None = None) -> None:
        super().__init__()
        self.static = static or {}
        self.credentials = credentials(environment)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            **self.static,
        }
        entry.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact_values(json.dumps(entry, default=str), self.credentials)


def setup(*, environment: TrainerEnvironment | None = None, **static: Any) -> logging.Logger:
    """Send every log record of the process to stderr as JSON; ``static`` fields (rank, job) go on every line.

    The handler sits on the root logger so library messages (transformers, bitsandbytes, torch,
    Python warnings) become JSON lines too; libraries log from WARNING, the trainer from INFO.
    Credentials of ``environment`` (the process's by default) are redacted from every line.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(static, environment))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = True
    logging.captureWarnings(True)
    return logger


def quiet_libraries() -> None:
    """Stop transformers and datasets from writing progress bars and plain-text lines to stderr."""
    # An instruction to huggingface_hub, read when it loads, not a setting of the trainer's own.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft calls a transformers name deprecated in v5 on every model wrap; it says nothing about the run.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # Imported here, not with this module: __main__ sets up logging before it knows the config is valid,
    # and transformers alone takes seconds to import.
    try:
        hf_logging: Any = importlib.import_module("transformers.utils.logging")
        hf_logging.disable_progress_bar()
        # Let transformers' records reach the root JSON handler instead of its own plain one.
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    except ImportError:
        pass
    try:
        datasets: Any = importlib.import_module("datasets")
        datasets.disable_progress_bars()
    except ImportError:
        pass


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def event(msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields``."""
    get().log(level, msg, extra={_FIELDS: fields})
