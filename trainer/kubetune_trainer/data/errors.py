"""The one exception the data pipeline raises for bad input."""

from __future__ import annotations

from kubetune_api.exitcodes import ExitCode
from kubetune_trainer.errors import TrainerError


class DataError(TrainerError):
    """The dataset is missing, empty or malformed; running again cannot help.

    ``exit_code`` is what the trainer exits with, so the operator's podFailurePolicy fails the Job
    at once instead of retrying. The message says what is wrong and what to change.
    """

    exit_code = ExitCode.DATA_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
