"""How a run ends: the termination message (``kubetune_api.result.TerminationMessage``) where the kubelet
reads it, and the same result in the log."""

from __future__ import annotations

from pathlib import Path

from kubetune_api.exitcodes import ExitCode
from kubetune_api.result import CheckpointRef, TerminationMessage
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer import logs
from kubetune_trainer.errors import EvaluationGateError, TrainerError, redact


def failure(error: TrainerError, last_checkpoint: CheckpointRef | None, environment: TrainerEnvironment | None = None) -> TerminationMessage:
    """The message of a failed run: its reason, exit code and the advice, credentials redacted."""
    report = error.report if isinstance(error, EvaluationGateError) else None
    return TerminationMessage.failed(error.exit_code, redact(error.message, environment), last_checkpoint, report)


def write(path: str, message: TerminationMessage) -> None:
    """Write the termination message; a missing folder (local runs) is created, failures are not fatal."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(message.encode())
    except OSError:
        # The result is still in the log; an unwritable path must not hide the real exit code.
        pass


def report_failure(error: TrainerError, last_checkpoint: CheckpointRef | None, path: str | None, environment: TrainerEnvironment | None = None) -> ExitCode:
    """Log the failure and, given a ``path`` (local rank 0), write it as the termination message; returns its exit code."""
    logs.event("run failed", level=40, reason=error.reason, exit_code=int(error.exit_code), error=error.message)
    if path is not None:
        write(path, failure(error, last_checkpoint, environment))
    return error.exit_code


def report_success(message: TerminationMessage, path: str) -> None:
    write(path, message)
    logs.event("run succeeded", **message.to_api())
