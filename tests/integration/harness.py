"""The reconciler against a real kube-apiserver, without kopf: what a test needs to drive it as the operator does.

The operator's kopf indexes are replaced by a live view that lists from the apiserver on every read, through the
same slim copies the indexes keep, so the reconciler sees what kopf's watches would show. Every call goes out as
the chart's ServiceAccount (impersonated), so the chart's RBAC is what permits or refuses it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_operator import api, manifests, podspec
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import Health, OperatorMetrics
from kubetune_operator.reconciler import Reconciler
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.snapshots import Watched, gpu_resources, slim_finetunejob, slim_job, slim_pod

Obj = dict[str, Any]

NAMESPACE = "kubetune-it"
SELECTOR = f"{manifests.LABEL_MANAGED_BY}={manifests.MANAGED_BY}"
NOW = "2026-11-27T10:00:00Z"

SPEC: Obj = {
    "model": {"source": "meta-llama/Llama-3.1-8B"},
    "dataset": {"source": "s3://data/alpaca.jsonl", "format": "instruction"},
    "training": {"maxSteps": 100},
    "output": {"bucket": "adapters"},
    "resources": {"gpus": 0},
}


def decoded(response: Any) -> Any:
    return json.loads(response.data)


@dataclass
class ControlPlane:
    """etcd + kube-apiserver with the CRD and the chart's RBAC installed, and clients for an admin and the operator."""

    kubectl: Path
    kubeconfig: Path
    admin: client.ApiClient
    operator: client.ApiClient

    def kubectl_run(self, *args: str, stdin: str | None = None) -> str:
        command = [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, f"{' '.join(args)}: {result.stderr}"
        return result.stdout


class LiveIndex(Mapping[Any, list[Obj]]):
    """One kopf index, answered by listing from the apiserver at each read (an empty answer is a missing key)."""

    def __init__(self, fetch: Callable[[Any], list[Obj]]) -> None:
        self._fetch = fetch

    def __getitem__(self, key: Any) -> list[Obj]:
        found = self._fetch(key)
        if not found:
            raise KeyError(key)
        return found

    def __iter__(self) -> Iterator[Any]:
        raise NotImplementedError("the reconciler looks entries up by key")

    def __len__(self) -> int:
        raise NotImplementedError("the reconciler looks entries up by key")


class Harness:
    """One operator process, as far as the reconciler goes: its runtime, its API client and its view of the watches."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.core = client.CoreV1Api(plane.admin)
        self.batch = client.BatchV1Api(plane.admin)
        self.custom = client.CustomObjectsApi(plane.admin)
        self._operator_core = client.CoreV1Api(plane.operator)
        self._operator_batch = client.BatchV1Api(plane.operator)
        self._operator_custom = client.CustomObjectsApi(plane.operator)
        self.start()

    # ------------------------------------------------------------------ the operator process

    def start(self, **settings: Any) -> None:
        """A fresh operator process: nothing remembered, as after a restart."""
        self.metrics = OperatorMetrics()
        operator_settings = OperatorSettings(status_workers=1, trainer_image="localhost/kubetune-trainer:test", **settings)
        self.runtime = Runtime(settings=operator_settings, metrics=self.metrics, health=Health())
        self.reconciler = Reconciler(self.runtime, Kube(self.plane.operator, self.metrics, instance="integration-test"))

    def restart(self, **settings: Any) -> None:
        self.runtime.close()
        self.start(**settings)

    def close(self) -> None:
        self.runtime.close()

    def settle(self) -> None:
        """Wait until the status lane (one thread, first in first out) has run every refresh queued so far."""
        done = threading.Event()
        self.runtime.defer(("", "settle"), done.set)
        assert done.wait(10), "the status lane did not drain"

    def writes(self, verb: str, resource: str) -> float:
        """API writes of this operator process, as its own metric counts them."""
        return self.metrics.registry.get_sample_value("kubetune_operator_api_writes_total", {"verb": verb, "resource": resource}) or 0.0

    # ------------------------------------------------------------------ what kopf's handlers would call

    def watched(self) -> Watched:
        return Watched(
            {
                "finetunejobs": LiveIndex(self._finetunejob),
                "trainer_jobs": LiveIndex(lambda key: self._children(self._operator_batch.list_namespaced_job, key, slim_job)),
                "trainer_pods": LiveIndex(lambda key: self._children(self._operator_core.list_namespaced_pod, key, slim_pod)),
                "gpu_nodes": LiveIndex(self._gpu_nodes),
            }
        )

    def ensure(self, name: str) -> None:
        self.reconciler.ensure(self.finetunejob(name), self.watched())

    def spec_changed(self, name: str, suspended_before: bool) -> None:
        self.reconciler.spec_changed(self.finetunejob(name), suspended_before, self.watched())
        self.settle()

    def job_changed(self, name: str, deleted: bool = False) -> None:
        asyncio.run(self.reconciler.job_changed((NAMESPACE, name), deleted, self.watched()))
        self.settle()

    def pod_changed(self, name: str) -> None:
        self.reconciler.pod_changed((NAMESPACE, name), self.watched())
        self.settle()

    def _finetunejob(self, key: tuple[str, str]) -> list[Obj]:
        # A list, as kopf's index does: the operator's RBAC grants list and watch on FinetuneJobs, not get.
        found = decoded(
            self._operator_custom.list_namespaced_custom_object(
                api.GROUP, api.VERSION, key[0], api.PLURAL, field_selector=f"metadata.name={key[1]}", _preload_content=False
            )
        )["items"]
        return [slim_finetunejob(body) for body in found]

    def _children(self, lister: Callable[..., Any], key: tuple[str, str], slim: Callable[[Any], Obj]) -> list[Obj]:
        selector = f"{SELECTOR},{manifests.LABEL_FINETUNEJOB}={key[1]}"
        return [slim(item) for item in decoded(lister(key[0], label_selector=selector, _preload_content=False))["items"]]

    def _gpu_nodes(self, resource: str) -> list[Obj]:
        nodes = decoded(self._operator_core.list_node(_preload_content=False))["items"]
        return [{"name": node["metadata"]["name"]} for node in nodes if resource in gpu_resources(node["metadata"]["name"], node.get("status", {}))]

    # ------------------------------------------------------------------ objects, as an admin sees them

    def create_finetunejob(self, name: str, **spec: Any) -> Obj:
        body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name, "namespace": NAMESPACE}, "spec": {**SPEC, **spec}}
        created: Obj = decoded(self.custom.create_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, body, _preload_content=False))
        return created

    def created(self, name: str, **spec: Any) -> Obj:
        """A new FinetuneJob that the operator has handled once: its children exist."""
        body = self.create_finetunejob(name, **spec)
        self.ensure(name)
        return body

    def running(self, name: str, **spec: Any) -> Obj:
        """A new FinetuneJob whose trainer pod runs."""
        body = self.created(name, **spec)
        self.run_pod(name)
        self.pod_changed(name)
        assert self.status(name)["phase"] == "Running"
        return body

    def finetunejob(self, name: str) -> Obj:
        found: Obj = decoded(self.custom.get_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name, _preload_content=False))
        return found

    def patch_spec(self, name: str, **spec: Any) -> None:
        patch = {"spec": spec}
        self.custom.patch_namespaced_custom_object(api.GROUP, api.VERSION, NAMESPACE, api.PLURAL, name, patch, _content_type="application/merge-patch+json")

    def status(self, name: str) -> Obj:
        status: Obj = self.finetunejob(name).get("status") or {}
        return status

    def read(self, kind: str, name: str) -> Obj | None:
        readers = {
            "ConfigMap": self.core.read_namespaced_config_map,
            "Service": self.core.read_namespaced_service,
            "Job": self.batch.read_namespaced_job,
        }
        try:
            found: Obj = decoded(readers[kind](name, NAMESPACE, _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def job(self, name: str) -> Obj | None:
        return self.read("Job", manifests.job_name(name))

    def jobs(self, name: str) -> list[Obj]:
        items: list[Obj] = decoded(self.batch.list_namespaced_job(NAMESPACE, label_selector=f"{manifests.LABEL_FINETUNEJOB}={name}", _preload_content=False))[
            "items"
        ]
        return items

    def event_reasons(self, name: str) -> list[str]:
        selector = f"involvedObject.kind={api.KIND},involvedObject.name={name}"
        events = decoded(self.core.list_namespaced_event(NAMESPACE, field_selector=selector, _preload_content=False))["items"]
        # Timestamps have whole seconds; the resourceVersion orders Events of one second (one etcd here).
        return [str(event["reason"]) for event in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]

    def delete_job(self, name: str) -> None:
        """Delete a trainer Job, as a user or a TTL would; no garbage collector runs here, so its pods go too."""
        self.batch.delete_namespaced_job(manifests.job_name(name), NAMESPACE, propagation_policy="Background")
        pods = decoded(self.core.list_namespaced_pod(NAMESPACE, label_selector=f"{manifests.LABEL_FINETUNEJOB}={name}", _preload_content=False))
        for pod in pods["items"]:
            self.core.delete_namespaced_pod(pod["metadata"]["name"], NAMESPACE, grace_period_seconds=0)

    def complete_job(self, name: str) -> None:
        """What the Job controller writes when the trainer succeeded."""
        conditions = [{"type": kind, "status": "True", "lastTransitionTime": NOW, "lastProbeTime": NOW} for kind in ("SuccessCriteriaMet", "Complete")]
        status = {"startTime": NOW, "completionTime": NOW, "succeeded": 1, "conditions": conditions}
        self.batch.patch_namespaced_job_status(manifests.job_name(name), NAMESPACE, {"status": status}, _content_type="application/merge-patch+json")

    def run_pod(self, name: str) -> Obj:
        """A Running trainer pod of the FinetuneJob's Job, as the Job controller and a kubelet would report it."""
        job = self.job(name)
        assert job is not None
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{manifests.job_name(name)}-0",
                "labels": manifests.child_labels(name),
                "ownerReferences": [
                    {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
                ],
            },
            "spec": {"containers": [{"name": podspec.CONTAINER_NAME, "image": "localhost/kubetune-trainer:test"}], "automountServiceAccountToken": False},
        }
        created: Obj = decoded(self.core.create_namespaced_pod(NAMESPACE, client.V1Pod.model_validate(pod), _preload_content=False))
        running = {"name": podspec.CONTAINER_NAME, "image": "x", "imageID": "", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": NOW}}}
        status = {"phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}], "containerStatuses": [running]}
        self.core.patch_namespaced_pod_status(created["metadata"]["name"], NAMESPACE, {"status": status}, _content_type="application/merge-patch+json")
        return created

    def admit_in_kueue(self, name: str) -> None:
        """What Kueue does when it admits a queued Job: unsuspend it, under its own field manager."""
        self.batch.patch_namespaced_job(
            manifests.job_name(name), NAMESPACE, {"spec": {"suspend": False}}, field_manager="kueue", _content_type="application/merge-patch+json"
        )


def wait_for(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def managers_of(obj: Obj, field: str) -> set[str]:
    """The field managers that own ``spec.<field>`` of an object."""
    owners = set()
    for entry in obj["metadata"].get("managedFields") or []:
        if f"f:{field}" in (entry.get("fieldsV1") or {}).get("f:spec", {}):
            owners.add(f"{entry['manager']}/{entry['operation']}")
    return owners


def only(items: Iterable[Obj]) -> Obj:
    found = list(items)
    assert len(found) == 1, found
    return found[0]
