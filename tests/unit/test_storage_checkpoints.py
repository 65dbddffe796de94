"""Checkpoints in S3 (storage.checkpoints) against a real endpoint: markers, resume points, fallback, retention."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

import pytest

from kubetune_api.layout import CHECKPOINT_MARKER, step_files_prefix, step_prefix
from kubetune_api.result import CheckpointRef
from kubetune_trainer.storage.checkpoints import (
    complete_checkpoints,
    delete_all,
    download_checkpoint,
    prune,
    read_marker,
    resume_point,
    upload_checkpoint,
)
from kubetune_trainer.storage.errors import CheckpointDamaged
from kubetune_trainer.storage.fencing import Attempt
from kubetune_trainer.storage.paths import sha256_file
from kubetune_trainer.storage.store import S3Store
from tests.support import s3 as s3_support
from tests.support.s3 import MotoS3Server
from tests.support.storage import RUN_UID, attempt_on, json_object, make_store

# The shared S3 endpoint fixtures, visible to this module's tests.
s3_server = s3_support.s3_server
s3_bucket = s3_support.s3_bucket

RUN_PREFIX = "runs/team-a/demo/runs/" + RUN_UID


def write_checkpoint(folder: Path, step: int) -> Path:
    """A folder shaped like the trainer's local checkpoint: adapter weights, optimizer state, trainer state."""
    rng = random.Random(step)
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(rng.randbytes(20_000))
    (folder / "optimizer.pt").write_bytes(rng.randbytes(40_000))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def upload_step(attempt: Attempt, tmp_path: Path, step: int) -> str:
    return upload_checkpoint(attempt.store, write_checkpoint(tmp_path / f"local-{step}", step), attempt, step, {"loss": 1.0 / step})


def files_of(store: S3Store, step: int, token: str = "attempt-a") -> str:
    return step_files_prefix(RUN_PREFIX, step, token)


def accept(directory: Path) -> None:
    """A resume-time check that finds every file loadable."""


def resume(store: S3Store, tmp_path: Path, check: object = accept) -> tuple[int | None, list[int]]:
    point = resume_point(store, RUN_PREFIX, RUN_UID, lambda step: tmp_path / "resume" / f"step-{step}", check)  # type: ignore[arg-type]
    return (point.checkpoint.step if point.checkpoint else None), [skipped.step for skipped in point.skipped]


