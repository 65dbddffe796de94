"""The preparation phase end to end: a CPU Job before any GPU is requested, its report in status.preparation.

The preparation pods run for real on the CPU node (the node agent runs the trainer in prepare mode); on the
local cluster kwok's GPU nodes run nothing, so a GPU job's trainer pod completes there at once.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.e2e.support.stack import DEMO_BUCKET, Stack
from tests.e2e.test_finetunejobs import condition, trainer_jobs, trainer_pods

pytestmark = pytest.mark.e2e

PREPARE_TIMEOUT = 420
"""Seconds a preparation may take on a busy two-core machine (torch and the tokenizer load in the pod)."""


def job_names(stack: Stack, name: str) -> set[str]:
    return {job["metadata"]["name"] for job in trainer_jobs(stack, name)}


def failed_before_training(stack: Stack, name: str, reason: str) -> tuple[dict[str, Any], str]:
    """The status and Failed message of a FinetuneJob that must fail in its preparation, with no trainer Job made."""
    status = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=PREPARE_TIMEOUT)["status"]
    assert status["phase"] == "Failed", status
    failed = condition(status, "Failed")
    assert failed is not None and failed["reason"] == reason, status
    assert job_names(stack, name) == {f"{name}-prepare"}
    return status, str(failed["message"])


def test_a_gpu_job_prepares_on_the_cpu_node_then_trains_on_a_gpu_node(stack: Stack) -> None:
    if not stack.local:
        pytest.skip("needs the local cluster's fake GPU nodes")
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": 1, "cpu": None, "memory": None}, training={"autoFit": True})
    body["metadata"]["name"] = "prepared-gpu"
    stack.apply(body)
    status = stack.wait_for_phase("prepared-gpu", {"Succeeded", "Failed"}, timeout=PREPARE_TIMEOUT)["status"]
    assert status["phase"] == "Succeeded", status
    pods = {p["metadata"]["name"]: p for p in trainer_pods(stack, "prepared-gpu")}
    prepare = next(p for name, p in pods.items() if name.startswith("prepared-gpu-prepare-"))
    trainer = next(p for name, p in pods.items() if name.startswith("prepared-gpu-trainer-"))
    assert not prepare["spec"]["nodeName"].startswith("gpu-node")
    assert "nvidia.com/gpu" not in prepare["spec"]["containers"][0].get("resources", {}).get("limits", {})
    assert trainer["spec"]["nodeName"].startswith("gpu-node")
    preparation: dict[str, Any] = status["preparation"]
    assert preparation["data"]["trainRecords"] > 0 and preparation["data"]["tokens"] > 0
    assert preparation["fit"]["fits"] is True and preparation["fit"]["gpuMemorySource"] in ("nodeLabel", "default")
    assert preparation["cacheUri"].startswith(f"s3://{DEMO_BUCKET}/")
    prepared = condition(status, "Prepared")
    assert prepared is not None and prepared["status"] == "True"
    shown = stack.kubectl("get", "ftj", "prepared-gpu", "-n", stack.settings.jobs_namespace, "-o", "yaml").stdout
    assert "preparation:" in shown and "packingEfficiency" in shown


def test_a_bad_dataset_line_fails_in_preparing_and_no_trainer_job_is_made(stack: Stack) -> None:
    assert stack.s3 is not None
    stack.s3.client().put_object(Bucket=DEMO_BUCKET, Key="datasets/bad.jsonl", Body=b'{"text": "one"}\n{"text": "two"}\n{"txt": "three"}\n')
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": 1, "cpu": None, "memory": None}, dataset={"source": f"s3://{DEMO_BUCKET}/datasets/bad.jsonl"})
    body["metadata"]["name"] = "bad-line"
    stack.apply(body)
    _, message = failed_before_training(stack, "bad-line", "DataError")
    assert f"s3://{DEMO_BUCKET}/datasets/bad.jsonl line 3 has no field 'text'; fields present: txt" in message


def test_an_auto_fit_job_that_cannot_fit_ends_does_not_fit(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", resources={"gpus": 1, "cpu": None, "memory": None, "gpuMemory": "256Mi"}, training={"autoFit": True})
    body["metadata"]["name"] = "does-not-fit"
    stack.apply(body)
    status, message = failed_before_training(stack, "does-not-fit", "DoesNotFit")
    assert "Estimate per GPU:" in message and "What would fit:" in message
    assert status["preparation"]["fit"]["fits"] is False


def test_a_cpu_job_with_the_separate_phase_trains_from_the_prepared_data(stack: Stack) -> None:
    body = stack.example("tiny-cpu-lora.yaml", preparation={"mode": "Job"})
    body["metadata"]["name"] = "cpu-prepared"
    stack.apply(body)
    status = stack.wait_for_phase("cpu-prepared", {"Succeeded", "Failed"}, timeout=PREPARE_TIMEOUT + 300)["status"]
    assert status["phase"] == "Succeeded", status
    assert job_names(stack, "cpu-prepared") == {"cpu-prepared-prepare", "cpu-prepared-trainer"}
    assert status["result"]["tokenizedInTrainer"] is False
    assert status["preparation"]["data"]["trainRecords"] > 0 and "fit" not in status["preparation"]
