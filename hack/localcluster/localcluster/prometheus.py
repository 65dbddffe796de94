"""A real Prometheus (Debian's ``prometheus`` package) scraping the cluster's annotated pods.

Pods annotated ``prometheus.io/scrape: "true"`` are scraped at ``<podIP>:<prometheus.io/port><prometheus.io/path>``
with the job names that the owner's ``job_rules`` give (what a PodMonitor/ServiceMonitor would name them).
Debian builds Prometheus without ``kubernetes_sd_configs``, so ``PodDiscovery`` lists pods from the apiserver
and feeds ``file_sd_configs``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localcluster.probes import free_ports
from localcluster.process import wait_or_kill


def scrape_config(targets_file: Path, interval_seconds: float) -> dict[str, Any]:
    """Prometheus configuration: pods found through the apiserver, handed over in a file_sd file."""
    interval = f"{interval_seconds:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": interval}],
            }
        ],
    }


DEFAULT_JOB = "kubernetes-pods"
JobRule = tuple[Mapping[str, str], str]
"""Labels a pod must all carry, and the job name its series then get."""


def job_label(labels: Mapping[str, str], rules: Sequence[JobRule]) -> str:
    """The job name of the first rule whose labels the pod carries, so dashboards and alerts written for a
    PodMonitor/ServiceMonitor match."""
    for selector, job in rules:
        if all(labels.get(key) == value for key, value in selector.items()):
            return job
    return DEFAULT_JOB


def pod_targets(pods: list[dict[str, Any]], rules: Sequence[JobRule] = ()) -> list[dict[str, Any]]:
    """file_sd target groups for annotated, running pods: what kubernetes_sd_configs + relabelling would give.

    Debian's Prometheus is built without Kubernetes discovery, so the stack discovers pods itself.
    """
    groups = []
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status", {})
        annotations = meta.get("annotations") or {}
        if annotations.get("prometheus.io/scrape") != "true" or status.get("phase") != "Running" or not status.get("podIP"):
            continue
        port = annotations.get("prometheus.io/port")
        if not port:
            continue
        labels = {
            "__metrics_path__": annotations.get("prometheus.io/path", "/metrics"),
            "namespace": meta.get("namespace", ""),
            "pod": meta.get("name", ""),
            "job": job_label(meta.get("labels") or {}, rules),
        }
        groups.append({"targets": [f"{status['podIP']}:{port}"], "labels": labels})
    return groups


class PodDiscovery:
    """Keeps a file_sd file in step with the annotated pods of the cluster (polling, once a second)."""

    def __init__(self, kubeconfig: Path, targets_file: Path, interval_seconds: float = 1.0, job_rules: Sequence[JobRule] = ()) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
        self._api = client.CoreV1Api(client.ApiClient(configuration))
        self.targets_file = targets_file
        self.interval_seconds = interval_seconds
        self.job_rules = job_rules
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prometheus-pod-discovery", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def refresh(self) -> None:
        pods = self._api.api_client.sanitize_for_serialization(self._api.list_pod_for_all_namespaces().items)
        text = json.dumps(pod_targets(pods, self.job_rules))
        if not self.targets_file.exists() or self.targets_file.read_text() != text:
            temporary = self.targets_file.with_suffix(".tmp")
            temporary.write_text(text)
            temporary.replace(self.targets_file)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            try:
                self.refresh()
            except Exception:  # the apiserver may be restarting; the next round retries
                continue


class PrometheusQueries(ABC):
    """The HTTP API calls the tests and the demo make, against any Prometheus at ``url``."""

    @property
    @abstractmethod
    def url(self) -> str: ...

    def api(self, path: str, **params: str) -> Any:
        """GET a Prometheus HTTP API path; returns the ``data`` member or raises on an error status."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} failed: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (or matrix/scalar as a list)."""
        data = self.api("/api/v1/query", query=expr)
        result = data["result"]
        return result if isinstance(result, list) else [result]

    def query_range(self, expr: str, seconds: float = 600.0, step: float = 2.0) -> list[dict[str, Any]]:
        """Range query over the last ``seconds``, as Grafana panels run them."""
        end = time.time()
        data = self.api("/api/v1/query_range", query=expr, start=f"{end - seconds:.3f}", end=f"{end:.3f}", step=f"{step:g}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health."""
        active: list[dict[str, Any]] = self.api("/api/v1/targets")["activeTargets"]
        return active


class PrometheusAPI(PrometheusQueries):
    """A Prometheus someone else runs (in a kind cluster, reached through a port-forward)."""

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")

    @property
    def url(self) -> str:
        return self._url


@dataclass
class Prometheus(PrometheusQueries):
    """One Prometheus server on a free loopback port, its data and log under ``workdir``."""

    workdir: Path
    kubeconfig: Path
    interval_seconds: float = 1.0
    rule_files: list[Path] = field(default_factory=list)
    job_rules: list[JobRule] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    discovery: PodDiscovery | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run `bash hack/setup-system.sh` (Debian package prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        targets = self.workdir / "targets.json"
        self.discovery = PodDiscovery(self.kubeconfig, targets, self.interval_seconds, self.job_rules)
        self.discovery.start()
        config = scrape_config(targets, self.interval_seconds)
        if self.rule_files:
            config["rule_files"] = [str(p) for p in self.rule_files]
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = self.port or free_ports(1)[0]
        with (self.workdir / "prometheus.log").open("ab") as log:
            self.process = self._spawn(binary, config_path, log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: see {self.workdir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"prometheus did not become ready in {timeout:.0f}s: see {self.workdir / 'prometheus.log'}")

    def _spawn(self, binary: str, config_path: Path, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        if self.process is None:
            return
        self.process.terminate()
        wait_or_kill(self.process, timeout=15)
        self.process = None