@pytest.mark.unit
def test_upload_writes_the_attempts_files_then_a_marker_naming_run_and_attempt(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    uri = upload_step(attempt_on(store, RUN_PREFIX), tmp_path, 10)
    assert uri == f"s3://{s3_bucket}/{RUN_PREFIX}/checkpoints/step-10/"
    marker = store.get_json(step_prefix(RUN_PREFIX, 10) + CHECKPOINT_MARKER)
    assert isinstance(marker, dict)
    assert marker["step"] == 10 and marker["meta"] == {"loss": 0.1}
    assert (marker["runUid"], marker["attempt"]) == (RUN_UID, "attempt-a")
    assert datetime.fromisoformat(marker["created"]).tzinfo is not None
    local = tmp_path / "local-10"
    assert {f["path"]: (f["sha256"], f["size"]) for f in marker["files"]} == {
        p.relative_to(local).as_posix(): (sha256_file(p), p.stat().st_size) for p in local.rglob("*") if p.is_file()
    }
    # Every file lies in the attempt's own folder, which no other attempt writes.
    assert all(key.startswith(files_of(store, 10)) for key in store.list_keys(step_prefix(RUN_PREFIX, 10)) if not key.endswith(CHECKPOINT_MARKER))
    assert complete_checkpoints(store, RUN_PREFIX, RUN_UID) == [CheckpointRef(step=10, uri=uri)]


@pytest.mark.unit
def test_resume_skips_unfinished_checkpoints_and_orders_steps_numerically(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    attempt = attempt_on(store, RUN_PREFIX)
    assert resume(store, tmp_path) == (None, [])
    upload_step(attempt, tmp_path, 5)
    upload_step(attempt, tmp_path, 20)
    # step-30: files uploaded, killed before its checkpoint.json: incomplete, not damaged.
    store.upload_dir(write_checkpoint(tmp_path / "local-30", 30), files_of(store, 30))
    # A stray folder that is not a step.
    store.put_json(f"{RUN_PREFIX}/checkpoints/notes/readme.json", {})
    # Numeric order: step-20 is newer than step-5 although "step-5" sorts after "step-20".
    assert resume(store, tmp_path) == (20, [])
    assert [ref.step for ref in complete_checkpoints(store, RUN_PREFIX, RUN_UID)] == [20, 5]


@pytest.mark.unit
@pytest.mark.parametrize("damage", ["bad-marker-json", "missing-file", "sha-mismatch", "does-not-load", "another-runs-marker"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_sound_one(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path, damage: str) -> None:
    store = make_store(s3_server, s3_bucket)
    attempt = attempt_on(store, RUN_PREFIX)
    upload_step(attempt, tmp_path, 10)
    upload_step(attempt, tmp_path, 20)
    marker_key = step_prefix(RUN_PREFIX, 20) + CHECKPOINT_MARKER
    optimizer_key = files_of(store, 20) + "optimizer.pt"

    def refuse_step_20(directory: Path) -> None:
        if directory.name == "step-20":
            raise CheckpointDamaged(f"checkpoint file {directory}/optimizer.pt cannot be loaded safely")

    check = refuse_step_20 if damage == "does-not-load" else accept
    if damage == "bad-marker-json":
        store.put_bytes(marker_key, b'{"step": 20, "files": [')
    elif damage == "missing-file":
        store.delete_keys([optimizer_key])
    elif damage == "sha-mismatch":
        store.put_bytes(optimizer_key, random.Random(99).randbytes(40_000))  # same size, other bytes
    elif damage == "another-runs-marker":
        store.put_json(marker_key, {**json_object(store, marker_key), "runUid": "an-earlier-namesake"})

    point = resume_point(store, RUN_PREFIX, RUN_UID, lambda step: tmp_path / "resume" / f"step-{step}", check)
    assert point.checkpoint is not None and point.checkpoint.step == 10
    assert [(s.step, s.uri) for s in point.skipped] == [(20, f"s3://{s3_bucket}/{step_prefix(RUN_PREFIX, 20)}")]
    assert point.skipped[0].reason
    assert json.loads((tmp_path / "resume" / "step-10" / "trainer_state.json").read_text()) == {"step": 10}


@pytest.mark.unit
def test_download_keeps_matching_local_files_and_replaces_others(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    upload_step(attempt_on(store, RUN_PREFIX), tmp_path, 7)
    marker = read_marker(store, RUN_PREFIX, 7, RUN_UID)
    assert marker is not None
    target = download_checkpoint(store, marker, tmp_path / "restored")
    source = tmp_path / "local-7"
    for path in source.rglob("*"):
        if path.is_file():
            assert (target / path.relative_to(source)).read_bytes() == path.read_bytes()
    # A local file that differs from the marker is replaced, not trusted.
    (target / "optimizer.pt").write_bytes(b"garbage")
    download_checkpoint(store, marker, target)
    assert (target / "optimizer.pt").read_bytes() == (source / "optimizer.pt").read_bytes()


@pytest.mark.unit
def test_a_marker_listing_a_path_outside_its_folder_is_damaged(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    upload_step(attempt_on(store, RUN_PREFIX), tmp_path, 3)
    marker_key = step_prefix(RUN_PREFIX, 3) + CHECKPOINT_MARKER
    marker = json_object(store, marker_key)
    escaping = "../../../../escaped.txt"
    store.put_bytes(files_of(store, 3) + escaping, b"x" * 5)
    marker["files"].append({"path": escaping, "sha256": "0" * 64, "size": 5})
    store.put_json(marker_key, marker)
    with pytest.raises(CheckpointDamaged, match="escaped.txt"):
        read_marker(store, RUN_PREFIX, 3, RUN_UID)
    assert resume(store, tmp_path / "deep" / "er") == (None, [3])
    assert not list(tmp_path.rglob("escaped.txt"))


@pytest.mark.unit
def test_another_attempt_saving_the_same_step_replaces_the_marker_and_its_files(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    """A stale attempt's step-10 (or a damaged one passed over) is replaced whole: the marker never vouches for a mix."""
    store = make_store(s3_server, s3_bucket)
    upload_step(attempt_on(store, RUN_PREFIX, "attempt-a"), tmp_path, 10)
    newer = attempt_on(store, RUN_PREFIX, "attempt-b")
    changed = write_checkpoint(tmp_path / "again", 10)
    (changed / "trainer_state.json").write_text(json.dumps({"step": 10, "attempt": 2}))
    upload_checkpoint(store, changed, newer, 10, {"loss": 0.5})
    marker = read_marker(store, RUN_PREFIX, 10, RUN_UID)
    assert marker is not None and marker.attempt == "attempt-b"
    assert store.list_keys(files_of(store, 10, "attempt-a")) == [], "the replaced marker's files were left behind"
    restored = download_checkpoint(store, marker, tmp_path / "out")
    assert json.loads((restored / "trainer_state.json").read_text()) == {"step": 10, "attempt": 2}


@pytest.mark.unit
def test_prune_keeps_the_newest_complete_checkpoints(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    attempt = attempt_on(store, RUN_PREFIX)
    for step in (10, 20, 30):
        upload_step(attempt, tmp_path, step)
    store.upload_dir(write_checkpoint(tmp_path / "local-15", 15), files_of(store, 15))
    store.upload_dir(write_checkpoint(tmp_path / "local-40", 40), files_of(store, 40))

    assert prune(store, attempt, keep_last=2) == [10, 15]
    assert [ref.step for ref in complete_checkpoints(store, RUN_PREFIX, RUN_UID)] == [30, 20]
    assert store.list_keys(step_prefix(RUN_PREFIX, 10)) == []
    # step-40 may still be uploading: it stays.
    assert store.list_keys(step_prefix(RUN_PREFIX, 40))
    assert prune(store, attempt, keep_last=5) == []
    with pytest.raises(ValueError, match="keep_last"):
        prune(store, attempt, keep_last=0)
    assert delete_all(store, attempt) == [20, 30, 40]
    assert store.list_keys(RUN_PREFIX + "/checkpoints/") == []
