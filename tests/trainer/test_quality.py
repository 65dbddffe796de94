"""A run that goes wrong is seen while it runs, and only an adapter that passes its gate is published.

Real trainer processes on the tiny model against a real S3 endpoint: a NaN run's final loss is on /metrics for
Prometheus (and the KubetuneLossNotFinite expression, evaluated by promtool, has data from it), a learning rate
that blows the loss up stops the run with reason Diverged, and the evaluation gate keeps or publishes the adapter.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.s3 import MotoS3Server
from tests.support.storage import make_store
from tests.trainer.conftest import RUN_UID, TrainerRun, finish, run_trainer, start_trainer, trainer_config, trainer_env, write_config

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "kubetune" / "files" / "prometheus" / "kubetune-alerts.yaml"
METRICS_WAIT_SECONDS = 240
"""How long the NaN run may take to load and reach its first logged step on a busy machine."""


def alert_expression(name: str) -> str:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    return str(next(rule["expr"] for rule in rules if rule.get("alert") == name)).strip()


def loss_samples(body: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == "kubetune_trainer_loss"
    ]


def scrape_until_loss(port: int, process: subprocess.Popen[str]) -> list[tuple[dict[str, str], float]]:
    """Read /metrics until a loss sample appears; fails if the trainer exits or stays silent first."""
    deadline = time.monotonic() + METRICS_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except (urllib.error.URLError, OSError):
            body = ""
        samples = loss_samples(body)
        if samples:
            return samples
        if process.poll() is not None:
            pytest.fail(f"the trainer exited ({process.returncode}) without a kubetune_trainer_loss series on /metrics")
        time.sleep(0.5)
    pytest.fail(f"no kubetune_trainer_loss series within {METRICS_WAIT_SECONDS}s")


def test_a_nan_run_leaves_its_loss_for_the_alert(nan_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    config = trainer_config(nan_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, training={"logEvery": 1})
    config["runtime"]["metricsLingerSeconds"] = 120
    process = start_trainer(write_config(config, tmp_path / "config.yaml"), trainer_env(s3_server))
    try:
        samples = scrape_until_loss(config["runtime"]["metricsPort"], process)
    finally:
        process.terminate()
        run = finish(process, Path(config["runtime"]["terminationMessagePath"]))
    assert run.termination is not None and run.termination["reason"] == "LossNotFinite", run.stderr[-2000:]
    ((labels, value),) = samples
    assert math.isnan(value) and labels["namespace"] == "team-a" and labels["finetunejob"] == "tiny"

    # The alert's own expression over the scraped series, evaluated by Prometheus' rule engine.
    series = "kubetune_trainer_loss{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    tests = {
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": "NaN NaN"}],
                "promql_expr_test": [
                    {"expr": f"count({alert_expression('KubetuneLossNotFinite')})", "eval_time": "1m", "exp_samples": [{"labels": "{}", "value": 1}]}
                ],
            }
        ],
    }
    path = tmp_path / "nan.test.yaml"
    path.write_text(yaml.safe_dump(tests), encoding="utf-8")
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: apt-get install -y prometheus"
    checked = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# On the tiny model this learning rate first lowers the loss, then drives it back up by 10-20% and keeps it there.
DIVERGING = {"maxSteps": 50, "learningRate": 0.3, "logEvery": 2, "warmupSteps": 40, "scheduler": "constant_with_warmup", "checkpointEvery": 4}
WATCH = {"factor": 1.1, "patience": 2, "smoothing": 0.0}


def test_a_learning_rate_that_blows_up_stops_the_run_as_diverged(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    training = {**DIVERGING, "divergence": WATCH}
    config = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, training=training)
    run = run_trainer(config, trainer_env(s3_server), tmp_path)
    losses = run.progress()
    assert run.returncode == 16, run.stderr[-3000:]
    termination = run.termination or {}
    assert termination["reason"] == "Diverged" and "spec.training.learningRate" in termination["message"]
    assert all(math.isfinite(loss) for loss in losses.values()), losses
    stopped = max(losses)
    assert stopped < 50 and losses[stopped] > 1.1 * min(losses.values()), losses
    # The last good checkpoint is kept, and none was taken of the diverged state.
    checkpoint = termination["lastCheckpoint"]
    assert checkpoint["step"] < stopped and checkpoint["step"] % 4 == 0
    assert [e for e in run.events if e.get("msg") == "loss diverged"]


def test_continue_only_warns_about_divergence(tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    training = {**DIVERGING, "divergence": {**WATCH, "onDivergence": "Continue"}}
    config = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, training=training)
    run = run_trainer(config, trainer_env(s3_server), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    warned = [e for e in run.events if e.get("msg") == "loss diverged"]
    assert len(warned) == 1 and warned[0]["action"] == "Continue"
    assert max(run.progress()) == 50


def run_gated(
    tiny_model_dir: Path, data: Path, s3_server: MotoS3Server, bucket: str, tmp_path: Path, gate: dict[str, Any], exit_code: int
) -> tuple[TrainerRun, dict[str, Any]]:
    """Train with an eval split and ``gate``; the run (which must end with ``exit_code``) and its termination message."""
    eval_split = {"source": str(data), "maxSeqLength": 64, "eval": {"ratio": 0.25}}
    config = trainer_config(tiny_model_dir, data, bucket, s3_server.endpoint_url, tmp_path, dataset=eval_split, evaluation=gate)
    run = run_trainer(config, trainer_env(s3_server), tmp_path)
    assert run.returncode == exit_code, run.stderr[-3000:]
    return run, run.termination or {}


RUN = f"runs/team-a/tiny/runs/{RUN_UID}"


def test_an_adapter_that_beats_the_base_is_published_with_both_figures(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    run, termination = run_gated(tiny_model_dir, memorise_jsonl, s3_server, s3_bucket, tmp_path, {"minRelativeImprovement": 0.05}, 0)
    report = termination["evaluation"]
    assert report["gate"] == "Passed" and report["finalEvalLoss"] < report["baseEvalLoss"]
    assert report["basePerplexity"] == pytest.approx(math.exp(report["baseEvalLoss"]))
    base_events = [e for e in run.events if e.get("msg") == "base evaluation"]
    assert base_events and base_events[0]["eval_loss"] == report["baseEvalLoss"]
    store = make_store(s3_server, s3_bucket)
    manifest = json.loads(store.get_bytes(f"{RUN}/adapter/manifest.json") or b"{}")
    assert manifest["evaluation"]["baseEvalLoss"] == report["baseEvalLoss"] and manifest["evaluation"]["gate"] == "Passed"
    assert not store.list_keys(f"{RUN}/rejected/")
    # The trainer's log outlives the pod: uploaded next to the checkpoints, up to its last line.
    log = (store.get_bytes(f"{RUN}/logs/local.jsonl") or b"").decode()
    assert '"base evaluation"' in log and '"run succeeded"' in log


def test_an_adapter_that_fails_the_gate_is_kept_but_not_published(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    _, termination = run_gated(tiny_model_dir, memorise_jsonl, s3_server, s3_bucket, tmp_path, {"maxEvalLoss": 0.0001}, 17)
    report = termination["evaluation"]
    assert termination["reason"] == "EvaluationGateFailed" and report["gate"] == "Failed"
    final = report["finalEvalLoss"]
    assert f"{final:.4f}" in termination["message"] and "maxEvalLoss 0.0001" in termination["message"]
    assert report["baseEvalLoss"] > final
    store = make_store(s3_server, s3_bucket)
    assert report["rejectedUri"] == f"s3://{s3_bucket}/{RUN}/rejected/"
    rejected = json.loads(store.get_bytes(f"{RUN}/rejected/manifest.json") or b"{}")
    assert rejected["kind"] == "RejectedAdapterManifest" and rejected["evaluation"]["gate"] == "Failed"
    assert not store.list_keys(f"{RUN}/adapter/")
