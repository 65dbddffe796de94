"""kopf registrations: each handler parses its event and calls the reconciler.

Indexers and the child event handlers (which only queue a status refresh) are coroutines, so the many
pod and Job events cost no thread hop; handlers that call the API are plain functions, run in kopf's
thread pool. Children are found through kopf's in-memory indexes, fed by watches, so a status refresh
costs no API reads.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from kubetune_operator import api, manifests
from kubetune_operator.reconciler import Reconciler
from kubetune_operator.snapshots import Key, Obj, Watched, by_owner, gpu_resources, owner_name, slim_finetunejob, slim_job, slim_pod, suspend_before

CHILDREN = {manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}


def register(registry: kopf.OperatorRegistry, reconciler: Reconciler) -> None:
    """Register every handler and index on ``registry``, each calling ``reconciler``."""
    resource = (api.GROUP, api.VERSION, api.PLURAL)
    runtime = reconciler.runtime

    @kopf.index(*resource, id="finetunejobs", registry=registry)
    async def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, Obj]:
        return {(namespace or "", name): slim_finetunejob(body)}

    @kopf.index("batch", "v1", "jobs", labels=CHILDREN, id="trainer_jobs", registry=registry)
    async def trainer_jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Obj] | None:
        return by_owner(namespace, labels, slim_job(body))

    @kopf.index("v1", "pods", labels=CHILDREN, id="trainer_pods", registry=registry)
    async def trainer_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Obj] | None:
        return by_owner(namespace, labels, slim_pod(body))

    @kopf.index("v1", "nodes", id="gpu_nodes", registry=registry)
    async def gpu_nodes(name: str, status: kopf.Status, labels: kopf.Labels, **_: Any) -> dict[Any, Any]:
        return gpu_resources(name, status, labels)

    @kopf.on.resume(*resource, id="ensure", registry=registry)
    @kopf.on.create(*resource, id="ensure", registry=registry)
    def ensure(body: kopf.Body, **kwargs: Any) -> None:
        reconciler.ensure(dict(body), Watched(kwargs))

    @kopf.on.update(*resource, field="spec", id="spec_changed", registry=registry)
    def spec_changed(body: kopf.Body, diff: kopf.Diff, **kwargs: Any) -> None:
        reconciler.spec_changed(dict(body), suspend_before(diff, bool(body["spec"].get("suspend"))), Watched(kwargs))

    @kopf.on.event("batch", "v1", "jobs", labels=CHILDREN, id="job_event", registry=registry)
    async def job_event(type: str, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
        owner = owner_name(labels)
        if owner:
            await reconciler.job_changed((namespace or "", owner), type == "DELETED", Watched(kwargs))

    @kopf.on.event("v1", "pods", labels=CHILDREN, id="pod_event", registry=registry)
    async def pod_event(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
        owner = owner_name(labels)
        if owner:
            reconciler.pod_changed((namespace or "", owner), Watched(kwargs))

    @kopf.on.event(*resource, id="finetunejob_event", registry=registry)
    async def finetunejob_event(type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        reconciler.finetunejob_seen((namespace or "", name), dict(body), deleted=type == "DELETED")

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """The kubernetes client's credentials: in a pod the service account token and KUBERNETES_SERVICE_HOST/PORT
        (kopf's own service-account login assumes the kubernetes.default.svc DNS name), elsewhere the kubeconfig.
        A custom registry has no default login."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="start_heartbeat", registry=registry)
    async def start_heartbeat(**_: Any) -> None:
        runtime.tasks = [asyncio.create_task(runtime.health.keep_beating()), asyncio.create_task(reconciler.poll_progress())]

    @kopf.on.cleanup(id="stop_heartbeat", registry=registry)
    async def stop_heartbeat(**_: Any) -> None:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.to_thread(runtime.close)
