"""Process exit codes of the trainer, shared with the operator's podFailurePolicy.

Codes in ``NON_RETRIABLE`` mean the input is wrong: running again cannot help, so the operator
fails the Job at once. Any other non-zero code is a runtime fault and the Job retries it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Why the trainer stopped. The termination message carries the same name as ``reason``."""

    SUCCESS = 0
    RUNTIME_ERROR = 1
    """An unexpected fault (network, node, library); retried from the newest checkpoint."""
    INTERRUPTED = 3
    """SIGTERM arrived; a checkpoint was uploaded first. Retried."""
    STORAGE_UNAVAILABLE = 4
    """S3 did not answer after every retry. Retried."""
    HUB_UNAVAILABLE = 8
    """The Hugging Face Hub did not answer (5xx, 429, connection error, timeout). Retried."""
    CONFIG_ERROR = 10
    """The training config is invalid or inconsistent."""
    DATA_ERROR = 11
    """The dataset is missing, empty, or lacks a required field."""
    MODEL_ERROR = 12
    """The base model cannot be found or loaded, or a target module does not exist."""
    STORAGE_ACCESS_ERROR = 13
    """S3 refused access or the bucket does not exist."""
    NUMERIC_ERROR = 14
    """The loss became NaN or infinite."""
    OUT_OF_MEMORY = 15
    """The accelerator ran out of memory."""
    DIVERGED = 16
    """The smoothed loss ran away (spec.training.divergence, onDivergence Stop)."""
    EVALUATION_GATE_FAILED = 17
    """The adapter failed spec.evaluation; it was kept as a rejected candidate, not published."""
    DISK_FULL = 18
    """A volume of the pod filled up (no space left on device)."""
    RENDEZVOUS_TIMEOUT = 19
    """A multi-node run's ranks did not all join within spec.distributed.joinTimeoutSeconds; the message names the missing ones."""
    COLLECTIVE_TIMEOUT = 20
    """A collective across the run's processes did not finish within spec.distributed.collectiveTimeoutSeconds (a rank
    stopped answering). Retried from the newest checkpoint."""


NON_RETRIABLE: frozenset[ExitCode] = frozenset(
    {
        ExitCode.CONFIG_ERROR,
        ExitCode.DATA_ERROR,
        ExitCode.MODEL_ERROR,
        ExitCode.STORAGE_ACCESS_ERROR,
        ExitCode.NUMERIC_ERROR,
        ExitCode.OUT_OF_MEMORY,
        ExitCode.DIVERGED,
        ExitCode.EVALUATION_GATE_FAILED,
        ExitCode.DISK_FULL,
        # A pod that finds no node does not find one by running its peers again: the job fails, naming it.
        ExitCode.RENDEZVOUS_TIMEOUT,
    }
)

REASONS: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "Succeeded",
    ExitCode.RUNTIME_ERROR: "RuntimeError",
    ExitCode.INTERRUPTED: "Interrupted",
    ExitCode.STORAGE_UNAVAILABLE: "StorageUnavailable",
    ExitCode.HUB_UNAVAILABLE: "ModelHubUnavailable",
    ExitCode.CONFIG_ERROR: "ConfigError",
    ExitCode.DATA_ERROR: "DataError",
    ExitCode.MODEL_ERROR: "ModelError",
    ExitCode.STORAGE_ACCESS_ERROR: "StorageAccessDenied",
    ExitCode.NUMERIC_ERROR: "LossNotFinite",
    ExitCode.OUT_OF_MEMORY: "OutOfMemory",
    ExitCode.DIVERGED: "Diverged",
    ExitCode.EVALUATION_GATE_FAILED: "EvaluationGateFailed",
    ExitCode.DISK_FULL: "DiskFull",
    ExitCode.RENDEZVOUS_TIMEOUT: "RendezvousTimeout",
    ExitCode.COLLECTIVE_TIMEOUT: "CollectiveTimeout",
}
"""CamelCase reason for each exit code, used in termination messages and FinetuneJob conditions."""
