"""README's demo command runs end to end without a terminal (what `make demo` does, non-interactively)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end() -> None:
    workdir = REPO / ".cache" / "e2e-demo"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "hack" / "localcluster"), str(REPO)])}
    result = subprocess.run(
        [sys.executable, "-m", "localcluster.demo", "--non-interactive", "--workdir", str(workdir), "--s3-port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "100%" in output and "Succeeded" in output
    assert "adapter: s3://kubetune-demo/runs/ml/tiny-lora/adapter/" in output
    assert "with the adapter:" in output
    assert "stopping everything the demo started" in output
