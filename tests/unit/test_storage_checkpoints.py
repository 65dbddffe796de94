"""Checkpoints in S3 (storage.checkpoints) against a real endpoint: completion markers, newest complete step, download, pruning."""

from __future__ import annotations

import json
import random
from datetime import datetime
from pathlib import Path

import pytest

from kubetune_api.layout import CHECKPOINT_MARKER, step_prefix
from kubetune_api.result import CheckpointRef
from kubetune_trainer.storage.checkpoints import complete_checkpoints, download_checkpoint, newest_complete, prune, upload_checkpoint
from kubetune_trainer.storage.errors import StorageError
from kubetune_trainer.storage.paths import sha256_file
from kubetune_trainer.storage.store import S3Store
from tests.support import s3 as s3_support
from tests.support.s3 import MotoS3Server
from tests.support.storage import make_store

# The shared S3 endpoint fixtures, visible to this module's tests.
s3_server = s3_support.s3_server
s3_bucket = s3_support.s3_bucket

RUN_PREFIX = "runs/team-a/demo"


def write_checkpoint(folder: Path, step: int) -> Path:
    """A folder shaped like the trainer's local checkpoint: adapter weights, optimizer state, trainer state."""
    rng = random.Random(step)
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(rng.randbytes(20_000))
    (folder / "optimizer.pt").write_bytes(rng.randbytes(40_000))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def upload_step(store: S3Store, tmp_path: Path, step: int) -> str:
    return upload_checkpoint(store, write_checkpoint(tmp_path / f"local-{step}", step), RUN_PREFIX, step, {"loss": 1.0 / step})


@pytest.mark.unit
def test_upload_writes_files_then_a_marker(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    uri = upload_step(store, tmp_path, 10)
    assert uri == f"s3://{s3_bucket}/{RUN_PREFIX}/checkpoints/step-10/"
    marker = store.get_json(step_prefix(RUN_PREFIX, 10) + CHECKPOINT_MARKER)
    assert isinstance(marker, dict)
    assert marker["step"] == 10 and marker["meta"] == {"loss": 0.1}
    assert datetime.fromisoformat(marker["created"]).tzinfo is not None
    local = tmp_path / "local-10"
    assert {f["path"]: (f["sha256"], f["size"]) for f in marker["files"]} == {
        p.relative_to(local).as_posix(): (sha256_file(p), p.stat().st_size) for p in local.rglob("*") if p.is_file()
    }
    assert newest_complete(store, RUN_PREFIX) == CheckpointRef(step=10, uri=uri)


@pytest.mark.unit
def test_newest_complete_skips_unfinished_checkpoints(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    assert newest_complete(store, RUN_PREFIX) is None
    upload_step(store, tmp_path, 5)
    uri_20 = upload_step(store, tmp_path, 20)

    # step-30: files uploaded, killed before its checkpoint.json.
    store.upload_dir(write_checkpoint(tmp_path / "local-30", 30), step_prefix(RUN_PREFIX, 30))
    # step-40: marker present but one of its files is gone.
    upload_step(store, tmp_path, 40)
    store.delete_keys([step_prefix(RUN_PREFIX, 40) + "optimizer.pt"])
    # A stray folder that is not a step.
    store.put_json(f"{RUN_PREFIX}/checkpoints/notes/readme.json", {})

    # Numeric order: step-20 is newer than step-5 although "step-5" sorts after "step-20".
    assert newest_complete(store, RUN_PREFIX) == CheckpointRef(step=20, uri=uri_20)
    assert [ref.step for ref in complete_checkpoints(store, RUN_PREFIX)] == [20, 5]


@pytest.mark.unit
def test_download_restores_the_checkpoint(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    uri = upload_step(store, tmp_path, 7)
    target = tmp_path / "restored"
    restored = download_checkpoint(store, uri, target)
    assert restored.step == 7 and restored.path == target
    source = tmp_path / "local-7"
    for path in source.rglob("*"):
        if path.is_file():
            assert (target / path.relative_to(source)).read_bytes() == path.read_bytes()

    # A local file that differs from the marker is replaced, not trusted.
    (target / "optimizer.pt").write_bytes(b"garbage")
    download_checkpoint(store, uri, target)
    assert (target / "optimizer.pt").read_bytes() == (source / "optimizer.pt").read_bytes()


@pytest.mark.unit
def test_download_refuses_an_incomplete_checkpoint(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    store.upload_dir(write_checkpoint(tmp_path / "local", 3), step_prefix(RUN_PREFIX, 3))
    with pytest.raises(StorageError, match="not a complete checkpoint"):
        download_checkpoint(store, f"s3://{s3_bucket}/{step_prefix(RUN_PREFIX, 3)}", tmp_path / "out")


@pytest.mark.unit
def test_reuploading_a_step_replaces_it(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    upload_step(store, tmp_path, 10)
    changed = write_checkpoint(tmp_path / "again", 10)
    (changed / "trainer_state.json").write_text(json.dumps({"step": 10, "attempt": 2}))
    uri = upload_checkpoint(store, changed, RUN_PREFIX, 10, {"loss": 0.5})
    download_checkpoint(store, uri, tmp_path / "out")
    marker = store.get_json(step_prefix(RUN_PREFIX, 10) + CHECKPOINT_MARKER)
    assert marker is not None and marker["meta"] == {"loss": 0.5}
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text()) == {"step": 10, "attempt": 2}


@pytest.mark.unit
def test_prune_keeps_the_newest_complete_checkpoints(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    for step in (10, 20, 30):
        upload_step(store, tmp_path, step)
    store.upload_dir(write_checkpoint(tmp_path / "local-15", 15), step_prefix(RUN_PREFIX, 15))
    store.upload_dir(write_checkpoint(tmp_path / "local-40", 40), step_prefix(RUN_PREFIX, 40))

    assert prune(store, RUN_PREFIX, keep_last=2) == [10, 15]
    assert [ref.step for ref in complete_checkpoints(store, RUN_PREFIX)] == [30, 20]
    assert store.list_keys(step_prefix(RUN_PREFIX, 10)) == []
    # step-40 may still be uploading: it stays.
    assert store.list_keys(step_prefix(RUN_PREFIX, 40))
    assert prune(store, RUN_PREFIX, keep_last=5) == []
    with pytest.raises(ValueError, match="keep_last"):
        prune(store, RUN_PREFIX, keep_last=0)
