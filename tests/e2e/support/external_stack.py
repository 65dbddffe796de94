"""kubetune on a cluster someone else runs (kind, or any cluster reached through a kubeconfig), for the e2e tests.

``hack/kind/e2e.sh`` creates the kind cluster, loads the images, runs S3 (moto) and Prometheus in it,
port-forwards both and sets the environment this module reads:

- ``KUBETUNE_E2E_KUBECONFIG``: the cluster; its presence makes the e2e suite use this stack;
- ``KUBETUNE_E2E_VALUES``: a chart values file (images, pull policy) for ``helm upgrade --install``;
- ``KUBETUNE_E2E_S3_URL``: S3 as this process reaches it; ``KUBETUNE_E2E_S3_POD_URL``: as pods reach it
  (default: the same URL);
- ``KUBETUNE_E2E_S3_SERVICE``: ``namespace/name`` of the S3 Service, for the S3 outage test;
- ``KUBETUNE_E2E_PROMETHEUS_URL``: Prometheus as this process reaches it;
- ``KUBETUNE_E2E_NAMESPACE``: the namespace the test FinetuneJobs go to (default ``ml``).

The tests that need the local cluster's own machinery (kwok's fake GPU nodes, the node agent, the
demo) skip themselves on such a cluster and say why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from localcluster.prometheus import PrometheusAPI
from localcluster.s3 import boto3_client, client_env
from localcluster.tools import find_tool
from tests.e2e.support.stack import Stack, StackSettings, merge_values

KUBECONFIG_ENV = "KUBETUNE_E2E_KUBECONFIG"
# Label added to the S3 Service's selector during an outage: no pod carries it, so the Service has no endpoints.
OUTAGE_LABEL = "kubetune.io/e2e-outage"


@dataclass(frozen=True)
class ExternalConfig:
    """Where the external cluster and its S3 and Prometheus are."""

    kubeconfig: Path
    s3_url: str
    s3_pod_url: str
    values_file: Path | None = None
    s3_service: str | None = None
    prometheus_url: str | None = None
    jobs_namespace: str = "ml"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ExternalConfig | None:
        """The configuration from ``KUBETUNE_E2E_*``; None when no external cluster is named."""
        env = dict(os.environ) if env is None else env
        kubeconfig = env.get(KUBECONFIG_ENV)
        if not kubeconfig:
            return None
        s3_url = env.get("KUBETUNE_E2E_S3_URL")
        if not s3_url:
            raise ValueError(f"{KUBECONFIG_ENV} is set but KUBETUNE_E2E_S3_URL is not: set it to the S3 endpoint this machine reaches (a port-forward)")
        values = env.get("KUBETUNE_E2E_VALUES")
        return cls(
            kubeconfig=Path(kubeconfig),
            s3_url=s3_url,
            s3_pod_url=env.get("KUBETUNE_E2E_S3_POD_URL") or s3_url,
            values_file=Path(values) if values else None,
            s3_service=env.get("KUBETUNE_E2E_S3_SERVICE") or None,
            prometheus_url=env.get("KUBETUNE_E2E_PROMETHEUS_URL") or None,
            jobs_namespace=env.get("KUBETUNE_E2E_NAMESPACE") or "ml",
        )


class ServiceS3:
    """S3 running in the cluster behind a Service; an outage empties the Service's endpoints (data stays).

    Connections a client already holds may outlive the outage (kube-proxy keeps established flows),
    so it is milder than the local stack's, which drops every connection.
    """

    def __init__(self, stack: ExternalStack, url: str, pod_url: str, service: str | None) -> None:
        self._stack = stack
        self._url = url
        self._pod_url = pod_url
        self._service = service

    @property
    def endpoint_url(self) -> str:
        return self._url

    @property
    def pod_endpoint_url(self) -> str:
        return self._pod_url

    @property
    def can_fail(self) -> bool:
        return self._service is not None

    def env(self) -> dict[str, str]:
        return client_env(self._url)

    def client(self, service: str = "s3") -> Any:
        return boto3_client(self._url, service)

    def stop(self) -> None:
        self._stack.kubectl("patch", "service", *self._service_args(), "--type=merge", "-p", json.dumps({"spec": {"selector": {OUTAGE_LABEL: "true"}}}))

    def start(self) -> None:
        escaped = OUTAGE_LABEL.replace("~", "~0").replace("/", "~1")
        patch = json.dumps([{"op": "remove", "path": f"/spec/selector/{escaped}"}])
        self._stack.kubectl("patch", "service", *self._service_args(), "--type=json", "-p", patch)

    def _service_args(self) -> list[str]:
        if self._service is None or "/" not in self._service:
            raise RuntimeError("an S3 outage needs KUBETUNE_E2E_S3_SERVICE=namespace/name")
        namespace, name = self._service.split("/", 1)
        return [name, "-n", namespace]


class ExternalStack(Stack):
    """kubetune installed by helm on an existing cluster; ``stop()`` leaves the cluster as it is (its owner deletes it)."""

    local = False

    def __init__(self, settings: StackSettings, config: ExternalConfig) -> None:
        self.settings = settings
        self.workdir = settings.workdir.resolve()
        self.config = config
        self._kubectl = find_tool("kubectl")
        self._helm = find_tool("helm")
        self.s3: ServiceS3 = ServiceS3(self, config.s3_url, config.s3_pod_url, config.s3_service)
        self.prometheus = PrometheusAPI(config.prometheus_url) if config.prometheus_url else None

    @property
    def kubeconfig(self) -> Path:
        return self.config.kubeconfig

    @property
    def kubectl_binary(self) -> str:
        return self._kubectl

    @property
    def helm_binary(self) -> str:
        return self._helm

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.seed_s3()
        self.prepare_namespaces()
        values: dict[str, Any] = {"operator": {"progressIntervalSeconds": 1}}
        if self.config.values_file is not None:
            values = merge_values(values, yaml.safe_load(self.config.values_file.read_text()) or {})
        self.helm_install(merge_values(values, self.settings.helm_values))

    def stop(self) -> None:
        """Nothing to stop: the cluster, S3 and Prometheus belong to whoever started them."""

    crash_fails_pod = False

    def crash_pod(self, pod: dict[str, Any]) -> None:
        """Force-delete the pod: the API object goes at once and the kubelet kills the containers with no grace to
        speak of, so the Job controller starts a replacement as it would after a node loss."""
        meta = pod["metadata"]
        self.kubectl("delete", "pod", meta["name"], "-n", meta["namespace"], "--grace-period=0", "--force", "--wait=false")
