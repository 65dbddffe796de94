"""Every reconciler path against a real kube-apiserver (no controllers run: the tests play the Job controller,
the garbage collector, Kueue and the user), driven as kopf's handlers drive it, as the chart's ServiceAccount."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest
from kubernetes import client

from kubetune_api.metrics import TrainerMetric
from kubetune_operator import manifests
from kubetune_operator.kube import FIELD_MANAGER
from tests.integration.harness import NAMESPACE, Harness, managers_of, only

pytestmark = pytest.mark.integration

CREDENTIALS = {"bucket": "adapters", "credentialsSecret": {"name": "s3-creds"}}


def test_a_new_finetunejob_gets_its_children_in_one_write_each(harness: Harness) -> None:
    created = harness.created("fresh", resources={"gpus": 1, "nodes": 2}, preparation={"mode": "InTrainer"})
    uid = created["metadata"]["uid"]
    for kind, name in (("ConfigMap", "fresh-config"), ("Service", "fresh-trainer"), ("Job", "fresh-trainer")):
        child = harness.read(kind, name)
        assert child is not None, f"{kind} {name} was not created"
        assert [(o["kind"], o["uid"], o["controller"]) for o in child["metadata"]["ownerReferences"]] == [("FinetuneJob", uid, True)]
        assert {entry["manager"] for entry in child["metadata"]["managedFields"]} == {FIELD_MANAGER}
    assert harness.writes("create", "job") == harness.writes("create", "configmap") == harness.writes("create", "service") == 1
    assert harness.writes("apply", "job") == harness.writes("apply", "configmap") == 0
    harness.job_changed("fresh")
    status = harness.status("fresh")
    assert status["phase"] == "Pending" and status["jobName"] == "fresh-trainer"
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Created"] == "JobCreated"


def test_after_a_restart_an_owned_job_is_only_observed(harness: Harness) -> None:
    harness.created("adopted")
    harness.job_changed("adopted")
    before = {kind: harness.read(kind, name) for kind, name in (("ConfigMap", "adopted-config"), ("Job", "adopted-trainer"))}
    status_version = harness.finetunejob("adopted")["metadata"]["resourceVersion"]
    harness.restart()
    harness.ensure("adopted")
    harness.job_changed("adopted")
    for kind, name in (("ConfigMap", "adopted-config"), ("Job", "adopted-trainer")):
        after = harness.read(kind, name)
        assert after is not None and after["metadata"]["resourceVersion"] == before[kind]["metadata"]["resourceVersion"], f"{kind} was written"  # type: ignore[index]
    # Nothing changed, so the status the earlier process wrote is not written again either.
    assert harness.finetunejob("adopted")["metadata"]["resourceVersion"] == status_version
    assert harness.writes("create", "job") == harness.writes("create", "configmap") == 0
    assert harness.writes("apply", "job") == harness.writes("apply", "configmap") == harness.writes("patch", "finetunejobs/status") == 0


def test_a_users_config_map_of_the_same_name_is_refused_and_left_alone(harness: Harness) -> None:
    users = client.V1ConfigMap.model_validate({"metadata": {"name": "taken-config"}, "data": {"mine": "keep me"}})
    harness.core.create_namespaced_config_map(NAMESPACE, users)
    harness.create_finetunejob("taken")
    with pytest.raises(kopf.TemporaryError, match="ConfigMap kubetune-it/taken-config exists and is not owned by this FinetuneJob"):
        harness.ensure("taken")
    config_map = harness.read("ConfigMap", "taken-config")
    assert config_map is not None and config_map["data"] == {"mine": "keep me"} and "ownerReferences" not in config_map["metadata"]
    assert harness.job("taken") is None
    status = harness.status("taken")
    created = {c["type"]: c for c in status["conditions"]}["Created"]
    assert (created["status"], created["reason"]) == ("False", "NameTaken")
    assert "delete or rename it" in status["message"]
    assert "NameTaken" in harness.event_reasons("taken")


def test_the_job_of_a_deleted_namesake_is_not_taken_over(harness: Harness) -> None:
    """A completed Job of an earlier FinetuneJob of this name, which the garbage collector has not removed yet: it
    was applied by the same field manager, so only the ownership check keeps the new FinetuneJob from adopting it."""
    earlier = harness.created("again")
    harness.complete_job("again")
    harness.custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", NAMESPACE, "finetunejobs", "again")
    harness.restart()
    harness.create_finetunejob("again")
    with pytest.raises(kopf.TemporaryError, match="belongs to an earlier FinetuneJob of this name"):
        harness.ensure("again")
    old_job = harness.job("again")
    assert old_job is not None and old_job["metadata"]["ownerReferences"][0]["uid"] == earlier["metadata"]["uid"]
    assert harness.status("again")["phase"] == "Pending"
    harness.patch_spec("again", backoffLimit=7)
    harness.spec_changed("again", suspended_before=False)
    assert (harness.job("again") or {})["metadata"]["resourceVersion"] == old_job["metadata"]["resourceVersion"]
    # The garbage collector removes the earlier run's children; the Job's deletion brings the new one.
    harness.delete_job("again")
    harness.core.delete_namespaced_config_map("again-config", NAMESPACE)
    harness.job_changed("again", deleted=True)
    job = harness.job("again")
    assert job is not None and job["metadata"]["ownerReferences"][0]["uid"] == harness.finetunejob("again")["metadata"]["uid"]
    harness.job_changed("again")
    assert harness.status("again")["phase"] == "Pending"


def test_a_spec_change_while_running_reaches_the_job(harness: Harness) -> None:
    harness.running("changed", activeDeadlineSeconds=7200)
    harness.patch_spec("changed", backoffLimit=5, activeDeadlineSeconds=None, ttlSecondsAfterFinished=600)
    harness.spec_changed("changed", suspended_before=False)
    job = harness.job("changed")
    assert job is not None
    # The TTL is the operator's to keep (after the outcome is recorded): it never reaches the Job.
    assert (job["spec"]["backoffLimit"], job["spec"].get("activeDeadlineSeconds"), job["spec"].get("ttlSecondsAfterFinished")) == (5, None, None)
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "localhost/kubetune-trainer:test"
    assert harness.status("changed")["phase"] == "Running"


def test_a_spec_change_made_while_the_operator_was_down_reaches_the_job(harness: Harness) -> None:
    harness.created("drifted", suspend=True)
    harness.restart()
    harness.patch_spec("drifted", suspend=False, backoffLimit=5)
    harness.ensure("drifted")
    job = harness.job("drifted")
    assert job is not None and (job["spec"]["suspend"], job["spec"]["backoffLimit"]) == (False, 5)
    assert "Resuming" in harness.event_reasons("drifted")


def test_suspend_and_resume_reach_the_job_with_their_events(harness: Harness) -> None:
    harness.created("paused")
    harness.patch_spec("paused", suspend=True)
    harness.spec_changed("paused", suspended_before=False)
    assert (harness.job("paused") or {})["spec"]["suspend"] is True
    harness.job_changed("paused")
    assert harness.status("paused")["phase"] == "Suspended"
    harness.patch_spec("paused", suspend=False)
    harness.spec_changed("paused", suspended_before=True)
    assert (harness.job("paused") or {})["spec"]["suspend"] is False
    reasons = harness.event_reasons("paused")
    assert reasons.index("Suspending") < reasons.index("Resuming")


def test_kueue_owns_suspend_once_the_job_exists(harness: Harness) -> None:
    harness.created("queued", queueName="team-a")
    job = harness.job("queued")
    assert job is not None and job["spec"]["suspend"] is True and job["metadata"]["labels"][manifests.LABEL_KUEUE_QUEUE] == "team-a"
    # A change while Kueue still holds the Job back must not release it (an apply that left suspend out would).
    harness.patch_spec("queued", backoffLimit=5)
    harness.spec_changed("queued", suspended_before=False)
    job = harness.job("queued")
    assert job is not None and (job["spec"]["suspend"], job["spec"]["backoffLimit"]) == (True, 5)
    harness.admit_in_kueue("queued")
    harness.patch_spec("queued", suspend=True)
    harness.spec_changed("queued", suspended_before=False)
    job = harness.job("queued")
    assert job is not None and job["spec"]["suspend"] is False
    assert managers_of(job, "suspend") == {"kueue/Update"}
    assert "SuspendManagedByKueue" in harness.event_reasons("queued")


def test_a_missing_secret_is_named_and_its_creation_lets_the_children_appear(harness: Harness) -> None:
    harness.create_finetunejob("secretive", output=CREDENTIALS)
    with pytest.raises(kopf.TemporaryError, match="s3-creds"):
        harness.ensure("secretive")
    status = harness.status("secretive")
    assert 'Secret "s3-creds" not found' in status["message"]
    assert {c["type"]: c["reason"] for c in status["conditions"]}["Created"] == "WaitingForSecret"
    assert harness.read("ConfigMap", "secretive-config") is None and harness.job("secretive") is None
    secret = {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}}
    harness.core.create_namespaced_secret(NAMESPACE, client.V1Secret.model_validate(secret))
    harness.ensure("secretive")
    assert harness.read("ConfigMap", "secretive-config") is not None and harness.job("secretive") is not None
    harness.job_changed("secretive")
    assert {c["type"]: c["reason"] for c in harness.status("secretive")["conditions"]}["Created"] == "JobCreated"


def test_a_job_removed_after_success_is_not_recreated(harness: Harness) -> None:
    """Removed by hand, or by the Job controller's TTL an earlier operator put on it: the run is finished all the same."""
    harness.created("finished")
    harness.complete_job("finished")
    harness.job_changed("finished")
    assert harness.status("finished")["phase"] == "Succeeded"
    version = harness.finetunejob("finished")["metadata"]["resourceVersion"]
    harness.delete_job("finished")
    harness.job_changed("finished", deleted=True)
    assert harness.jobs("finished") == []
    assert harness.status("finished")["phase"] == "Succeeded"
    assert harness.finetunejob("finished")["metadata"]["resourceVersion"] == version


