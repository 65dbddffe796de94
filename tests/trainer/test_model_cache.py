"""The model-cache volume: an s3:// model is downloaded once per content, by one pod even when two fill it at once.

GETs of the weights are counted in the real S3 endpoint's request log.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from kubetune_api.output import OutputSpec
from kubetune_api.recipe import ModelSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer import model
from kubetune_trainer.storage.store import S3Store
from tests.support.s3 import MotoS3Server

pytestmark = pytest.mark.trainer


def weights_gets(server: MotoS3Server, bucket: str) -> int:
    lines = server.log_path.read_text(errors="replace").splitlines()
    return sum(1 for line in lines if '"GET ' in line and f"/{bucket}/models/tiny/model.safetensors" in line)


@pytest.fixture
def setup(tiny_model_dir: Path, s3_server: MotoS3Server, s3_bucket: str) -> tuple[OutputSpec, model.StoreFactory]:
    output = OutputSpec(bucket=s3_bucket, endpoint_url=s3_server.endpoint_url, region="us-east-1")

    def store_factory(spec: OutputSpec) -> S3Store:
        return S3Store.from_output(spec, environment=TrainerEnvironment.model_validate(s3_server.env()))

    store_factory(output).upload_dir(tiny_model_dir, "models/tiny")
    return output, store_factory


def test_a_retry_and_a_second_job_read_the_cache(setup: tuple[OutputSpec, model.StoreFactory], s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    output, factory = setup
    spec = ModelSpec(source=f"s3://{s3_bucket}/models/tiny/", cache_volume_claim="models")
    cache = tmp_path / "models"
    before = weights_gets(s3_server, s3_bucket)
    first = model.fetch_model(spec, output, tmp_path / "attempt-1", factory, cache_dir=cache)
    assert weights_gets(s3_server, s3_bucket) == before + 1
    retry = model.fetch_model(spec, output, tmp_path / "attempt-2", factory, cache_dir=cache)
    other_job = model.fetch_model(spec, output, tmp_path / "other-job", factory, cache_dir=cache)
    assert weights_gets(s3_server, s3_bucket) == before + 1
    assert first.path == retry.path == other_job.path and first.resolved == retry.resolved
    assert Path(first.path).is_relative_to(cache) and model.load_tokenizer(retry, trust_remote_code=False) is not None

    # A changed upload is a new version: downloaded again into a folder of its own.
    factory(output).put_bytes("models/tiny/README.md", b"retrained")
    changed = model.fetch_model(spec, output, tmp_path / "attempt-3", factory, cache_dir=cache)
    assert changed.path != first.path and changed.resolved != first.resolved
    assert weights_gets(s3_server, s3_bucket) == before + 2


def test_two_pods_filling_the_cache_at_once_download_once(
    setup: tuple[OutputSpec, model.StoreFactory], s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    output, factory = setup
    spec = ModelSpec(source=f"s3://{s3_bucket}/models/tiny/", cache_volume_claim="models")
    before = weights_gets(s3_server, s3_bucket)
    paths: list[str] = []

    def pod(name: str) -> None:
        paths.append(model.fetch_model(spec, output, tmp_path / name, factory, cache_dir=tmp_path / "models").path)

    pods = [threading.Thread(target=pod, args=(f"pod-{i}",)) for i in range(2)]
    for thread in pods:
        thread.start()
    for thread in pods:
        thread.join(timeout=120)
    assert len(paths) == 2 and paths[0] == paths[1]
    assert weights_gets(s3_server, s3_bucket) == before + 1
    assert not list((tmp_path / "models" / "s3" / s3_bucket).glob("*.partial-*"))
