"""The integration tier's real apiserver: etcd + kube-apiserver started once per session from the built binaries,
with the FinetuneJob CRD and the chart's RBAC (namespaced mode) installed. Starting them needs no Docker; a
missing binary fails the tests with the command that builds it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from localcluster import LocalCluster, MissingBinariesError, locate_bin_dir
from tests.integration.harness import NAMESPACE, ControlPlane, Harness
from tests.support.chart import RELEASE_NAMESPACE, ROOT, render

RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
OPERATOR_ACCOUNT = f"system:serviceaccount:{RELEASE_NAMESPACE}:kubetune"


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    try:
        bin_dir = locate_bin_dir(build=False)
    except MissingBinariesError as missing:
        pytest.fail(str(missing))
    server = LocalCluster(tmp_path_factory.mktemp("apiserver"), bin_dir, apiserver_only=True)
    server.start()
    try:
        admin = client.ApiClient(_configuration(server.kubeconfig))
        operator = client.ApiClient(_configuration(server.kubeconfig), header_name="Impersonate-User", header_value=OPERATOR_ACCOUNT)
        plane = ControlPlane(kubectl=bin_dir / "kubectl", kubeconfig=server.kubeconfig, admin=admin, operator=operator)
        _install(plane)
        yield plane
    finally:
        server.stop()


def _configuration(kubeconfig: Path) -> client.Configuration:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)  # type: ignore[no-untyped-call]
    return configuration


def _install(plane: ControlPlane) -> None:
    """The CRD, the namespaces, and the RBAC objects of the chart rendered to watch the test namespace."""
    plane.kubectl_run("apply", "--server-side", "-f", str(ROOT / "crds" / "finetunejob.yaml"))
    namespaces = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}} for name in (NAMESPACE, RELEASE_NAMESPACE)]
    rbac = [doc for doc in render({"watchNamespaces": [NAMESPACE]}, []) if doc["kind"] in RBAC_KINDS]
    # Pods are admitted only once their namespace's default ServiceAccount exists (no controller makes it here).
    default_account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": NAMESPACE}}
    objects = {"apiVersion": "v1", "kind": "List", "items": [*namespaces, *rbac, default_account]}
    plane.kubectl_run("apply", "--server-side", "-f", "-", stdin=json.dumps(objects))
    plane.kubectl_run("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=30s")


@pytest.fixture
def harness(control_plane: ControlPlane) -> Iterator[Harness]:
    operator = Harness(control_plane)
    try:
        yield operator
    finally:
        operator.close()
