"""Kueue in the local cluster, installed from its own Helm chart, its manager running next to the control plane.

What a user gets from ``helm install kueue``: the CRDs, the ServiceAccount and its RBAC, the webhook
configurations, and a controller manager reading a ``Configuration``. The manager here is the binary
hack/build-tools.sh builds from ``sigs.k8s.io/kueue`` and runs as a local process (no image), with the
token of the chart's ServiceAccount, so the chart's RBAC is what it is allowed. The apiserver reaches its
webhooks at ``https://127.0.0.1:<port>`` (URL clientConfig) and trusts them through a caBundle of the
cluster CA, which signed the webhook's serving certificate. The chart comes from the same module version
as the binary, out of the Go module cache the build fills.

Only the ``batch/job`` integration is on (trainer and preparation pods are Jobs'); the chart's webhooks
for other kinds (pods, Deployments, other operators' CRDs) are left out, since nothing here serves them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .cluster import LocalCluster
from .pki import issue_loopback_serving_cert
from .probes import ComponentFailedError, free_ports, http_ok, wait_for
from .tools import BUILD_SCRIPT, REPO_ROOT, MissingBinariesError

NAMESPACE = "kueue-system"
SERVICE_ACCOUNT = "kueue-controller-manager"
RELEASE = "kueue"
GO_MODULE = REPO_ROOT / "hack" / "tools" / "kueue" / "go.mod"
# Where the manager reads its metrics serving certificate when it does not make its own (cmd/kueue/main.go).
METRICS_CERT_PATH = "/etc/kueue/metrics/certs"
# Points the installer at a Kueue chart folder instead of the one in the Go module cache.
CHART_ENV = "KUBETUNE_KUEUE_CHART"
# Kinds of the chart that describe the in-cluster Deployment (its pod, Services, serving Secret, ConfigMap,
# the visibility APIServices behind a Service): the local process takes their place.
_REPLACED_KINDS = {"Deployment", "Service", "Secret", "ConfigMap", "APIService"}
_WEBHOOK_KINDS = {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
# Webhooks of Kueue's own kinds and of batch/v1 Jobs: the paths the manager serves with only batch/job on.
_SERVED_WEBHOOK_PATH = re.compile(r"^/(mutate|validate)-(kueue-x-k8s-io-|batch-v1-job$)")


@dataclass(frozen=True)
class KueuePorts:
    webhook: int
    health: int


def kueue_version(go_mod: Path = GO_MODULE) -> str:
    """The ``sigs.k8s.io/kueue`` version pinned by hack/tools/kueue/go.mod."""
    match = re.search(r"^\s*sigs\.k8s\.io/kueue (v\S+)", go_mod.read_text(), re.MULTILINE)
    if match is None:
        raise ValueError(f"{go_mod} does not require sigs.k8s.io/kueue; run `go mod tidy` in {go_mod.parent}")
    return match.group(1)


def chart_dir() -> Path:
    """Kueue's chart, from ${KUBETUNE_KUEUE_CHART} or the Go module cache of hack/build-tools.sh."""
    override = os.environ.get(CHART_ENV)
    if override:
        chart = Path(override)
    else:
        cache_root = Path(os.environ.get("KUBETUNE_TOOLS_DIR") or Path.home() / ".cache" / "kubetune" / "tools")
        chart = cache_root / "go-mod" / "sigs.k8s.io" / f"kueue@{kueue_version()}" / "charts" / "kueue"
    if not (chart / "Chart.yaml").is_file():
        raise MissingBinariesError(f"Kueue's chart is not at {chart}; build the tools with {BUILD_SCRIPT} (or point {CHART_ENV} at a charts/kueue folder)")
    return chart


def local_manifests(rendered: Iterable[dict[str, Any] | None], webhook_url: str, ca_bundle: bytes) -> list[dict[str, Any]]:
    """The chart's objects for a manager outside the cluster (pure): the Deployment's own objects dropped, the
    webhooks Kueue serves here pointed at ``webhook_url`` and trusted through ``ca_bundle`` (PEM)."""
    bundle = base64.b64encode(ca_bundle).decode()
    kept: list[dict[str, Any]] = []
    for document in rendered:
        if not document or document.get("kind") in _REPLACED_KINDS:
            continue
        if document["kind"] in _WEBHOOK_KINDS:
            webhooks = []
            for webhook in document.get("webhooks") or []:
                path = webhook["clientConfig"]["service"]["path"]
                if _SERVED_WEBHOOK_PATH.match(path):
                    webhooks.append({**webhook, "clientConfig": {"url": webhook_url.rstrip("/") + path, "caBundle": bundle}})
            document = {**document, "webhooks": webhooks}
        kept.append(document)
    return kept


