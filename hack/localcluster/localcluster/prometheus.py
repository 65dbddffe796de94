"""A real Prometheus (Debian's ``prometheus`` package) scraping kubetune's pods through Kubernetes discovery.

Pods annotated ``prometheus.io/scrape: "true"`` are found with ``kubernetes_sd_configs`` against the
local apiserver, exactly as a cluster's Prometheus finds them, and scraped at
``<podIP>:<prometheus.io/port><prometheus.io/path>``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localcluster.probes import free_ports


def scrape_config(kubeconfig: Path, interval_seconds: float) -> dict[str, Any]:
    """Prometheus configuration: one job discovering annotated pods in every namespace."""
    interval = f"{interval_seconds:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "honor_labels": True,
                "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
                "relabel_configs": [
                    {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"], "regex": "true", "action": "keep"},
                    {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Pending|Running", "action": "keep"},
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
                        "regex": "(.+)",
                        "target_label": "__metrics_path__",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_ip", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
                        "regex": "(.+);(\\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }


@dataclass
class Prometheus:
    """One Prometheus server on a free loopback port, its data and log under ``workdir``."""

    workdir: Path
    kubeconfig: Path
    interval_seconds: float = 1.0
    rule_files: list[Path] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run `bash hack/setup-system.sh` (Debian package prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = scrape_config(self.kubeconfig, self.interval_seconds)
        if self.rule_files:
            config["rule_files"] = [str(p) for p in self.rule_files]
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.port = self.port or free_ports(1)[0]
        log = (self.workdir / "prometheus.log").open("ab")
        self.process = subprocess.Popen(
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

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

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
