"""The operator's settings: one typed object read from KUBETUNE_* environment variables."""

from __future__ import annotations

import shlex
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune_api import __version__
from kubetune_api.runtime import METRICS_PORT
from kubetune_api.serving import DEFAULT_MAX_RANK, SUPPORTED_RANKS, ServingSettings
from kubetune_operator.usagespec import GpuPrices

DEFAULT_TRAINER_IMAGE = f"ghcr.io/kubetune/trainer:{__version__}"


class OperatorSettings(BaseSettings):
    """How the operator runs; every field comes from the environment variable KUBETUNE_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="KUBETUNE_", extra="ignore", frozen=True)

    watch_namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Namespaces to watch (comma-separated in the environment); empty watches the whole cluster.",
    )
    trainer_image: str = Field(default=DEFAULT_TRAINER_IMAGE, min_length=1, description="Image of the trainer pods.")
    trainer_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(default="IfNotPresent", description="imagePullPolicy of the trainer container.")
    operator_port: int = Field(default=8080, ge=1, le=65535, description="Port of the operator's /metrics, /healthz and /readyz server.")
    operator_host: str = Field(default="0.0.0.0", description="Bind address of the operator's metrics and health server.")
    trainer_metrics_port: int = Field(default=METRICS_PORT, ge=1, le=65535, description="Port of the trainer's Prometheus endpoint.")
    peering: str = Field(default="", description="kopf peering object name; empty runs standalone (a single replica).")
    log_format: Literal["json", "text"] = Field(default="text", description="Log line format.")
    progress_interval_seconds: float = Field(default=5.0, gt=0, description="How often the progress of a running trainer is read.")
    trainer_cpu_command: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Replacement of the trainer container command (one shell-style line), for local clusters that run pods as processes.",
    )
    trainer_default_cpu: str = Field(default="", description="CPU request and limit of trainer pods whose FinetuneJob sets no spec.resources.cpu.")
    trainer_default_memory: str = Field(default="", description="Memory request and limit of trainer pods whose FinetuneJob sets no spec.resources.memory.")
    default_gpu_memory: str = Field(
        default="80Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        description="GPU memory assumed by the memory estimate and autoFit when neither spec.resources.gpuMemory "
        "nor a node's nvidia.com/gpu.memory label says.",
    )
    fit_headroom: float = Field(default=0.10, ge=0, lt=1, description="Share of the GPU memory that autoFit leaves free.")
    prepare_default_cpu: str = Field(default="1", description="CPU request and limit of preparation pods whose FinetuneJob sets no spec.preparation.cpu.")
    prepare_default_memory: str = Field(
        default="4Gi", description="Memory request and limit of preparation pods whose FinetuneJob sets no spec.preparation.memory."
    )
    trainer_peer_network_policy: bool = Field(
        default=False,
        description="Give each multi-node job a NetworkPolicy that admits traffic between its own pods only (set when the chart's "
        "NetworkPolicies are on, which no longer admit traffic between the pods of different jobs).",
    )
    trainer_image_pull_secrets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Secrets with registry credentials for the trainer image (comma-separated in the environment)."
    )
    secret_retry_seconds: float = Field(default=10.0, gt=0, description="Delay between checks for a referenced Secret that does not exist yet.")
    conflict_retry_seconds: float = Field(
        default=10.0, gt=0, description="Delay between tries to create a child whose name is taken by an object this FinetuneJob does not own."
    )
    scrape_timeout_seconds: float = Field(default=2.0, gt=0, description="Timeout of one read of a trainer's /metrics.")
    max_workers: int = Field(default=32, ge=1, le=256, description="Threads that run handlers; they block on API calls, so more threads hide API latency.")
    status_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Threads that write FinetuneJob status after pod and Job changes. Few, so a burst of pod events coalesces "
        "into fewer status writes and leaves the handler threads and the apiserver to creating trainer Jobs.",
    )
    termination_grace_seconds: int = Field(default=300, ge=30, description="Grace period of trainer pods: time to checkpoint after SIGTERM.")
    serving_max_lora_rank: int = Field(
        default=DEFAULT_MAX_RANK, ge=1, le=SUPPORTED_RANKS[-1], description="Highest --max-lora-rank of the vLLM fleet; the serving check of adapters uses it."
    )
    serving_allow_modules_to_save: bool = Field(default=False, description="Accept adapters with modules_to_save in the serving check.")
    notification_sinks: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="URLs that receive a CloudEvent on every phase change of every FinetuneJob (comma-separated in the environment)."
    )
    notification_signing_key: str | None = Field(
        default=None, repr=False, description="HMAC-SHA256 key that signs each CloudEvent body (X-Kubetune-Signature); from a Secret."
    )
    gpu_hour_prices: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Price of one GPU-hour by the nvidia.com/gpu.product label of the node a trainer pod ran on (JSON in the environment); "
        "status.usage.estimatedCost multiplies each pod's GPU hours by it.",
    )
    default_gpu_hour_price: float | None = Field(
        default=None, ge=0, description="Price of one GPU-hour on nodes whose GPU product gpuHourPrices does not list; unset prices those at nothing."
    )
    cost_currency: str = Field(default="USD", min_length=1, max_length=16, description="Currency of the GPU-hour prices, shown next to the estimated cost.")
    pod_namespace: str = Field(
        default="",
        validation_alias=AliasChoices("POD_NAMESPACE", "KUBETUNE_POD_NAMESPACE"),
        description="Namespace the operator itself runs in (from the downward API).",
    )

    @field_validator("watch_namespaces", "trainer_image_pull_secrets", "notification_sinks", mode="before")
    @classmethod
    def _split_namespaces(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trainer_cpu_command", mode="before")
    @classmethod
    def _split_command(cls, value: object) -> object:
        if isinstance(value, str):
            return shlex.split(value)
        return value

    @property
    def serving(self) -> ServingSettings:
        return ServingSettings(max_lora_rank=self.serving_max_lora_rank, allow_modules_to_save=self.serving_allow_modules_to_save)

    @property
    def prices(self) -> GpuPrices:
        return GpuPrices(by_product=dict(self.gpu_hour_prices), default=self.default_gpu_hour_price, currency=self.cost_currency)

    @property
    def clusterwide(self) -> bool:
        """True when no namespaces are listed: the operator watches every namespace."""
        return not self.watch_namespaces

    @property
    def trainer_command(self) -> list[str]:
        """The trainer container command, which trainer_cpu_command replaces when set."""
        return list(self.trainer_cpu_command) or ["python", "-m", "kubetune_trainer"]
