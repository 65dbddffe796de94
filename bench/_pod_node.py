"""The node's part of bench/gpu_pod.py: a Job's pod made and run as the local cluster's node agent runs pods.

No control plane: the Job controller's part (a pod per completion index, its annotation and environment variable)
and the kubelet's part (volumes as per-pod folders, the container command with its environment, the termination
message, exit code -> pod phase) are done here, the latter with the node agent's own modules.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune_operator import manifests
from localcluster import agent_process
from localcluster.agent_env import container_env, expand
from localcluster.agent_network import image_env
from localcluster.agent_volumes import Mount, PodVolumes

Obj = dict[str, Any]
POD_IP = "127.0.0.1"
NODE_NAME = "local-gpu-node"
# Host variables a GPU container gets from the NVIDIA container runtime, or that the host needs to find CUDA.
GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "LD_LIBRARY_PATH", "CUDA_HOME")
# The host's thread settings stand in for the pod's CPU limit, which no cgroup enforces here.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM")


def timestamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


class LocalObjects:
    """The ConfigMaps and Secrets the pods may reference: what the apiserver would return (Secret data base64)."""

    def __init__(self) -> None:
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}

    def add(self, manifest: Obj, namespace: str) -> None:
        key = (manifest["metadata"].get("namespace") or namespace, manifest["metadata"]["name"])
        if manifest["kind"] == "ConfigMap":
            self.config_maps[key] = dict(manifest.get("data") or {})
        elif manifest["kind"] == "Secret":
            data = dict(manifest.get("data") or {})
            data.update({k: base64.b64encode(str(v).encode()).decode() for k, v in (manifest.get("stringData") or {}).items()})
            self.secrets[key] = data

    def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.secrets.get((namespace, name))

    def get_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        return self.config_maps.get((namespace, name))

    def request_token(self, namespace: str, service_account: str, audiences: list[str], expiration_seconds: int, pod: Obj) -> str:
        raise RuntimeError("trainer pods get no service-account token")


def pod_of(job: Obj, index: int) -> Obj:
    """The pod the Job controller would create for completion ``index`` of an Indexed Job, bound to this node."""
    template = job["spec"]["template"]
    meta = template.get("metadata") or {}
    spec = dict(template["spec"])
    # The Job controller adds the index as an annotation and as JOB_COMPLETION_INDEX, read through the downward API.
    index_env = {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{manifests.COMPLETION_INDEX_ANNOTATION}']"}}}
    spec["containers"] = [{**c, "env": [*(c.get("env") or []), index_env]} for c in spec["containers"]]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job['metadata']['name']}-{index}-{uuid.uuid4().hex[:5]}",
            "namespace": job["metadata"]["namespace"],
            "uid": str(uuid.uuid4()),
            "labels": dict(meta.get("labels") or {}),
            "annotations": {**(meta.get("annotations") or {}), manifests.COMPLETION_INDEX_ANNOTATION: str(index)},
            "creationTimestamp": timestamp(),
        },
        "spec": {**spec, "nodeName": NODE_NAME},
        "status": {"phase": "Pending", "podIP": POD_IP, "hostIP": POD_IP},
    }


def with_status(pod: Obj, phase: str, state: Obj) -> Obj:
    container = pod["spec"]["containers"][0]
    status = {**pod["status"], "phase": phase, "containerStatuses": [{"name": container["name"], "image": container["image"], "state": state}]}
    return {**pod, "status": status}


def job_with_status(job: Obj, pod: Obj) -> Obj:
    """The Job's status as the Job controller would set it for its one pod."""
    phase = pod["status"]["phase"]
    status: Obj = {"startTime": pod["metadata"]["creationTimestamp"]}
    if phase == "Succeeded":
        conditions = [{"type": kind, "status": "True", "lastTransitionTime": timestamp()} for kind in ("SuccessCriteriaMet", "Complete")]
        status.update(succeeded=1, completionTime=timestamp(), conditions=conditions)
    elif phase == "Failed":
        status.update(failed=1, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "lastTransitionTime": timestamp()}])
    else:
        status["active"] = 1
    return {**job, "status": status}


@dataclass
class PodRun:
    """A finished pod: its final object and its log."""

    pod: Obj
    exit_code: int
    log: str


def run_pod(pod: Obj, objects: LocalObjects, pod_dir: Path, allocatable: Mapping[str, str], watch: Callable[[Obj], None], interval: float = 0.25) -> PodRun:
    """Run the pod's one container to its end as the node agent does; ``watch`` sees the running pod every ``interval``."""
    volumes = PodVolumes(pod_dir, pod_dir / "claims", objects, allocatable)
    volumes.prepare(pod)
    try:
        container = pod["spec"]["containers"][0]
        env = container_env(pod, container, objects, {}, allocatable)
        mounts = volumes.mounts_for(pod, container, env)
        home = agent_process.uncovered_path(mounts, agent_process.HOME_CANDIDATES)
        mounts.append(Mount(pod_dir / "home", home, read_only=False))
        (pod_dir / "home").mkdir(parents=True, exist_ok=True)
        host = {name: os.environ[name] for name in (*GPU_ENV, *THREAD_ENV) if name in os.environ}
        full_env = {**image_env(), **host, "HOME": home, "HOSTNAME": pod["metadata"]["name"], **env}
        run_dir = pod_dir / "containers" / container["name"]
        log_file = pod_dir / "logs" / f"{container['name']}.log"
        process = agent_process.start(
            agent_process.LaunchSpec(
                argv=[expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])],
                env=full_env,
                working_dir=container.get("workingDir") or "/",
                hostname=pod["metadata"]["name"],
                mounts=mounts,
                run_dir=run_dir,
                log_file=log_file,
                termination_file=run_dir / "termination-log",
                termination_path=container.get("terminationMessagePath") or "/dev/termination-log",
            )
        )
        running = with_status(pod, "Running", {"running": {"startedAt": timestamp(process.started_at)}})
        while process.poll() is None:
            watch(running)
            time.sleep(interval)
        code = process.exit_code
        assert code is not None
        fallback = container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and code != 0
        message = agent_process.termination_message(run_dir / "termination-log", log_file, fallback)
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": timestamp()}
        if message:
            terminated["message"] = message
        final = with_status(pod, "Succeeded" if code == 0 else "Failed", {"terminated": terminated})
        return PodRun(final, code, log_file.read_text(errors="replace") if log_file.exists() else "")
    finally:
        volumes.cleanup()
