"""Pure builders: a FinetuneJob in, the manifests of its children out (no I/O).

Names and labels are deterministic, so applying a child again makes no duplicate and the
operator finds its children again after a restart.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune_api.exitcodes import NON_RETRIABLE
from kubetune_api.fit import GpuMemorySource, training_overrides
from kubetune_api.recipe import TrainingRecipe
from kubetune_api.result import PreparationReport
from kubetune_api.runtime import (
    CONFIG_FILE,
    MODELS_DIR,
    RENDEZVOUS_PORT,
    TERMINATION_MESSAGE_PATH,
    WORK_DIR,
    PreparationRuntime,
    RuntimeConfig,
    TrainerConfig,
)
from kubetune_operator.api import API_VERSION, KIND, FinetuneJob
from kubetune_operator.podspec import CONTAINER_NAME, Manifest, pod_spec
from kubetune_operator.settings import OperatorSettings

YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter when PyYAML has it: the Python one costs a burst of creations a tenth of the operator's CPU."""


LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_FINETUNEJOB = "kubetune.io/finetunejob"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_COMPONENT = "kubetune.io/component"
COMPONENT_PREPARE = "prepare"
PREPARE_BACKOFF_LIMIT = 2
APP_NAME = "kubetune-trainer"
MANAGED_BY = "kubetune"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def config_map_name(name: str) -> str:
    return f"{name}-config"


def job_name(name: str) -> str:
    return f"{name}-trainer"


def prepare_job_name(name: str) -> str:
    return f"{name}-prepare"


def service_name(name: str) -> str:
    return f"{name}-trainer"


def peer_selector(name: str) -> dict[str, str]:
    """What selects a job's trainer pods: the headless Service, their anti-affinity, the peer NetworkPolicy."""
    return {LABEL_FINETUNEJOB: name, LABEL_MANAGED_BY: MANAGED_BY}


def child_labels(name: str) -> dict[str, str]:
    """Labels on every child; kubetune.io/finetunejob is how watches map a child to its owner."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_FINETUNEJOB: name,
    }


def owner_reference(job: FinetuneJob) -> Manifest:
    """Controller reference: deleting the FinetuneJob garbage-collects the child."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(job: FinetuneJob, name: str, extra_labels: dict[str, str] | None = None) -> Manifest:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {**child_labels(job.metadata.name), **(extra_labels or {})},
        "ownerReferences": [owner_reference(job)],
    }


GpuMemory = tuple[int, GpuMemorySource]
"""Bytes of one GPU and where the figure came from."""


def trainer_config(
    job: FinetuneJob, settings: OperatorSettings, preparation: PreparationReport | None = None, gpu_memory: GpuMemory | None = None
) -> TrainerConfig:
    """The trainer's input: the spec's recipe fields plus how the operator runs it.

    With a preparation report the trainer loads its prepared data and, when autoFit found settings that fit, runs
    with them. ``gpu_memory`` is what the preparation step fits to (GPU runs only)."""
    spec = job.spec
    name = job.metadata.name
    recipe = spec.model_dump(include=set(TrainingRecipe.model_fields))
    if preparation is not None and preparation.fit is not None and preparation.fit.fits and spec.training.auto_fit:
        recipe["training"] = {**recipe["training"], **training_overrides(preparation.fit)}
    # Each pod by its stable name under the headless Service (the Job controller names pod k's host <job>-k); rank 0 hosts
    # the rendezvous.
    peers = [f"{job_name(name)}-{rank}.{service_name(name)}" for rank in range(spec.resources.nodes)] if spec.resources.nodes > 1 else []
    memory, source = gpu_memory if gpu_memory is not None and spec.resources.gpus > 0 else (None, GpuMemorySource.DEFAULT)
    runtime = RuntimeConfig(
        namespace=job.metadata.namespace,
        job_name=name,
        # A FinetuneJob created again under the same name is a new run, with a folder of its own in S3.
        run_uid=job.metadata.uid,
        gpus_per_node=spec.resources.gpus,
        nodes=spec.resources.nodes,
        # The pod of completion index 0, by its stable name under the headless Service.
        rendezvous_host=peers[0] if peers else "127.0.0.1",
        rendezvous_port=RENDEZVOUS_PORT,
        peer_hosts=peers,
        join_timeout_seconds=spec.distributed.join_timeout_seconds,
        collective_timeout_seconds=spec.distributed.collective_timeout_seconds,
        # The other pods restart their ranks in place while the Job controller replaces a failed one.
        max_restarts=spec.backoff_limit if spec.resources.nodes > 1 else 0,
        metrics_port=settings.trainer_metrics_port,
        work_dir=WORK_DIR,
        termination_message_path=TERMINATION_MESSAGE_PATH,
        model_cache_dir=MODELS_DIR if spec.model.cache_volume_claim else None,
        preparation=PreparationRuntime(
            cache_uri=preparation.cache_uri if preparation is not None else None,
            gpu_memory_bytes=memory,
            gpu_memory_source=source,
            headroom=settings.fit_headroom,
        ),
    )
    return TrainerConfig.model_validate({**recipe, "runtime": runtime})


def build_config_map(
    job: FinetuneJob, settings: OperatorSettings, preparation: PreparationReport | None = None, gpu_memory: GpuMemory | None = None
) -> Manifest:
    """ConfigMap `<name>-config` with the trainer config; it holds Secret names only, never values."""
    text = yaml.dump(trainer_config(job, settings, preparation, gpu_memory).to_api(), Dumper=YAML_DUMPER, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.metadata.name)),
        "data": {CONFIG_FILE: text},
    }


