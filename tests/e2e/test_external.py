"""The harness for clusters someone else runs (hack/kind/e2e.sh), exercised here against the local cluster.

kind needs Docker, which the test machine lacks; what can be checked without it is checked: the kind
manifests pass the apiserver's server-side dry run, and the e2e suite, pointed at a running cluster
through KUBETUNE_E2E_*, installs kubetune with helm, runs FinetuneJobs in a namespace of its own,
crashes a trainer pod by force-deleting it, and skips what needs the local cluster's own parts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.e2e.support.local_stack import KubetuneStack
from tests.e2e.support.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

REPO = Path(__file__).resolve().parents[2]
KIND = REPO / "hack" / "kind"


def test_kind_manifests_pass_server_side_dry_run(stack: Stack) -> None:
    docs = [d for f in ("s3.yaml", "prometheus.yaml") for d in yaml.safe_load_all((KIND / f).read_text()) if d]
    for namespace in [d for d in docs if d["kind"] == "Namespace"]:
        stack.apply(namespace)
    body = {"apiVersion": "v1", "kind": "List", "items": [d for d in docs if d["kind"] != "Namespace"]}
    result = stack.kubectl("apply", "--dry-run=server", "--server-side", "-f", "-", stdin=json.dumps(body), check=False)
    assert result.returncode == 0, result.stderr
    values = yaml.safe_load((KIND / "values.yaml").read_text())
    assert values["trainer"]["image"]["tag"] in (KIND / "e2e.sh").read_text()
    assert values["operator"]["image"]["tag"] in (KIND / "e2e.sh").read_text()


def test_suite_runs_against_a_cluster_named_by_kubeconfig(stack: KubetuneStack) -> None:
    assert isinstance(stack, KubetuneStack) and stack.s3 is not None and stack.prometheus is not None
    env = {
        **os.environ,
        "KUBETUNE_E2E_KUBECONFIG": str(stack.kubeconfig),
        "KUBETUNE_E2E_VALUES": str(stack.workdir / "values.yaml"),
        "KUBETUNE_E2E_S3_URL": stack.s3.endpoint_url,
        "KUBETUNE_E2E_PROMETHEUS_URL": stack.prometheus.url,
        "KUBETUNE_E2E_NAMESPACE": "ml-external",
    }
    tests = [
        "tests/e2e/test_finetunejobs.py::test_cpu_lora_job_succeeds_with_adapter_in_s3",
        "tests/e2e/test_finetunejobs.py::test_killed_trainer_resumes_from_its_checkpoint",
        "tests/e2e/test_s3_outages.py::test_an_s3_outage_while_publishing_is_ridden_out_by_the_same_attempt",
        "tests/e2e/test_demo.py",
    ]
    argv = [sys.executable, "-m", "pytest", "-m", "e2e", "-q", "-rs", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    assert summary.startswith("2 passed, ") and "skipped" in summary and "failed" not in summary, output[-3000:]
    assert "needs the local cluster's own parts" in output, output[-3000:]
    jobs = stack.get_json("finetunejobs", "-n", "ml-external")["items"]
    assert {j["metadata"]["name"] for j in jobs} >= {"tiny-lora", "killed"}
    assert all(j["status"]["phase"] == "Succeeded" for j in jobs), [j["status"] for j in jobs]
