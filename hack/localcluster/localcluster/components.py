"""Command lines of the control-plane components (pure: paths and ports in, argv out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import (
    FAKE_NODE_ANNOTATION,
    FAKE_NODE_ANNOTATION_VALUE,
    ClusterConfig,
)
from .pki import FRONT_PROXY_CLIENT, ClusterPki

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


@dataclass(frozen=True)
class Kubeconfigs:
    admin: Path
    controller_manager: Path
    scheduler: Path
    kwok: Path


def etcd_argv(config: ClusterConfig, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(config.binary("etcd")),
        "--name=kubetune-local",
        f"--data-dir={config.etcd_data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=kubetune-local={peer}",
        "--initial-cluster-state=new",
        # A throw-away cluster: skipping fsync makes every write several times faster.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def apiserver_argv(config: ClusterConfig, ports: Ports, pki: ClusterPki) -> list[str]:
    return [
        str(config.binary("kube-apiserver")),
        "--advertise-address=127.0.0.1",
        # The endpoint reconcilers refuse a loopback advertise address. Nothing routes
        # Service IPs here anyway (no kube-proxy): in-cluster clients get the real
        # 127.0.0.1 URL, so the `kubernetes` Service needs no Endpoints.
        "--endpoint-reconciler-type=none",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.apiserver}",
        f"--cert-dir={config.pki_dir}",
        f"--tls-cert-file={pki.apiserver.cert}",
        f"--tls-private-key-file={pki.apiserver.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        f"--service-cluster-ip-range={config.service_cluster_ip_range}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.service_account_pub}",
        f"--service-account-signing-key-file={pki.service_account_key}",
        "--authorization-mode=Node,RBAC",
        # The aggregation layer's front proxy: without it every component logs a missing
        # request-header CA, and aggregated APIs (metrics-server) could not be added.
        f"--requestheader-client-ca-file={pki.front_proxy_ca.cert}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.front_proxy_client.cert}",
        f"--proxy-client-key-file={pki.front_proxy_client.key}",
        # Added to the defaults (which already include PodSecurity and ServiceAccount);
        # naming them makes the admission chain the tests rely on explicit.
        "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,PodSecurity,"
        "LimitRanger,DefaultTolerationSeconds,ResourceQuota,Priority,"
        "MutatingAdmissionWebhook,ValidatingAdmissionWebhook,NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
        *config.extra_apiserver_args,
    ]


def controller_manager_argv(config: ClusterConfig, ports: Ports, pki: ClusterPki, kubeconfigs: Kubeconfigs) -> list[str]:
    kubeconfig = kubeconfigs.controller_manager
    return [
        str(config.binary("kube-controller-manager")),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.controller_manager}",
        f"--cert-dir={config.workdir / 'controller-manager'}",
        "--leader-elect=false",
        # Each controller acts as its own ServiceAccount, so RBAC is exercised as in a
        # production cluster.
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.service_account_key}",
        f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}",
        f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={config.service_cluster_ip_range}",
        f"--controllers={','.join(config.controllers)}",
        # The default 20 QPS throttles the Job controller when many Jobs start at once.
        "--kube-api-qps=200",
        "--kube-api-burst=400",
        "--v=1",
    ]


def scheduler_argv(config: ClusterConfig, ports: Ports, kubeconfigs: Kubeconfigs) -> list[str]:
    kubeconfig = kubeconfigs.scheduler
    return [
        str(config.binary("kube-scheduler")),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.scheduler}",
        f"--cert-dir={config.workdir / 'scheduler'}",
        "--leader-elect=false",
        "--v=1",
    ]


def kwok_argv(config: ClusterConfig, ports: Ports, kubeconfigs: Kubeconfigs, kwok_config: Path) -> list[str]:
    return [
        str(config.binary("kwok")),
        f"--config={kwok_config}",
        f"--kubeconfig={kubeconfigs.kwok}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}={FAKE_NODE_ANNOTATION_VALUE}",
        f"--cidr={config.pod_cidr}",
        # The fake nodes' InternalIP. Nothing listens on their kubelet port, and on
        # loopback a client that tries (kubectl logs) fails at once instead of hanging.
        "--node-ip=127.0.0.1",
        f"--server-address=127.0.0.1:{ports.kwok}",
        "--node-lease-duration-seconds=40",
    ]
