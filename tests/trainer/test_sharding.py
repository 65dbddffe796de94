"""spec.training.sharding fsdp on CPU: two gloo processes (two single-process pods) train the tiny model sharded (FSDP2)."""

from __future__ import annotations

import copy
import json
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.s3 import MotoS3Server, free_port
from tests.trainer.conftest import TrainerRun, start_trainer, trainer_config, trainer_env, write_config
from tests.trainer.test_distributed import PEER_HOSTS, pod_ip, run_pods

pytestmark = pytest.mark.trainer

STEPS = 10


def two_pod_config(
    model: Path, data: Path, bucket: str, server: MotoS3Server, tmp_path: Path, name: str, sharding: str, method: str = "lora"
) -> dict[str, Any]:
    runtime = trainer_config(model, data, bucket, server.endpoint_url, tmp_path)["runtime"]
    extra: dict[str, Any] = {"quantization": {"bits": 4, "type": "nf4", "doubleQuant": True, "computeDtype": "float32"}} if method == "qlora" else {}
    return trainer_config(
        model,
        data,
        bucket,
        server.endpoint_url,
        tmp_path,
        method=method,
        training={"maxSteps": STEPS, "checkpointEvery": 5, "logEvery": 1, "sharding": sharding},
        runtime={**runtime, "jobName": name, "nodes": 2, "rendezvousHost": "127.0.0.1", "rendezvousPort": free_port(), "peerHosts": PEER_HOSTS},
        **extra,
    )


def losses(run: TrainerRun) -> dict[int, float]:
    return run.progress()


def trained(config: dict[str, Any], server: MotoS3Server, tmp_path: Path) -> TrainerRun:
    tmp_path.mkdir(parents=True)
    pods = run_pods(config, server, tmp_path, nodes=2)
    for pod in pods:
        assert pod.returncode == 0, pod.stderr[-4000:]
    return pods[0]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_sharded_training_follows_the_data_parallel_loss_curve(
    method: str, tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    plain = trained(two_pod_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "ddp", "none", method), s3_server, tmp_path / "ddp")
    sharded = trained(two_pod_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "fsdp", "fsdp", method), s3_server, tmp_path / "fsdp")

    expected, seen = losses(plain), losses(sharded)
    assert sorted(seen) == sorted(expected) == list(range(1, STEPS + 1))
    # The loss must move, or matching curves prove nothing.
    assert expected[STEPS] < expected[1] - 0.1, expected
    for step in expected:
        assert seen[step] == pytest.approx(expected[step], rel=2e-3, abs=1e-3), (step, seen, expected)
    assert sharded.termination is not None and sharded.termination["status"] == "Succeeded"
    assert sharded.termination["result"]["finalLoss"] == pytest.approx(plain.termination["result"]["finalLoss"], rel=2e-3)  # type: ignore[index]
    # The published adapter is a whole PEFT adapter, not one rank's shard: the plain run's tensors, names and shapes.
    ours, theirs = published_weights(sharded, s3_server), published_weights(plain, s3_server)
    assert sorted(ours) == sorted(theirs) and ours
    for key, tensor in theirs.items():
        assert ours[key].shape == tensor.shape, key
        assert torch.allclose(ours[key], tensor, rtol=2e-2, atol=1e-4), key


def published_weights(run: TrainerRun, server: MotoS3Server) -> dict[str, torch.Tensor]:
    assert run.termination is not None
    return weights_at(run.termination["result"]["adapterUri"], server)


def weights_at(uri: str, server: MotoS3Server) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    body = server.client().get_object(Bucket=bucket, Key=prefix + "adapter_model.safetensors")["Body"].read()
    return load(body)


def test_a_sharded_adapter_that_fails_the_gate_is_kept_whole(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    config = two_pod_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "fsdp-rejected", "fsdp")
    config["dataset"]["eval"] = {"source": str(memorise_jsonl)}
    config["evaluation"] = {"maxEvalLoss": 0.0001}
    tmp_path.joinpath("rejected").mkdir()
    pods = run_pods(config, s3_server, tmp_path / "rejected", nodes=2)
    termination = pods[0].termination
    assert termination is not None and termination["reason"] == "EvaluationGateFailed", pods[0].stderr[-4000:]
    kept = weights_at(termination["evaluation"]["rejectedUri"], s3_server)
    # Every adapter tensor at its full shape: r x in for lora_A, out x r for lora_B (a shard would have half the rows).
    r = config["lora"]["r"]
    assert kept and all(r in tensor.shape for tensor in kept.values()), {k: tuple(t.shape) for k, t in kept.items()}
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    q_proj = {k: tuple(t.shape) for k, t in kept.items() if "q_proj" in k}
    assert q_proj and all(shape == ((r, hidden) if "lora_A" in k else (hidden, r)) for k, shape in q_proj.items()), q_proj


def _read_until_checkpoint(process: Any, step: int, lines: list[str]) -> bool:
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line)
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("msg") == "checkpoint uploaded" and event.get("step") == step:
                return True
    return False


def test_a_killed_sharded_run_resumes_with_the_same_loss_curve(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    reference = trained(two_pod_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "whole", "fsdp"), s3_server, tmp_path / "whole")
    config = two_pod_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "killed", "fsdp")

    # First attempt: both pods killed once the step-5 checkpoint is in S3.
    first = tmp_path / "first"
    processes = []
    for index in range(2):
        pod = first / f"pod-{index}"
        pod.mkdir(parents=True)
        own = copy.deepcopy(config)
        own["runtime"] = {**own["runtime"], "workDir": str(pod / "work"), "terminationMessagePath": str(pod / "termination-log")}
        env = trainer_env(s3_server, JOB_COMPLETION_INDEX=str(index), KUBETUNE_POD_IP=pod_ip(index), KUBETUNE_POD_NAME=f"killed-trainer-{index}")
        processes.append(start_trainer(write_config(own, pod / "config.yaml"), env))

    def kill_all() -> None:
        for process in processes:
            process.kill()

    watchdog = threading.Timer(300, kill_all)
    watchdog.daemon = True
    watchdog.start()
    # The other pod's output is drained so a full pipe never stalls the collective.
    drain = threading.Thread(target=lambda: processes[1].communicate(), daemon=True)
    drain.start()
    lines: list[str] = []
    uploaded = _read_until_checkpoint(processes[0], 5, lines)
    for process in processes:
        process.send_signal(signal.SIGKILL)
        process.wait()
    watchdog.cancel()
    processes[0].communicate()
    drain.join(timeout=30)
    for process in processes:  # closed here, not whenever the collector runs (a ResourceWarning fails the test)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert uploaded, "".join(lines)[-4000:]
    assert processes[0].returncode == -signal.SIGKILL, "the run ended before it could be killed"

    # Second attempt: new pods with empty scratch folders, the same world size and run.
    resumed = trained(config, s3_server, tmp_path / "second")
    start = next(e for e in resumed.events if e.get("msg") == "resumed from checkpoint")
    assert start["step"] == 5
    assert resumed.termination is not None and resumed.termination["result"]["resumedFromStep"] == start["step"]
    expected = losses(reference)
    after = {step: loss for step, loss in losses(resumed).items() if step > start["step"]}
    assert sorted(after) == [s for s in sorted(expected) if s > start["step"]]
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], rel=1e-3, abs=1e-4), (step, after, expected)
