"""Nothing lost, nothing mixed up: ``python -m kubetune_trainer`` against a real S3 endpoint (moto) and the tiny model.

A namesake (the same FinetuneJob name, a new metadata.uid) trains from the start in a folder of its own; two
attempts of one run (a paused pod that wakes up after its replacement took over) never both write; a damaged
newest checkpoint is passed over for the one before it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from kubetune_api import layout
from kubetune_trainer.storage.publish import read_manifest, verify_publication
from tests.support.s3 import MotoS3Server, free_port
from tests.support.storage import json_object, make_store
from tests.trainer.conftest import collect, run_prefix, run_trainer, start_trainer, trainer_config, trainer_env, write_config

pytestmark = [
    pytest.mark.trainer,
    # peft still calls the gradient-checkpointing names transformers 5 deprecates.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def config_for(model: Path, data: Path, bucket: str, server: MotoS3Server, tmp: Path, job: str, uid: str, **training: Any) -> dict[str, Any]:
    base = trainer_config(model, data, bucket, server.endpoint_url, tmp)
    return trainer_config(
        model,
        data,
        bucket,
        server.endpoint_url,
        tmp,
        training={**base["training"], "maxSteps": 20, "checkpointEvery": 10, **training},
        runtime={**base["runtime"], "jobName": job, "runUid": uid},
    )


def fresh_pod(config: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The same run in a new pod: empty scratch directory, its own termination message and metrics port."""
    tmp.mkdir(parents=True, exist_ok=True)
    pod = {"workDir": str(tmp / "work"), "terminationMessagePath": str(tmp / "termination-log"), "metricsPort": free_port()}
    return {**config, "runtime": {**config["runtime"], **pod}}


