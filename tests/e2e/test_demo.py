"""README's demo command runs end to end without a terminal (what `make demo` does, non-interactively)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localcluster import processes_mentioning

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end() -> None:
    workdir = REPO / ".cache" / "e2e-demo"
    result = subprocess.run(
        [sys.executable, "-m", "tests.e2e.support.demo", "--non-interactive", "--workdir", str(workdir), "--s3-port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "100%" in output and "Succeeded" in output
    # The run's own folder, named by the FinetuneJob's uid (kubetune_api.layout).
    assert re.search(r"adapter: s3://kubetune-demo/runs/ml/tiny-lora/runs/[0-9a-f-]{36}/adapter/ ", output), output[-4000:]
    # The gate compared the adapter with the base model, and the hand-off says how to serve it.
    gate = re.search(r"evaluation: base eval loss ([0-9.]+) .*, adapter ([0-9.]+) .*; gate Passed", output)
    assert gate and float(gate.group(2)) < float(gate.group(1)), output[-4000:]
    assert "vllm serve s3://kubetune-demo/models/tiny-llama/ --enable-lora --lora-modules ml-tiny-lora=/mnt/models --max-lora-rank 8" in output
    assert "kind: InferenceService" in output
    assert re.search(r"usage: 0\.000 GPU hours over 1 attempt\(s\) \(\d+ s of trainer time\); 0 steps redone after restarts", output), output[-4000:]
    assert "stopping everything the demo started" in output
    # The command it shows is the one it ran: the file exists and says what was changed from the example.
    applied = re.search(r"kubectl apply -f (\S+) -n ml   # examples/tiny-cpu-lora.yaml with spec.output.endpointUrl=(\S+)", output)
    assert applied, output[-4000:]
    assert applied.group(2) in (REPO / applied.group(1)).read_text()
    # What it claims: the adapter changes the generation, towards the line the job learned by heart.
    base = re.search(r"base model: +'(.*)'", output)
    tuned = re.search(r"with the adapter: +'(.*)'", output)
    assert base and tuned, output[-4000:]
    assert tuned.group(1) != base.group(1)
    assert tuned.group(1).startswith(" seven ships"), tuned.group(1)
    # Only what the demo says: no library progress bars or deprecation warnings.
    assert "Loading weights" not in output and "FutureWarning" not in output, output[-4000:]
    phases = re.findall(r"%  step \d+/\S+  loss \S+  (\w+)", output)
    assert phases and phases[-1] == "Succeeded"
    assert "Pending" not in phases[phases.index("Running") :], phases


def test_sigterm_stops_everything_the_demo_started(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    argv = [sys.executable, "-m", "tests.e2e.support.demo", "--non-interactive", "--workdir", str(workdir), "--s3-port", "0"]
    demo = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert demo.stdout is not None
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if "installing kubetune with helm" in line:
            break
    assert processes_mentioning(str(workdir)), "the demo's cluster should be running by now:\n" + "".join(lines)
    demo.send_signal(signal.SIGTERM)
    rest, _ = demo.communicate(timeout=180)
    output = "".join(lines) + rest
    assert demo.returncode == 130, output[-3000:]
    assert "stopping everything the demo started" in output
    assert processes_mentioning(str(workdir)) == []


def test_sigkill_of_the_demo_leaves_no_process_behind(tmp_path: Path) -> None:
    """The demo killed outright (no handler runs): its watchdog still ends every process it started."""
    workdir = tmp_path / "demo"
    argv = [sys.executable, "-m", "tests.e2e.support.demo", "--non-interactive", "--workdir", str(workdir), "--s3-port", "0"]
    demo = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert demo.stdout is not None
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if "installing kubetune with helm" in line:
            break
    assert processes_mentioning(str(workdir), environment=True), "the demo's cluster should be running by now:\n" + "".join(lines)
    demo.kill()
    demo.communicate(timeout=30)
    deadline = time.monotonic() + 20
    while processes_mentioning(str(workdir), environment=True) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_mentioning(str(workdir), environment=True) == []
