"""Cluster DNS of the node agent: the pods a headless Service selects become lines of each pod's hosts file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from localcluster.agent_dns import ClusterDns, PodHosts, records_from, render

pytestmark = pytest.mark.unit


def service(name: str, headless: bool = True, namespace: str = "ml", not_ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"clusterIP": "None" if headless else "10.96.0.20", "selector": {"job": name}, "publishNotReadyAddresses": not_ready},
    }


def pod(hostname: str, ip: str, selected_by: str, namespace: str = "ml", phase: str = "Running", ready: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"name": f"{hostname}-x1y2z", "namespace": namespace, "labels": {"job": selected_by}},
        "spec": {"hostname": hostname, "subdomain": selected_by},
        "status": {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def pod_hosts(path: Path, pod_ip: str = "127.0.5.1", namespace: str = "ml") -> PodHosts:
    return PodHosts(path, namespace, pod_ip, "job-trainer-0", "job-trainer", "127.0.0.10")


def hosts_of(text: str) -> dict[str, set[str]]:
    """Name -> addresses, as a resolver reading the file sees them."""
    names: dict[str, set[str]] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        address, *aliases = line.split()
        for alias in aliases:
            names.setdefault(alias, set()).add(address)
    return names


def test_a_headless_services_pods_resolve_by_hostname_and_subdomain(tmp_path: Path) -> None:
    services = [service("job-trainer"), service("web", headless=False), service("job-trainer", namespace="elsewhere"), service("ready-only", not_ready=False)]
    pods = [
        pod("job-trainer-0", "127.0.5.1", "job-trainer"),
        pod("job-trainer-1", "127.0.6.1", "job-trainer"),
        pod("job-trainer-2", "127.0.6.2", "job-trainer", phase="Failed"),
        pod("web-0", "127.0.7.1", "web"),
        pod("other-0", "127.0.8.1", "job-trainer", namespace="elsewhere"),
        pod("ready-0", "127.0.9.1", "ready-only"),
        pod("ready-1", "127.0.9.2", "ready-only", ready=True),
    ]
    names = hosts_of(render(pod_hosts(tmp_path / "hosts"), records_from(services, pods)))
    # The peer, by every name cluster DNS gives it; the short form only within the pod's namespace.
    for name in ("job-trainer-1.job-trainer.ml.svc.cluster.local", "job-trainer-1.job-trainer.ml.svc", "job-trainer-1.job-trainer"):
        assert names[name] == {"127.0.6.1"}, name
    # The pod's own names, the FQDN first as the kubelet writes it, and the Service's name with every live address.
    assert names["job-trainer-0.job-trainer"] == {"127.0.5.1"} and names["job-trainer-0"] == {"127.0.5.1"}
    assert names["job-trainer.ml.svc.cluster.local"] == {"127.0.5.1", "127.0.6.1"}
    assert "job-trainer-2.job-trainer" not in names, "a failed pod has no record"
    assert "other-0.job-trainer" not in names and names["other-0.job-trainer.elsewhere.svc"] == {"127.0.8.1"}
    assert not any(name.startswith("web") for name in names), "a Service with a ClusterIP gets no pod records"
    assert "ready-0.ready-only" not in names and names["ready-1.ready-only"] == {"127.0.9.2"}, "not-ready pods only where published"
    assert names["kubernetes.default.svc"] == {"127.0.0.10"}


def test_hosts_files_follow_the_pods_in_place(tmp_path: Path) -> None:
    pods: list[dict[str, Any]] = []
    dns = ClusterDns(lambda: [service("job-trainer")], lambda: pods, interval_s=0.05)
    path = tmp_path / "hosts"
    path.write_text("")
    inode = path.stat().st_ino
    dns.start()
    try:
        dns.register("uid-0", pod_hosts(path))
        assert "job-trainer-1.job-trainer" not in hosts_of(path.read_text())
        pods.append(pod("job-trainer-1", "127.0.6.1", "job-trainer"))
        deadline = time.monotonic() + 5
        while "job-trainer-1.job-trainer" not in hosts_of(path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hosts_of(path.read_text())["job-trainer-1.job-trainer"] == {"127.0.6.1"}
        # The bind mount in the pod's namespace follows the inode: the file is rewritten, never replaced.
        assert path.stat().st_ino == inode
    finally:
        dns.stop()


def test_the_pods_own_fqdn_is_its_canonical_name(tmp_path: Path) -> None:
    text = render(pod_hosts(tmp_path / "hosts"), [])
    own = next(line for line in text.splitlines() if line.startswith("127.0.5.1"))
    # The resolver takes the first name of the line as the canonical one (what getfqdn returns).
    assert own.split()[1] == "job-trainer-0.job-trainer.ml.svc.cluster.local"
