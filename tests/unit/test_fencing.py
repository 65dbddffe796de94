"""Two writers on one run, against a real S3 endpoint (moto 5.2.5, which honours If-None-Match and If-Match on
PutObject): conditional writes, the attempt lease, the latest pointer and the published-run lookup."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from kubetune_api import layout
from kubetune_api.result import PublishedRun
from kubetune_trainer.storage.checkpoints import complete_checkpoints, upload_checkpoint
from kubetune_trainer.storage.errors import PreconditionFailed
from kubetune_trainer.storage.fencing import Superseded
from kubetune_trainer.storage.publish import point_latest, publish_adapter, published_result, read_manifest, verify_publication
from tests.support import s3 as s3_support
from tests.support.s3 import MotoS3Server
from tests.support.storage import RUN_UID, attempt_on, json_object, make_store
from tests.unit.test_publish import EXTRA, write_adapter
from tests.unit.test_storage_checkpoints import write_checkpoint

pytestmark = pytest.mark.unit

s3_server = s3_support.s3_server
s3_bucket = s3_support.s3_bucket

JOB_PREFIX = "runs/team-a/demo"
RUN_PREFIX = layout.run_prefix("runs", "team-a", "demo", RUN_UID)


def test_conditional_writes_let_only_one_writer_win(s3_server: MotoS3Server, s3_bucket: str) -> None:
    store = make_store(s3_server, s3_bucket)
    store.put_json("k.json", {"writer": "a"}, create=True)
    with pytest.raises(PreconditionFailed):
        store.put_json("k.json", {"writer": "b"}, create=True)
    # A retried create whose first try landed holds these very bytes: that is not a conflict.
    store.put_json("k.json", {"writer": "a"}, create=True)
    found = store.get_versioned("k.json")
    assert found is not None
    store.put_json("k.json", {"writer": "a", "n": 2}, replacing=found[1])
    with pytest.raises(PreconditionFailed):
        store.put_json("k.json", {"writer": "b", "n": 2}, replacing=found[1])  # the version it read is gone
    with pytest.raises(PreconditionFailed):
        store.put_json("missing.json", {"writer": "b"}, replacing=found[1])
    assert store.get_json("k.json") == {"writer": "a", "n": 2}


def test_a_store_without_conditional_writes_is_still_written(s3_server: MotoS3Server, s3_bucket: str) -> None:
    """A test double stands in for an S3-compatible store that answers conditional PUTs with 501 NotImplemented
    (no such store runs here): the write goes through unconditionally and the attempt lease remains the fence."""
    store = make_store(s3_server, s3_bucket)

    def not_implemented(request: Any, **_: Any) -> AWSResponse | None:
        if "If-None-Match" not in request.headers and "If-Match" not in request.headers:
            return None
        body = b"<Error><Code>NotImplemented</Code><Message>conditional writes are not supported</Message></Error>"
        return AWSResponse(request.url, 501, {}, _Raw(body))

    store.client.meta.events.register("before-send.s3.PutObject", not_implemented)
    try:
        store.put_json("plain.json", {"n": 1}, create=True)
    finally:
        store.client.meta.events.unregister("before-send.s3.PutObject", not_implemented)
    assert store.get_json("plain.json") == {"n": 1} and not store.conditional_writes


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_: Any) -> Any:
        yield self.body


def test_a_superseded_attempt_writes_nothing_more(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Attempt A (a pod on a lost node) keeps running after attempt B took the run over."""
    store = make_store(s3_server, s3_bucket)
    stale = attempt_on(store, RUN_PREFIX, "attempt-a")
    upload_checkpoint(store, write_checkpoint(tmp_path / "a-10", 10), stale, 10, {})
    survivor = attempt_on(store, RUN_PREFIX, "attempt-b")

    with pytest.raises(Superseded, match="pod-attempt-b"):
        upload_checkpoint(store, write_checkpoint(tmp_path / "a-20", 20), stale, 20, {})
    assert store.list_keys(layout.step_prefix(RUN_PREFIX, 20)) == []
    with pytest.raises(Superseded):
        publish_adapter(store, write_adapter(tmp_path / "a-adapter", seed=1), stale, EXTRA)
    assert store.list_keys(layout.adapter_prefix(RUN_PREFIX) + "/") == []

    upload_checkpoint(store, write_checkpoint(tmp_path / "b-20", 20), survivor, 20, {})
    result = publish_adapter(store, write_adapter(tmp_path / "b-adapter", seed=2), survivor, EXTRA)
    # The stale attempt wakes up once more after the run succeeded: still refused, the publication stands.
    with pytest.raises(Superseded):
        publish_adapter(store, write_adapter(tmp_path / "a-adapter", seed=1), stale, EXTRA)
    assert verify_publication(store, result.uri, deep=True)
    manifest = read_manifest(store, result.uri)
    assert manifest is not None and manifest["attempt"] == "attempt-b"
    assert [ref.step for ref in complete_checkpoints(store, RUN_PREFIX, RUN_UID)] == [20, 10]


