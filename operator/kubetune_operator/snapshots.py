"""Slim copies of watched objects (what the status function reads), the view over them, and body parsing helpers.

kopf indexes keep one snapshot per object for the operator's lifetime; keeping only the
fields the status function reads (no managedFields, no annotations) keeps memory flat.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune_operator import api, manifests
from kubetune_operator.usagespec import GPU_PRODUCT_LABEL

Obj = dict[str, Any]
Key = tuple[str, str]

INDEX_IDS = ("finetunejobs", "trainer_jobs", "trainer_pods", "gpu_nodes")


def slim_pod(body: kopf.Body) -> Obj:
    """The parts of a pod the status function reads; indexes keep these for every trainer pod."""
    meta, status = body.get("metadata", {}), body.get("status", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k == manifests.COMPLETION_INDEX_ANNOTATION},
        },
        "ownerUid": controller_uid(meta),
        "spec": {"nodeName": body.get("spec", {}).get("nodeName")},
        "status": {k: status.get(k) for k in ("phase", "reason", "message", "podIP", "conditions", "containerStatuses") if status.get(k) is not None},
    }


def slim_finetunejob(body: kopf.Body) -> Obj:
    """What refreshes need: spec, status and the identity Events refer to (no managedFields or annotations)."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp") if k in meta},
        "spec": body.get("spec", {}),
        "status": body.get("status", {}),
    }


def slim_job(body: kopf.Body | Obj) -> Obj:
    """The Job's status and the fields a FinetuneJob may change (kept to notice drift after a restart)."""
    meta = body.get("metadata", {})
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"), "creationTimestamp": meta.get("creationTimestamp"), "ownerUid": controller_uid(meta)},
        "spec": {field: (body.get("spec") or {}).get(field) for field in api.MUTABLE_FIELDS},
        "status": dict(body.get("status") or {}),
    }


def by_owner(namespace: str | None, labels: Mapping[str, str], slim: Obj) -> dict[Key, Obj] | None:
    """Index entry of a child: under its FinetuneJob's key, from the label every child carries."""
    owner = owner_name(labels)
    return {(namespace or "", owner): slim} if owner else None


GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
"""Memory of each GPU of a node in MiB, as NVIDIA's GPU feature discovery labels it."""


def gpu_resources(name: str, status: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> dict[Any, Any]:
    """Index entry of a node: each extended resource it offers (some amount of), to its name; and under
    ("memory", resource) the GPU memory its nvidia.com/gpu.memory label states, in MiB."""
    allocatable = status.get("allocatable") or {}
    offered = [resource for resource, amount in allocatable.items() if "/" in resource and str(amount) not in ("0", "")]
    entry: dict[Any, Any] = dict.fromkeys(offered, name)
    memory = (labels or {}).get(GPU_MEMORY_LABEL, "")
    if memory.isdigit():
        entry.update({("memory", resource): int(memory) for resource in offered})
    product = (labels or {}).get(GPU_PRODUCT_LABEL, "")
    if offered and product:
        entry[("product", name)] = product
    return entry


class Watched:
    """What the watches hold, by FinetuneJob key: kopf's live indexes in the operator, the same shape built from
    lists in tests. Reading costs no API call."""

    def __init__(self, indexes: Mapping[str, Any]) -> None:
        self._indexes = {name: indexes[name] for name in INDEX_IDS}

    def _values(self, index: str, key: Any) -> Iterable[Obj]:
        return self._indexes[index].get(key) or ()

    def finetunejob(self, key: Key) -> Obj | None:
        found: Obj | None = first(self._values("finetunejobs", key))
        return found

    def jobs(self, key: Key) -> list[Obj]:
        return [dict(job) for job in self._values("trainer_jobs", key)]

    def own_job(self, key: Key, uid: str, name: str | None = None) -> Obj | None:
        """The trainer Job (or the Job named ``name``) of this incarnation: a Job of a deleted namesake, still being
        collected, is not it."""
        wanted = name or manifests.job_name(key[1])
        return next((job for job in self.jobs(key) if job["metadata"].get("ownerUid") == uid and job["metadata"].get("name") == wanted), None)

    def own_prepare_job(self, key: Key, uid: str) -> Obj | None:
        return self.own_job(key, uid, manifests.prepare_job_name(key[1]))

    def gpu_memory_mib(self, resource: str) -> int | None:
        """The smallest GPU memory the nvidia.com/gpu.memory labels of nodes offering ``resource`` state, in MiB."""
        values: list[Any] = list(self._values("gpu_nodes", ("memory", resource)))
        return min(int(v) for v in values) if values else None

    def gpu_products(self, pods: Iterable[Obj]) -> dict[str, str]:
        """The GPU product label of the nodes ``pods`` ran on, by node name (nodes without one left out)."""
        nodes = {str(n) for n in ((p.get("spec") or {}).get("nodeName") for p in pods) if n}
        return {node: str(found) for node in sorted(nodes) if (found := first(self._values("gpu_nodes", ("product", node))))}

    def pods(self, key: Key, job: Obj | None) -> list[Obj]:
        """The pods of ``job`` (none without one): a namesake's pods carry the same FinetuneJob label."""
        uid = (job or {}).get("metadata", {}).get("uid")
        return [dict(pod) for pod in self._values("trainer_pods", key) if uid and pod.get("ownerUid") == uid]

    def gpu_resource_found(self, resource: str) -> bool:
        return resource in self._indexes["gpu_nodes"]


def controller_owner(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference marked controller, if any."""
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            return dict(owner)
    return None


def controller_uid(meta: Mapping[str, Any]) -> str | None:
    owner = controller_owner(meta)
    return str(owner.get("uid")) if owner is not None else None


def owner_name(labels: kopf.Labels) -> str | None:
    return labels.get(manifests.LABEL_FINETUNEJOB)


def first(store: Any) -> Any:
    for value in store or ():
        return value
    return None


def finished(ftj: api.FinetuneJob) -> bool:
    return ftj.status is not None and ftj.status.phase in (api.Phase.SUCCEEDED, api.Phase.FAILED)


def parse(body: Obj | kopf.Body, written: Obj | None = None) -> api.FinetuneJob:
    """The FinetuneJob model of a body; the status we last wrote wins over the watched copy, which may lag."""
    status = written if written is not None else (body.get("status") or {})
    return api.FinetuneJob.from_body({**body, "status": status or None})


def previous_status(body: Obj | kopf.Body) -> api.FinetuneJobStatus | None:
    raw = body.get("status") or {}
    try:
        return api.FinetuneJobStatus.model_validate(raw) if raw else None
    except ValidationError:
        return None


def suspend_before(diff: Iterable[tuple[Any, ...]], current: bool) -> bool:
    """spec.suspend before a spec change, from kopf's diff of the spec (paths relative to it, or from the root)."""
    for _, path, old, _new in diff:
        if tuple(path) in (("suspend",), ("spec", "suspend")):
            return bool(old)
    return current


def short_errors(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)
