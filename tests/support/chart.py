"""The Helm chart as the tests see it: the helm binary, rendering over a matrix of values, and lookups."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import MissingBinariesError
from localcluster.tools import find_tool

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RELEASE_NAMESPACE = "kubetune-system"
MONITORING_API = "monitoring.coreos.com/v1"

CONTRACT_ENV = {
    "POD_NAMESPACE",
    "KUBETUNE_WATCH_NAMESPACES",
    "KUBETUNE_TRAINER_IMAGE",
    "KUBETUNE_TRAINER_PULL_POLICY",
    "KUBETUNE_OPERATOR_PORT",
    "KUBETUNE_TRAINER_METRICS_PORT",
    "KUBETUNE_PEERING",
    "KUBETUNE_LOG_FORMAT",
    "KUBETUNE_PROGRESS_INTERVAL_SECONDS",
}

# name -> (values, extra API versions the cluster serves)
MATRIX: dict[str, tuple[dict[str, Any], list[str]]] = {
    "defaults": ({}, []),
    "namespaced": ({"watchNamespaces": ["team-a", "team-b"]}, []),
    "namespaced-peering": ({"watchNamespaces": ["team-a"], "peering": {"enabled": True}}, []),
    "cluster-peering": ({"peering": {"enabled": True}}, []),
    "monitoring-on": (
        {
            "metrics": {
                "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                "podMonitor": {"enabled": True},
                "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml"}, "disabledAlerts": ["KubetuneLossDiverging"]},
            }
        },
        [MONITORING_API],
    ),
    "monitoring-on-without-crds": (
        {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}},
        [],
    ),
    "monitoring-namespaced": (
        {"watchNamespaces": ["team-a"], "metrics": {"podMonitor": {"enabled": True}}},
        [MONITORING_API],
    ),
    "network-policy": ({"networkPolicy": {"enabled": True, "egressCIDRs": ["0.0.0.0/0"]}}, []),
    "admission-policy": (
        {"admissionPolicy": {"enabled": True, "allowedImagePrefixes": ["registry.example.com/ml/"], "allowTrustRemoteCode": False}},
        [],
    ),
    "network-policy-namespaced": ({"networkPolicy": {"enabled": True, "egressCIDRs": ["10.20.0.0/16"]}, "watchNamespaces": ["team-a", "team-b"]}, []),
    "local-cluster": (
        {
            "trainer": {
                "image": {"repository": "localhost/kubetune-trainer", "tag": "dev-cpu", "pullPolicy": "Never"},
                "command": "python -m kubetune_trainer --config /etc/kubetune/config.yaml",
                "defaultResources": {"cpu": "1", "memory": "2Gi"},
            },
            "operator": {
                "image": {"repository": "localhost/kubetune-operator", "tag": "dev", "pullPolicy": "Never"},
                "runAsUser": None,
                "logFormat": "text",
                "scrapeAnnotations": False,
            },
            "dashboards": {"enabled": False},
            "crds": {"enabled": False},
        },
        [],
    ),
}

CASES = [pytest.param(values, apis, id=name) for name, (values, apis) in MATRIX.items()]


def helm_binary() -> str:
    """The helm built by hack/build-tools.sh for the current pins (as the e2e suite uses), else KUBETUNE_HELM or PATH."""
    try:
        return find_tool("helm")
    except MissingBinariesError as missing:
        pytest.fail(str(missing))


def run_helm(*args: str, values: dict[str, Any] | None = None, tmp_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [helm_binary(), *args]
    if values:
        assert tmp_path is not None
        values_file = tmp_path / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        command += ["--values", str(values_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def render(values: dict[str, Any], apis: list[str], tmp_path: Path | None = None) -> list[dict[str, Any]]:
    """The chart's objects for these values; each distinct case is rendered once per test session."""
    return copy.deepcopy(_render_once(json.dumps(values, sort_keys=True), tuple(apis)))


@functools.cache
def _render_once(values_json: str, apis: tuple[str, ...]) -> list[dict[str, Any]]:
    args = ["template", "kubetune", str(CHART), "--namespace", RELEASE_NAMESPACE]
    for api in apis:
        args += ["--api-versions", api]
    with tempfile.TemporaryDirectory() as scratch:
        result = run_helm(*args, values=json.loads(values_json), tmp_path=Path(scratch))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return container


def env_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in operator_container(docs)["env"]}