def test_the_operator_deletes_a_finished_job_once_its_outcome_is_recorded_and_the_ttl_passed(harness: Harness) -> None:
    """ttlSecondsAfterFinished is kept by the operator, not the Job controller: a Job deleted before the operator saw
    it finish would take the result with it, and the operator would train the run again."""
    harness.created("expiring", ttlSecondsAfterFinished=0)
    job = harness.job("expiring")
    assert job is not None and "ttlSecondsAfterFinished" not in job["spec"]
    harness.complete_job("expiring")
    harness.job_changed("expiring")
    assert harness.status("expiring")["phase"] == "Succeeded"
    assert harness.jobs("expiring") == [] and harness.writes("delete", "job") == 1
    harness.job_changed("expiring", deleted=True)
    assert harness.jobs("expiring") == [], "the finished run was started again"
    assert harness.status("expiring")["phase"] == "Succeeded"


def test_a_finished_job_stays_until_its_ttl_has_passed_and_an_unfinished_one_always(harness: Harness) -> None:
    ten_days = 10 * 24 * 3600
    harness.created("kept", ttlSecondsAfterFinished=ten_days)
    harness.complete_job("kept")
    harness.job_changed("kept")
    assert harness.status("kept")["phase"] == "Succeeded" and harness.job("kept") is not None
    # The ticker deletes it once the TTL has passed (completionTime + ttl), not before.
    assert harness.runtime.expired_keys(datetime.now(UTC)) == []
    assert harness.runtime.expired_keys(datetime.now(UTC) + timedelta(seconds=ten_days)) == [(NAMESPACE, "kept")]
    harness.running("unfinished", ttlSecondsAfterFinished=0)
    harness.pod_changed("unfinished")
    assert harness.job("unfinished") is not None and harness.writes("delete", "job") == 0


