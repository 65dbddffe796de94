"""Writing the termination message (``kubetune_api.result.TerminationMessage``) where the kubelet reads it."""

from __future__ import annotations

from pathlib import Path

from kubetune_api.result import CheckpointRef, TerminationMessage
from kubetune_trainer.errors import TrainerError, redact


def failure(error: TrainerError, last_checkpoint: CheckpointRef | None) -> TerminationMessage:
    """The message of a failed run: its reason, exit code and the advice, credentials redacted."""
    return TerminationMessage.failed(error.exit_code, redact(error.message), last_checkpoint)


def write(path: str, message: TerminationMessage) -> None:
    """Write the termination message; a missing folder (local runs) is created, failures are not fatal."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(message.encode())
    except OSError:
        # The result is still in the log; an unwritable path must not hide the real exit code.
        pass
