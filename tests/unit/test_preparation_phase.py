"""The preparation phase in the pure parts: the prepare Job's manifest, the fitted trainer config, and the status."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kubetune_api.estimate import EstimateInput, ModelShape, estimate
from kubetune_api.fit import FitDecision, GpuMemorySource
from kubetune_api.result import PreparationReport, TerminationMessage
from kubetune_api.runtime import TrainerConfig
from kubetune_operator import manifests
from kubetune_operator.status import compute_status
from tests.support.reports import preparation_report
from tests.unit.test_manifests import SETTINGS, container, make, pod_spec
from tests.unit.test_status import cond, conditions_by_type, ftj, job, observe, pod, terminated

pytestmark = pytest.mark.unit

GI = 1024**3
SHAPE = ModelShape(4096, 32, 32, 8, 14336, 128256, 128)


def report(*, fits: bool = True, micro_batch: int = 2, accumulation: int = 8, checkpointing: bool = True) -> PreparationReport:
    breakdown = estimate(EstimateInput(SHAPE, micro_batch, 2048, checkpointing, quant_bits=4))
    return preparation_report(
        fit=FitDecision(
            fits=fits,
            gpu_memory_bytes=24 * GI,
            gpu_memory_source=GpuMemorySource.NODE_LABEL,
            usable_bytes=int(21.6 * GI),
            micro_batch=micro_batch,
            gradient_accumulation_steps=accumulation,
            gradient_checkpointing=checkpointing,
            estimate=breakdown,
            suggestions=[] if fits else ["method: qlora with quantization.bits 4 fits at micro-batch 2 (9.80Gi)"],
            message="micro-batch 2 x 8 fits" if fits else "even micro-batch 1 with gradient checkpointing needs 30.00Gi",
        ),
    )


def config_of(children: list[dict[str, Any]]) -> TrainerConfig:
    return TrainerConfig.model_validate(yaml.safe_load(children[0]["data"]["config.yaml"]))


def test_a_gpu_job_starts_with_a_cpu_only_preparation_job() -> None:
    children = manifests.build_children(make(resources={"gpus": 4}), SETTINGS, gpu_memory=(80 * GI, GpuMemorySource.SPEC))
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [("ConfigMap", "llama-config"), ("Job", "llama-prepare")]
    prepare = children[1]
    assert container(prepare)["args"] == ["prepare", "--config", "/etc/kubetune/config.yaml"]
    assert container(prepare)["resources"]["limits"] == {"cpu": SETTINGS.prepare_default_cpu, "memory": SETTINGS.prepare_default_memory}
    assert "tolerations" not in pod_spec(prepare)
    assert prepare["metadata"]["labels"][manifests.LABEL_COMPONENT] == manifests.COMPONENT_PREPARE
    runtime = config_of(children).runtime
    assert runtime.preparation.gpu_memory_bytes == 80 * GI and runtime.preparation.cache_uri is None


def test_the_preparation_pod_takes_its_own_resources() -> None:
    prepare = manifests.build_prepare_job(make(resources={"gpus": 1}, preparation={"cpu": "4", "memory": "16Gi"}), SETTINGS)
    assert container(prepare)["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}


def test_cpu_jobs_prepare_in_the_trainer_unless_told_otherwise() -> None:
    assert [c["metadata"]["name"] for c in manifests.build_children(make(resources={"gpus": 0}), SETTINGS)] == ["llama-config", "llama-trainer"]
    forced = make(resources={"gpus": 0}, preparation={"mode": "Job"})
    assert [c["metadata"]["name"] for c in manifests.build_children(forced, SETTINGS)] == ["llama-config", "llama-prepare"]
    in_trainer = make(resources={"gpus": 1}, preparation={"mode": "InTrainer"})
    assert [c["metadata"]["name"] for c in manifests.build_children(in_trainer, SETTINGS)] == ["llama-config", "llama-trainer"]


def test_after_preparation_the_trainer_runs_the_fitted_settings_on_the_prepared_data() -> None:
    spec = make(resources={"gpus": 1}, training={"maxSteps": 100, "autoFit": True, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 4})
    children = manifests.build_children(spec, SETTINGS, report(micro_batch=2, accumulation=8), gpu_memory=(24 * GI, GpuMemorySource.NODE_LABEL))
    assert [c["metadata"]["name"] for c in children] == ["llama-config", "llama-trainer"]
    config = config_of(children)
    assert (config.training.per_device_batch_size, config.training.gradient_accumulation_steps, config.training.gradient_checkpointing) == (2, 8, True)
    assert config.runtime.preparation.cache_uri == report().cache_uri
    # Without autoFit the spec's own settings stay.
    plain = config_of(manifests.build_children(make(resources={"gpus": 1}), SETTINGS, report(micro_batch=2, accumulation=8)))
    assert plain.training.per_device_batch_size == 4 and plain.runtime.preparation.cache_uri == report().cache_uri


def prepare_job(*conditions: dict[str, Any]) -> dict[str, Any]:
    found = job(list(conditions))
    found["metadata"]["name"] = "llama-prepare"
    return found


def finished_pod(message: TerminationMessage, code: int = 0) -> dict[str, Any]:
    phase = "Succeeded" if code == 0 else "Failed"
    return pod(phase, state=terminated(code, json.loads(message.encode())), node="cpu-node", name="llama-prepare-x1")


def test_a_running_preparation_shows_phase_preparing() -> None:
    status = compute_status(ftj(), observe(prepare_job=prepare_job(), prepare_pods=[pod("Running", state={"running": {}}, node="cpu-node")]))
    assert status["phase"] == "Preparing" and "before any GPU is requested" in status["message"]
    assert conditions_by_type(status)["Prepared"]["status"] == "False"


def test_a_bad_record_fails_in_preparing_with_the_line() -> None:
    failure = TerminationMessage.failed(11, "data.jsonl line 17: field 'response' is missing (null), expected a string; fix or remove that record", None)  # type: ignore[arg-type]
    status = compute_status(ftj(), observe(prepare_job=prepare_job(cond("Failed", "PodFailurePolicy")), prepare_pods=[finished_pod(failure, 11)]))
    assert status["phase"] == "Failed"
    failed = conditions_by_type(status)["Failed"]
    assert failed["reason"] == "DataError" and "data.jsonl line 17" in failed["message"]
    assert "jobName" not in status


def test_a_finished_preparation_fills_status_preparation() -> None:
    done = TerminationMessage.succeeded(None, None).model_copy(update={"preparation": report()})
    status = compute_status(ftj(), observe(prepare_job=prepare_job(cond("Complete", "")), prepare_pods=[finished_pod(done)]))
    assert status["phase"] == "Preparing" and "creating the trainer Job" in status["message"]
    assert status["preparation"]["data"]["trainRecords"] == 1000 and status["preparation"]["fit"]["microBatch"] == 2
    assert conditions_by_type(status)["Prepared"]["reason"] == "DataPrepared"
    # Once the trainer Job exists and the preparation pod is gone, the report stays.
    later = compute_status(ftj(status=status), observe(job=job(), pods=[]))
    assert later["preparation"] == status["preparation"]


def test_an_auto_fit_that_cannot_fit_fails_does_not_fit_with_the_breakdown() -> None:
    done = TerminationMessage.succeeded(None, None).model_copy(update={"preparation": report(fits=False, micro_batch=1)})
    spec = {"training": {"maxSteps": 10, "autoFit": True}}
    status = compute_status(ftj(**spec), observe(prepare_job=prepare_job(cond("Complete", "")), prepare_pods=[finished_pod(done)]))
    assert status["phase"] == "Failed"
    failed = conditions_by_type(status)["Failed"]
    assert failed["reason"] == "DoesNotFit"
    assert "Estimate per GPU:" in failed["message"] and "total" in failed["message"] and "method: qlora" in failed["message"]


def test_preparing_and_the_prepared_data_are_events() -> None:
    from kubetune_operator.events import transition_events

    pending = compute_status(ftj(), observe())
    preparing = compute_status(ftj(), observe(prepare_job=prepare_job(), prepare_pods=[]))
    assert [e.reason for e in transition_events(pending, preparing)] == ["Preparing"]
    done = TerminationMessage.succeeded(None, None).model_copy(update={"preparation": report()})
    prepared = compute_status(ftj(), observe(prepare_job=prepare_job(cond("Complete", "")), prepare_pods=[finished_pod(done)]))
    events = transition_events(preparing, prepared)
    assert [(e.type, e.reason) for e in events] == [("Normal", "DataPrepared")] and "1000 records" in events[0].message
