"""The trainer's /metrics endpoint: every contract series, with its labels, clean under promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest

from tests.support.s3 import free_port

pytestmark = pytest.mark.trainer

CONTRACT_SERIES = [
    "kubetune_trainer_step",
    "kubetune_trainer_total_steps",
    "kubetune_trainer_epoch",
    "kubetune_trainer_progress_ratio",
    "kubetune_trainer_loss",
    "kubetune_trainer_eval_loss",
    "kubetune_trainer_learning_rate",
    "kubetune_trainer_tokens_per_second",
    "kubetune_trainer_tokens_total",
    "kubetune_trainer_eta_seconds",
    "kubetune_trainer_checkpoint_save_seconds_bucket",
    "kubetune_trainer_checkpoint_upload_seconds_count",
    "kubetune_trainer_last_checkpoint_step",
    "kubetune_trainer_s3_bytes_total",
    "kubetune_trainer_s3_retries_total",
    "kubetune_trainer_resident_memory_bytes",
    "kubetune_trainer_info",
]


def promtool_check(body: str) -> None:
    """Fail unless ``promtool check metrics`` accepts ``body`` without a single remark."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (apt-get install -y prometheus), which ships it")
    checked = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked.stdout + checked.stderr


def test_metrics_endpoint_serves_contract_series() -> None:
    import torch

    from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
    from kubetune_trainer.distributed import Context
    from kubetune_trainer.metrics import TrainerMetrics
    from kubetune_trainer.recipe import LoRARecipe
    from kubetune_trainer.training import Progress

    metrics = TrainerMetrics("team-a", "tiny", 0, {"method": "qlora", "base_model": "s3://models/tiny/", "revision": ""})
    config = TrainerConfig.model_validate({"model": {"source": "/m"}, "dataset": {"source": "/d"}, "training": {"maxSteps": 10}, "output": {"bucket": "bkt"}})
    recipe = LoRARecipe(config, Context(0, 0, 2, 2, 0, torch.device("cpu")), TrainerEnvironment(), metrics=metrics)
    progress = Progress(
        step=4, total_steps=10, epoch=0.4, loss=2.5, learning_rate=1e-3, tokens_per_second=2000.0, interval_tokens=800, tokens=3200, eta_seconds=12.0
    )
    recipe.on_log(progress)
    recipe.on_eval(4, 2.75)
    metrics.on_bytes("upload", 1234)
    metrics.on_retry()
    metrics.save_seconds.labels(**metrics.labels).observe(0.3)
    port = metrics.serve("127.0.0.1", free_port())
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.stop()
    recipe.cleanup()

    promtool_check(body)
    for name in CONTRACT_SERIES:
        assert f"\n{name}{{" in body, name
    labels = 'finetunejob="tiny",namespace="team-a",rank="0"'
    assert f"kubetune_trainer_step{{{labels}}} 4.0" in body
    assert f"kubetune_trainer_progress_ratio{{{labels}}} 0.4" in body
    assert f"kubetune_trainer_eval_loss{{{labels}}} 2.75" in body
    # Two processes in one pod: the pod's share is the whole run's rate (world size 2, both local).
    assert f"kubetune_trainer_tokens_per_second{{{labels}}} 2000.0" in body
    assert f"kubetune_trainer_tokens_total{{{labels}}} 800.0" in body
    assert 'kubetune_trainer_s3_bytes_total{direction="upload",finetunejob="tiny",namespace="team-a",rank="0"} 1234.0' in body
    assert 'method="qlora"' in body