def events(stderr: str, msg: str) -> list[dict[str, Any]]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{") and f'"{msg}"' in line:
            found.append(json.loads(line))
    return [e for e in found if e.get("msg") == msg]


def test_a_namesake_trains_from_the_start_and_leaves_the_earlier_adapter_alone(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Delete a FinetuneJob and create it again with a lower learning rate: the new run must not resume the old
    run's checkpoint (whose optimizer state would keep the old rate), nor withdraw or overwrite its adapter."""
    store = make_store(s3_server, s3_bucket)
    first = config_for(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path / "first", "namesake", "uid-first", learningRate=0.003)
    first["output"]["keepCheckpointsAfterSuccess"] = True  # the earlier run's checkpoints stay, as tempting as can be
    earlier = run_trainer(first, trainer_env(s3_server), tmp_path)
    assert earlier.returncode == 0, earlier.stderr[-4000:]
    assert earlier.termination is not None
    old = earlier.termination["result"]
    assert [e["step"] for e in events(earlier.stderr, "checkpoint uploaded")] == [10, 20]

    second = config_for(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path / "second", "namesake", "uid-second", learningRate=0.001, maxSteps=40)
    later = run_trainer(second, trainer_env(s3_server), tmp_path)
    assert later.returncode == 0, later.stderr[-4000:]
    assert later.termination is not None
    new = later.termination["result"]
    assert "resumedFromStep" not in new and not events(later.stderr, "resumed from checkpoint")
    assert new["steps"] == 40 and new["adapterUri"] != old["adapterUri"]
    manifest = read_manifest(store, new["adapterUri"])
    assert manifest is not None and manifest["training"]["learningRate"] == 0.001 and manifest["runUid"] == "uid-second"
    # The earlier run's adapter is where its status said, byte for byte.
    assert verify_publication(store, old["adapterUri"], deep=True)
    old_manifest = store.get_bytes(layout.join_key(layout.adapter_prefix(run_prefix(first)), layout.MANIFEST))
    assert old_manifest is not None and hashlib.sha256(old_manifest).hexdigest() == old["manifestSha256"]
    assert json_object(store, layout.latest_key("runs/team-a/namesake"))["runUid"] == "uid-second"


def _process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (the trainer runs under its output-redacting launcher)."""
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            queue += [int(child) for child in task.read_text().split()]
    return tree


def _signal_pod(pid: int, sig: signal.Signals) -> None:
    """What a frozen node does to a pod: every one of its processes gets ``sig``, not only the first."""
    for each in _process_tree(pid):
        os.kill(each, sig)


def test_two_attempts_on_one_run_the_stale_one_is_refused(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Attempt A (a pod on a lost node) is paused after its first checkpoint; its replacement B takes the run over,
    resumes and publishes; A wakes up, trains on and tries to checkpoint: refused, it writes nothing more."""
    config = config_for(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "two-writers", "uid-two-writers", maxSteps=30)
    stale_config = fresh_pod(config, tmp_path / "a")
    stale = start_trainer(write_config(stale_config, tmp_path / "a" / "config.yaml"), trainer_env(s3_server, KUBETUNE_POD_UID="pod-uid-a"))
    watchdog = threading.Timer(300, stale.kill)
    watchdog.daemon = True
    watchdog.start()
    assert stale.stderr is not None
    lines: list[str] = []
    try:
        for line in stale.stderr:
            lines.append(line)
            if '"checkpoint uploaded"' in line:
                break
        assert any('"checkpoint uploaded"' in line for line in lines), "".join(lines)[-4000:]
        _signal_pod(stale.pid, signal.SIGSTOP)

        survivor = run_trainer(fresh_pod(config, tmp_path / "b"), trainer_env(s3_server, KUBETUNE_POD_UID="pod-uid-b"), tmp_path / "b")
        assert survivor.returncode == 0, survivor.stderr[-4000:]
        assert survivor.termination is not None
        assert survivor.termination["result"]["resumedFromStep"] == 10
        store = make_store(s3_server, s3_bucket)
        manifest_key = layout.join_key(layout.adapter_prefix(run_prefix(config)), layout.MANIFEST)
        published = store.get_bytes(manifest_key)
    finally:
        _signal_pod(stale.pid, signal.SIGCONT)
    _, rest = stale.communicate(timeout=240)
    watchdog.cancel()
    run = collect(stale.returncode, "".join(lines) + rest, Path(stale_config["runtime"]["terminationMessagePath"]))
    assert run.returncode == 1, run.stderr[-4000:]
    assert run.termination is not None and run.termination["status"] == "Failed"
    assert "Another attempt" in run.termination["message"] and "pod-uid-b" in run.termination["message"]
    assert not events(run.stderr, "adapter published")

    # What the survivor published stands, deep-verified, and names it.
    adapter_uri = store.uri(layout.adapter_prefix(run_prefix(config)) + "/")
    assert store.get_bytes(manifest_key) == published
    assert verify_publication(store, adapter_uri, deep=True)
    manifest = read_manifest(store, adapter_uri)
    assert manifest is not None and manifest["attempt"] == "pod-uid-b"
    assert store.list_keys(layout.checkpoints_prefix(run_prefix(config))) == [], "the stale attempt wrote a checkpoint after the run succeeded"


def test_a_damaged_newest_checkpoint_is_passed_over_for_the_one_before(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """step-20's optimizer state does not load (its marker vouches for the bytes, so only loading tells): the next
    attempt warns, resumes from step-10 and succeeds, and the result names the checkpoint it passed over."""
    config = config_for(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server, tmp_path, "damaged", "uid-damaged", maxSteps=40)
    first = start_trainer(write_config(fresh_pod(config, tmp_path / "a"), tmp_path / "a" / "config.yaml"), trainer_env(s3_server))
    watchdog = threading.Timer(300, first.kill)
    watchdog.daemon = True
    watchdog.start()
    assert first.stderr is not None
    lines: list[str] = []
    for line in first.stderr:
        lines.append(line)
        if '"checkpoint uploaded"' in line and '"step": 20' in line:
            break
    first.kill()
    first.communicate()
    watchdog.cancel()
    assert any('"step": 20' in line and "checkpoint uploaded" in line for line in lines), "".join(lines)[-4000:]

    store = make_store(s3_server, s3_bucket)
    marker_key = layout.step_prefix(run_prefix(config), 20) + layout.CHECKPOINT_MARKER
    marker = json_object(store, marker_key)
    entry = next(item for item in marker["files"] if item["path"] == "optimizer.pt")
    garbage = b"not a torch file" * 64
    store.put_bytes(layout.step_files_prefix(run_prefix(config), 20, marker["attempt"]) + "optimizer.pt", garbage)
    entry.update(sha256=hashlib.sha256(garbage).hexdigest(), size=len(garbage))
    store.put_json(marker_key, marker)

    resumed = run_trainer(fresh_pod(config, tmp_path / "b"), trainer_env(s3_server), tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    passed_over = events(resumed.stderr, "damaged checkpoint passed over")
    assert [(e["step"], e["level"]) for e in passed_over] == [(20, "warning")] and "optimizer.pt" in passed_over[0]["reason"]
    assert events(resumed.stderr, "resumed from checkpoint")[0]["step"] == 10
    assert resumed.termination is not None
    result = resumed.termination["result"]
    assert result["resumedFromStep"] == 10 and result["steps"] == 40
    assert [(s["step"], s["uri"]) for s in result["skippedCheckpoints"]] == [(20, store.uri(layout.step_prefix(run_prefix(config), 20)))]
