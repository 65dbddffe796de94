"""Kueue's install for a manager outside the cluster: the pure translation of the chart (no binaries needed)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from localcluster.kueue import KueuePorts, kueue_version, local_manifests, manager_configuration
from localcluster.pki import create_pki, issue_loopback_serving_cert

pytestmark = pytest.mark.unit


def webhook(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "clientConfig": {"service": {"name": "kueue-webhook-service", "namespace": "kueue-system", "path": path}}, "failurePolicy": "Fail"}


CHART_LIKE: list[dict[str, Any] | None] = [
    {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {"name": "clusterqueues.kueue.x-k8s.io"}},
    {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "kueue-manager-role"}},
    {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kueue-controller-manager"}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "kueue-webhook-service"}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kueue-webhook-server-cert"}},
    None,
    {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "kueue-mutating-webhook-configuration"},
        "webhooks": [
            webhook("mjob.kb.io", "/mutate-batch-v1-job"),
            webhook("mpod.kb.io", "/mutate--v1-pod"),
            webhook("mdeployment.kb.io", "/mutate-apps-v1-deployment"),
            webhook("mjobset.kb.io", "/mutate-jobset-x-k8s-io-v1alpha2-jobset"),
            webhook("mclusterqueue.kb.io", "/mutate-kueue-x-k8s-io-v1beta2-clusterqueue"),
        ],
    },
]


def test_chart_objects_for_a_local_manager_keep_crds_rbac_and_served_webhooks() -> None:
    manifests = local_manifests(CHART_LIKE, "https://127.0.0.1:9443/", b"PEM")
    assert [m["kind"] for m in manifests] == ["CustomResourceDefinition", "ClusterRole", "MutatingWebhookConfiguration"]
    webhooks = manifests[-1]["webhooks"]
    # A pod or Deployment webhook nothing serves, with failurePolicy Fail, would refuse every pod of the cluster.
    assert [w["name"] for w in webhooks] == ["mjob.kb.io", "mclusterqueue.kb.io"]
    assert webhooks[0]["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-batch-v1-job", "caBundle": base64.b64encode(b"PEM").decode()}
    assert webhooks[0]["failurePolicy"] == "Fail"


def test_manager_configuration_serves_on_loopback_with_the_given_certificate(tmp_path: Path) -> None:
    config = manager_configuration(KueuePorts(webhook=19443, health=18081), tmp_path)
    assert config["webhook"] == {"host": "127.0.0.1", "port": 19443, "certDir": str(tmp_path)}
    assert config["internalCertManagement"] == {"enable": False}
    assert config["integrations"]["frameworks"] == ["batch/job"]
    assert config["health"]["healthProbeBindAddress"] == "127.0.0.1:18081"


def test_webhook_certificate_is_trusted_by_the_cluster_ca_for_loopback(tmp_path: Path) -> None:
    pki = create_pki(tmp_path, "10.96.0.0/16")
    pair = issue_loopback_serving_cert(tmp_path, "kueue-webhook", "kueue-webhook")
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    serving = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_kueue_version_is_read_from_the_tools_module(tmp_path: Path) -> None:
    assert kueue_version().startswith("v0.")
    go_mod = tmp_path / "go.mod"
    go_mod.write_text("module x\n\nrequire (\n\tsigs.k8s.io/kueue v0.17.0 // indirect\n)\n")
    assert kueue_version(go_mod) == "v0.17.0"
    go_mod.write_text("module x\n")
    with pytest.raises(ValueError, match="go mod tidy"):
        kueue_version(go_mod)