def build_service(job: FinetuneJob, settings: OperatorSettings) -> Manifest | None:
    """Headless Service giving each trainer pod a DNS name for rendezvous; only for nodes > 1."""
    if job.spec.resources.nodes <= 1:
        return None
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(name)),
        "spec": {
            "clusterIP": "None",
            "selector": peer_selector(name),
            # Ranks must resolve each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": settings.trainer_metrics_port, "targetPort": settings.trainer_metrics_port, "protocol": "TCP"},
            ],
        },
    }


def _trainer_pod(job: FinetuneJob, settings: OperatorSettings, preparation: PreparationReport | None) -> Manifest:
    name = job.metadata.name
    return pod_spec(
        job,
        settings,
        config_map_name(name),
        service_name(name),
        model_parameters=preparation.model_parameters if preparation else None,
        peer_labels=peer_selector(name),
    )


def _prepare_pod(job: FinetuneJob, settings: OperatorSettings) -> Manifest:
    name = job.metadata.name
    return pod_spec(job, settings, config_map_name(name), service_name(name), prepare=True)


def pod_failure_policy() -> Manifest:
    """Input errors fail the Job at once; evictions and preemptions do not count as failures."""
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In", "values": sorted(int(code) for code in NON_RETRIABLE)},
            },
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def build_job(job: FinetuneJob, settings: OperatorSettings, preparation: PreparationReport | None = None) -> Manifest:
    """batch/v1 Job `<name>-trainer`: one pod per node; an Indexed Job when nodes > 1. The preparation's report, when
    there is one, sizes the scratch volume from the model."""
    spec = job.spec
    name = job.metadata.name
    extra_labels = {LABEL_KUEUE_QUEUE: spec.queue_name} if spec.queue_name else None
    job_spec: Manifest = {
        **{field: value for field, value in spec.lifecycle().items() if value is not None},
        # Kueue admits a queued Job by unsuspending it, so such a Job always starts suspended.
        "suspend": spec.suspend or spec.queue_name is not None,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {
                "labels": child_labels(name),
                "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(settings.trainer_metrics_port)},
            },
            "spec": _trainer_pod(job, settings, preparation),
        },
    }
    if spec.resources.nodes > 1:
        job_spec.update({"completionMode": "Indexed", "completions": spec.resources.nodes, "parallelism": spec.resources.nodes})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(job, job_name(name), extra_labels), "spec": job_spec}


def build_prepare_job(job: FinetuneJob, settings: OperatorSettings) -> Manifest:
    """batch/v1 Job `<name>-prepare`: one CPU pod (no GPU, no GPU toleration) running the trainer image in prepare mode."""
    name = job.metadata.name
    labels = {LABEL_COMPONENT: COMPONENT_PREPARE}
    job_spec: Manifest = {
        "backoffLimit": PREPARE_BACKOFF_LIMIT,
        "podFailurePolicy": pod_failure_policy(),
        "template": {
            "metadata": {"labels": {**child_labels(name), **labels}},
            "spec": pod_spec(job, settings, config_map_name(name), service_name(name), prepare=True),
        },
    }
    if job.spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = job.spec.active_deadline_seconds
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(job, prepare_job_name(name), labels), "spec": job_spec}


def job_update(job: FinetuneJob, current: Manifest | None = None) -> Manifest | None:
    """Merge patch of an existing trainer Job's spec: the FinetuneJob's mutable fields (None removes one).

    An existing Job gets no apply: an apply that leaves out fields its manager applied before removes them, which
    fails on the immutable pod template and would reset a Kueue Job's suspend to false. Suspend is left out under
    Kueue, which owns it once the Job exists. ``current`` (the Job's spec as observed): None when nothing differs.
    """
    fields = job.spec.lifecycle()
    if job.spec.queue_name is not None:
        del fields["suspend"]
    if current is not None and all(_same(field, current.get(field), wanted) for field, wanted in fields.items()):
        return None
    return fields


def _same(field: str, current: Any, wanted: Any) -> bool:
    # The apiserver stores an unset suspend as false.
    return bool(current) == bool(wanted) if field == "suspend" else current == wanted


def build_peer_network_policy(job: FinetuneJob, settings: OperatorSettings) -> Manifest | None:
    """NetworkPolicy `<name>-peers`: the pods of one multi-node job reach each other (rendezvous, NCCL's ephemeral ports)
    and no other job's pods reach them; only when the chart's NetworkPolicies are on."""
    if job.spec.resources.nodes <= 1 or not settings.trainer_peer_network_policy:
        return None
    own_pods = {"matchLabels": peer_selector(job.metadata.name)}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(job, peer_network_policy_name(job.metadata.name)),
        "spec": {"podSelector": own_pods, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": own_pods}]}]},
    }


def peer_network_policy_name(name: str) -> str:
    return f"{name}-peers"


def build_children(
    job: FinetuneJob, settings: OperatorSettings, preparation: PreparationReport | None = None, gpu_memory: GpuMemory | None = None
) -> list[Manifest]:
    """All children in creation order: the config, Service and peer policy exist before the pods need them.

    A job prepared in a separate Job gets the ConfigMap and that Job first; once its report is in, the ConfigMap
    with the prepared data and fitted settings, and the trainer Job."""
    config_map = build_config_map(job, settings, preparation, gpu_memory)
    if job.spec.prepares_in_job() and preparation is None:
        return [config_map, build_prepare_job(job, settings)]
    children = [config_map]
    for optional in (build_service(job, settings), build_peer_network_policy(job, settings)):
        if optional is not None:
            children.append(optional)
    children.append(build_job(job, settings, preparation))
    return children