def test_claiming_takes_over_from_the_version_read(s3_server: MotoS3Server, s3_bucket: str) -> None:
    store = make_store(s3_server, s3_bucket)
    first = attempt_on(store, RUN_PREFIX, "attempt-a")
    first.check()
    second = attempt_on(store, RUN_PREFIX, "attempt-b")
    second.check()
    with pytest.raises(Superseded):
        first.check()
    lease = json_object(store, layout.attempt_key(RUN_PREFIX))
    assert lease["attempt"] == "attempt-b" and lease["runUid"] == RUN_UID


def test_latest_names_the_newest_publication_and_earlier_runs_stay(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    earlier_prefix = layout.run_prefix("runs", "team-a", "demo", "uid-of-the-first")
    earlier = attempt_on(store, earlier_prefix, run_uid="uid-of-the-first")
    first = publish_adapter(store, write_adapter(tmp_path / "first", seed=1), earlier, EXTRA)
    first_run = PublishedRun(run_uid="uid-of-the-first", adapter_uri=first.uri, manifest_sha256=first.manifest_sha256, published=datetime.now(UTC))
    assert point_latest(store, JOB_PREFIX, earlier, first_run)

    later = attempt_on(store, RUN_PREFIX)
    second = publish_adapter(store, write_adapter(tmp_path / "second", seed=2), later, EXTRA)
    second_run = PublishedRun(run_uid=RUN_UID, adapter_uri=second.uri, manifest_sha256=second.manifest_sha256, published=datetime.now(UTC))
    assert point_latest(store, JOB_PREFIX, later, second_run)
    latest = PublishedRun.model_validate(store.get_json(layout.latest_key(JOB_PREFIX)))
    assert (latest.run_uid, latest.adapter_uri, latest.manifest_sha256) == (RUN_UID, second.uri, second.manifest_sha256)
    # The earlier run's adapter is where its status said it was, unchanged.
    assert verify_publication(store, first.uri, deep=True)
    first_manifest = store.get_bytes(layout.join_key(layout.adapter_prefix(earlier_prefix), layout.MANIFEST))
    assert first_manifest is not None and hashlib.sha256(first_manifest).hexdigest() == first.manifest_sha256
    # A publication that completed before the one named (a slow namesake) does not move the pointer back.
    stale = first_run.model_copy(update={"published": second_run.published - timedelta(seconds=1)})
    assert not point_latest(store, JOB_PREFIX, earlier, stale)
    assert json_object(store, layout.latest_key(JOB_PREFIX))["runUid"] == RUN_UID


def test_a_published_run_is_found_only_by_its_own_run(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    assert published_result(store, RUN_PREFIX, RUN_UID, merged=False) is None
    published = publish_adapter(
        store, write_adapter(tmp_path / "adapter"), attempt_on(store, RUN_PREFIX), {**EXTRA, "metrics": {"steps": 20, "finalLoss": 1.5}}
    )
    found = published_result(store, RUN_PREFIX, RUN_UID, merged=False)
    assert found is not None
    assert (found.adapter_uri, found.manifest_sha256, found.steps, found.final_loss) == (published.uri, published.manifest_sha256, 20, 1.5)
    assert published_result(store, RUN_PREFIX, "another-run", merged=False) is None
    assert published_result(store, RUN_PREFIX, RUN_UID, merged=True) is None, "the merged model was asked for and is not there"
    manifest = json.loads(store.get_bytes(layout.join_key(layout.adapter_prefix(RUN_PREFIX), layout.MANIFEST)) or b"{}")
    store.delete_keys([layout.join_key(layout.adapter_prefix(RUN_PREFIX), manifest["files"][0]["path"])])
    assert published_result(store, RUN_PREFIX, RUN_UID, merged=False) is None
