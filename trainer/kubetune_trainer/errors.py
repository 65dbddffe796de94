"""Failures the trainer reports: each maps to an exit code, a CamelCase reason and advice.

The operator's podFailurePolicy reads the exit code (``NON_RETRIABLE`` fails the job at once)
and the termination message carries ``reason`` and ``message``. Messages are meant for the
person who wrote the FinetuneJob, so they say what to change. ``redact`` strips credential
values from any text before it leaves the process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from kubetune_api.exitcodes import REASONS, ExitCode
from kubetune_api.quality import EvaluationReport
from kubetune_api.runtime import TrainerEnvironment

OOM_ADVICE = (
    "Lower spec.training.perDeviceBatchSize (raise gradientAccumulationSteps to keep the effective batch), "
    "use method: qlora, enable spec.training.gradientCheckpointing, shorten spec.dataset.maxSeqLength, "
    "or request more GPUs."
)


class TrainerError(Exception):
    """A failure with a known cause; ends the process with ``exit_code``."""

    exit_code: ExitCode = ExitCode.RUNTIME_ERROR

    def __init__(self, message: str, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def reason(self) -> str:
        return REASONS[self.exit_code]


class ConfigError(TrainerError):
    exit_code = ExitCode.CONFIG_ERROR


class ModelError(TrainerError):
    exit_code = ExitCode.MODEL_ERROR


class NumericError(TrainerError):
    exit_code = ExitCode.NUMERIC_ERROR


class DivergedError(TrainerError):
    exit_code = ExitCode.DIVERGED


class EvaluationGateError(TrainerError):
    exit_code = ExitCode.EVALUATION_GATE_FAILED
    report: EvaluationReport | None = None


class OutOfMemoryError(TrainerError):
    exit_code = ExitCode.OUT_OF_MEMORY


class CollectiveTimeout(TrainerError):
    """A collective across the ranks did not finish in time: one rank stopped answering."""

    exit_code = ExitCode.COLLECTIVE_TIMEOUT


class Interrupted(TrainerError):
    """SIGTERM arrived; the newest checkpoint has been uploaded."""

    exit_code = ExitCode.INTERRUPTED


def classify(error: BaseException) -> TrainerError:
    """The TrainerError that describes ``error``; the data and storage layers raise TrainerErrors of their own."""
    if isinstance(error, TrainerError):
        return error
    if _is_out_of_memory(error):
        return OutOfMemoryError(f"The GPU ran out of memory ({_first_line(error)}). {OOM_ADVICE}")
    if _is_collective_timeout(error):
        return CollectiveTimeout(
            f"A collective across the run's ranks timed out ({_first_line(error)}): another rank stopped answering (a hung or lost "
            "pod, a stalled network). The job is retried from its newest checkpoint; spec.distributed.collectiveTimeoutSeconds sets the limit."
        )
    return TrainerError(f"Unexpected {type(error).__name__}: {_first_line(error)}. The job is retried from its newest checkpoint.")


def causes(error: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps: boto3's transfer layer and transformers re-raise the real cause as their own types."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for wrapped in (getattr(current, "last_exception", None), current.__cause__, current.__context__):
            if isinstance(wrapped, BaseException):
                pending.append(wrapped)


def _is_out_of_memory(error: BaseException) -> bool:
    if type(error).__name__ == "OutOfMemoryError":
        return True
    # Some kernels surface CUDA OOM as a plain RuntimeError.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _is_collective_timeout(error: BaseException) -> bool:
    # gloo: "Timed out waiting 600000ms for recv operation to complete"; NCCL's watchdog: "Watchdog caught collective operation timeout".
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out waiting" in text or "collective operation timeout" in text)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def credentials(environment: TrainerEnvironment | None = None) -> tuple[str, ...]:
    """The credential values of ``environment`` (its fields kept out of reprs) that are worth redacting."""
    environment = environment or TrainerEnvironment()
    values = (getattr(environment, name) for name, info in TrainerEnvironment.model_fields.items() if not info.repr)
    # Very short values would blank out ordinary words; real credentials are long.
    return tuple(value for value in values if isinstance(value, str) and len(value) >= 6)


def redact(text: str, environment: TrainerEnvironment | None = None) -> str:
    """``text`` with the value of every credential in the environment replaced by ***."""
    return redact_values(text, credentials(environment))


def redact_values(text: str, values: Iterable[str]) -> str:
    for value in values:
        text = text.replace(value, "***")
    return text
