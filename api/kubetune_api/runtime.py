"""The trainer's input and the pod conventions both sides agree on: paths, ports, environment.

``TrainerConfig`` (the recipe plus ``RuntimeConfig``) is what the operator renders into the job's
ConfigMap and the trainer reads back with ``load_trainer_config``. ``TrainerEnvironment`` names every
variable the operator sets on the trainer container (and the credentials its Secrets provide); the
operator builds the container's env from its fields, the trainer reads them through it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kubetune_api import layout
from kubetune_api.fit import DEFAULT_HEADROOM, GpuMemorySource
from kubetune_api.recipe import TrainingRecipe
from kubetune_api.schema import ApiModel

CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "config.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
WORK_DIR = "/var/lib/kubetune"
"""Scratch volume of the trainer pod: caches, local checkpoints, the adapter before upload."""
MODELS_DIR = "/models"
"""Mount point of spec.model.cacheVolumeClaim."""
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
METRICS_PORT = 9184
RENDEZVOUS_PORT = 29500
DEFAULT_JOIN_TIMEOUT_S = 600
DEFAULT_COLLECTIVE_TIMEOUT_S = 600


RUN_UID_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"


class PreparationRuntime(ApiModel):
    """What the operator tells the preparation step and the trainer; see kubetune_trainer.preparation."""

    cache_uri: str | None = Field(
        default=None, description="Prepared data written by the preparation Job (s3:// URI); set, the trainer loads it and tokenizes nothing."
    )
    gpu_memory_bytes: int | None = Field(default=None, ge=1, description="Memory of one GPU for the estimate and the fit; None on CPU.")
    gpu_memory_source: GpuMemorySource = Field(default=GpuMemorySource.DEFAULT, description="Where gpuMemoryBytes came from.")
    headroom: float = Field(default=DEFAULT_HEADROOM, ge=0, lt=1, description="Share of the GPU memory the fit leaves free.")


class RuntimeConfig(ApiModel):
    """How the operator runs the trainer; filled in by the operator, not part of the FinetuneJob spec."""

    namespace: str = Field(default="default", description="Namespace of the FinetuneJob (a metrics label).")
    job_name: str = Field(default="local", description="Name of the FinetuneJob (a metrics label and part of S3 keys).")
    run_uid: str = Field(
        default="",
        max_length=63,
        pattern=RUN_UID_PATTERN,
        description=(
            "Identity of the run: the FinetuneJob's metadata.uid, which names its folder in S3 (layout.run_prefix). "
            "Empty (a run started by hand) uses a hash of the recipe instead."
        ),
    )
    gpus_per_node: int = Field(default=0, ge=0, description="GPUs per node; 0 runs on CPU.")
    nodes: int = Field(default=1, ge=1, description="Number of nodes (pods) taking part.")
    rendezvous_host: str = Field(
        default="127.0.0.1", description="Stable DNS name of the pod with completion index 0, where the ranks meet; loopback for one pod."
    )
    rendezvous_port: int = Field(default=RENDEZVOUS_PORT, ge=1, le=65535, description="Port of the rendezvous on rendezvousHost.")
    peer_hosts: list[str] = Field(
        default_factory=list, description="Stable DNS name of each pod of a multi-node run, by node rank (completion index); empty for one pod."
    )
    join_timeout_seconds: int = Field(
        default=DEFAULT_JOIN_TIMEOUT_S, ge=1, description="How long the pods of a multi-node run wait for each other at the rendezvous."
    )
    collective_timeout_seconds: int = Field(
        default=DEFAULT_COLLECTIVE_TIMEOUT_S, ge=1, description="How long one collective (gloo or NCCL) may take before the run fails."
    )
    max_restarts: int = Field(default=0, ge=0, description="Times a multi-node pod restarts its workers in place when a rank fails (the job's backoffLimit).")
    metrics_port: int = Field(default=METRICS_PORT, ge=1, le=65535, description="Port of the Prometheus metrics endpoint.")
    metrics_linger_seconds: int = Field(
        default=30,
        ge=0,
        le=600,
        description="Seconds the metrics endpoint stays up after the loss stopped the run (NaN or divergence), so Prometheus scrapes that loss.",
    )
    work_dir: str = Field(default=WORK_DIR, description="Scratch directory for caches and local checkpoints.")
    termination_message_path: str = Field(default=TERMINATION_MESSAGE_PATH, description="File that receives the JSON result.")
    preparation: PreparationRuntime = Field(default_factory=PreparationRuntime, description="Prepared data and the GPU size to fit.")
    model_cache_dir: str | None = Field(
        default=None, description="Mount point of spec.model.cacheVolumeClaim: s3:// models are cached there by content, hub models under hub/."
    )

    @property
    def processes_per_node(self) -> int:
        """Training processes in one pod: one per GPU, or one on CPU."""
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


class TrainerConfig(TrainingRecipe):
    """Everything the trainer needs for one run; rendered by the operator into the job's ConfigMap."""

    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="How the operator runs the trainer.")

    @property
    def run_id(self) -> str:
        """The run's identity: runtime.runUid, or for a run started by hand a hash of its recipe (a changed recipe is a new run)."""
        if self.runtime.run_uid:
            return self.runtime.run_uid
        recipe = json.dumps(self.model_dump(mode="json", include=set(TrainingRecipe.model_fields)), sort_keys=True)
        return "recipe-" + hashlib.sha256(recipe.encode()).hexdigest()[:16]

    @property
    def job_prefix(self) -> str:
        """S3 key prefix shared by the runs of this FinetuneJob name (``layout.job_prefix``)."""
        return layout.job_prefix(self.output.prefix, self.runtime.namespace, self.runtime.job_name)

    @property
    def run_prefix(self) -> str:
        """S3 key prefix of this run (``layout.run_prefix``)."""
        return layout.run_prefix(self.output.prefix, self.runtime.namespace, self.runtime.job_name, self.run_id)


