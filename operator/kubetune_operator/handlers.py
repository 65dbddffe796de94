"""Thin kopf handlers: parse, build, create (409 means adopt), observe, patch status.

All decisions live in the pure modules: ``manifests`` builds the children, ``status`` derives
the status, ``events`` picks the Events. Handlers run in kopf's thread pool and use the
blocking Kubernetes client; children are found through kopf in-memory indexes fed by watches,
so a status refresh costs no API reads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, cast

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from kubetune_operator import api, manifests
from kubetune_operator.events import transition_events
from kubetune_operator.metrics import Health
from kubetune_operator.progress import ScrapeError, TrainerSample, scrape
from kubetune_operator.runtime import Key, Obj, Runtime, now
from kubetune_operator.snapshots import (
    finished,
    first,
    owner_name,
    parse,
    previous_status,
    raw_json,
    short_errors,
    slim_finetunejob,
    slim_job,
    slim_pod,
)
from kubetune_operator.status import Observed, compute_status, invalid_spec_status, status_patch

MERGE_PATCH = "application/merge-patch+json"
HEARTBEAT_SECONDS = 5.0
PROGRESS_READERS = 8
"""Trainers whose metrics are read at once (each read blocks a thread for up to the scrape timeout)."""
INDEX_IDS = ("finetunejobs", "trainer_jobs", "trainer_pods", "gpu_nodes")
CHILD_SELECTOR = f"{manifests.LABEL_MANAGED_BY}={manifests.MANAGED_BY}"


def _gpu_found(gpu_nodes: kopf.Index[str, str], resource: str) -> bool:
    return resource in gpu_nodes


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """Register every handler and index on `registry`, closed over `runtime`.

    Indexers, bookkeeping and the child event handlers (which only queue a status refresh) are
    coroutines, so the many pod and Job events cost no thread hop; handlers that call the API are
    plain functions run in kopf's thread pool (or handed to a thread from a coroutine).
    """
    settings = runtime.settings
    clients = runtime.clients
    resource = (api.GROUP, api.VERSION, api.PLURAL)

    @kopf.index(*resource, id="finetunejobs", registry=registry)
    async def finetunejobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[Key, Obj]:
        return {(namespace or "", name): slim_finetunejob(body)}

    @kopf.index("batch", "v1", "jobs", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}, id="trainer_jobs", registry=registry)
    async def trainer_jobs(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Obj] | None:
        owner = owner_name(labels)
        return {(namespace or "", owner): slim_job(body)} if owner else None

    @kopf.index("v1", "pods", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}, id="trainer_pods", registry=registry)
    async def trainer_pods(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Obj] | None:
        owner = owner_name(labels)
        return {(namespace or "", owner): slim_pod(body)} if owner else None

    @kopf.index("v1", "nodes", id="gpu_nodes", registry=registry)
    async def gpu_nodes(name: str, status: kopf.Status, **_: Any) -> dict[str, str]:
        allocatable = status.get("allocatable") or {}
        return {resource: name for resource, amount in allocatable.items() if "/" in resource and str(amount) not in ("0", "")}

    def own_job(key: Key, uid: str, indexes: dict[str, Any]) -> Obj | None:
        """The trainer Job of this incarnation: a Job of a deleted namesake, still being collected, is not it."""
        for job in indexes["trainer_jobs"].get(key, ()):
            if job["metadata"].get("ownerUid") == uid:
                return dict(job)
        return None

    def observe(
        key: Key, uid: str, job: Obj | None, indexes: dict[str, Any], sample: TrainerSample | None = None, missing_secret: str | None = None
    ) -> Observed:
        pods = list(indexes["trainer_pods"].get(key, ()))
        if job is None:
            job = own_job(key, uid, indexes)
        return Observed(now=now(), job=job, pods=pods, sample=sample, missing_secret=missing_secret, gpu_resource_found=None)

    def publish(key: Key, body: Obj, new: Obj) -> None:
        """Patch the status when it differs from what was last written or observed; post Events."""
        old = runtime._written.get(key) or body.get("status") or {}
        patch = status_patch(old, new)
        if patch is None:
            return
        clients.custom.patch_namespaced_custom_object_status(api.GROUP, api.VERSION, key[0], api.PLURAL, key[1], {"status": patch}, _content_type=MERGE_PATCH)
        runtime.metrics.api_writes.labels(verb="patch", resource="finetunejobs/status").inc()
        runtime._written[key] = new
        runtime.metrics.jobs.set(key[0], key[1], str(new.get("phase")))
        for event in transition_events(old, new):
            kopf.event(kopf.Body(cast(kopf.RawBody, body)), type=event.type, reason=event.reason, message=event.message)

    def refresh(key: Key, indexes: dict[str, Any], sample: TrainerSample | None = None, job: Obj | None = None, missing_secret: str | None = None) -> None:
        """Recompute and publish the status: at once when the caller brings news (a sample, an adopted Job, a missing
        Secret), else on the status lane, where refreshes of one FinetuneJob coalesce."""
        runtime.indexes = runtime.indexes or {name: indexes[name] for name in INDEX_IDS}
        if sample is None and job is None and missing_secret is None:
            runtime.defer(key, functools.partial(update, key, indexes))
        else:
            update(key, indexes, sample, job, missing_secret)

    def update(key: Key, indexes: dict[str, Any], sample: TrainerSample | None = None, job: Obj | None = None, missing_secret: str | None = None) -> None:
        body = first(indexes["finetunejobs"].get(key))
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        with runtime.lock(key):
            body = first(indexes["finetunejobs"].get(key)) or body
            try:
                ftj = parse(body, runtime._written.get(key))
            except ValidationError:
                return
            observed = observe(key, ftj.metadata.uid, job, indexes, sample, missing_secret)
            gpus = ftj.spec.resources
            if gpus.gpus > 0:
                observed = Observed(**{**observed.__dict__, "gpu_resource_found": _gpu_found(indexes["gpu_nodes"], gpus.gpu_resource_name)})
            new = compute_status(ftj, observed)
            runtime.track(key, running=new.get("phase") == api.Phase.RUNNING)
            publish(key, body, new)

    def missing_secret(ftj: api.FinetuneJob) -> str | None:
        """The first referenced Secret (or key) that does not exist; None when all exist or cannot be checked."""
        refs: list[tuple[str, str]] = []
        if ftj.spec.output.credentials_secret is not None:
            cred = ftj.spec.output.credentials_secret
            refs += [(cred.name, cred.access_key_id_key), (cred.name, cred.secret_access_key_key)]
        if ftj.spec.model.token_secret_ref is not None:
            refs.append((ftj.spec.model.token_secret_ref.name, ftj.spec.model.token_secret_ref.key))
        seen: dict[str, set[str]] = {}
        for name, key in refs:
            if name not in seen:
                try:
                    # Only the key names are kept; the raw response is dropped at once.
                    keys = set((raw_json(clients.core.read_namespaced_secret(name, ftj.metadata.namespace, _preload_content=False)).get("data") or {}).keys())
                except ApiException as error:
                    if error.status == 404:
                        return name
                    if error.status == 403:
                        # Cluster-wide mode has no Secret access: the pod status reports a missing Secret instead.
                        return None
                    raise
                seen[name] = keys
            if key not in seen[name]:
                return f"{name}' has no key '{key}"
        return None

    def create_child(ftj: api.FinetuneJob, manifest: Obj) -> tuple[Obj, bool]:
        """Create one child (True) or, on 409, adopt the one we own (False); refuse one we do not own."""
        namespace, kind, name = ftj.metadata.namespace, manifest["kind"], manifest["metadata"]["name"]
        creators: dict[str, Callable[..., Any]] = {
            "ConfigMap": clients.core.create_namespaced_config_map,
            "Service": clients.core.create_namespaced_service,
            "Job": clients.batch.create_namespaced_job,
        }
        readers: dict[str, Callable[..., Any]] = {
            "ConfigMap": clients.core.read_namespaced_config_map,
            "Service": clients.core.read_namespaced_service,
            "Job": clients.batch.read_namespaced_job,
        }
        try:
            created = raw_json(creators[kind](namespace, manifest, _preload_content=False))
            runtime.metrics.api_writes.labels(verb="create", resource=kind.lower()).inc()
            if kind == "Job":
                runtime.metrics.jobs_created.labels(namespace=namespace).inc()
            return created, True
        except ApiException as error:
            if error.status != 409:
                raise
        existing = raw_json(readers[kind](name, namespace, _preload_content=False))
        owners = [o for o in existing.get("metadata", {}).get("ownerReferences") or [] if o.get("controller")]
        if not owners or owners[0].get("uid") != ftj.metadata.uid:
            raise kopf.TemporaryError(f"{kind} {namespace}/{name} exists and is not owned by this FinetuneJob: delete or rename it", delay=60)
        return existing, False

    @kopf.on.resume(*resource, id="ensure", registry=registry)
    @kopf.on.create(*resource, id="ensure", registry=registry)
    def ensure(body: kopf.Body, namespace: str | None, name: str, **kwargs: Any) -> None:
        """Create the children once the referenced Secrets exist; idempotent, so it also runs on resume."""
        key = (namespace or "", name)
        with runtime.timed("ensure"):
            try:
                ftj = parse(body)
            except ValidationError as error:
                previous = previous_status(body)
                new = invalid_spec_status(short_errors(error), int(body.get("metadata", {}).get("generation") or 0), previous, now())
                publish(key, dict(body), new)
                runtime.metrics.reconcile_errors.labels(kind="InvalidSpec").inc()
                raise kopf.PermanentError(f"invalid spec: {short_errors(error)}") from error
            job = own_job(key, ftj.metadata.uid, kwargs)
            if finished(ftj) or job is not None:
                # Seen before this process started (kopf's state lives in memory): done, or its Job is in place;
                # a spec change made meanwhile is found by comparing with the Job itself.
                if job is not None and manifests.lifecycle_drift(ftj, job["spec"]):
                    apply_lifecycle(body, ftj, suspended_before=bool(job["spec"].get("suspend")) if ftj.spec.queue_name is None else None)
                refresh(key, kwargs)
                return
            create_all(key, ftj, kwargs)

    def create_all(key: Key, ftj: api.FinetuneJob, indexes: dict[str, Any]) -> None:
        """Create every child once the referenced Secrets exist."""
        secret = missing_secret(ftj)
        if secret is not None:
            refresh(key, indexes, missing_secret=secret)
            raise kopf.TemporaryError(f"waiting for Secret '{secret}'", delay=settings.secret_retry_seconds)
        for manifest in manifests.build_children(ftj, settings):
            child, created = create_child(ftj, manifest)
            if manifest["kind"] == "Job" and not created:
                # An adopted Job sends no new watch event, so publish the status from it now.
                refresh(key, indexes, job=slim_job(child))
        # A new Job's watch event triggers the first status; this thread is free for the next FinetuneJob.

    @kopf.on.update(*resource, field="spec", id="spec_changed", registry=registry)
    def spec_changed(body: kopf.Body, namespace: str | None, name: str, diff: kopf.Diff, **kwargs: Any) -> None:
        """Apply the lifecycle fields (suspend, limits, TTL) to the trainer Job."""
        with runtime.timed("spec_changed"):
            try:
                ftj = parse(body)
            except ValidationError as error:
                raise kopf.PermanentError(f"invalid spec: {short_errors(error)}") from error
            suspended_before = bool(ftj.spec.suspend)
            for _, path, old, _new in diff:
                if tuple(path) in (("suspend",), ("spec", "suspend")):
                    suspended_before = bool(old)
            apply_lifecycle(body, ftj, suspended_before)
            refresh((namespace or "", name), kwargs)

    def apply_lifecycle(body: kopf.Body, ftj: api.FinetuneJob, suspended_before: bool | None) -> None:
        """Merge-patch the trainer Job's lifecycle fields; post an Event when suspend changed (None: not known)."""
        namespace, name = ftj.metadata.namespace, ftj.metadata.name
        try:
            clients.batch.patch_namespaced_job(manifests.job_name(name), namespace, manifests.lifecycle_patch(ftj), _content_type=MERGE_PATCH)
            runtime.metrics.api_writes.labels(verb="patch", resource="job").inc()
        except ApiException as error:
            if error.status == 404:
                return
            if error.status == 422:
                kopf.warn(body, reason="JobUpdateRejected", message=f"the trainer Job rejected the change: {error.reason}")
                return
            raise
        if suspended_before is None or suspended_before == ftj.spec.suspend:
            return
        # kopf.event, not kopf.info: kopf's posting level (WARNING) filters info() out.
        if ftj.spec.queue_name is not None:
            kopf.event(body, type="Normal", reason="SuspendManagedByKueue", message="the trainer Job is queued in Kueue, which decides when it runs")
        else:
            message = "suspend requested" if ftj.spec.suspend else "resuming from the newest checkpoint"
            kopf.event(body, type="Normal", reason="Suspending" if ftj.spec.suspend else "Resuming", message=message)

    @kopf.on.event("batch", "v1", "jobs", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}, id="job_event", registry=registry)
    async def job_event(type: str, namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
        """A trainer Job changed: refresh the status on the status lane, or replace a Job deleted under a running FinetuneJob."""
        owner = owner_name(labels)
        if not owner:
            return
        key = (namespace or "", owner)
        body = first(kwargs["finetunejobs"].get(key))
        if type == "DELETED" and body is not None and not body["metadata"].get("deletionTimestamp"):
            await asyncio.to_thread(replace_job, key, body, kwargs)
            return
        with runtime.timed("job_event"):
            refresh(key, kwargs)

    def replace_job(key: Key, body: Obj, indexes: dict[str, Any]) -> None:
        """Someone deleted the trainer Job of an unfinished FinetuneJob: make a new one, which resumes from the checkpoint."""
        with runtime.timed("job_event"):
            try:
                ftj = parse(body, runtime._written.get(key))
            except ValidationError:
                return
            if finished(ftj):
                refresh(key, indexes)
            else:
                create_all(key, ftj, indexes)

    @kopf.on.event("v1", "pods", labels={manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}, id="pod_event", registry=registry)
    async def pod_event(namespace: str | None, labels: kopf.Labels, **kwargs: Any) -> None:
        """A trainer pod changed: refresh the status on the status lane (no thread hop: pods change often)."""
        owner = owner_name(labels)
        if owner:
            with runtime.timed("pod_event"):
                refresh((namespace or "", owner), kwargs)

    @kopf.on.event(*resource, id="finetunejob_event", registry=registry)
    async def finetunejob_event(type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        if type == "DELETED":
            runtime.metrics.jobs.forget(namespace or "", name)
            runtime.forget((namespace or "", name))
            runtime.handled.forget(str(body.get("metadata", {}).get("uid") or ""))
        else:
            runtime.metrics.jobs.set(namespace or "", name, str(body.get("status", {}).get("phase") or api.Phase.PENDING))

    def read_progress(key: Key) -> None:
        """Read a running trainer's metrics (rank 0 first) into status.progress."""
        indexes = runtime.indexes
        if indexes is None:
            return
        with runtime.timed("read_progress"):
            pods = [p for p in indexes["trainer_pods"].get(key, ()) if p["status"].get("phase") == "Running" and p["status"].get("podIP")]
            pods.sort(key=lambda p: int(p["metadata"]["annotations"].get(manifests.COMPLETION_INDEX_ANNOTATION, 0)))
            if not pods:
                return
            try:
                sample = scrape([p["status"]["podIP"] for p in pods], settings.trainer_metrics_port, settings.scrape_timeout_seconds, now())
            except ScrapeError:
                runtime.metrics.reconcile_errors.labels(kind="ScrapeError").inc()
                return
            refresh(key, indexes, sample=sample)

    async def poll_progress() -> None:
        """Every interval, read the progress of each running trainer.

        One operator-wide ticker instead of a kopf timer per object: kopf puts a finalizer on
        objects with timers, and a FinetuneJob must delete cleanly even with the operator down.
        """
        while True:
            await asyncio.sleep(settings.progress_interval_seconds)
            keys = runtime.running_keys()
            for batch in range(0, len(keys), PROGRESS_READERS):
                await asyncio.gather(*(asyncio.to_thread(read_progress, key) for key in keys[batch : batch + PROGRESS_READERS]))

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        """The kubernetes client's credentials: in a pod the service account token and KUBERNETES_SERVICE_HOST/PORT
        (kopf's own service-account login assumes the kubernetes.default.svc DNS name), elsewhere the kubeconfig.
        A custom registry has no default login."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="start_heartbeat", registry=registry)
    async def start_heartbeat(**_: Any) -> None:
        runtime.tasks = [asyncio.create_task(_beat(runtime.health)), asyncio.create_task(poll_progress())]

    @kopf.on.cleanup(id="stop_heartbeat", registry=registry)
    async def stop_heartbeat(**_: Any) -> None:
        for task in runtime.tasks:
            task.cancel()
        await asyncio.to_thread(runtime.close)


async def _beat(health: Health) -> None:
    """Liveness: the event loop proves it still runs by beating every few seconds."""
    while True:
        health.beat()
        await asyncio.sleep(HEARTBEAT_SECONDS)
