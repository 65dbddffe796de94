"""Pure translators and small helpers of the trainer: spec in, library objects or values out.

Nothing here needs torch; the translators that build transformers or peft objects are in the trainer tier
(tests/trainer/test_translators.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.exitcodes import ExitCode
from kubetune_api.output import OutputSpec
from kubetune_api.recipe import ModelSpec, Precision
from kubetune_api.result import MAX_BYTES, CheckpointRef
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.errors import ConfigError, ModelError, TrainerError, classify, redact
from kubetune_trainer.locations import local_path, location
from kubetune_trainer.model import fetch_model, resolve_precision, resolve_target_modules
from kubetune_trainer.result import failure

pytestmark = pytest.mark.unit

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_all_linear_expands_to_every_linear_layer() -> None:
    assert resolve_target_modules(["all-linear"], LLAMA_LINEARS) == LLAMA_LINEARS


def test_named_targets_are_kept_in_order_without_duplicates() -> None:
    assert resolve_target_modules(["v_proj", "q_proj", "v_proj"], LLAMA_LINEARS) == ["v_proj", "q_proj"]


def test_unknown_target_fails_with_the_models_linear_layers() -> None:
    with pytest.raises(ModelError) as raised:
        resolve_target_modules(["q_proj", "qkv"], LLAMA_LINEARS)
    error = raised.value
    assert error.exit_code is ExitCode.MODEL_ERROR
    assert error.reason == "ModelError"
    assert "'qkv'" in error.message and "'q_proj'" not in error.message.split("not found")[0]
    for name in LLAMA_LINEARS:
        assert name in error.message


def test_all_linear_cannot_be_mixed_with_names() -> None:
    with pytest.raises(ModelError, match="cannot be combined"):
        resolve_target_modules(["all-linear", "q_proj"], LLAMA_LINEARS)


@pytest.mark.parametrize(
    ("precision", "cuda", "bf16", "expected"),
    [
        (Precision.AUTO, False, False, Precision.FP32),
        (Precision.BF16, False, False, Precision.FP32),
        (Precision.AUTO, True, True, Precision.BF16),
        (Precision.AUTO, True, False, Precision.FP16),
        (Precision.FP32, True, True, Precision.FP32),
        (Precision.FP16, True, True, Precision.FP16),
    ],
)
def test_precision_resolution(precision: Precision, cuda: bool, bf16: bool, expected: Precision) -> None:
    assert resolve_precision(precision, cuda=cuda, bf16_supported=bf16) is expected


@pytest.mark.parametrize(
    ("source", "kind"),
    [("meta-llama/Llama-3.1-8B", "hub"), ("s3://models/llama/", "s3"), ("/models/llama", "local"), ("gpt2", "hub")],
)
def test_model_location(source: str, kind: str) -> None:
    assert location(source) == kind


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("s3://models/llama/", "s3"),
        ("/models/llama", "local"),
        ("./data/train.jsonl", "local"),
        ("../data/train.jsonl", "local"),
        ("~/data/train.jsonl", "local"),
        ("file:///models/llama", "local"),
        ("meta-llama/Llama-3.1-8B", "hub"),
        ("data/train.jsonl", "hub"),
    ],
)
def test_source_location_depends_on_the_spelling_alone(source: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # data/train.jsonl exists in the working directory, and is still read as a hub id: a pod's working directory must not decide.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert location(source) == kind


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ("s3:/bad", "a typo such as s3:/"),
        ("S3://models/llama/", "a typo such as s3:/"),
        ("gs://models/llama/", "unsupported scheme"),
        ("s3://models/../../../../tmp/x/", "no '.' or '..' segments"),
        ("s3://models/llama/./weights", "no '.' or '..' segments"),
    ],
)
def test_a_source_of_no_valid_form_is_refused_by_the_trainer_too(source: str, says: str) -> None:
    """The second line of defence, for a source that reached the trainer without the FinetuneJob schema."""
    with pytest.raises(ConfigError, match=re.escape(says)) as raised:
        location(source)
    assert repr(source) in raised.value.message and raised.value.exit_code == ExitCode.CONFIG_ERROR


def test_an_s3_model_source_never_lands_outside_the_scratch_directory(tmp_path: Path) -> None:
    outside = tmp_path / "tmp" / "x"
    spec = ModelSpec.model_construct(source="s3://bucket/../../../../" + str(outside).lstrip("/") + "/")
    work = tmp_path / "scratch" / "work"

    def no_store(output: OutputSpec) -> Any:
        raise AssertionError("no S3 request may be made for a source of no valid form")

    with pytest.raises(ConfigError):
        fetch_model(spec, OutputSpec(bucket="bucket"), work, no_store)
    assert not outside.exists() and not work.exists()


def test_local_path_expands_home_and_drops_the_file_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/trainer")
    assert local_path("~/data/train.jsonl") == Path("/home/trainer/data/train.jsonl")
    assert local_path("file:///models/llama") == Path("/models/llama")
    assert local_path("../data") == Path("../data")


def test_errors_of_other_layers_keep_their_exit_code() -> None:
    from kubetune_trainer.data.errors import DataError
    from kubetune_trainer.storage.errors import StorageAccessError

    assert classify(DataError("field 'text' missing")).exit_code is ExitCode.DATA_ERROR
    assert classify(StorageAccessError("bucket missing")).exit_code is ExitCode.STORAGE_ACCESS_ERROR
    unknown = classify(KeyError("boom"))
    assert unknown.exit_code is ExitCode.RUNTIME_ERROR


def test_redact_removes_credentials() -> None:
    env = TrainerEnvironment.model_validate({"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123", "HF_TOKEN": "hf_abcdefgh"})
    assert redact("auth s3cr3t-value-123 and hf_abcdefgh failed", env) == "auth *** and *** failed"


def test_failure_message_fits_the_kubernetes_limit_and_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key-value")
    error = TrainerError("S3 said very-secret-key-value " + "x" * 10_000, ExitCode.STORAGE_UNAVAILABLE)
    data = failure(error, CheckpointRef(step=30, uri="s3://b/p/checkpoints/step-30/")).encode()
    assert len(data) <= MAX_BYTES
    decoded = json.loads(data)
    assert decoded["status"] == "Failed" and decoded["reason"] == "StorageUnavailable" and decoded["exitCode"] == 4
    assert decoded["lastCheckpoint"] == {"step": 30, "uri": "s3://b/p/checkpoints/step-30/"}
    assert "very-secret-key-value" not in data.decode()
