"""Pure builders: a FinetuneJob in, the manifests of its children out (no I/O).

Names and labels are deterministic, so applying a child again makes no duplicate and the
operator finds its children again after a restart.
"""

from __future__ import annotations

from typing import Any

import yaml

from kubetune_api import disk
from kubetune_api.exitcodes import NON_RETRIABLE
from kubetune_api.fit import GpuMemorySource, training_overrides
from kubetune_api.recipe import TrainingRecipe
from kubetune_api.result import PreparationReport
from kubetune_api.runtime import (
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    MODELS_DIR,
    RENDEZVOUS_PORT,
    TERMINATION_MESSAGE_PATH,
    WORK_DIR,
    PreparationRuntime,
    RuntimeConfig,
    TrainerConfig,
    env_name,
)
from kubetune_operator.api import API_VERSION, KIND, FinetuneJob
from kubetune_operator.settings import OperatorSettings

YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter when PyYAML has it: the Python one costs a burst of creations a tenth of the operator's CPU."""

Manifest = dict[str, Any]

CONTAINER_NAME = "trainer"
RUN_AS_USER = 1000

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
    memory, source = gpu_memory if gpu_memory is not None and spec.resources.gpus > 0 else (None, GpuMemorySource.DEFAULT)
    runtime = RuntimeConfig(
        namespace=job.metadata.namespace,
        job_name=name,
        # A FinetuneJob created again under the same name is a new run, with a folder of its own in S3.
        run_uid=job.metadata.uid,
        gpus_per_node=spec.resources.gpus,
        nodes=spec.resources.nodes,
        # The pod of completion index 0, by its stable name under the headless Service.
        rendezvous_host=f"{job_name(name)}-0.{service_name(name)}" if spec.resources.nodes > 1 else "127.0.0.1",
        rendezvous_port=RENDEZVOUS_PORT,
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
            "selector": {LABEL_FINETUNEJOB: name, LABEL_MANAGED_BY: MANAGED_BY},
            # Ranks must resolve each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"},
                {"name": "metrics", "port": settings.trainer_metrics_port, "targetPort": settings.trainer_metrics_port, "protocol": "TCP"},
            ],
        },
    }


def _field_env(name: str, path: str) -> Manifest:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _secret_env(name: str, secret: str, key: str) -> Manifest:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _env(job: FinetuneJob) -> list[Manifest]:
    """What the trainer reads through ``TrainerEnvironment``, plus what its libraries read. The topology is in the
    ConfigMap, and the node rank is JOB_COMPLETION_INDEX, which the Job controller sets in Indexed Jobs."""
    spec = job.spec
    env: list[Manifest] = [
        _field_env(env_name("pod_ip"), "status.podIP"),
        _field_env(env_name("pod_name"), "metadata.name"),
        # Each attempt's token: it fences the attempt's S3 writes against an older pod that is still running.
        _field_env(env_name("pod_uid"), "metadata.uid"),
        {"name": "HOME", "value": WORK_DIR},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.model.cache_volume_claim:
        env.append({"name": env_name("hf_hub_cache"), "value": f"{MODELS_DIR}/hub"})
    credentials = spec.output.credentials_secret
    if credentials is not None:
        env.append(_secret_env(env_name("aws_access_key_id"), credentials.name, credentials.access_key_id_key))
        env.append(_secret_env(env_name("aws_secret_access_key"), credentials.name, credentials.secret_access_key_key))
    token = spec.model.token_secret_ref
    if token is not None:
        env.append(_secret_env(env_name("hf_token"), token.name, token.key))
    return env


def _resources(job: FinetuneJob, settings: OperatorSettings, prepare: bool = False) -> Manifest:
    spec = job.spec.resources
    limits: dict[str, str] = {}
    if prepare:
        cpu = job.spec.preparation.cpu or settings.prepare_default_cpu
        memory = job.spec.preparation.memory or settings.prepare_default_memory
    else:
        if spec.gpus > 0:
            limits[spec.gpu_resource_name] = str(spec.gpus)
        cpu = spec.cpu or settings.trainer_default_cpu
        memory = spec.memory or settings.trainer_default_memory
    if cpu:
        limits["cpu"] = cpu
    if memory:
        limits["memory"] = memory
    if spec.ephemeral_storage:
        limits["ephemeral-storage"] = spec.ephemeral_storage
    return {"limits": dict(limits), "requests": dict(limits)} if limits else {}


def _tolerations(job: FinetuneJob, prepare: bool = False) -> list[Manifest]:
    spec = job.spec.resources
    tolerations: list[Manifest] = []
    if spec.gpus > 0 and not prepare:
        # GPU pools are tainted with the resource name so that only GPU workloads land there.
        tolerations.append({"key": spec.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"})
    tolerations.extend(t.to_api() for t in spec.tolerations)
    return tolerations


def _volumes(job: FinetuneJob, model_parameters: int | None = None) -> tuple[list[Manifest], list[Manifest]]:
    name = job.metadata.name
    scratch = job.spec.resources.scratch_size or disk.scratch_size(model_parameters)
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": config_map_name(name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.spec.resources.shm_size}},
        {"name": "scratch", "emptyDir": {"sizeLimit": scratch}},
        {"name": "tmp", "emptyDir": {"sizeLimit": job.spec.resources.tmp_size}},
    ]
    mounts: list[Manifest] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": WORK_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    claim = job.spec.model.cache_volume_claim
    if claim:
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR})
    return volumes, mounts


def _container(job: FinetuneJob, settings: OperatorSettings, prepare: bool = False, model_parameters: int | None = None) -> Manifest:
    _, mounts = _volumes(job, model_parameters)
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": job.spec.resources.image or settings.trainer_image,
        "imagePullPolicy": settings.trainer_pull_policy,
        "command": settings.trainer_command,
        "args": (["prepare"] if prepare else []) + ["--config", CONFIG_PATH],
        "env": _env(job),
        "ports": [{"name": "metrics", "containerPort": settings.trainer_metrics_port, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if job.spec.resources.nodes > 1 and not prepare:
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"})
    resources = _resources(job, settings, prepare)
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(job: FinetuneJob, settings: OperatorSettings, prepare: bool = False, model_parameters: int | None = None) -> Manifest:
    spec = job.spec.resources
    volumes, _ = _volumes(job, model_parameters)
    pod: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, settings, prepare, model_parameters)],
        "volumes": volumes,
    }
    if settings.trainer_image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in settings.trainer_image_pull_secrets]
    tolerations = _tolerations(job, prepare)
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity is not None:
        pod["affinity"] = _prune(spec.affinity.to_api())
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if prepare:
        # A CPU pod: the GPU pool's node selection does not apply to it.
        pod.pop("nodeSelector", None)
        pod.pop("affinity", None)
    elif spec.nodes > 1:
        pod["subdomain"] = service_name(job.metadata.name)
    return pod


def _prune(value: Any) -> Any:
    """Drop empty lists and objects, which the API would store as noise."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value


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
            "spec": _pod_spec(job, settings, model_parameters=preparation.model_parameters if preparation else None),
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
        "template": {"metadata": {"labels": {**child_labels(name), **labels}}, "spec": _pod_spec(job, settings, prepare=True)},
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
    own_pods = {"matchLabels": {LABEL_FINETUNEJOB: job.metadata.name, LABEL_MANAGED_BY: MANAGED_BY}}
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
