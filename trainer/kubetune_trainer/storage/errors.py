"""Why an S3 call failed, told apart: refused (waiting cannot help), worth retrying, or something else.

Each error carries the trainer exit code the operator acts on; messages name the S3 error code and
text, never request headers or keys.
"""

from __future__ import annotations

from typing import Literal

from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError, PartialCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from kubetune_api.exitcodes import ExitCode
from kubetune_trainer.errors import TrainerError, causes

ACCESS_ERROR_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "Forbidden", "InvalidAccessKeyId", "InvalidBucketName"}
    | {"InvalidToken", "NoSuchBucket", "SignatureDoesNotMatch", "403", "AuthorizationHeaderMalformed", "PermanentRedirect"}
    | {"IllegalLocationConstraintException"}
)
"""S3 error codes that waiting cannot fix: refusals (a HEAD request reports one only as "403"), a wrong bucket or region."""
RETRIABLE_ERROR_CODES = frozenset(
    {"InternalError", "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException"}
    | {"TooManyRequests", "BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
)
"""S3 error codes worth another attempt (besides every 5xx and 429): throttling, server faults, bytes damaged in transit."""


class StorageError(TrainerError):
    """An S3 operation failed; ``exit_code`` tells the trainer how to end."""

    exit_code = ExitCode.RUNTIME_ERROR


class StorageAccessError(StorageError):
    """S3 refused the request or the bucket does not exist: retrying cannot help."""

    exit_code = ExitCode.STORAGE_ACCESS_ERROR


class StorageUnavailableError(StorageError):
    """S3 did not answer (or kept failing) for the whole retry budget."""

    exit_code = ExitCode.STORAGE_UNAVAILABLE


class PreconditionFailed(StorageError):
    """A conditional write was refused: another writer created or replaced the object since it was read."""


class CheckpointDamaged(StorageError):
    """A checkpoint whose marker cannot be trusted, or whose files do not load: the run resumes from an older one."""


class StorageCredentialsError(StorageError):
    """No usable S3 credentials: the Secret's values are missing or empty, or no identity was found. Waiting cannot help."""

    exit_code = ExitCode.CONFIG_ERROR


class StorageIntegrityError(StorageError):
    """Data read back does not match its checksum. Retried; persistent mismatches end as unavailable."""

    exit_code = ExitCode.STORAGE_UNAVAILABLE


def error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def http_status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def classify(error: BaseException) -> Literal["access", "credentials", "retry", "other"]:
    for cause in causes(error):
        if isinstance(cause, NoCredentialsError | PartialCredentialsError):
            return "credentials"
        if isinstance(cause, ClientError):
            code = error_code(cause)
            if code in ACCESS_ERROR_CODES:
                return "access"
            if code in RETRIABLE_ERROR_CODES or http_status(cause) >= 500 or http_status(cause) == 429:
                return "retry"
            return "other"
        if isinstance(cause, BotoConnectionError | HTTPClientError | StorageIntegrityError | ConnectionError | TimeoutError):
            return "retry"
    return "other"


def describe(error: BaseException) -> str:
    """A short cause for messages: the S3 error code and text, never request headers or keys."""
    for cause in causes(error):
        if isinstance(cause, ClientError):
            message = cause.response.get("Error", {}).get("Message", "")
            return f"{error_code(cause) or http_status(cause)}: {message}".rstrip(": ")
    return f"{type(error).__name__}: {error}"
