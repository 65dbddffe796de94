"""Data parallel on CPU: two single-process pods of one 2-node job, meeting at the rendezvous as real pods do."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import MotoS3Server, free_port
from tests.trainer.conftest import TrainerRun, finish, run_prefix, start_trainer, trainer_config, trainer_env, write_config

pytestmark = pytest.mark.trainer


PEER_HOSTS = ["127.0.0.1", "127.0.0.2"]
"""Each pod's address (KUBETUNE_POD_IP below), standing in for its stable DNS name: the rendezvous orders ranks by these,
so the pod of completion index 0 holds rank 0 whichever pod joins first."""


def pod_ip(index: int) -> str:
    return f"127.0.0.{index + 1}"


def run_pods(config: dict[str, Any], server: MotoS3Server, tmp_path: Path, nodes: int) -> list[TrainerRun]:
    """Start one trainer per pod, each with its own scratch folder, completion index and address, and wait for all."""
    pods = []
    for index in range(nodes):
        pod = tmp_path / f"pod-{index}"
        pod.mkdir()
        own = copy.deepcopy(config)
        own["runtime"] = {**own["runtime"], "workDir": str(pod / "work"), "terminationMessagePath": str(pod / "termination-log")}
        env = trainer_env(server, JOB_COMPLETION_INDEX=str(index), KUBETUNE_POD_IP=pod_ip(index), KUBETUNE_POD_NAME=f"ddp-trainer-{index}")
        pods.append((start_trainer(write_config(own, pod / "config.yaml"), env), pod / "termination-log"))
    # Each pod's output is drained on its own thread: a full pipe would stall that pod and the collective with it.
    with ThreadPoolExecutor(max_workers=nodes) as pool:
        return list(pool.map(lambda pod: finish(*pod), pods))


def test_two_processes_train_one_adapter(tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    runtime = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path)["runtime"]
    config = trainer_config(
        tiny_model_dir,
        memorise_jsonl,
        s3_bucket,
        s3_server.endpoint_url,
        tmp_path,
        training={"maxSteps": 10, "checkpointEvery": 5, "logEvery": 5},
        output={"bucket": s3_bucket, "prefix": "runs", "endpointUrl": s3_server.endpoint_url, "region": "us-east-1", "keepCheckpointsAfterSuccess": True},
        runtime={**runtime, "jobName": "ddp", "nodes": 2, "rendezvousHost": "127.0.0.1", "rendezvousPort": free_port(), "peerHosts": PEER_HOSTS},
    )
    pods = run_pods(config, s3_server, tmp_path, nodes=2)
    for pod in pods:
        assert pod.returncode == 0, pod.stderr[-4000:]
    # The job as a whole: every pod's log, and the result of the pod that holds rank 0.
    run = TrainerRun(pods[0].returncode, "".join(p.stderr for p in pods), pods[0].termination, [e for p in pods for e in p.events])

    started = [e for e in run.events if e.get("msg") == "training started"]
    assert sorted(e["rank"] for e in started) == [0, 1]
    assert all(e["world_size"] == 2 for e in started)
    # Only rank 0 reports progress; the loss is the mean over both ranks.
    assert {e["rank"] for e in run.events if e.get("msg") == "progress"} == {0}
    assert run.termination is not None and run.termination["status"] == "Succeeded" and run.termination["result"]["steps"] == 10

    client = s3_server.client()
    prefix = run_prefix(config)
    keys = {o["Key"].removeprefix(prefix + "/") for o in client.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "/")["Contents"]}
    # Every rank's RNG state is in the checkpoint (in the folder of the attempt that wrote it), so a resumed run continues both ranks' streams.
    step_10 = {key.split("/", 3)[-1] for key in keys if key.startswith("checkpoints/step-10/") and key.count("/") == 3}
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= step_10
    assert "adapter/manifest.json" in keys
