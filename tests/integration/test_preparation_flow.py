"""The preparation phase through the reconciler and a real apiserver: the prepare Job first, the trainer Job after its report."""

from __future__ import annotations

import json

import pytest
import yaml
from kubernetes import client

from kubetune_api.result import TerminationMessage
from kubetune_api.runtime import TrainerConfig
from kubetune_operator import manifests, podspec
from tests.integration.harness import NAMESPACE, NOW, Harness, decoded
from tests.support.reports import data_report, preparation_report

pytestmark = pytest.mark.integration

REPORT = preparation_report(data=data_report(train_records=16), cache_uri="s3://adapters/runs/team-a/prep/prepared/abc.npz", cache_key="abc")


def finish_preparation(harness: Harness, name: str, message: TerminationMessage) -> None:
    """What the Job controller and the kubelet report when the preparation pod ended with ``message``."""
    job = harness.read("Job", manifests.prepare_job_name(name))
    assert job is not None
    owner = {"apiVersion": "batch/v1", "kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{job['metadata']['name']}-0", "labels": manifests.child_labels(name), "ownerReferences": [owner]},
        "spec": {"containers": [{"name": podspec.CONTAINER_NAME, "image": "localhost/kubetune-trainer:test"}], "automountServiceAccountToken": False},
    }
    created = decoded(harness.core.create_namespaced_pod(NAMESPACE, client.V1Pod.model_validate(pod), _preload_content=False))
    code = message.exit_code
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message.encode().decode(), "startedAt": NOW, "finishedAt": NOW}
    container = {"name": podspec.CONTAINER_NAME, "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": terminated}}
    status = {"phase": "Succeeded" if code == 0 else "Failed", "containerStatuses": [container]}
    harness.core.patch_namespaced_pod_status(created["metadata"]["name"], NAMESPACE, {"status": status}, _content_type="application/merge-patch+json")
    kinds = ("SuccessCriteriaMet", "Complete") if code == 0 else ("FailureTarget", "Failed")
    conditions = [{"type": kind, "status": "True", "lastTransitionTime": NOW, "lastProbeTime": NOW, "reason": "PodFailurePolicy"} for kind in kinds]
    job_status = {"startTime": NOW, "conditions": conditions, **({"completionTime": NOW, "succeeded": 1} if code == 0 else {"failed": 1})}
    harness.batch.patch_namespaced_job_status(job["metadata"]["name"], NAMESPACE, {"status": job_status}, _content_type="application/merge-patch+json")


def test_the_trainer_job_follows_the_preparation_with_its_data(harness: Harness) -> None:
    harness.created("prep", resources={"gpus": 1})
    assert harness.read("Job", "prep-prepare") is not None and harness.job("prep") is None
    harness.job_changed("prep")
    assert harness.status("prep")["phase"] == "Preparing"
    finish_preparation(harness, "prep", TerminationMessage.succeeded(None, None).model_copy(update={"preparation": REPORT}))
    harness.job_changed("prep")
    assert harness.job("prep") is not None, "the trainer Job was not created after the preparation"
    config_map = harness.read("ConfigMap", "prep-config")
    assert config_map is not None
    config = TrainerConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert config.runtime.preparation.cache_uri == REPORT.cache_uri
    harness.job_changed("prep")
    status = harness.status("prep")
    assert status["preparation"]["data"]["trainRecords"] == 16 and status["jobName"] == "prep-trainer"


def test_bad_data_fails_the_job_in_preparing_without_a_trainer_job(harness: Harness) -> None:
    harness.created("bad-data", resources={"gpus": 1})
    failure = TerminationMessage.failed(11, "s3://data/train.jsonl line 3: field 'text' is missing (null), expected a string", None)  # type: ignore[arg-type]
    finish_preparation(harness, "bad-data", failure)
    harness.job_changed("bad-data")
    status = harness.status("bad-data")
    assert status["phase"] == "Failed" and "line 3" in status["message"]
    assert harness.job("bad-data") is None
    assert json.dumps(status).count("DataError") >= 1


def test_the_ttl_removes_the_preparation_job_with_the_trainer_job(harness: Harness) -> None:
    harness.created("prep-ttl", resources={"gpus": 1}, ttlSecondsAfterFinished=0)
    finish_preparation(harness, "prep-ttl", TerminationMessage.succeeded(None, None).model_copy(update={"preparation": REPORT}))
    harness.job_changed("prep-ttl")
    assert harness.job("prep-ttl") is not None
    harness.complete_job("prep-ttl")
    harness.job_changed("prep-ttl")
    status = harness.status("prep-ttl")
    assert status["phase"] == "Succeeded" and status["preparation"]["data"]["trainRecords"] == 16
    assert harness.job("prep-ttl") is None and harness.read("Job", "prep-ttl-prepare") is None
    assert harness.writes("delete", "job") == 2


def test_the_ttl_removes_a_failed_preparation_job(harness: Harness) -> None:
    harness.created("prep-failed-ttl", resources={"gpus": 1}, ttlSecondsAfterFinished=0)
    failure = TerminationMessage.failed(11, "s3://data/train.jsonl line 3: field 'text' is missing (null), expected a string", None)  # type: ignore[arg-type]
    finish_preparation(harness, "prep-failed-ttl", failure)
    harness.job_changed("prep-failed-ttl")
    assert harness.status("prep-failed-ttl")["phase"] == "Failed" and harness.status("prep-failed-ttl")["completionTime"]
    assert harness.read("Job", "prep-failed-ttl-prepare") is None and harness.writes("delete", "job") == 1
    harness.job_changed("prep-failed-ttl")
    assert harness.read("Job", "prep-failed-ttl-prepare") is None and harness.job("prep-failed-ttl") is None, "the run was prepared again"
