"""bench/gpu_pod.py on the CPU: a FinetuneJob through the operator's builders, the pod path and the status function."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubetune_operator.api import FinetuneJob

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]


def test_the_gpu_job_of_the_pod_script_is_a_valid_finetunejob() -> None:
    body = yaml.safe_load((REPO / "bench" / "jobs" / "qlora-1b-gpu.yaml").read_text())
    job = FinetuneJob.from_body({**body, "metadata": {**body["metadata"], "namespace": "default", "uid": "u"}})
    assert job.spec.resources.gpus == 1 and job.spec.method.value == "qlora"


def test_a_cpu_finetunejob_runs_through_the_pod_path_to_succeeded(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_", "PYTEST_"))}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HOME": str(tmp_path)})
    done = subprocess.run(
        [sys.executable, "bench/gpu_pod.py", "examples/tiny-cpu-qlora.yaml", "--max-steps", "30", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert out.is_file(), done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["checks"] == {
        "exit_code_zero": True,
        "status_succeeded": True,
        "running_seen": True,
        "progress_scraped": True,
        "result_has_adapter": True,
        "adapter_verified": True,
        "no_gpu_series_on_cpu": True,
    }, report["log_tail"]
    assert done.returncode == 0
    assert report["phases_seen"] == ["Running", "Succeeded"]
    assert report["result"]["steps"] == 30 and report["result"]["adapterUri"].endswith("/adapter/")
