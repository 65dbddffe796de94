"""Adapter publication against a real S3 endpoint: manifest last, verification, re-publication, outages."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.layout import MANIFEST
from kubetune_trainer.storage.errors import StorageError, StorageUnavailableError
from kubetune_trainer.storage.paths import sha256_file
from kubetune_trainer.storage.publish import publish_adapter, publish_merged, read_manifest, verify_publication
from kubetune_trainer.storage.settings import RetryPolicy, StoreSettings
from tests.support import s3 as s3_support
from tests.support.s3 import MotoS3Server
from tests.support.storage import RUN_UID, CountingObserver, attempt_on, make_store

# The shared S3 endpoint fixtures, visible to this module's tests.
s3_server = s3_support.s3_server
s3_bucket = s3_support.s3_bucket

RUN_PREFIX = "runs/team-a/demo"
MIB = 1024 * 1024
EXTRA = {
    "baseModel": {"source": "s3://models/tiny-llama/", "revision": None},
    "dataset": {"source": "s3://data/train.jsonl"},
    "training": {"maxSteps": 20, "learningRate": 0.0002},
    "metrics": {"finalLoss": 1.25, "steps": 20},
}


def write_adapter(folder: Path, weights_bytes: int = 200_000, seed: int = 0) -> Path:
    """A folder shaped like peft's save_pretrained output plus tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(random.Random(seed).randbytes(weights_bytes))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "seed": seed}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


