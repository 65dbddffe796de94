"""FinetuneJob condition types and their CamelCase reasons, each reason next to its type."""

from __future__ import annotations

from kubetune_api.exitcodes import NON_RETRIABLE, REASONS, ExitCode

CREATED = "Created"
REASON_JOB_CREATED = "JobCreated"
REASON_CREATING = "Creating"
REASON_WAITING_FOR_SECRET = "WaitingForSecret"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_NAME_TAKEN = "NameTaken"

PREPARED = "Prepared"
REASON_PREPARING = "Preparing"
REASON_DATA_PREPARED = "DataPrepared"
REASON_DOES_NOT_FIT = "DoesNotFit"
REASON_PREPARATION_FAILED = "PreparationFailed"

SCHEDULED = "Scheduled"
REASON_POD_SCHEDULED = "PodScheduled"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_NO_POD = "NoPod"

RUNNING = "Running"
REASON_TRAINING = "Training"
REASON_STARTING = "Starting"
REASON_NOT_RUNNING = "NotRunning"
REASON_CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
REASON_IMAGE_PULL = "ImagePullBackOff"
REASON_RETRYING = "Retrying"
REASON_FINISHING = "Finishing"

SUCCEEDED = "Succeeded"
REASON_SUCCEEDED = REASONS[ExitCode.SUCCESS]
REASON_NOT_FINISHED = "NotFinished"

FAILED = "Failed"
REASON_NOT_FAILED = "NotFailed"
REASON_OOM_KILLED = "OOMKilled"
REASON_DEADLINE_EXCEEDED = "DeadlineExceeded"
REASON_BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
REASON_DISRUPTION_LIMIT_EXCEEDED = "DisruptionLimitExceeded"
REASON_EVICTED = "Evicted"
REASON_JOB_FAILED = "JobFailed"
TRAINER_REASONS = frozenset(REASONS.values())
"""Every trainer reason (ConfigError, DataError, ...) may appear as the Failed condition's reason."""
INPUT_REASONS = frozenset(REASONS[code] for code in NON_RETRIABLE)

SUSPENDED = "Suspended"
REASON_SUSPENDED = "Suspended"
REASON_WAITING_FOR_ADMISSION = "WaitingForAdmission"
REASON_NOT_SUSPENDED = "NotSuspended"

GPU_RESOURCE_AVAILABLE = "GPUResourceAvailable"
REASON_GPU_RESOURCE_FOUND = "GPUResourceFound"
REASON_GPU_RESOURCE_NOT_FOUND = "GPUResourceNotFound"

DIVERGED = "Diverged"
"""Present (True) once the smoothed training loss has run away; its reason is Diverged."""

CONDITION_ORDER = (CREATED, PREPARED, SCHEDULED, RUNNING, SUCCEEDED, FAILED, SUSPENDED, GPU_RESOURCE_AVAILABLE, DIVERGED)