def test_a_ttl_an_earlier_operator_put_on_the_job_is_taken_off(harness: Harness) -> None:
    harness.created("older", ttlSecondsAfterFinished=0)
    harness.batch.patch_namespaced_job(
        manifests.job_name("older"), NAMESPACE, {"spec": {"ttlSecondsAfterFinished": 0}}, _content_type="application/merge-patch+json"
    )
    harness.restart()
    harness.ensure("older")
    job = harness.job("older")
    assert job is not None and job["spec"].get("ttlSecondsAfterFinished") is None


def test_a_job_deleted_by_a_user_while_running_is_replaced(harness: Harness) -> None:
    harness.running("replaced")
    first = harness.job("replaced")
    assert first is not None
    harness.delete_job("replaced")
    harness.job_changed("replaced", deleted=True)
    second = only(harness.jobs("replaced"))
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert second["metadata"]["ownerReferences"][0]["uid"] == harness.finetunejob("replaced")["metadata"]["uid"]


def test_the_status_is_patched_only_when_it_changed(harness: Harness) -> None:
    harness.created("quiet")
    harness.job_changed("quiet")
    version = harness.finetunejob("quiet")["metadata"]["resourceVersion"]
    assert harness.writes("patch", "finetunejobs/status") == 1
    for _ in range(3):
        harness.job_changed("quiet")
        harness.pod_changed("quiet")
    assert harness.finetunejob("quiet")["metadata"]["resourceVersion"] == version
    assert harness.writes("patch", "finetunejobs/status") == 1
    harness.run_pod("quiet")
    harness.pod_changed("quiet")
    assert harness.status("quiet")["phase"] == "Running"
    assert harness.writes("patch", "finetunejobs/status") == 2


