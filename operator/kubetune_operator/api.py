"""The FinetuneJob API (kubetune.io/v1alpha1): spec and status as pydantic models.

The training part of the spec is the contract shared with the trainer (``kubetune_api.recipe``), so
the CRD, the operator and the trainer cannot drift apart. ``crds/finetunejob.yaml`` is generated
from these models by ``kubetune_operator.crdgen``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, computed_field, model_validator
from pydantic.config import JsonDict
from pydantic.fields import FieldInfo

from kubetune_api.messages import message
from kubetune_api.quality import EvaluationReport
from kubetune_api.recipe import RECIPE_RULES, Optimizer, Precision, TrainingRecipe
from kubetune_api.result import CheckpointRef, PreparationReport, TrainingResult
from kubetune_api.schema import K8S_NAME_PATTERN, ApiModel, cel, validations, without_nulls
from kubetune_api.serving import ServingReport
from kubetune_operator.distributedspec import DistributedSpec
from kubetune_operator.resourcesspec import HOSTNAME_LABEL, Quantity, ResourcesSpec
from kubetune_operator.sinkspec import MAX_SINKS, NOTIFICATIONS_DESCRIPTION, NotificationSink
from kubetune_operator.usagespec import Usage

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FinetuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
API_VERSION = f"{GROUP}/{VERSION}"


class PreparationMode(StrEnum):
    AUTO = "Auto"
    JOB = "Job"
    IN_TRAINER = "InTrainer"


class PreparationSpec(ApiModel):
    """Where the data is validated, tokenized and packed, and the memory estimated, before training."""

    mode: PreparationMode = Field(
        default=PreparationMode.AUTO,
        description=(
            "Job: a CPU-only Job <name>-prepare (no GPU requested) validates every record, tokenizes and packs the data into a cache "
            "under the run's S3 prefix, estimates GPU memory (and fits the batch with spec.training.autoFit), and only then is the "
            "trainer Job created; the trainer loads the cache and tokenizes nothing. InTrainer: the trainer does it all itself. "
            "Auto (default): Job when the run uses GPUs, InTrainer for CPU runs (gpus: 0)."
        ),
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit of the preparation pod; unset uses the operator's default.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit of the preparation pod; unset uses the operator's default.")


@dataclass(frozen=True)
class Mutable:
    """``Annotated`` marker of a spec field that may change after creation; every other spec field is immutable.

    A mutable field is named like the trainer Job field it sets, so the operator re-applies it under the same name.
    One the operator acts on itself (``on_job=False``) is kept off the Job: the Job gets none, and an earlier one is removed.
    """

    on_job: bool = True


MUTABLE = Mutable()
MUTABLE_BY_OPERATOR = Mutable(on_job=False)


def _unchanged(field: str) -> str:
    return f"(has(self.{field}) == has(oldSelf.{field})) && (!has(self.{field}) || self.{field} == oldSelf.{field})"


def _spoken_list(names: list[str]) -> str:
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


HAS_GPUS = "(!has(self.resources) || !has(self.resources.gpus) || self.resources.gpus > 0)"
"""CEL: the job asks for GPUs (gpus defaults to 1)."""

SPEC_RULES: list[JsonDict] = [
    *RECIPE_RULES,
    cel(f"{HAS_GPUS} || !has(self.training.precision) || self.training.precision != 'fp16'", message("training.fp16_cpu")),
    cel(f"{HAS_GPUS} || !has(self.training.optimizer) || !(self.training.optimizer in ['paged_adamw_8bit', 'paged_adamw'])", message("training.paged_cpu")),
]


def _spec_schema(schema: JsonDict, model: type[Any]) -> None:
    """The spec's CEL rules; the immutability rule is built from the model's fields, which exist only once it does."""
    mutable, immutable = _aliases(model, True), _aliases(model, False)
    immutability = cel(
        " && ".join(_unchanged(f) for f in immutable),
        message("spec.immutable", mutable=_spoken_list(mutable)),
        reason="FieldValueForbidden",
    )
    schema.update(validations(*SPEC_RULES, immutability))


def _aliases(model: type[Any], mutable: bool) -> list[str]:
    fields: dict[str, FieldInfo] = model.model_fields
    return [info.alias or name for name, info in fields.items() if (_mutable(info) is not None) is mutable]


def _mutable(info: FieldInfo) -> Mutable | None:
    return next((item for item in info.metadata if isinstance(item, Mutable)), None)


class FinetuneJobSpec(TrainingRecipe):
    """Desired state of a FinetuneJob: what to train, on what hardware, and its lifecycle."""

    model_config = ConfigDict(json_schema_extra=_spec_schema)

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Hardware and scheduling of the trainer pods.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Rendezvous and collective timeouts of a run over several processes or pods."
    )
    suspend: Annotated[bool, MUTABLE] = Field(
        default=False, description="Pause the job: running trainer pods checkpoint and stop; unsuspend resumes from the checkpoint."
    )
    backoff_limit: Annotated[int, MUTABLE] = Field(
        default=3,
        ge=0,
        le=100,
        description="Retries of the trainer after runtime failures (configuration errors are never retried). In a multi-node job a "
        "failed rank's pod is replaced by the Job controller, and the other pods restart their ranks in place, as often as this.",
    )
    active_deadline_seconds: Annotated[int | None, MUTABLE] = Field(default=None, ge=60, description="Fail the job when it runs longer than this.")
    max_disruptions: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="Trainer pods evicted or preempted (pod condition DisruptionTarget) before the job fails with reason "
        "DisruptionLimitExceeded. Disruptions resume from the newest checkpoint and do not count against backoffLimit.",
    )
    ttl_seconds_after_finished: Annotated[int | None, MUTABLE_BY_OPERATOR] = Field(
        default=None,
        ge=0,
        description=(
            "Delete the finished trainer Job and its pods (not the FinetuneJob) this many seconds after the job finished. "
            "The operator deletes it only once the outcome is recorded in status, so the result is never lost with the Job."
        ),
    )
    preparation: PreparationSpec = Field(
        default_factory=PreparationSpec, description="Where the data is prepared and the memory estimated before training (a CPU Job by default for GPU runs)."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=K8S_NAME_PATTERN,
        description="Kueue LocalQueue to submit the trainer Job to; Kueue then decides when it starts.",
    )
    notifications: list[NotificationSink] = Field(default_factory=list, max_length=MAX_SINKS, description=NOTIFICATIONS_DESCRIPTION)

    def prepares_in_job(self) -> bool:
        """True when a separate CPU Job prepares the data before the trainer Job is created."""
        mode = self.preparation.mode
        return mode is PreparationMode.JOB or (mode is PreparationMode.AUTO and self.resources.gpus > 0)

    def lifecycle(self) -> dict[str, Any]:
        """The trainer Job's values of the mutable fields, by their (Job) names: None where unset or kept off the Job."""
        values: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            marker = _mutable(info)
            if marker is not None:
                values[info.alias or name] = getattr(self, name) if marker.on_job else None
        return values

    @model_validator(mode="after")
    def _check_hardware(self) -> FinetuneJobSpec:
        errors = spec_errors(self)
        if errors:
            raise ValueError("; ".join(errors))
        return self


