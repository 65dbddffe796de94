"""The trainer pod's spec, built from a FinetuneJob (no I/O): container, environment, volumes, resources, placement."""

from __future__ import annotations

from typing import Any

from kubetune_api import disk
from kubetune_api.runtime import CONFIG_DIR, CONFIG_PATH, MODELS_DIR, RENDEZVOUS_PORT, TERMINATION_MESSAGE_PATH, WORK_DIR, env_name
from kubetune_operator.api import FinetuneJob
from kubetune_operator.resourcesspec import HOSTNAME_LABEL
from kubetune_operator.settings import OperatorSettings

Manifest = dict[str, Any]

CONTAINER_NAME = "trainer"
RUN_AS_USER = 1000


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


def _volumes(job: FinetuneJob, config_map: str, model_parameters: int | None = None) -> tuple[list[Manifest], list[Manifest]]:
    scratch = job.spec.resources.scratch_size or disk.scratch_size(model_parameters)
    volumes: list[Manifest] = [
        {"name": "config", "configMap": {"name": config_map}},
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


def _container(job: FinetuneJob, settings: OperatorSettings, config_map: str, prepare: bool, model_parameters: int | None) -> Manifest:
    _, mounts = _volumes(job, config_map, model_parameters)
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


def pod_spec(
    job: FinetuneJob,
    settings: OperatorSettings,
    config_map: str,
    subdomain: str,
    prepare: bool = False,
    model_parameters: int | None = None,
    peer_labels: dict[str, str] | None = None,
) -> Manifest:
    """The pod template's spec of a trainer (or, with ``prepare``, a preparation) pod: restricted security context,
    the config, shared-memory, scratch and tmp volumes, and the GPU pool's placement; ``subdomain`` is the headless
    Service a multi-node job's pods resolve each other through, ``peer_labels`` what selects them all (one per node)."""
    spec = job.spec.resources
    volumes, _ = _volumes(job, config_map, model_parameters)
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
        "containers": [_container(job, settings, config_map, prepare, model_parameters)],
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
    if spec.nodes > 1 and not prepare:
        pod.setdefault("affinity", {})["podAntiAffinity"] = one_pod_per_node(peer_labels or {})
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if prepare:
        # A CPU pod: the GPU pool's node selection does not apply to it.
        pod.pop("nodeSelector", None)
        pod.pop("affinity", None)
    elif spec.nodes > 1:
        pod["subdomain"] = subdomain
    return pod


def one_pod_per_node(peer_labels: dict[str, str]) -> Manifest:
    """Required anti-affinity among a multi-node job's pods: two ranks on one node would share its GPUs (or CPUs) and its
    network, so a pod that finds no free node stays Pending (and the run reports the rank that did not join)."""
    term = {"labelSelector": {"matchLabels": dict(peer_labels)}, "topologyKey": HOSTNAME_LABEL}
    return {"requiredDuringSchedulingIgnoredDuringExecution": [term]}


def _prune(value: Any) -> Any:
    """Drop empty lists and objects, which the API would store as noise."""
    if isinstance(value, dict):
        pruned = {k: _prune(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in ({}, [])}
    if isinstance(value, list):
        return [_prune(v) for v in value]
    return value
