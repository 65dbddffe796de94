"""The Prometheus of the kind e2e run (hack/kind/prometheus.yaml) keeps the pods and job names the dashboards expect.

Debian's Prometheus lacks Kubernetes discovery, so the test hands it the same pods through file_sd, with
the ``__meta_kubernetes_*`` labels Kubernetes discovery would attach, and reads the targets that the
relabelling keeps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.probes import free_ports

pytestmark = pytest.mark.unit

MANIFEST = Path(__file__).resolve().parents[2] / "hack" / "kind" / "prometheus.yaml"


def pod(name: str, labels: dict[str, str], annotations: dict[str, str], phase: str = "Running", ip: str = "127.0.0.1") -> dict[str, Any]:
    meta = {
        "__address__": f"{ip}:80",
        "__meta_kubernetes_namespace": "ml",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": phase,
    }
    meta |= {f"__meta_kubernetes_pod_label_{k.replace('.', '_').replace('/', '_').replace('-', '_')}": v for k, v in labels.items()}
    meta |= {f"__meta_kubernetes_pod_annotation_{k.replace('.', '_').replace('/', '_').replace('-', '_')}": v for k, v in annotations.items()}
    return {"targets": [f"{ip}:80"], "labels": meta}


SCRAPE = {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
PODS = [
    pod("kubetune-operator-0", {"app.kubernetes.io/part-of": "kubetune", "app.kubernetes.io/component": "operator"}, SCRAPE),
    pod("tiny-lora-0", {"app.kubernetes.io/name": "kubetune-trainer"}, {**SCRAPE, "prometheus.io/port": "9400"}),
    pod("other", {"app": "other"}, SCRAPE),
    pod("unannotated", {"app.kubernetes.io/name": "kubetune-trainer"}, {}),
    pod("pending", {"app.kubernetes.io/name": "kubetune-trainer"}, SCRAPE, phase="Pending"),
]


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run `bash hack/setup-system.sh` (Debian package prometheus)")
    workdir = tmp_path_factory.mktemp("kind-prometheus")
    configmap = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "ConfigMap")
    config = yaml.safe_load(configmap["data"]["prometheus.yml"])
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["file_sd_configs"] = [{"files": [str(workdir / "pods.json")]}]
    (workdir / "pods.json").write_text(json.dumps(PODS))
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    argv = [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2) as response:
                    data: dict[str, Any] = json.load(response)["data"]
                if len(data["activeTargets"]) + len(data["droppedTargets"]) == len(PODS):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not load the targets"
            time.sleep(0.3)
        yield data
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_only_annotated_running_pods_are_scraped(targets: dict[str, Any]) -> None:
    scraped = {t["labels"]["pod"] for t in targets["activeTargets"]}
    assert scraped == {"kubetune-operator-0", "tiny-lora-0", "other"}


def test_job_names_and_addresses_match_the_chart(targets: dict[str, Any]) -> None:
    by_pod = {t["labels"]["pod"]: t for t in targets["activeTargets"]}
    assert by_pod["kubetune-operator-0"]["labels"]["job"] == "kubetune-operator"
    assert by_pod["kubetune-operator-0"]["scrapeUrl"] == "http://127.0.0.1:8080/metrics"
    assert by_pod["tiny-lora-0"]["labels"]["job"] == "kubetune-trainer"
    assert by_pod["tiny-lora-0"]["scrapeUrl"] == "http://127.0.0.1:9400/metrics"
    assert by_pod["other"]["labels"]["job"] == "kubernetes-pods"
    assert all(t["labels"]["namespace"] == "ml" for t in targets["activeTargets"])
