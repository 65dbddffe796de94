"""The kube-apiserver restarted in the middle of a run: the trainer keeps training, the operator keeps watching,
and the status catches up once the API is back."""

from __future__ import annotations

import pytest

from tests.e2e.support.local_stack import KubetuneStack
from tests.e2e.support.stack import Stack
from tests.e2e.test_finetunejobs import LONG_RUN, progress_of, running_trainer_pods, trainer_jobs, trainer_pods, wait_for_checkpoint

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

RUN_STEPS = 1200
"""Long enough that the run is still going when the component is back (400 steps take under a minute here)."""
DOWN_SECONDS = 15.0
"""Long enough for the operator's watches and the status lane to fail their requests, short of any timeout."""


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_a_control_plane_restart_in_the_middle_of_a_run_loses_nothing(stack: Stack, component: str) -> None:
    assert isinstance(stack, KubetuneStack)
    name = f"{component.removeprefix('kube-')}-restart"
    body = stack.example("tiny-cpu-lora.yaml", training={**LONG_RUN["training"], "maxSteps": RUN_STEPS})
    body["metadata"]["name"] = name
    stack.apply(body)
    wait_for_checkpoint(stack, name)
    (trainer,) = running_trainer_pods(stack, name)
    (job,) = trainer_jobs(stack, name)
    step = int(progress_of(stack, name)["step"])
    stack.restart_control_plane(component, DOWN_SECONDS)
    # The trainer trained through the outage: the status, once the operator writes again, is past where it was.
    stack.wait_for(lambda: int(progress_of(stack, name).get("step", 0)) > step, 180, f"progress after the {component} restart", interval=0.5)
    status = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    assert status["attempts"] == 1 and "resumedFromStep" not in status["result"], status
    assert [p["metadata"]["uid"] for p in trainer_pods(stack, name)] == [trainer["metadata"]["uid"]]
    assert [j["metadata"]["uid"] for j in trainer_jobs(stack, name)] == [job["metadata"]["uid"]]
    assert status["progress"]["step"] == RUN_STEPS
