"""An operator process that dies halfway through creating a FinetuneJob's children, and the process after it."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_operator import manifests
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration


class Killed(BaseException):
    """The operator process ends here (SIGKILL, OOM): nothing after this line of its runs, no handler catches it."""


def test_an_operator_killed_between_the_config_map_and_the_job_creates_the_job_on_restart(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies after its ConfigMap write and before its Job write (the kill is a raise in the kube module,
    there being no real process to kill in this tier); the next process adopts the ConfigMap and creates one Job."""
    created = harness.create_finetunejob("halfway")
    create = harness.reconciler.kube.create

    def dies_before_the_job(manifest: dict[str, Any]) -> bool:
        if manifest["kind"] == "Job":
            raise Killed
        return create(manifest)

    monkeypatch.setattr(harness.reconciler.kube, "create", dies_before_the_job)
    with pytest.raises(Killed):
        harness.ensure("halfway")
    left = harness.read("ConfigMap", manifests.config_map_name("halfway"))
    assert left is not None and harness.job("halfway") is None

    harness.restart()
    harness.ensure("halfway")
    harness.job_changed("halfway")
    jobs = harness.jobs("halfway")
    assert len(jobs) == 1, [job["metadata"]["name"] for job in jobs]
    job = jobs[0]
    assert job["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    config_map = harness.read("ConfigMap", manifests.config_map_name("halfway"))
    assert config_map is not None and config_map["metadata"]["uid"] == left["metadata"]["uid"], "the ConfigMap was replaced, not adopted"
    mounted = {volume["configMap"]["name"] for volume in job["spec"]["template"]["spec"]["volumes"] if "configMap" in volume}
    assert mounted == {config_map["metadata"]["name"]}
    assert harness.writes("create", "job") == 1
    status = harness.status("halfway")
    assert (status["phase"], status["jobName"]) == ("Pending", job["metadata"]["name"])