def test_a_running_trainers_progress_is_read_into_the_status(harness: Harness) -> None:
    """The trainer's /metrics is a plain HTTP server on the pod's address (the pods here have 127.0.0.1)."""
    text = "".join(f"{metric} {value}\n" for metric, value in ((TrainerMetric.STEP, 42), (TrainerMetric.TOTAL_STEPS, 100), (TrainerMetric.LOSS, 0.5)))
    with serving(text.encode()) as port:
        harness.restart(trainer_metrics_port=port)
        harness.running("progressing")
        harness.reconciler.read_progress((NAMESPACE, "progressing"))
    progress = harness.status("progressing")["progress"]
    assert (progress["step"], progress["totalSteps"], progress["percent"], progress["loss"]) == (42, 100, 42, 0.5)
    assert harness.status("progressing")["progressText"] == "42%"


@contextlib.contextmanager
def serving(body: bytes) -> Iterator[int]:
    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def test_the_operators_calls_reuse_their_connections(harness: Harness) -> None:
    """Every call returns its connection to the pool: an unread response drops it, and each later call would open a
    new TLS connection (about a third of the operator's time under load)."""
    rest = harness.plane.operator.rest_client
    pools = rest.pool_manager.pools
    opened_before = sum(pool.num_connections for pool in (pools[key] for key in pools.keys()))
    for index in range(4):
        harness.created(f"pooled-{index}")  # creates, Events
        harness.job_changed(f"pooled-{index}")  # status patches
    opened = sum(pool.num_connections for pool in (pools[key] for key in pools.keys())) - opened_before
    assert opened <= 1, f"{opened} new connections for 4 FinetuneJobs' creates, Events and status patches"


def test_the_progress_ticker_outlives_a_read_that_fails(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A status write refused while the apiserver restarts must not end the ticker: before, the exception ended
    its task silently, and no trainer's progress was read again until the operator restarted."""
    harness.restart(progress_interval_seconds=0.05)
    harness.running("ticking")
    reads: list[str] = []

    def read_progress(key: tuple[str, str]) -> None:
        reads.append(key[1])
        if len(reads) == 1:
            raise ConnectionRefusedError("the apiserver is restarting")

    monkeypatch.setattr(harness.reconciler, "read_progress", read_progress)

    async def tick_for_a_while() -> None:
        ticker = asyncio.create_task(harness.reconciler.poll_progress())
        await asyncio.sleep(0.5)
        assert not ticker.done(), f"the ticker ended: {ticker.exception()!r}"
        ticker.cancel()

    asyncio.run(tick_for_a_while())
    assert len(reads) >= 3, reads
    assert harness.metrics.registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"kind": "ProgressError"}) == 1