@pytest.mark.unit
def test_publish_writes_files_and_a_complete_manifest(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    local = write_adapter(tmp_path / "adapter")

    result = publish_adapter(store, local, attempt_on(store, RUN_PREFIX), EXTRA)

    assert result.uri == f"s3://{s3_bucket}/{RUN_PREFIX}/adapter/"
    expected = {p.name: (sha256_file(p), p.stat().st_size) for p in local.iterdir()}
    assert {f.path: (f.sha256, f.size) for f in result.files} == expected
    assert result.size_bytes == sum(size for _, size in expected.values())
    stored = store.get_bytes(f"{RUN_PREFIX}/adapter/{MANIFEST}")
    assert stored is not None and hashlib.sha256(stored).hexdigest() == result.manifest_sha256

    manifest = read_manifest(store, result.uri)
    assert manifest is not None
    assert manifest["schemaVersion"] == 1 and manifest["kind"] == "AdapterManifest"
    assert datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert {f["path"]: (f["sha256"], f["size"]) for f in manifest["files"]} == expected
    for key, value in EXTRA.items():
        assert manifest[key] == value
    # Who wrote it: the run (FinetuneJob UID) and the attempt (pod UID) that held the run then.
    assert (manifest["runUid"], manifest["attempt"], manifest["pod"]) == (RUN_UID, "attempt-a", "pod-attempt-a")
    assert verify_publication(store, result.uri)
    assert verify_publication(store, result.uri, deep=True)


@pytest.mark.unit
def test_verify_rejects_changed_or_missing_files(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    uri = publish_adapter(store, write_adapter(tmp_path / "adapter"), attempt_on(store, RUN_PREFIX), EXTRA).uri
    weights_key = f"{RUN_PREFIX}/adapter/adapter_model.safetensors"

    # Same size, different bytes: only the checksum can tell.
    store.client.put_object(Bucket=s3_bucket, Key=weights_key, Body=b"\0" * 200_000)
    assert not verify_publication(store, uri)
    assert not verify_publication(store, uri, deep=True)

    publish_adapter(store, tmp_path / "adapter", attempt_on(store, RUN_PREFIX), EXTRA)
    assert verify_publication(store, uri)
    store.delete_keys([f"{RUN_PREFIX}/adapter/tokenizer.json"])
    assert not verify_publication(store, uri)
    assert not verify_publication(store, f"s3://{s3_bucket}/{RUN_PREFIX}/nothing-here/")


@pytest.mark.unit
def test_republishing_replaces_the_publication(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    first = write_adapter(tmp_path / "first", seed=1)
    (first / "extra-notes.txt").write_text("from the first attempt")
    publish_adapter(store, first, attempt_on(store, RUN_PREFIX), EXTRA)

    second = write_adapter(tmp_path / "second", seed=2)
    result = publish_adapter(store, second, attempt_on(store, RUN_PREFIX), {**EXTRA, "metrics": {"finalLoss": 0.5}})

    assert verify_publication(store, result.uri)
    keys = store.list_keys(f"{RUN_PREFIX}/adapter/")
    assert f"{RUN_PREFIX}/adapter/extra-notes.txt" not in keys, "a file of the earlier publication survived"
    manifest = read_manifest(store, result.uri)
    assert manifest is not None and manifest["metrics"] == {"finalLoss": 0.5}
    assert store.get_json(f"{RUN_PREFIX}/adapter/adapter_config.json") == {"r": 8, "lora_alpha": 16, "seed": 2}


@pytest.mark.unit
def test_interrupted_publish_is_incomplete_until_published_again(s3_server: MotoS3Server, tmp_path: Path) -> None:
    """The endpoint goes away just before the manifest is written; the files alone must not count."""
    bucket = s3_server.create_bucket()
    fast = StoreSettings(retry=RetryPolicy(max_total_seconds=1.0, initial_delay_seconds=0.05, max_delay_seconds=0.2), connect_timeout_seconds=1)
    store = make_store(s3_server, bucket, settings=fast)
    local = write_adapter(tmp_path / "adapter")

    def cut_before_manifest(request: Any, **_: Any) -> None:
        if request.url.endswith(MANIFEST):
            s3_server.stop()

    store.client.meta.events.register("before-send.s3.PutObject", cut_before_manifest)
    try:
        with pytest.raises(StorageUnavailableError):
            publish_adapter(store, local, attempt_on(store, RUN_PREFIX), EXTRA)
    finally:
        store.client.meta.events.unregister("before-send.s3.PutObject", cut_before_manifest)
        s3_server.start()

    uri = f"s3://{bucket}/{RUN_PREFIX}/adapter/"
    assert f"{RUN_PREFIX}/adapter/adapter_model.safetensors" in store.list_keys(f"{RUN_PREFIX}/adapter/")
    assert read_manifest(store, uri) is None
    assert not verify_publication(store, uri)

    observer = CountingObserver()
    again = make_store(s3_server, bucket, observer=observer)
    result = publish_adapter(again, local, attempt_on(again, RUN_PREFIX, claim=False), EXTRA)
    assert verify_publication(again, result.uri)
    manifest_size = len(again.get_bytes(f"{RUN_PREFIX}/adapter/{MANIFEST}") or b"")
    assert observer.bytes["upload"] == manifest_size, "files already uploaded intact were sent again"


@pytest.mark.unit
def test_merged_model_is_published_beside_the_adapter(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"w" * 5000)
    result = publish_merged(store, merged, attempt_on(store, RUN_PREFIX), EXTRA)
    assert result.uri == f"s3://{s3_bucket}/{RUN_PREFIX}/merged/"
    manifest = read_manifest(store, result.uri)
    assert manifest is not None and manifest["kind"] == "MergedModelManifest"
    assert verify_publication(store, result.uri)


@pytest.mark.unit
def test_publish_refuses_empty_folders_and_reserved_manifest_keys(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="nothing to publish"):
        publish_adapter(store, tmp_path / "empty", attempt_on(store, RUN_PREFIX), EXTRA)
    with pytest.raises(ValueError, match="files"):
        publish_adapter(store, write_adapter(tmp_path / "adapter"), attempt_on(store, RUN_PREFIX), {"files": []})


@pytest.mark.unit
def test_upload_survives_an_outage_in_the_middle(tmp_path: Path) -> None:
    """The endpoint drops every connection during a multipart upload and comes back 4 s later.

    botocore's own quick retries cannot span 4 s, so the store's backoff loop must carry the
    upload through; the publication ends complete and verified.
    """
    outage_seconds = 4.0
    with MotoS3Server() as server:
        bucket = server.create_bucket()
        observer = CountingObserver()
        settings = StoreSettings(multipart_threshold_bytes=5 * MIB, multipart_chunk_bytes=5 * MIB, max_concurrency=1, connect_timeout_seconds=1)
        store = make_store(server, bucket, settings=settings, observer=observer)
        local = write_adapter(tmp_path / "adapter", weights_bytes=16 * MIB)
        parts_sent = 0
        outage: list[threading.Timer] = []

        def drop_mid_upload(**_: Any) -> None:
            nonlocal parts_sent
            parts_sent += 1
            if parts_sent == 2 and not outage:
                server.stop()
                restart = threading.Timer(outage_seconds, server.start)
                restart.start()
                outage.append(restart)

        store.client.meta.events.register("before-send.s3.UploadPart", drop_mid_upload)
        began = time.monotonic()
        try:
            result = publish_adapter(store, local, attempt_on(store, RUN_PREFIX), EXTRA)
        finally:
            # A failed publish must not leave the restart pending past the server's shutdown.
            for restart in outage:
                restart.cancel()
                restart.join()
        elapsed = time.monotonic() - began

        assert outage, "the outage never started"
        assert elapsed >= outage_seconds
        assert observer.retries >= 1
        assert verify_publication(store, result.uri, deep=True)
        copy = tmp_path / "copy.safetensors"
        store.download_file(f"{RUN_PREFIX}/adapter/adapter_model.safetensors", copy)
        assert copy.read_bytes() == (local / "adapter_model.safetensors").read_bytes()


@pytest.mark.unit
def test_an_outage_begun_by_the_first_adapter_upload_is_ridden_out(tmp_path: Path) -> None:
    """The endpoint goes down at the first request of the publication itself, for 3 s; the store retries through it."""
    outage_seconds = 3.0
    with MotoS3Server() as server:
        bucket = server.create_bucket()
        observer = CountingObserver()
        store = make_store(server, bucket, settings=StoreSettings(connect_timeout_seconds=1), observer=observer)
        attempt = attempt_on(store, RUN_PREFIX)
        began = server.outage_on(rb"^PUT /[^ ]*/adapter/", outage_seconds)
        assert not began.is_set() and observer.retries == 0  # the attempt's own writes did not match
        started = time.monotonic()
        result = publish_adapter(store, write_adapter(tmp_path / "adapter"), attempt, EXTRA)
        assert began.is_set(), "the outage never started"
        assert time.monotonic() - started >= outage_seconds
        assert observer.retries >= 1
        assert verify_publication(store, result.uri, deep=True)
