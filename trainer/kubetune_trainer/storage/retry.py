"""The one retry loop every S3 call of a store runs in: exponential backoff with jitter, bounded by a time budget.

What waiting cannot fix (access refused, bucket missing, bad key pair) raises ``StorageAccessError`` at once;
an endpoint that stays unreachable past the budget raises ``StorageUnavailableError``. A ``StorageError`` the
call raises itself (other than an integrity mismatch, which is worth another try) passes through untouched.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from botocore.exceptions import ClientError

from kubetune_api import layout
from kubetune_trainer.errors import causes
from kubetune_trainer.storage.credentials import CREDENTIALS_ADVICE
from kubetune_trainer.storage.errors import (
    StorageAccessError,
    StorageCredentialsError,
    StorageError,
    StorageIntegrityError,
    StorageUnavailableError,
    classify,
    describe,
)
from kubetune_trainer.storage.settings import RetryPolicy, StorageObserver

T = TypeVar("T")


class Retrier:
    """Runs one S3 operation of a store until it succeeds, cannot succeed, or the budget is spent."""

    def __init__(
        self, bucket: str, endpoint_url: str | None, policy: RetryPolicy, observer: StorageObserver, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.policy = policy
        self.observer = observer
        self._sleep = sleep
        self._rng = random.Random()

    def __call__(self, operation: str, key: str, action: Callable[[], T]) -> T:
        policy = self.policy
        began = time.monotonic()
        deadline = began + policy.max_total_seconds
        attempt = 0
        while True:
            try:
                return action()
            except Exception as error:
                if isinstance(error, StorageError) and not isinstance(error, StorageIntegrityError):
                    raise
                kind = classify(error)
                if kind == "access":
                    raise StorageAccessError(self._access_message(operation, key, error)) from error
                if kind == "credentials":
                    raise StorageCredentialsError(
                        f"S3 {operation} of {layout.uri(self.bucket, key)} found no credentials ({describe(error)}). {CREDENTIALS_ADVICE}"
                    ) from error
                if kind == "other" and any(isinstance(cause, ClientError) for cause in causes(error)):
                    raise StorageError(f"S3 {operation} of {layout.uri(self.bucket, key)} failed ({describe(error)})") from error
                if kind != "retry":
                    raise
                delay = policy.delay(attempt, self._rng)
                if time.monotonic() + delay > deadline:
                    raise StorageUnavailableError(
                        f"S3 {operation} of {layout.uri(self.bucket, key)} failed {attempt + 1} times in "
                        f"{time.monotonic() - began:.0f}s ({describe(error)}); check that the endpoint "
                        f"{self.endpoint_url or 'AWS S3'} is reachable from the pod. The job is retried from its newest checkpoint."
                    ) from error
                attempt += 1
                self.observer.on_retry()
                self._sleep(delay)

    def _access_message(self, operation: str, key: str, error: BaseException) -> str:
        return (
            f"S3 refused {operation} of {layout.uri(self.bucket, key)} ({describe(error)}). Check that bucket "
            f"'{self.bucket}' exists at {self.endpoint_url or 'AWS S3'} in the configured region (spec.output.bucket, endpointUrl, region) "
            "and that the key pair in spec.output.credentialsSecret may read and write it."
        )
