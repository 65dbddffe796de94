"""S3Store against a real S3 endpoint (moto's server over HTTP): checksums, multipart, errors, retries."""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exitcodes import NON_RETRIABLE, ExitCode
from kubetune_api.layout import join_key
from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.errors import StorageAccessError, StorageError, StorageUnavailableError
from kubetune_trainer.storage.paths import parse_s3_uri, safe_relative_path, sha256_file
from kubetune_trainer.storage.settings import RetryPolicy, StoreSettings
from kubetune_trainer.storage.store import S3Store
from tests.support import s3 as s3_support
from tests.support.s3 import MotoS3Server, free_port
from tests.support.storage import CountingObserver, make_store

# The shared S3 endpoint fixtures, visible to this module's tests.
s3_server = s3_support.s3_server
s3_bucket = s3_support.s3_bucket

FAST_RETRY = StoreSettings(
    retry=RetryPolicy(max_total_seconds=1.0, initial_delay_seconds=0.05, max_delay_seconds=0.2), connect_timeout_seconds=1, read_timeout_seconds=5
)


def random_file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


# ---- pure helpers ---------------------------------------------------------------------------


@pytest.mark.unit
def test_parse_s3_uri_splits_bucket_and_key() -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3:// URI"):
        parse_s3_uri("https://bucket/a")
    with pytest.raises(ValueError, match="without a bucket"):
        parse_s3_uri("s3:///key")
    # A key becomes a local path (downloads) and the prefix of other keys: no segment may climb out.
    for hostile in ("s3://bucket/../../../../tmp/x/", "s3://bucket/a/./b", "s3://bucket/..", "s3://bucket/a/.."):
        with pytest.raises(ValueError, match="'.' or '..' segment"):
            parse_s3_uri(hostile)
    assert parse_s3_uri("s3://bucket/a..b/.hidden/c.") == ("bucket", "a..b/.hidden/c.")


@pytest.mark.unit
def test_join_key_and_relative_paths() -> None:
    assert join_key("runs/", "", "/ns/job", "adapter") == "runs/ns/job/adapter"
    assert str(safe_relative_path("a/b.bin")) == "a/b.bin"
    for hostile in ("../etc/passwd", "/abs", "a/../../b", "", "a\\..\\..\\b", "a\x00b"):
        with pytest.raises(StorageError):
            safe_relative_path(hostile)


@pytest.mark.unit
def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(initial_delay_seconds=1.0, max_delay_seconds=8.0, multiplier=2.0)
    rng = random.Random(1)
    delays = [[policy.delay(attempt, rng) for _ in range(50)] for attempt in range(6)]
    for attempt, samples in enumerate(delays):
        ceiling = min(8.0, 2.0**attempt)
        assert all(ceiling / 2 <= d <= ceiling for d in samples)
        assert len(set(samples)) > 1, "no jitter"


@pytest.mark.unit
def test_error_exit_codes_match_the_operator_contract() -> None:
    assert StorageAccessError.exit_code is ExitCode.STORAGE_ACCESS_ERROR and StorageAccessError.exit_code in NON_RETRIABLE
    assert StorageUnavailableError.exit_code is ExitCode.STORAGE_UNAVAILABLE and StorageUnavailableError.exit_code not in NON_RETRIABLE


# ---- against the S3 endpoint ----------------------------------------------------------------


