"""Fixtures of the trainer tier: a real tiny model, a memorisable dataset, a real S3 endpoint.

Importing this file needs neither torch nor a cluster; the model is built by the first test
that asks for it. ``run_trainer`` starts ``python -m kubetune_trainer`` as the pod would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.s3 import MotoS3Server, free_port, s3_bucket, s3_server

__all__ = ["s3_bucket", "s3_server"]

REPO = Path(__file__).resolve().parents[2]
MEMORISE_LINES = 24
RUN_UID = "5e1c0ffe-run-1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset of tinymodel, built once per session."""
    import tinymodel

    return tinymodel.build(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0)


@pytest.fixture(scope="session")
def nan_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with one infinite norm weight (a diverged checkpoint): every forward pass yields NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path_factory.mktemp("nan-model") / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("inf"))
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return broken


@pytest.fixture(scope="session")
def memorise_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few corpus sentences as text records: small enough to memorise in a few dozen steps."""
    from tinymodel import corpus_lines

    path = tmp_path_factory.mktemp("data") / "memorise.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in corpus_lines()[:MEMORISE_LINES]), encoding="utf-8")
    return path


def trainer_config(model: Path | str, data: Path | str, bucket: str, endpoint: str, work_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A TrainerConfig document (camelCase, as the operator renders it) for a short CPU run."""
    config: dict[str, Any] = {
        "model": {"source": str(model)},
        "dataset": {"source": str(data), "maxSeqLength": 64},
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "maxSteps": 20,
            "learningRate": 0.01,
            "perDeviceBatchSize": 4,
            "gradientCheckpointing": False,
            "checkpointEvery": 10,
            "logEvery": 5,
            "warmupSteps": 0,
            "scheduler": "constant",
        },
        "output": {"bucket": bucket, "prefix": "runs", "endpointUrl": endpoint, "region": "us-east-1"},
        "runtime": {
            "namespace": "team-a",
            "jobName": "tiny",
            # What the operator sets from the FinetuneJob's metadata.uid.
            "runUid": RUN_UID,
            "workDir": str(work_dir / "work"),
            "terminationMessagePath": str(work_dir / "termination-log"),
            "metricsPort": free_port(),
            "metricsLingerSeconds": 0,
        },
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


@dataclass
class TrainerRun:
    returncode: int
    stderr: str
    termination: dict[str, Any] | None
    events: list[dict[str, Any]]

    def progress(self) -> dict[int, float]:
        """step -> loss of every progress line."""
        return {int(e["step"]): float(e["loss"]) for e in self.events if e.get("msg") == "progress"}


def trainer_env(server: MotoS3Server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_", "PYTEST_"))}
    env.update(server.env())
    # One thread per process: the tier shares two cores, and oversubscription makes steps 10x slower.
    env.update({"OMP_NUM_THREADS": "1", "KUBETUNE_POD_IP": "127.0.0.1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def run_prefix(config: dict[str, Any]) -> str:
    """The S3 key prefix of the run a config describes (``kubetune_api.layout``)."""
    from kubetune_api.runtime import TrainerConfig

    return TrainerConfig.model_validate(config).run_prefix


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def start_trainer(config_path: Path, env: dict[str, str], mode: str = "train") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", mode, "--config", str(config_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], termination_path: Path, timeout: float = 300) -> TrainerRun:
    _, stderr = process.communicate(timeout=timeout)
    return collect(process.returncode, stderr, termination_path)


def collect(returncode: int, stderr: str, termination_path: Path) -> TrainerRun:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    termination = json.loads(termination_path.read_text()) if termination_path.is_file() else None
    return TrainerRun(returncode, stderr, termination, events)


def run_trainer(config: dict[str, Any], env: dict[str, str], tmp_path: Path, timeout: float = 300, mode: str = "train") -> TrainerRun:
    """Run the trainer (or its preparation step) to completion as its pod would and collect exit code, JSON logs and result."""
    termination = Path(config["runtime"]["terminationMessagePath"])
    termination.unlink(missing_ok=True)
    path = write_config(config, tmp_path / f"config-{os.urandom(3).hex()}.yaml")
    return finish(start_trainer(path, env, mode), termination, timeout)


@pytest.fixture
def isolated_threads() -> Iterator[None]:
    """In-process training on one thread (see trainer_env), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
