"""The operator's decisions: create, adopt or refuse children, bring a Job to a changed spec, replace a deleted Job,
and write the status when it changed.

The handlers parse kopf's events and call these methods with a ``Watched`` view of what the watches hold; every
API call goes through ``Kube``. Nothing here needs kopf to run it: the integration tests call it against a real
apiserver. kopf's errors are the vocabulary for retries (TemporaryError) and bad input (PermanentError).
"""

from __future__ import annotations

import asyncio
import functools
import logging

import kopf
from pydantic import ValidationError

from kubetune_api.fit import GpuMemorySource, parse_quantity
from kubetune_api.result import PreparationReport
from kubetune_operator import api, manifests
from kubetune_operator.events import job_update_rejected, suspend_events, transition_events
from kubetune_operator.kube import Kube, Rejected, SecretsForbidden
from kubetune_operator.notifications import job_sinks, phase_events, replayed_events
from kubetune_operator.progress import ScrapeError, TrainerSample, scrape
from kubetune_operator.runtime import Key, Obj, Runtime, now
from kubetune_operator.snapshots import Watched, controller_owner, finished, parse, previous_status, short_errors, slim_job
from kubetune_operator.status import Observed, compute_status, invalid_spec_status, job_expiry, status_patch
from kubetune_operator.verdict import conditions_of, disruptions, newest_first, preparation_report, rank

MIB = 1024**2

log = logging.getLogger(__name__)

PROGRESS_READERS = 8
"""Trainers whose metrics are read at once (each read blocks a thread for up to the scrape timeout)."""


def _complete(job: Obj) -> bool:
    conditions = conditions_of(job)
    return any(conditions.get(kind, {}).get("status") == "True" for kind in ("Complete", "SuccessCriteriaMet"))


def key_of(body: Obj) -> Key:
    meta = body.get("metadata", {})
    return (str(meta.get("namespace") or ""), str(meta.get("name")))


def name_taken(ftj: api.FinetuneJob, child: Obj, existing: Obj | None) -> str | None:
    """Why ``child`` cannot be written over ``existing`` (the object holding its name), or None when it can: there
    is none, or this FinetuneJob controls it. Server-side apply alone would take over one its own field manager
    wrote, such as the Job of a deleted namesake that the garbage collector has not removed yet."""
    if existing is None:
        return None
    owner = controller_owner(existing.get("metadata", {}))
    if owner is not None and owner.get("uid") == ftj.metadata.uid:
        return None
    what = f"{child['kind']} {ftj.metadata.namespace}/{child['metadata']['name']}"
    if owner is not None and owner.get("kind") == api.KIND and owner.get("name") == ftj.metadata.name:
        return f"{what} belongs to an earlier FinetuneJob of this name that is being deleted; it is created once Kubernetes has removed that one"
    holder = f"controlled by {owner.get('kind')} {owner.get('name')}" if owner is not None else "it has no controller"
    return f"{what} exists and is not owned by this FinetuneJob ({holder}): delete or rename it"