@pytest.mark.unit
def test_round_trip_keeps_bytes_and_checksum(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    observer = CountingObserver()
    store = make_store(s3_server, s3_bucket, observer=observer)
    source = random_file(tmp_path / "in" / "weights.bin", 300_000)

    uploaded = store.upload_file(source, "run/weights.bin")
    assert uploaded.sha256 == sha256_file(source) and uploaded.size == 300_000
    head = store.head("run/weights.bin")
    assert head is not None and head.sha256 == uploaded.sha256 and head.size == 300_000
    # S3's own checksum of the stored bytes is the file's SHA-256, not just our metadata.
    raw = store.client.head_object(Bucket=s3_bucket, Key="run/weights.bin", ChecksumMode="ENABLED")
    assert base64.b64decode(raw["ChecksumSHA256"]).hex() == sha256_file(source)

    target = tmp_path / "out" / "weights.bin"
    store.download_file("run/weights.bin", target)
    assert target.read_bytes() == source.read_bytes()
    assert not list(target.parent.glob("*.partial"))
    assert observer.bytes == {"upload": 300_000, "download": 300_000}
    assert observer.retries == 0


class CallLog:
    """Records the S3 operations a store's client sends, through botocore's own event hooks."""

    def __init__(self, store: S3Store) -> None:
        self.operations: list[str] = []
        store.client.meta.events.register("before-call.s3.*", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        self.operations.append(model.name)


@pytest.mark.unit
def test_small_upload_confirmed_by_s3_takes_one_request(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket)
    calls = CallLog(store)
    store.upload_file(random_file(tmp_path / "a.bin", 50_000), "a.bin", skip_if_identical=False)
    assert calls.operations == ["PutObject"]


@pytest.mark.unit
def test_store_that_ignores_the_checksum_is_read_back(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    """Some S3-compatible servers ignore x-amz-checksum-sha256; moto honours it, so the answer is edited to look
    like theirs (a botocore hook drops the confirmation) and the object must then be read back and checked."""
    store = make_store(s3_server, s3_bucket)
    calls = CallLog(store)

    def forget_checksum(parsed: dict[str, Any], **_: Any) -> None:
        parsed.pop("ChecksumSHA256", None)

    store.client.meta.events.register("after-call.s3.PutObject", forget_checksum)
    source = random_file(tmp_path / "a.bin", 50_000)
    info = store.upload_file(source, "a.bin", skip_if_identical=False)
    assert calls.operations == ["PutObject", "HeadObject"]
    assert info.sha256 == sha256_file(source)


@pytest.mark.unit
def test_identical_reupload_is_skipped(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    observer = CountingObserver()
    store = make_store(s3_server, s3_bucket, observer=observer)
    source = random_file(tmp_path / "a.bin", 10_000)
    store.upload_file(source, "a.bin")
    store.upload_file(source, "a.bin")
    assert observer.bytes["upload"] == 10_000
    random_file(source, 10_000, seed=7)
    changed = store.upload_file(source, "a.bin")
    assert observer.bytes["upload"] == 20_000
    assert store.head("a.bin") == changed


@pytest.mark.unit
def test_multipart_upload_above_threshold(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    mib = 1024 * 1024
    settings = StoreSettings(multipart_threshold_bytes=5 * mib, multipart_chunk_bytes=5 * mib)
    store = make_store(s3_server, s3_bucket, settings=settings)
    source = random_file(tmp_path / "big.safetensors", 11 * mib + 123)

    uploaded = store.upload_file(source, "big.safetensors")
    raw = store.client.head_object(Bucket=s3_bucket, Key="big.safetensors")
    assert raw["ETag"].strip('"').endswith("-3"), "expected a three-part multipart upload"
    assert uploaded.sha256 == sha256_file(source)
    head = store.head("big.safetensors")
    assert head is not None and head.sha256 == uploaded.sha256
    assert store.sha256_object("big.safetensors") == uploaded.sha256

    target = tmp_path / "back.safetensors"
    store.download_file("big.safetensors", target)
    assert sha256_file(target) == uploaded.sha256


@pytest.mark.unit
def test_download_detects_a_corrupted_object(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    store = make_store(s3_server, s3_bucket, settings=FAST_RETRY)
    store.upload_file(random_file(tmp_path / "a.bin", 4096), "a.bin")
    # Replace the bytes but keep the recorded checksum, as silent corruption would.
    store.client.put_object(Bucket=s3_bucket, Key="a.bin", Body=b"x" * 4096, Metadata={"sha256": sha256_file(tmp_path / "a.bin")})
    with pytest.raises(StorageUnavailableError, match="does not match"):
        store.download_file("a.bin", tmp_path / "copy.bin")
    assert not (tmp_path / "copy.bin").exists()


@pytest.mark.unit
def test_dir_upload_prefix_download_and_listing(s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    observer = CountingObserver()
    store = make_store(s3_server, s3_bucket, observer=observer)
    local = tmp_path / "model"
    for index, name in enumerate(["config.json", "weights/part-1.bin", "weights/part-2.bin"]):
        random_file(local / name, 1000 + index, seed=index)
    uploaded = store.upload_dir(local, "models/tiny")
    store.client.put_object(Bucket=s3_bucket, Key="models/tiny/weights/", Body=b"")
    assert [info.key for info in uploaded] == ["models/tiny/config.json", "models/tiny/weights/part-1.bin", "models/tiny/weights/part-2.bin"]
    assert store.list_prefixes("models/tiny/") == ["models/tiny/weights/"]
    assert store.list_keys("models/tiny/weights/") == ["models/tiny/weights/", "models/tiny/weights/part-1.bin", "models/tiny/weights/part-2.bin"]

    mirror = tmp_path / "mirror"
    paths = store.download_prefix("models/tiny", mirror)
    assert sorted(p.relative_to(mirror).as_posix() for p in paths) == ["config.json", "weights/part-1.bin", "weights/part-2.bin"]
    for path in paths:
        assert path.read_bytes() == (local / path.relative_to(mirror)).read_bytes()
    downloaded = observer.bytes["download"]
    store.download_prefix("models/tiny/", mirror)
    assert observer.bytes["download"] == downloaded, "files already present with the right size are downloaded again"


@pytest.mark.unit
def test_json_objects_and_existence(s3_server: MotoS3Server, s3_bucket: str) -> None:
    store = make_store(s3_server, s3_bucket)
    assert store.get_json("missing.json") is None
    assert not store.exists("doc.json")
    store.put_json("doc.json", {"step": 3, "files": ["a"]})
    assert store.exists("doc.json")
    assert store.get_json("doc.json") == {"step": 3, "files": ["a"]}
    assert store.delete_prefix("doc") == 1
    assert not store.exists("doc.json")


@pytest.mark.unit
def test_missing_bucket_is_an_access_error_without_retries(s3_server: MotoS3Server, tmp_path: Path) -> None:
    observer = CountingObserver()
    store = make_store(s3_server, "no-such-bucket", observer=observer)
    with pytest.raises(StorageAccessError) as caught:
        store.upload_file(random_file(tmp_path / "a.bin", 10), "a.bin")
    assert caught.value.exit_code is ExitCode.STORAGE_ACCESS_ERROR
    assert "no-such-bucket" in caught.value.message and "NoSuchBucket" in caught.value.message
    assert "credentialsSecret" in caught.value.message
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in caught.value.message
    assert observer.retries == 0
    with pytest.raises(StorageAccessError):
        store.list_keys("")


@pytest.mark.unit
def test_unreachable_endpoint_gives_up_after_the_retry_budget(tmp_path: Path) -> None:
    observer = CountingObserver()
    output = OutputSpec(bucket="bucket", endpoint_url=f"http://127.0.0.1:{free_port()}")
    env = {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "a-secret-value"}
    store = S3Store.from_output(output, environment=TrainerEnvironment.model_validate(env), settings=FAST_RETRY, observer=observer)
    with pytest.raises(StorageUnavailableError) as caught:
        store.put_json("a.json", {})
    assert caught.value.exit_code is ExitCode.STORAGE_UNAVAILABLE
    assert "s3://bucket/a.json" in caught.value.message and "reachable" in caught.value.message
    assert "a-secret-value" not in caught.value.message
    assert observer.retries >= 1


@pytest.mark.unit
def test_the_retry_budget_comes_from_spec_output() -> None:
    output = OutputSpec(bucket="bucket", endpoint_url="http://127.0.0.1:9", retry_timeout_seconds=42)
    env = TrainerEnvironment.model_validate({"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "a-secret-value"})
    assert S3Store.from_output(output, environment=env).settings.retry.max_total_seconds == 42
    assert S3Store.from_output(OutputSpec(bucket="bucket"), environment=env).settings.retry.max_total_seconds == 300


@pytest.fixture
def iam_s3() -> Iterator[tuple[MotoS3Server, str, str, str]]:
    """A separate endpoint that enforces IAM: one bucket, a read-only user; every later request is checked."""
    # Exactly these four setup requests run before enforcement starts.
    with MotoS3Server(auth_free_requests=4) as server:
        bucket = server.create_bucket("guarded")
        iam = server.client("iam")
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(policy))
        yield server, bucket, key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.unit
def test_denied_write_and_unknown_key_are_access_errors(iam_s3: tuple[MotoS3Server, str, str, str], tmp_path: Path) -> None:
    server, bucket, key_id, secret = iam_s3
    output = OutputSpec(bucket=bucket, endpoint_url=server.endpoint_url)
    observer = CountingObserver()
    reader = S3Store.from_output(
        output, environment=TrainerEnvironment.model_validate({"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}), observer=observer
    )
    assert reader.list_keys("") == []
    with pytest.raises(StorageAccessError) as denied:
        reader.upload_file(random_file(tmp_path / "a.bin", 100), "adapter/a.bin")
    assert "AccessDenied" in denied.value.message and "guarded" in denied.value.message
    assert secret not in denied.value.message and key_id not in denied.value.message

    stranger_environment = TrainerEnvironment.model_validate({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"})
    stranger = S3Store.from_output(output, environment=stranger_environment, observer=observer)
    with pytest.raises(StorageAccessError) as unknown:
        stranger.put_json("a.json", {})
    assert "InvalidAccessKeyId" in unknown.value.message and "wrong-secret-value" not in unknown.value.message
    assert observer.retries == 0


@pytest.mark.unit
def test_credentials_default_to_the_process_environment(s3_server: MotoS3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    # The endpoint may come from AWS_ENDPOINT_URL alone; path-style addressing still applies.
    store = S3Store.from_output(OutputSpec(bucket=s3_bucket))
    assert store.endpoint_url == os.environ["AWS_ENDPOINT_URL"]
    store.put_json("env.json", {"ok": True})
    assert store.get_json("env.json") == {"ok": True}
