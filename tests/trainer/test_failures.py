"""Bad input ends with its own exit code, reason and advice, and never leaks a credential.

These call the trainer's ``main`` in-process (the same code the pod runs) so that the tier pays
for importing torch once; the end-to-end tests run it as a subprocess.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.s3 import DUMMY_SECRET_ACCESS_KEY, MotoS3Server
from tests.trainer.conftest import trainer_config, trainer_env

pytestmark = [
    pytest.mark.trainer,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture
def pod_env(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch, isolated_threads: None) -> Iterator[None]:
    for key, value in trainer_env(s3_server).items():
        if key.startswith(("AWS_", "KUBETUNE_")):
            monkeypatch.setenv(key, value)
    # main() sets up the process as a pod's: SIGTERM handler, JSON logging on the root logger.
    before = signal.getsignal(signal.SIGTERM)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    signal.signal(signal.SIGTERM, before)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def run_main(config: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any], str]:
    from kubetune_trainer.__main__ import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    code = main(["--config", str(path)])
    output = capfd.readouterr()
    termination = json.loads(Path(config["runtime"]["terminationMessagePath"]).read_text())
    return code, termination, output.out + output.err


def check_failure(code: int, termination: dict[str, Any], logs: str, exit_code: int, reason: str) -> str:
    assert code == exit_code, logs[-3000:]
    assert termination["status"] == "Failed" and termination["reason"] == reason and termination["exitCode"] == exit_code
    assert DUMMY_SECRET_ACCESS_KEY not in logs and DUMMY_SECRET_ACCESS_KEY not in json.dumps(termination)
    failed = [json.loads(line) for line in logs.splitlines() if line.startswith("{") and '"run failed"' in line]
    assert failed and failed[-1]["reason"] == reason
    return str(termination["message"])


def test_missing_model_folder(
    pod_env: None, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = trainer_config(tmp_path / "no-such-model", memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path)
    message = check_failure(*run_main(config, tmp_path, capfd), 12, "ModelError")
    assert str(tmp_path / "no-such-model") in message and "spec.model.source" in message


def test_unknown_target_modules_list_the_linear_layers(
    pod_env: None, tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = trainer_config(tiny_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path, lora={"targetModules": ["q_proj", "qkv_proj"]})
    message = check_failure(*run_main(config, tmp_path, capfd), 12, "ModelError")
    assert "'qkv_proj'" in message
    for layer in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert layer in message


def test_non_finite_loss(
    pod_env: None, nan_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = trainer_config(nan_model_dir, memorise_jsonl, s3_bucket, s3_server.endpoint_url, tmp_path)
    message = check_failure(*run_main(config, tmp_path, capfd), 14, "LossNotFinite")
    assert "learningRate" in message


def test_missing_bucket(
    pod_env: None, tiny_model_dir: Path, memorise_jsonl: Path, s3_server: MotoS3Server, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = trainer_config(tiny_model_dir, memorise_jsonl, "kubetune-no-such-bucket", s3_server.endpoint_url, tmp_path)
    message = check_failure(*run_main(config, tmp_path, capfd), 13, "StorageAccessDenied")
    assert "kubetune-no-such-bucket" in message


def test_dataset_without_the_text_field(
    pod_env: None, tiny_model_dir: Path, s3_server: MotoS3Server, s3_bucket: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "wrong.jsonl"
    data.write_text('{"content": "hello"}\n{"content": "world"}\n', encoding="utf-8")
    config = trainer_config(tiny_model_dir, data, s3_bucket, s3_server.endpoint_url, tmp_path)
    message = check_failure(*run_main(config, tmp_path, capfd), 11, "DataError")
    assert "text" in message and "content" in message


def test_invalid_config_is_a_config_error(pod_env: None, tmp_path: Path, s3_server: MotoS3Server, capfd: pytest.CaptureFixture[str]) -> None:
    from kubetune_trainer.__main__ import main

    config = trainer_config("/m", "/d.jsonl", "bucket", s3_server.endpoint_url, tmp_path, training={"maxSteps": 10, "epochs": 1})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert main(["--config", str(path)]) == 10
    logs = capfd.readouterr().err
    failed = json.loads(next(line for line in logs.splitlines() if '"run failed"' in line))
    assert failed["reason"] == "ConfigError" and "set exactly one of epochs or maxSteps" in failed["error"]
    termination = json.loads(Path(config["runtime"]["terminationMessagePath"]).read_text())
    assert termination["reason"] == "ConfigError" and termination["exitCode"] == 10
