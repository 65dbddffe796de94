"""Where base models come from: an s3:// prefix (downloaded through the storage layer) or a hub id."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_api.output import OutputSpec
from kubetune_api.recipe import ModelSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.errors import ModelError
from kubetune_trainer.storage.store import S3Store
from tests.support.s3 import MotoS3Server

pytestmark = pytest.mark.trainer


def test_model_from_s3_prefix_is_downloaded_and_loads(tiny_model_dir: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path) -> None:
    from kubetune_trainer import model

    output = OutputSpec(bucket=s3_bucket, endpoint_url=s3_server.endpoint_url, region="us-east-1")

    def store_factory(spec: OutputSpec) -> S3Store:
        return S3Store.from_output(spec, environment=TrainerEnvironment.model_validate(s3_server.env()))

    store_factory(output).upload_dir(tiny_model_dir, "models/tiny")
    files = model.fetch_model(ModelSpec(source=f"s3://{s3_bucket}/models/tiny/"), output, tmp_path, store_factory)
    assert Path(files.path).is_relative_to(tmp_path)
    assert (Path(files.path) / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    tokenizer = model.load_tokenizer(files, trust_remote_code=False)
    assert tokenizer.pad_token == "<pad>"

    with pytest.raises(ModelError, match="holds no config.json"):
        model.fetch_model(ModelSpec(source=f"s3://{s3_bucket}/models/missing/"), output, tmp_path, store_factory)


def test_unknown_hub_model_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from kubetune_trainer import model

    # No hub is reachable from tests; offline mode makes the lookup fail at once, as a missing model does.
    # The flag is read when huggingface_hub is imported, so the module attribute is what counts.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    files = model.fetch_model(
        ModelSpec(source="kubetune-test/no-such-model", revision="main"),
        OutputSpec(bucket="unused"),
        Path("/nonexistent"),
        S3Store.from_output,
        environment=TrainerEnvironment.model_validate({"HF_TOKEN": "hf_secret_value_123"}),
    )
    assert files.token == "hf_secret_value_123" and files.revision == "main"
    with pytest.raises(ModelError) as raised:
        model.load_tokenizer(files, trust_remote_code=False)
    assert "kubetune-test/no-such-model" in raised.value.message and "tokenSecretRef" in raised.value.message
    assert "hf_secret_value_123" not in raised.value.message
