"""The GPU measurement scripts (bench/estimator_gpu.py, bench/gpu_suite.py) rehearsed on the CPU with tiny shapes, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

REPO = Path(__file__).resolve().parents[2]


def dry_run(tmp_path: Path, script: str, *args: str) -> None:
    """``script --dry-run args`` as a CPU-only user would run it, with a home of its own."""
    done = subprocess.run(
        [sys.executable, script, "--dry-run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_estimator_benchmark_runs_its_whole_path_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "estimator.json"
    dry_run(tmp_path, "bench/estimator_gpu.py", "--steps", "1", "--out", str(out), "--work", str(tmp_path / "models"))
    results = json.loads(out.read_text())["results"]
    assert [r["case"] for r in results] == ["lora-tiny-mb2-s64-nogc", "qlora-tiny-mb2-s64-gc"]
    assert all(r["estimate_allocated_bytes"] > 0 and r["measured_peak_bytes"] is None and "error" not in r for r in results)


def test_the_gpu_suite_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    dry_run(tmp_path, "bench/gpu_suite.py", "--out", str(out), "--work", str(tmp_path / "work"), "--budget", "1200")
    document = json.loads(out.read_text())
    rows = {row["case"]: row for row in document["rows"]}
    measured = ["qlora-tiny", "qlora-tiny-offload", "qlora-tiny-unfused", "lora-bf16-tiny", "bare-qlora-tiny", "overhead-qlora-tiny", "peer-trl-packed"]
    for case in measured:
        assert "error" not in rows[case] and rows[case]["tokens_per_second"] > 0, rows[case]
    assert rows["overhead-qlora-tiny"]["checkpoints"] == [3, 6]
    assert {"estimate-lora-tiny-mb2-s64-nogc", "estimate-qlora-tiny-mb2-s64-gc"} <= rows.keys()
    assert all({"case", "peak_vram_gib", "mfu", "tokens_per_second", "commit"} <= row.keys() for row in document["rows"])
    assert document["summary"]["best_peer"] == "peer-trl-packed" and document["summary"]["tokens_per_second_vs_best_peer"] > 0
