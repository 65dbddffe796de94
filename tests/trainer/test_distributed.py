"""Data parallel on CPU: two gloo processes in one pod, started by the trainer's elastic launcher."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.s3 import MotoS3Server, free_port
from tests.trainer.conftest import run_trainer, trainer_config, trainer_env

pytestmark = pytest.mark.trainer


def test_two_processes_train_one_adapter(tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    config = trainer_config(
        tiny_model_dir,
        memorise_jsonl,
        s3_bucket,
        s3_server.endpoint_url,
        tmp_path,
        training={"maxSteps": 10, "checkpointEvery": 5, "logEvery": 5},
        runtime={**trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path)["runtime"], "jobName": "ddp"},
    )
    env = trainer_env(s3_server, NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    run = run_trainer(config, env, tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]

    started = [e for e in run.events if e.get("msg") == "training started"]
    assert sorted(e["rank"] for e in started) == [0, 1]
    assert all(e["world_size"] == 2 for e in started)
    # Only rank 0 reports progress; the loss is the mean over both ranks.
    assert {e["rank"] for e in run.events if e.get("msg") == "progress"} == {0}
    assert run.termination is not None and run.termination["status"] == "Succeeded" and run.termination["result"]["steps"] == 10

    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/team-a/ddp/")["Contents"]}
    # Every rank's RNG state is in the checkpoint, so a resumed run continues both ranks' streams.
    assert {"runs/team-a/ddp/checkpoints/step-10/rng-rank0.pt", "runs/team-a/ddp/checkpoints/step-10/rng-rank1.pt"} <= keys
    assert "runs/team-a/ddp/adapter/manifest.json" in keys