MUTABLE_FIELDS = tuple(_aliases(FinetuneJobSpec, True))
"""Spec fields that may change after creation (and the trainer Job fields they set)."""


def spec_errors(spec: FinetuneJobSpec) -> list[str]:
    """Python twins of the hardware rules in SPEC_RULES, for specs that did not pass the apiserver."""
    errors: list[str] = []
    if spec.resources.nodes > 1 and HOSTNAME_LABEL in spec.resources.node_selector:
        errors.append(message("resources.multinode"))
    if spec.resources.gpus == 0 and spec.training.precision is Precision.FP16:
        errors.append(message("training.fp16_cpu"))
    if spec.resources.gpus == 0 and spec.training.optimizer in (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT):
        errors.append(message("training.paged_cpu"))
    return errors


class Phase(StrEnum):
    PENDING = "Pending"
    PREPARING = "Preparing"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(max_length=316, description="Condition type, for example Ready, Running, Succeeded, Failed, Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase reason for the last transition.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail, including what to do.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation the condition was computed from.")


class Progress(ApiModel):
    """Live training progress, read from the trainer's metrics."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Fractional epoch reached.")
    percent: int = Field(default=0, ge=0, le=100, description="Completion in percent.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput, all workers together.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds to completion.")
    last_update_time: datetime | None = Field(default=None, description="When these figures were read.")


class Result(TrainingResult):
    """The published adapter, as the trainer reported it in its termination message, and how to serve it."""

    serving: ServingReport | None = Field(default=None, description="Whether vLLM can serve the adapter, with the flags and a KServe InferenceService that do.")


class FinetuneJobStatus(ApiModel):
    """Observed state of a FinetuneJob, computed from its trainer Job, pods and metrics."""

    phase: Phase = Field(default=Phase.PENDING, description="Pending, Preparing, Running, Suspended, Succeeded or Failed.")
    phase_transition_time: datetime | None = Field(
        default=None, description="When the FinetuneJob entered its current phase; with the UID it identifies the transition in notifications."
    )
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="Kubernetes-style conditions.")
    progress: Progress | None = Field(default=None, description="Live training progress.")
    last_checkpoint: CheckpointRef | None = Field(default=None, description="Newest complete checkpoint.")
    result: Result | None = Field(default=None, description="The published adapter, once Succeeded.")
    preparation: PreparationReport | None = Field(
        default=None, description="What the preparation step found: the data report, the prepared-data cache, the memory estimate and the fit."
    )
    evaluation: EvaluationReport | None = Field(
        default=None, description="Eval loss of the base model and of the adapter, and the spec.evaluation gate's verdict, once the run ended."
    )
    usage: Usage | None = Field(default=None, description="GPU time over all attempts, the work lost to restarts, and the estimated cost.")
    logs_uri: str | None = Field(
        default=None,
        max_length=2048,
        description="s3:// folder of each attempt's trainer log (<pod>.jsonl), uploaded at every checkpoint and at the end.",
    )
    job_name: str | None = Field(default=None, max_length=253, description="Name of the trainer Job.")
    start_time: datetime | None = Field(default=None, description="When the trainer first started.")
    completion_time: datetime | None = Field(default=None, description="When the FinetuneJob finished.")
    attempts: int = Field(default=0, ge=0, description="Trainer pod attempts so far (1 + retries).")
    disruptions: int = Field(default=0, ge=0, description="Trainer pods evicted or preempted so far (pod condition DisruptionTarget).")
    observed_generation: int | None = Field(default=None, ge=0, description="metadata.generation this status reflects.")
    message: str | None = Field(default=None, max_length=32768, description="What is happening now, or why it failed and what to do.")

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        """A stored status carries the computed text fields too; they are derived again, never read back."""
        if isinstance(data, dict):
            derived = {field.alias for field in cls.model_computed_fields.values()} | set(cls.model_computed_fields)
            return {k: v for k, v in data.items() if k not in derived}
        return data

    @computed_field(alias="progressText", description="Completion as text for kubectl's PROGRESS column, for example '42%'.")  # type: ignore[prop-decorator]
    @property
    def progress_text(self) -> str | None:
        return f"{self.progress.percent}%" if self.progress is not None else None

    @computed_field(alias="lossText", description="Latest training loss rounded for kubectl's LOSS column, for example '0.574'.")  # type: ignore[prop-decorator]
    @property
    def loss_text(self) -> str | None:
        loss = self.progress.loss if self.progress is not None else None
        return None if loss is None else f"{loss:.3f}"


class ObjectMeta(ApiModel):
    """The subset of metadata the operator reads."""

    model_config = ConfigDict(extra="ignore")

    name: str = ""
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    resource_version: str | None = None


class FinetuneJob(ApiModel):
    """A FinetuneJob object as read from the apiserver."""

    model_config = ConfigDict(extra="ignore")

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FinetuneJobSpec
    status: FinetuneJobStatus | None = None

    @classmethod
    def from_body(cls, body: Any) -> FinetuneJob:
        """Parse a (kopf) body; raises pydantic.ValidationError for specs the apiserver could not reject.

        The spec is read as the apiserver reads JSON, strictly ('7' is no integer, 'yes' no boolean), and a null where
        the schema allows none counts as the field left out, so the model refuses what the CRD refuses and no more;
        the status, which only the operator writes, is read as usual."""
        data = json.loads(json.dumps(body, default=_plain))
        spec = _SpecOf.model_validate_json(json.dumps({"spec": without_nulls(FinetuneJobSpec, data.get("spec"))}), strict=True).spec
        return cls.model_validate({**data, "spec": spec})


class _SpecOf(ApiModel):
    """The spec of a body alone, so that its errors are located under spec."""

    spec: FinetuneJobSpec


def _plain(value: Any) -> Any:
    """kopf's views of a body (Spec, Status, Meta) as the plain mappings they wrap."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