def manager_configuration(ports: KueuePorts, cert_dir: Path) -> dict[str, Any]:
    """Kueue's ``Configuration`` for the local manager (pure): loopback ports, the serving certificate it is given
    (no internal certificate management: that needs the in-cluster Service), one replica, Jobs only."""
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2",
        "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports.health}"},
        # "0" turns the metrics server off: nothing here scrapes it.
        "metrics": {"bindAddress": "0"},
        "webhook": {"host": "127.0.0.1", "port": ports.webhook, "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "manageJobsWithoutQueueName": False,
        "integrations": {"frameworks": ["batch/job"]},
    }


class Kueue:
    """Installs Kueue on a started LocalCluster; its manager is one of the cluster's processes (stopped with it)."""

    def __init__(self, cluster: LocalCluster, timeout_seconds: float = 120.0) -> None:
        self.cluster = cluster
        self.timeout_seconds = timeout_seconds
        self.workdir = cluster.workdir / "kueue"

    def install(self) -> None:
        binary = self.cluster.bin_dir / "kueue"
        if not os.access(binary, os.X_OK):
            raise MissingBinariesError(f"missing binary {binary}; build it with: {BUILD_SCRIPT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = KueuePorts(*free_ports(2))
        self.cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        manifests = local_manifests(self._render_chart(), f"https://127.0.0.1:{ports.webhook}", self.cluster.ca_file.read_bytes())
        apply_input = "\n".join(json.dumps(m) for m in manifests)
        self.cluster.kubectl("apply", "--server-side", "--field-manager=helm", "-f", "-", input=apply_input, timeout=120)
        self.cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", timeout=90)
        self._start_manager(binary, ports)

    def _render_chart(self) -> list[dict[str, Any] | None]:
        helm = self.cluster.bin_dir / "helm"
        argv = [str(helm), "template", RELEASE, str(chart_dir()), "--namespace", NAMESPACE, "--include-crds"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise ComponentFailedError(f"helm template of Kueue's chart failed: {result.stderr.strip()}")
        return list(yaml.safe_load_all(result.stdout))

    def _start_manager(self, binary: Path, ports: KueuePorts) -> None:
        cert_dir = self.workdir / "serving-certs"
        cert_dir.mkdir(exist_ok=True)
        pair = issue_loopback_serving_cert(self.cluster.config.pki_dir, "kueue-webhook", "kueue-webhook")
        # controller-runtime's webhook server reads these two names from its certDir.
        (cert_dir / "tls.crt").write_bytes(pair.cert.read_bytes())
        (cert_dir / "tls.key").write_bytes(pair.key.read_bytes())
        config = self.workdir / "controller_manager_config.yaml"
        config.write_text(yaml.safe_dump(manager_configuration(ports, cert_dir), sort_keys=False))
        kubeconfig = self.cluster.service_account_kubeconfig(NAMESPACE, SERVICE_ACCOUNT, duration="48h")
        manager = [
            str(binary),
            f"--config={config}",
            # The visibility API is an aggregated apiserver reached through a Service; nothing routes one here.
            "--feature-gates=VisibilityOnDemand=false",
            "--zap-log-level=2",
        ]
        # Without internal certificate management the manager reads its metrics certificate from a fixed path, where
        # the chart mounts a Secret: here a bind mount in a private mount namespace, as the node agent gives pods
        # their volumes (only the empty mount point is made on the host).
        target = shlex.quote(METRICS_CERT_PATH)
        script = f'mkdir -p {target} && mount --bind {shlex.quote(str(cert_dir))} {target} && exec "$@"'
        argv = ["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c", script, "kueue", *manager]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KUBECONFIG": str(kubeconfig), "HOME": str(self.workdir)}
        record = self.cluster.add_process("kueue", argv, env)
        wait_for("kueue /readyz", lambda: http_ok(f"http://127.0.0.1:{ports.health}/readyz"), self.timeout_seconds, record)
        # Ready once the apiserver reaches the webhooks: a server-side dry run of a ResourceFlavor goes through them.
        flavor = json.dumps({"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": "kueue-webhook-probe"}})
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            probe = self.cluster.kubectl("create", "--dry-run=server", "-f", "-", input=flavor, check=False)
            if probe.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ComponentFailedError(f"the apiserver cannot reach Kueue's webhooks: {probe.stderr.strip()}")
            time.sleep(0.5)
