"""The termination message: the run's result as JSON, read by the operator when the pod ends."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.errors import TrainerError, redact
from kubetune_trainer.exitcodes import REASONS, ExitCode

MAX_BYTES = 4096
"""Kubernetes keeps at most 4 KiB of a termination message."""


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    uri: str

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "uri": self.uri}


def success_message(
    *,
    adapter_uri: str | None,
    manifest_sha256: str | None,
    size_bytes: int | None,
    final_loss: float | None,
    steps: int,
    tokens: int,
    duration_seconds: float,
    peak_memory_bytes: int,
    last_checkpoint: CheckpointRef | None,
    resumed_from_step: int | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "status": "Succeeded",
        "reason": REASONS[ExitCode.SUCCESS],
        "adapterUri": adapter_uri,
        "manifestSha256": manifest_sha256,
        "sizeBytes": size_bytes,
        "finalLoss": final_loss,
        "steps": steps,
        "tokens": tokens,
        "durationSeconds": round(duration_seconds, 3),
        "peakMemoryBytes": peak_memory_bytes,
        "resumedFromStep": resumed_from_step,
    }
    if last_checkpoint is not None:
        message["lastCheckpoint"] = last_checkpoint.to_json()
    return {k: v for k, v in message.items() if v is not None}


def failure_message(error: TrainerError, last_checkpoint: CheckpointRef | None) -> dict[str, Any]:
    message: dict[str, Any] = {
        "status": "Failed",
        "reason": error.reason,
        "message": redact(error.message),
        "exitCode": int(error.exit_code),
    }
    if last_checkpoint is not None:
        message["lastCheckpoint"] = last_checkpoint.to_json()
    return message


def encode(message: dict[str, Any]) -> bytes:
    """JSON of ``message`` within MAX_BYTES, shortening the free-text message if needed."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) <= MAX_BYTES or "message" not in message:
        return data
    excess = len(data) - MAX_BYTES
    text = str(message["message"])
    shortened = text[: max(0, len(text) - excess - 16)] + "..."
    while True:
        data = json.dumps({**message, "message": shortened}, separators=(",", ":")).encode()
        if len(data) <= MAX_BYTES:
            return data
        shortened = shortened[: max(0, len(shortened) - 64)] + "..."


def write(path: str, message: dict[str, Any]) -> None:
    """Write the termination message; a missing folder (local runs) is created, failures are not fatal."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode(message))
    except OSError:
        # The result is still in the log; an unwritable path must not hide the real exit code.
        pass
