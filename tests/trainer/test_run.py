"""``python -m kubetune_trainer`` end to end against a real S3 endpoint (moto) and a real tiny model.

One uninterrupted run (module fixture) is the reference: it publishes the adapter, serves
/metrics while it trains, and gives the loss curve that killed-and-resumed runs must reproduce.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.store import S3Store
from tests.support.s3 import DUMMY_SECRET_ACCESS_KEY, MotoS3Server
from tests.trainer.conftest import RUN_UID, TrainerRun, collect, run_prefix, run_trainer, start_trainer, trainer_config, trainer_env, write_config

pytestmark = [
    pytest.mark.trainer,
    # peft still calls the gradient-checkpointing names transformers 5 deprecates.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

HF_TOKEN = "hf_kubetune_test_token_value"
STEPS = 40


@dataclass
class Reference:
    run: TrainerRun
    config: dict[str, Any]
    bucket: str
    scrapes: list[str]


def resumable_config(model: Path, data: Path, bucket: str, endpoint: str, tmp: Path, job: str, **training: Any) -> dict[str, Any]:
    # Dropout on, so an incorrectly restored RNG state would show in the resumed loss curve.
    return trainer_config(
        model,
        data,
        bucket,
        endpoint,
        tmp,
        lora={"r": 8, "alpha": 16, "dropout": 0.1},
        dataset={"source": str(data), "maxSeqLength": 64, "eval": {"ratio": 0.25}},
        training={"maxSteps": STEPS, "checkpointEvery": 10, "logEvery": 5, "evalEvery": 20, **training},
        runtime={**trainer_config(model, data, bucket, endpoint, tmp)["runtime"], "jobName": job},
    )


def store_for(server: MotoS3Server, bucket: str) -> S3Store:
    return S3Store.from_output(
        OutputSpec(bucket=bucket, endpoint_url=server.endpoint_url, region="us-east-1"), environment=TrainerEnvironment.model_validate(server.env())
    )


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reference]:
    tmp = tmp_path_factory.mktemp("reference")
    bucket = s3_server.create_bucket()
    config = resumable_config(tiny_model_dir, memorise_jsonl, bucket, s3_server.endpoint_url, tmp, "reference")
    config["output"]["mergedModel"] = True
    scrapes: list[str] = []
    done = threading.Event()
    url = f"http://127.0.0.1:{config['runtime']['metricsPort']}/metrics"

    def scrape() -> None:
        while not done.wait(0.2):
            try:
                scrapes.append(urllib.request.urlopen(url, timeout=2).read().decode())
            except OSError:
                continue

    # An earlier attempt of this run was killed in the middle of a multipart upload: its parts must not linger.
    stale = s3_server.client().create_multipart_upload(Bucket=bucket, Key=run_prefix(config) + "/checkpoints/step-10/killed/optimizer.pt")
    assert stale["UploadId"]
    poller = threading.Thread(target=scrape, daemon=True)
    poller.start()
    try:
        run = run_trainer(config, trainer_env(s3_server, HF_TOKEN=HF_TOKEN), tmp)
    finally:
        done.set()
        poller.join()
    yield Reference(run, config, bucket, scrapes)


def test_run_publishes_adapter_with_manifest_and_result(reference: Reference, s3_server: MotoS3Server, tmp_path: Path) -> None:
    from kubetune_trainer.storage.publish import read_manifest, verify_publication

    run = reference.run
    assert run.returncode == 0, run.stderr[-4000:]
    prefix = f"s3://{reference.bucket}/runs/team-a/reference/runs/{RUN_UID}"
    message = run.termination
    assert message is not None
    assert message["status"] == "Succeeded" and message["reason"] == "Succeeded"
    result = message["result"]
    assert result["adapterUri"] == f"{prefix}/adapter/"
    assert result["steps"] == STEPS and result["tokens"] > 0 and result["sizeBytes"] > 0
    # The checkpoints went once the adapter was published (spec.output.keepCheckpointsAfterSuccess is false).
    assert "lastCheckpoint" not in message
    assert result["peakMemoryBytes"] > 0 and result["durationSeconds"] > 0
    assert "resumedFromStep" not in result  # trained from the start

    store = store_for(s3_server, reference.bucket)
    assert verify_publication(store, result["adapterUri"], deep=True)
    manifest = read_manifest(store, result["adapterUri"])
    assert manifest is not None
    assert manifest["runUid"] == RUN_UID and manifest["attempt"]
    # The job's stable pointer names this run's adapter.
    latest = store.get_json("runs/team-a/reference/latest.json")
    assert latest is not None and (latest["runUid"], latest["adapterUri"], latest["manifestSha256"]) == (
        RUN_UID,
        result["adapterUri"],
        result["manifestSha256"],
    )
    listed = {f["path"] for f in manifest["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"} <= listed
    assert manifest["baseModel"]["source"] == reference.config["model"]["source"]
    assert manifest["metrics"]["steps"] == STEPS
    assert manifest["training"]["maxSteps"] == STEPS
    assert verify_publication(store, f"{prefix}/merged/", deep=True)

    # The published adapter loads onto the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    local = tmp_path / "adapter"
    store.download_prefix(f"runs/team-a/reference/runs/{RUN_UID}/adapter", local)
    base = AutoModelForCausalLM.from_pretrained(reference.config["model"]["source"])
    PeftModel.from_pretrained(base, local)


def test_only_the_newest_checkpoints_are_kept_and_stale_uploads_are_aborted(reference: Reference, s3_server: MotoS3Server) -> None:
    """spec.output.keepCheckpoints (2): each new checkpoint deletes those older than the two newest; the run's
    unfinished multipart uploads (a killed attempt's) are aborted when it starts; all go after publication."""
    uploaded = {e["step"]: e["deleted_steps"] for e in reference.run.events if e.get("msg") == "checkpoint uploaded"}
    assert uploaded == {10: [], 20: [], 30: [10], 40: [20]}
    taken_over = next(e for e in reference.run.events if e.get("msg") == "run taken over")
    assert taken_over["aborted_uploads"] == 1
    client = s3_server.client()
    prefix = run_prefix(reference.config) + "/"
    assert client.list_multipart_uploads(Bucket=reference.bucket, Prefix=prefix).get("Uploads", []) == []
    published = next(e for e in reference.run.events if e.get("msg") == "adapter published")
    assert published["deleted_checkpoints"] == [30, 40]
    assert client.list_objects_v2(Bucket=reference.bucket, Prefix=prefix + "checkpoints/").get("KeyCount") == 0


def test_a_repeated_attempt_of_a_published_run_reports_it_without_training(reference: Reference, s3_server: MotoS3Server, tmp_path: Path) -> None:
    """The trainer Job of a finished run is created again (its status was lost with it): nothing is trained or rewritten."""
    store = store_for(s3_server, reference.bucket)
    manifest_key = f"{run_prefix(reference.config)}/adapter/manifest.json"
    before = store.get_bytes(manifest_key)
    config = {**reference.config, "runtime": {**reference.config["runtime"], "workDir": str(tmp_path / "work"), "terminationMessagePath": str(tmp_path / "t")}}
    again = run_trainer(config, trainer_env(s3_server), tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not [e for e in again.events if e.get("msg") in ("training started", "progress", "checkpoint uploaded")]
    assert again.termination is not None and reference.run.termination is not None
    first, second = reference.run.termination["result"], again.termination["result"]
    assert (second["adapterUri"], second["manifestSha256"], second["steps"]) == (first["adapterUri"], first["manifestSha256"], first["steps"])
    assert store.get_bytes(manifest_key) == before


def test_progress_is_logged_as_json_and_loss_falls(reference: Reference) -> None:
    progress = reference.run.progress()
    assert sorted(progress) == list(range(5, STEPS + 1, 5))
    assert progress[STEPS] < progress[5] * 0.6, progress
    line = next(e for e in reference.run.events if e.get("msg") == "progress")
    assert {"time", "level", "step", "total_steps", "loss", "learning_rate", "tokens_per_second", "eta_seconds"} <= line.keys()
    # Library output (transformers, bitsandbytes, warnings) is JSON too: a log pipeline can parse every line.
    plain = [line for line in reference.run.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert not plain, plain[:5]


def test_evaluation_runs_every_eval_every_steps(reference: Reference) -> None:
    evaluations = {e["step"]: e["eval_loss"] for e in reference.run.events if e.get("msg") == "evaluation"}
    assert sorted(evaluations) == [20, 40]
    # Held-out sentences are not memorised, so only a finite, sensible value is expected.
    assert all(0 < loss < 50 for loss in evaluations.values()), evaluations
    message = reference.run.termination
    assert message is not None and message["status"] == "Succeeded"


def test_credentials_never_reach_logs_or_result(reference: Reference) -> None:
    text = reference.run.stderr + str(reference.run.termination)
    assert DUMMY_SECRET_ACCESS_KEY not in text
    assert HF_TOKEN not in text


def test_metrics_served_during_the_run_pass_promtool(reference: Reference) -> None:
    from tests.trainer.test_metrics import promtool_check

    assert reference.run.returncode == 0
    trained = [s for s in reference.scrapes if 'kubetune_trainer_step{finetunejob="reference",namespace="team-a",rank="0"} 0.0' not in s]
    assert trained, f"no scrape during training among {len(reference.scrapes)}"
    body = trained[-1]
    promtool_check(body)
    assert 'kubetune_trainer_info{base_model="' in body and 'method="lora"' in body
    assert 'kubetune_trainer_s3_bytes_total{direction="upload",finetunejob="reference",namespace="team-a",rank="0"}' in body


def _read_until(process: subprocess.Popen[str], predicate: Any, lines: list[str]) -> dict[str, Any] | None:
    """Read JSON log lines until one satisfies ``predicate``; None when the process ended first."""
    import json

    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if line.startswith("{"):
            event = json.loads(line)
            if predicate(event):
                return dict(event)
    return None


def _start_with_watchdog(config: dict[str, Any], env: dict[str, str], tmp: Path) -> subprocess.Popen[str]:
    process = start_trainer(write_config(config, tmp / "config.yaml"), env)
    # A hung trainer must not hang the tier.
    watchdog = threading.Timer(300, process.kill)
    watchdog.daemon = True
    watchdog.start()
    return process


def test_killed_run_resumes_from_its_checkpoint_with_the_same_loss_curve(
    reference: Reference, tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, tmp_path: Path
) -> None:
    env = trainer_env(s3_server)
    first_tmp, second_tmp = tmp_path / "first", tmp_path / "second"
    first_tmp.mkdir()
    second_tmp.mkdir()
    bucket = reference.bucket
    config = resumable_config(tiny_model_dir, memorise_jsonl, bucket, s3_server.endpoint_url, first_tmp, "resumed")
    process = _start_with_watchdog(config, env, first_tmp)
    lines: list[str] = []
    uploaded = _read_until(process, lambda e: e.get("msg") == "checkpoint uploaded" and e.get("step") == 10, lines)
    process.kill()
    process.wait()
    assert uploaded is not None, "".join(lines)[-4000:]
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    # A new pod: empty scratch directory, same S3 prefix.
    config["runtime"]["workDir"] = str(second_tmp / "work")
    config["runtime"]["terminationMessagePath"] = str(second_tmp / "termination-log")
    resumed = run_trainer(config, env, second_tmp)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    start = next(e for e in resumed.events if e.get("msg") == "resumed from checkpoint")
    assert start["step"] >= 10 and start["step"] % 10 == 0
    assert resumed.termination is not None and resumed.termination["result"]["steps"] == STEPS
    assert resumed.termination["result"]["resumedFromStep"] == start["step"]

    expected = reference.run.progress()
    after = {step: loss for step, loss in resumed.progress().items() if step > start["step"]}
    assert sorted(after) == [s for s in sorted(expected) if s > start["step"]]
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], rel=1e-3, abs=1e-4), (step, after, expected)
    assert resumed.termination["result"]["finalLoss"] == pytest.approx(reference.run.termination["result"]["finalLoss"], rel=1e-3)  # type: ignore[index]

    # The loss history published with the adapter spans both attempts.
    from kubetune_trainer.storage.publish import read_manifest

    manifest = read_manifest(store_for(s3_server, bucket), resumed.termination["result"]["adapterUri"])
    assert manifest is not None
    history = {int(step): loss for step, loss in manifest["metrics"]["lossHistory"]}
    assert sorted(history) == sorted(expected)
    shutil.rmtree(first_tmp, ignore_errors=True)


def test_sigterm_uploads_a_checkpoint_and_exits_interrupted(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    config = resumable_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, "stopped", maxSteps=2000, checkpointEvery=1000)
    process = _start_with_watchdog(config, trainer_env(s3_server), tmp_path)
    lines: list[str] = []
    seen = _read_until(process, lambda e: e.get("msg") == "progress", lines)
    assert seen is not None, "".join(lines)[-4000:]
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
    run = collect(process.returncode, "".join(lines) + rest, Path(config["runtime"]["terminationMessagePath"]))
    assert run.returncode == 3, run.stderr[-4000:]
    assert run.termination is not None
    assert run.termination["status"] == "Failed" and run.termination["reason"] == "Interrupted" and run.termination["exitCode"] == 3
    checkpoint = run.termination["lastCheckpoint"]
    assert checkpoint["step"] >= 5
    store = store_for(s3_server, s3_bucket)
    marker = store.get_json(f"{run_prefix(config)}/checkpoints/step-{checkpoint['step']}/checkpoint.json")
    assert marker is not None and marker["step"] == checkpoint["step"] and marker["runUid"] == RUN_UID