class Reconciler:
    """Decisions for every FinetuneJob; the status of one is computed and written under its lock."""

    def __init__(self, runtime: Runtime, kube: Kube) -> None:
        self.runtime = runtime
        self.kube = kube
        self.settings = runtime.settings

    # ---------------------------------------------------------------- a FinetuneJob is seen

    def ensure(self, body: Obj, watched: Watched) -> None:
        """A FinetuneJob was created, or is seen for the first time by this process: create, adopt or observe."""
        key = key_of(body)
        with self.runtime.timed("ensure"):
            ftj = self._parse_or_fail(key, body)
            job = watched.own_job(key, ftj.metadata.uid)
            if job is not None:
                # Seen before this process started (kopf's state lives in memory): its Job is in place, and a spec
                # change made meanwhile is found by comparing with the Job itself.
                queued = ftj.spec.queue_name is not None
                self._update_job(body, ftj, job, job["spec"], suspended_before=None if queued else bool(job["spec"].get("suspend")))
                self.refresh(key, watched)
            elif finished(ftj):
                self.refresh(key, watched)
            else:
                self._create(key, body, ftj, watched)

    def spec_changed(self, body: Obj, suspended_before: bool, watched: Watched) -> None:
        """The mutable part of the spec changed (the apiserver rejects any other change): bring the Job to it."""
        key = key_of(body)
        with self.runtime.timed("spec_changed"):
            try:
                ftj = parse(body)
            except ValidationError as error:
                raise kopf.PermanentError(f"invalid spec: {short_errors(error)}") from error
            job = watched.own_job(key, ftj.metadata.uid) or self._read_own_job(ftj)
            if job is not None:
                # Not compared with the watched Job, which may not show this process's own last change yet.
                self._update_job(body, ftj, job, None, suspended_before)
            self.refresh(key, watched)

    def finetunejob_seen(self, key: Key, body: Obj, deleted: bool) -> None:
        """Bookkeeping on every FinetuneJob event: its phase for the metrics, or forgetting it once deleted."""
        if deleted:
            self.runtime.metrics.jobs.forget(*key)
            self.runtime.metrics.usage.forget(*key)
            self.runtime.forget(key)
            self.runtime.handled.forget(str(body.get("metadata", {}).get("uid") or ""))
        else:
            self.runtime.metrics.jobs.set(*key, str(body.get("status", {}).get("phase") or api.Phase.PENDING))

    # ---------------------------------------------------------------- a child changed

    async def job_changed(self, key: Key, deleted: bool, watched: Watched) -> None:
        """A trainer Job changed: refresh the status, or replace a Job deleted under a FinetuneJob that is not deleted."""
        body = watched.finetunejob(key)
        if deleted and body is not None and not body["metadata"].get("deletionTimestamp"):
            await asyncio.to_thread(self.replace_job, key, watched)
            return
        with self.runtime.timed("job_event"):
            self.refresh(key, watched)

    def replace_job(self, key: Key, watched: Watched) -> None:
        """A trainer Job is gone: make a new one, which resumes from the newest checkpoint, unless the run is over
        (a TTL removed a finished Job) or the Job that went was a namesake's."""
        with self.runtime.timed("job_event"):
            body = watched.finetunejob(key)
            if body is None:
                return
            try:
                ftj = parse(body, self.runtime.written(key))
            except ValidationError:
                return
            if finished(ftj) or watched.own_job(key, ftj.metadata.uid) is not None:
                self.refresh(key, watched)
            else:
                self._create(key, body, ftj, watched)

    def pod_changed(self, key: Key, watched: Watched) -> None:
        with self.runtime.timed("pod_event"):
            self.refresh(key, watched)

    # ---------------------------------------------------------------- children

    def _create(self, key: Key, body: Obj, ftj: api.FinetuneJob, watched: Watched) -> None:
        """Create the children, in order, once the referenced Secrets exist. A name that is taken is read and checked:
        a child this FinetuneJob controls is brought to the spec; one another FinetuneJob or a user owns is left alone,
        and nothing after it is made (the children made before it are this FinetuneJob's, and go with it)."""
        secret = self._missing_secret(ftj)
        if secret is not None:
            self.update(key, watched, missing_secret=secret)
            raise kopf.TemporaryError(f"waiting for Secret '{secret}'", delay=self.settings.secret_retry_seconds)
        preparation = self._preparation(key, ftj, watched)
        if preparation is not None and ftj.spec.training.auto_fit and preparation.fit is not None and not preparation.fit.fits:
            return  # DoesNotFit: the status says so, and no GPU is ever requested
        for child in manifests.build_children(ftj, self.settings, preparation, self.gpu_memory(ftj, watched)):
            # A new Job's watch event triggers the first status; this thread is free for the next FinetuneJob.
            if not self.kube.create(child):
                self._reuse(key, body, ftj, watched, child)

    def _reuse(self, key: Key, body: Obj, ftj: api.FinetuneJob, watched: Watched, child: Obj) -> None:
        """A child's name is taken: bring the object to ``child`` if this FinetuneJob controls it, else refuse."""
        existing = self.kube.read(child)
        if existing is None:
            taken: str | None = f"{child['kind']} {ftj.metadata.namespace}/{child['metadata']['name']} is being deleted; it is made again once it is gone"
        else:
            taken = name_taken(ftj, child, existing)
        if taken is not None or existing is None:
            self.update(key, watched, name_taken=taken)
            raise kopf.TemporaryError(taken, delay=self.settings.conflict_retry_seconds)
        if child["kind"] == "Job" and child["metadata"]["name"] == manifests.prepare_job_name(ftj.metadata.name):
            return  # the preparation runs once; only the trainer Job follows the spec's mutable fields
        if child["kind"] == "Job":
            # Ours, not in the watch yet. Its pod template is immutable: only the mutable fields can follow the spec.
            self._update_job(body, ftj, existing, existing.get("spec") or {}, suspended_before=None)
            self.update(key, watched, job=slim_job(existing))
        else:
            self.kube.apply(child, uid=existing["metadata"]["uid"])

    def gpu_memory(self, ftj: api.FinetuneJob, watched: Watched) -> manifests.GpuMemory:
        """Memory of one GPU: spec.resources.gpuMemory, else the smallest nvidia.com/gpu.memory label, else the default."""
        resources = ftj.spec.resources
        if resources.gpu_memory:
            return parse_quantity(resources.gpu_memory), GpuMemorySource.SPEC
        labelled = watched.gpu_memory_mib(resources.gpu_resource_name)
        if labelled:
            return labelled * MIB, GpuMemorySource.NODE_LABEL
        return parse_quantity(self.settings.default_gpu_memory), GpuMemorySource.DEFAULT

    def _preparation(self, key: Key, ftj: api.FinetuneJob, watched: Watched) -> PreparationReport | None:
        """The finished preparation's report (from its pod, or the status once the pod is gone); None before."""
        if not ftj.spec.prepares_in_job():
            return None
        job = watched.own_prepare_job(key, ftj.metadata.uid)
        if job is not None and not _complete(job):
            return None
        report = preparation_report(newest_first(watched.pods(key, job))) if job is not None else None
        return report or (ftj.status.preparation if ftj.status is not None else None)

    def _advance(self, key: Key, watched: Watched) -> None:
        """Create the trainer Job once the preparation Job completed with a report whose settings fit."""
        body = watched.finetunejob(key)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        try:
            ftj = parse(body, self.runtime.written(key))
        except ValidationError:
            return
        if not ftj.spec.prepares_in_job() or finished(ftj) or watched.own_job(key, ftj.metadata.uid) is not None:
            return
        if self._preparation(key, ftj, watched) is None:
            return
        try:
            self._create(key, body, ftj, watched)
        except kopf.TemporaryError:
            return  # waiting for a Secret or a name: the status says which, and the next event tries again

    def _read_own_job(self, ftj: api.FinetuneJob) -> Obj | None:
        """The trainer Job as stored, when this FinetuneJob controls it (the watch may not show it yet)."""
        wanted = {"kind": "Job", "metadata": {"name": manifests.job_name(ftj.metadata.name), "namespace": ftj.metadata.namespace}}
        job = self.kube.read(wanted)
        return job if job is not None and name_taken(ftj, wanted, job) is None else None

    def _update_job(self, body: Obj, ftj: api.FinetuneJob, job: Obj, current: Obj | None, suspended_before: bool | None) -> None:
        """Merge-patch the mutable fields of ``job`` (this FinetuneJob's) where ``current`` (its spec, None: not known)
        differs; post the Event a suspend change calls for."""
        patch = manifests.job_update(ftj, current)
        if patch is None:
            return
        try:
            if not self.kube.patch_job_spec(ftj.metadata.namespace, manifests.job_name(ftj.metadata.name), job["metadata"]["uid"], patch):
                return  # gone or replaced: a new Job is built from the spec as it is now
        except Rejected as error:
            self.kube.post_event(body, job_update_rejected(str(error)))
            return
        for event in suspend_events(suspended_before, ftj.spec.suspend, queued=ftj.spec.queue_name is not None):
            self.kube.post_event(body, event)

    def _missing_secret(self, ftj: api.FinetuneJob) -> str | None:
        """The first referenced Secret (or key) that does not exist; None when all exist or cannot be checked."""
        refs: list[tuple[str, str]] = []
        if ftj.spec.output.credentials_secret is not None:
            cred = ftj.spec.output.credentials_secret
            refs += [(cred.name, cred.access_key_id_key), (cred.name, cred.secret_access_key_key)]
        if ftj.spec.model.token_secret_ref is not None:
            refs.append((ftj.spec.model.token_secret_ref.name, ftj.spec.model.token_secret_ref.key))
        seen: dict[str, frozenset[str]] = {}
        for name, key in refs:
            if name not in seen:
                try:
                    keys = self.kube.secret_keys(ftj.metadata.namespace, name)
                except SecretsForbidden:
                    # Cluster-wide mode has no Secret access: the pod status reports a missing Secret instead.
                    return None
                if keys is None:
                    return name
                seen[name] = keys
            if key not in seen[name]:
                return f"{name}' has no key '{key}"
        return None

    def _parse_or_fail(self, key: Key, body: Obj) -> api.FinetuneJob:
        """The model of a body; a spec the apiserver let through but the model rejects fails the FinetuneJob for good."""
        try:
            return parse(body)
        except ValidationError as error:
            generation = int(body.get("metadata", {}).get("generation") or 0)
            self._publish(key, body, invalid_spec_status(short_errors(error), generation, previous_status(body), now()))
            self.runtime.metrics.reconcile_errors.labels(kind="InvalidSpec").inc()
            raise kopf.PermanentError(f"invalid spec: {short_errors(error)}") from error

    # ---------------------------------------------------------------- status

    def refresh(self, key: Key, watched: Watched, sample: TrainerSample | None = None) -> None:
        """Recompute and write the status: at once with a metrics sample, else on the status lane, where refreshes
        of one FinetuneJob coalesce."""
        self.runtime.watched = self.runtime.watched or watched
        if sample is None:
            self.runtime.defer(key, functools.partial(self._update_and_advance, key, watched))
        else:
            self.update(key, watched, sample=sample)

    def _update_and_advance(self, key: Key, watched: Watched) -> None:
        self.update(key, watched)
        self._advance(key, watched)

    def update(
        self,
        key: Key,
        watched: Watched,
        *,
        sample: TrainerSample | None = None,
        job: Obj | None = None,
        missing_secret: str | None = None,
        name_taken: str | None = None,
    ) -> None:
        """Compute the status from what is watched now (plus what the caller brings) and write it if it changed."""
        body = watched.finetunejob(key)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return
        with self.runtime.lock(key):
            body = watched.finetunejob(key) or body
            try:
                ftj = parse(body, self.runtime.written(key))
            except ValidationError:
                return
            job = job or watched.own_job(key, ftj.metadata.uid)
            prepare_job = watched.own_prepare_job(key, ftj.metadata.uid) if ftj.spec.prepares_in_job() else None
            resources = ftj.spec.resources
            pods = watched.pods(key, job)
            observed = Observed(
                now=now(),
                job=job,
                pods=pods,
                sample=sample,
                missing_secret=missing_secret,
                name_taken=name_taken,
                gpu_resource_found=watched.gpu_resource_found(resources.gpu_resource_name) if resources.gpus > 0 else None,
                prepare_job=prepare_job,
                prepare_pods=watched.pods(key, prepare_job),
                serving=self.settings.serving,
                gpu_products=watched.gpu_products(pods) if resources.gpus > 0 else {},
                prices=self.settings.prices,
            )
            new = compute_status(ftj, observed)
            self.runtime.track(key, running=new.get("phase") == api.Phase.RUNNING)
            self._publish(key, body, new)
            self._expire(key, ftj, [j for j in (job, prepare_job) if j is not None], new)
            if job is not None and disruptions(observed.pods) > ftj.spec.max_disruptions and not (job.get("spec") or {}).get("suspend"):
                # The podFailurePolicy ignores disruptions, so the Job would replace evicted pods forever: stop it.
                self.kube.patch_job_spec(key[0], job["metadata"]["name"], job["metadata"]["uid"], {"suspend": True})

    def _expire(self, key: Key, ftj: api.FinetuneJob, jobs: list[Obj], written: Obj) -> None:
        """spec.ttlSecondsAfterFinished, kept by the operator rather than the Job controller: the finished ``jobs``
        (trainer and preparation, with their pods) go only after ``written``, the status as the apiserver now holds it,
        records the outcome, so a Job never disappears before its result is kept (a Job controller's TTL would delete
        it while the operator is down)."""
        when = job_expiry(ftj, api.FinetuneJobStatus.model_validate(written)) if jobs else None
        if not jobs or when is None or when > now():
            self.runtime.expire_at(key, when)
            return
        self.runtime.expire_at(key, None)
        for job in jobs:
            self.kube.delete_job(ftj.metadata.namespace, job["metadata"]["name"], job["metadata"]["uid"])

    def _publish(self, key: Key, body: Obj, new: Obj) -> None:
        """Patch the status when it differs from what was last written or observed; post the Events the change calls for."""
        old = self.runtime.written(key) or body.get("status") or {}
        notifier = self.runtime.notifier
        if notifier is not None and self.runtime.first_sight(key):
            # The process before may have written the stored phase and stopped before its sinks got the event.
            notifier.notify(replayed_events(body, now()), job_sinks(body))
        patch = status_patch(old, new)
        if patch is None:
            return
        self.kube.patch_status(key[0], key[1], patch)
        self.runtime.remember(key, new)
        self.runtime.metrics.jobs.set(key[0], key[1], str(new.get("phase")))
        self.runtime.metrics.usage.set(key[0], key[1], new)
        for event in transition_events(old, new):
            self.kube.post_event(body, event)
        if notifier is not None:
            notifier.notify(phase_events(body, old, new), job_sinks(body))

    # ---------------------------------------------------------------- progress

    def read_progress(self, key: Key) -> None:
        """Read a running trainer's metrics (rank 0 first) into status.progress."""
        watched = self.runtime.watched
        body = watched.finetunejob(key) if watched is not None else None
        if watched is None or body is None:
            return
        with self.runtime.timed("read_progress"):
            job = watched.own_job(key, str(body["metadata"].get("uid") or ""))
            pods = sorted((p for p in watched.pods(key, job) if p["status"].get("phase") == "Running" and p["status"].get("podIP")), key=rank)
            if not pods:
                return
            try:
                sample = scrape([p["status"]["podIP"] for p in pods], self.settings.trainer_metrics_port, self.settings.scrape_timeout_seconds, now())
            except ScrapeError:
                self.runtime.metrics.reconcile_errors.labels(kind="ScrapeError").inc()
                return
            self.refresh(key, watched, sample=sample)

    async def poll_progress(self) -> None:
        """Every interval, read the progress of each running trainer, and delete the finished Jobs whose TTL has passed.

        One operator-wide ticker instead of a kopf timer per object: kopf puts a finalizer on
        objects with timers, and a FinetuneJob must delete cleanly even with the operator down.
        """
        while True:
            await asyncio.sleep(self.settings.progress_interval_seconds)
            watched = self.runtime.watched
            if watched is not None:
                for key in self.runtime.expired_keys(now()):
                    # A refresh writes the status if it changed, then deletes the Job (_expire).
                    self.refresh(key, watched)
            keys = self.runtime.running_keys()
            for batch in range(0, len(keys), PROGRESS_READERS):
                await asyncio.gather(*(asyncio.to_thread(self._read_progress_or_log, key) for key in keys[batch : batch + PROGRESS_READERS]))

    def _read_progress_or_log(self, key: Key) -> None:
        """A failed read (the apiserver restarting while the status is written) is logged and counted: an exception
        would end the ticker, and no trainer's progress would be read again in this process."""
        try:
            self.read_progress(key)
        except Exception:
            self.runtime.metrics.reconcile_errors.labels(kind="ProgressError").inc()
            log.warning("reading the progress of %s/%s failed; the next tick reads it again", *key, exc_info=True)