def load_trainer_config(path: Path) -> TrainerConfig:
    """Read a TrainerConfig from a YAML or JSON file."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return TrainerConfig.model_validate(data)


class TrainerEnvironment(BaseSettings):
    """Every environment variable the trainer reads. Names are derived: KUBETUNE_<FIELD> for kubetune's own,
    the conventional name (validation alias) for variables other tools define (the Job controller, AWS, Hugging Face).
    Credentials are the fields with ``repr=False``: kept out of reprs, and redacted by the trainer from every message."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", extra="ignore", frozen=True)

    pod_name: str = Field(default="", description="Name of the trainer pod (downward API metadata.name).")
    pod_uid: str = Field(
        default="",
        description="UID of the trainer pod (downward API metadata.uid): the attempt token that fences its writes to S3.",
    )
    pod_ip: str = Field(default="", description="Address the metrics endpoint binds (downward API status.podIP); empty binds every address.")
    completion_index: int = Field(
        default=0,
        ge=0,
        validation_alias=AliasChoices("JOB_COMPLETION_INDEX"),
        description="Index of this pod in an Indexed Job (set by the Job controller): its node rank.",
    )
    aws_access_key_id: str | None = Field(default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID"), description="S3 access key id.", repr=False)
    aws_secret_access_key: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY"), description="S3 secret access key.", repr=False
    )
    aws_session_token: str | None = Field(default=None, validation_alias=AliasChoices("AWS_SESSION_TOKEN"), repr=False)
    aws_endpoint_url: str | None = Field(default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL"))
    aws_region: str | None = Field(default=None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"))
    hf_token: str | None = Field(default=None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), repr=False)
    hf_hub_cache: str | None = Field(default=None, validation_alias=AliasChoices("HF_HUB_CACHE"), description="Hugging Face download cache.")


def env_name(field: str) -> str:
    """The environment variable of a ``TrainerEnvironment`` field, as the operator must set it."""
    info = TrainerEnvironment.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        assert isinstance(first, str)
        return first
    return f"{TrainerEnvironment.model_config.get('env_prefix', '')}{field}".upper()
