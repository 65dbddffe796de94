"""The preparation step as its Job runs it (``python -m kubetune_trainer prepare``), and the trainer that loads its file.

A real tiny model in a real S3 endpoint; the step reads config.json and the tokenizer only, validates every
record, writes the prepared data under the run's prefix and reports back in the termination message.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kubetune_api.output import OutputSpec
from kubetune_api.result import TerminationMessage
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.store import S3Store
from tests.support.s3 import MotoS3Server
from tests.trainer.conftest import TrainerRun, run_prefix, run_trainer, trainer_config, trainer_env

pytestmark = pytest.mark.trainer


def _store(server: MotoS3Server, bucket: str) -> S3Store:
    output = OutputSpec(bucket=bucket, endpoint_url=server.endpoint_url, region="us-east-1")
    return S3Store.from_output(output, environment=TrainerEnvironment.model_validate(server.env()))


@pytest.fixture
def s3_model(tiny_model_dir: Path, s3_server: MotoS3Server, s3_bucket: str) -> str:
    _store(s3_server, s3_bucket).upload_dir(tiny_model_dir, "models/tiny")
    return f"s3://{s3_bucket}/models/tiny/"


def _weights_gets(server: MotoS3Server) -> int:
    return sum(1 for line in server.log_path.read_text(errors="replace").splitlines() if '"GET ' in line and "model.safetensors" in line)


def other_tokenizer(model_dir: Path, target: Path) -> Path:
    """A copy of the model whose tokenizer differs in its chat template only."""
    shutil.copytree(model_dir, target)
    (target / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    return target


def prepare(config: dict[str, Any], server: MotoS3Server, tmp_path: Path) -> tuple[TrainerRun, TerminationMessage]:
    run = run_trainer(config, trainer_env(server), tmp_path, mode="prepare")
    assert run.termination is not None, run.stderr[-3000:]
    return run, TerminationMessage.model_validate(run.termination)


def test_preparation_reports_the_data_and_fits_without_reading_the_weights(
    s3_model: str, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    before = _weights_gets(s3_server)
    config = trainer_config(
        s3_model,
        memorise_jsonl,
        s3_bucket,
        s3_server.endpoint_url,
        tmp_path,
        training={"autoFit": True, "perDeviceBatchSize": 8, "gradientAccumulationSteps": 2},
        runtime={"gpusPerNode": 1, "preparation": {"gpuMemoryBytes": 80 * 1024**3, "gpuMemorySource": "spec"}},
    )
    run, message = prepare(config, s3_server, tmp_path)
    assert run.returncode == 0 and message.status == "Succeeded", run.stderr[-3000:]
    report = message.preparation
    assert report is not None
    assert report.data.train_records == 24 and report.data.tokens > 0 and 0 < report.data.packing_efficiency <= 1
    assert report.data.lengths.max <= 64 and report.data.total_steps == 20
    assert report.fit is not None and report.fit.fits and report.fit.micro_batch == 16 and report.fit.gradient_accumulation_steps == 1
    assert report.cache_uri == f"s3://{s3_bucket}/{run_prefix(config)}/prepared/{report.cache_key}.npz"
    assert _store(s3_server, s3_bucket).exists(report.cache_uri.split("/", 3)[3])
    assert _weights_gets(s3_server) == before
    assert len(message.encode()) <= 4096


def test_the_cache_key_follows_every_input_and_is_reused_when_none_changes(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    base = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path)

    def key(config: dict[str, Any]) -> tuple[str, list[str]]:
        run, message = prepare(config, s3_server, tmp_path)
        assert message.preparation is not None, run.stderr[-3000:]
        return message.preparation.cache_key, [str(e.get("msg")) for e in run.events]

    first, _ = key(base)
    again, events = key({**base, "runtime": {**base["runtime"], "workDir": str(tmp_path / "fresh")}})
    assert again == first and "prepared data reused" in events
    assert key({**base, "dataset": {**base["dataset"], "maxSeqLength": 48}})[0] != first
    assert key({**base, "dataset": {**base["dataset"], "packing": False}})[0] != first
    assert key({**base, "training": {**base["training"], "seed": 7}})[0] != first
    edited = tmp_path / "edited.jsonl"
    edited.write_text(memorise_jsonl.read_text() + json.dumps({"text": "one more line"}) + "\n")
    assert key({**base, "dataset": {**base["dataset"], "source": str(edited)}})[0] != first
    assert key({**base, "model": {"source": str(other_tokenizer(tiny_model_dir, tmp_path / "other"))}})[0] != first


def test_the_trainer_trains_from_the_prepared_file_and_refuses_another_tokenizer(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    config = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, training={"maxSteps": 6})
    _, message = prepare(config, s3_server, tmp_path)
    assert message.preparation is not None
    uri = message.preparation.cache_uri
    loading = {**config, "runtime": {**config["runtime"], "workDir": str(tmp_path / "trainer"), "preparation": {"cacheUri": uri}}}
    run = run_trainer(loading, trainer_env(s3_server), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = [e for e in run.events if str(e.get("msg", "")).startswith("prepared data loaded")]
    assert loaded and loaded[0]["seconds"] >= 0
    assert run.termination is not None and run.termination["result"]["tokenizedInTrainer"] is False
    manifest: Any = _store(s3_server, s3_bucket).get_json(f"{run_prefix(config)}/adapter/manifest.json")
    assert manifest["dataset"]["contentSha256"] == message.preparation.data.dataset_sha256
    assert len(manifest["baseModel"]["resolvedRevision"]) == 32

    other = other_tokenizer(tiny_model_dir, tmp_path / "other")
    # Another job (a run of its own) pointed at this prepared file with another model's tokenizer.
    another_job = {**loading["runtime"], "workDir": str(tmp_path / "t2"), "runUid": "another-job"}
    refused = run_trainer({**loading, "model": {"source": str(other)}, "runtime": another_job}, trainer_env(s3_server), tmp_path)
    assert refused.returncode == 11 and refused.termination is not None
    assert "another tokenizer" in refused.termination["message"]


def test_a_cpu_run_prepares_in_the_trainer_and_reports_it(
    tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    config = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, training={"maxSteps": 4})
    run = run_trainer(config, trainer_env(s3_server), tmp_path)
    assert run.returncode == 0 and run.termination is not None, run.stderr[-3000:]
    message = TerminationMessage.model_validate(run.termination)
    assert message.preparation is not None and message.preparation.data.train_records == 24 and message.preparation.fit is None
    manifest: Any = _store(s3_server, s3_bucket).get_json(f"{run_prefix(config)}/adapter/manifest.json")
    assert manifest["dataReport"]["trainRecords"] == 24 and manifest["dataset"]["contentSha256"] == message.preparation.data.dataset_sha256


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ('{"text": 3}', "bad.jsonl line 3: field 'text' is a int, expected a string"),
        ('{"text": "unfinished', "bad.jsonl line 3, column 10: not valid JSON"),
        (b'{"text": "caf\xe9"}', "bad.jsonl line 3: byte 14 of the line is not UTF-8"),
        ('["text"]', "bad.jsonl line 3: expected a JSON object"),
    ],
)
def test_a_bad_record_fails_the_preparation_with_its_file_and_line(
    line: str | bytes, complaint: str, tiny_model_dir: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    raw = line if isinstance(line, bytes) else line.encode()
    bad.write_bytes(b'{"text": "one"}\n{"text": "two"}\n' + raw + b'\n{"text": "four"}\n')
    run, message = prepare(trainer_config(tiny_model_dir, bad, s3_bucket, s3_server.endpoint_url, tmp_path), s3_server, tmp_path)
    assert run.returncode == 11 and message.reason == "DataError"
    assert message.message is not None and complaint in message.message, message.message
