"""bench/estimator_gpu.py rehearsed on the CPU with tiny shapes, so the GPU measurement script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]


def test_the_estimator_benchmark_runs_its_whole_path_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "estimator.json"
    done = subprocess.run(
        [sys.executable, "bench/estimator_gpu.py", "--dry-run", "--steps", "1", "--out", str(out), "--work", str(tmp_path / "models")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["case"] for r in results] == ["lora-tiny-mb2-s64-nogc", "qlora-tiny-mb2-s64-gc"]
    assert all(r["estimate_allocated_bytes"] > 0 and r["measured_peak_bytes"] is None and "error" not in r for r in results)
