"""Cluster DNS of the node agent: headless Services' EndpointSlices become lines of each pod's hosts file."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from localcluster.agent_dns import ClusterDns, PodHosts, records_from_slices, render

pytestmark = pytest.mark.unit


def endpoint_slice(service: str, endpoints: list[tuple[str, str | None]], headless: bool = True, namespace: str = "ml") -> dict[str, Any]:
    labels = {"kubernetes.io/service-name": service, **({"service.kubernetes.io/headless": ""} if headless else {})}
    return {
        "metadata": {"name": f"{service}-abcde", "namespace": namespace, "labels": labels},
        "endpoints": [{"addresses": [address], **({"hostname": hostname} if hostname else {})} for address, hostname in endpoints],
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
    slices = [
        endpoint_slice("job-trainer", [("127.0.5.1", "job-trainer-0"), ("127.0.6.1", "job-trainer-1")]),
        endpoint_slice("web", [("127.0.7.1", None)], headless=False),
        endpoint_slice("job-trainer", [("127.0.8.1", "other-0")], namespace="elsewhere"),
    ]
    names = hosts_of(render(pod_hosts(tmp_path / "hosts"), records_from_slices(slices)))
    # The peer, by every name cluster DNS gives it; the short form only within the pod's namespace.
    for name in ("job-trainer-1.job-trainer.ml.svc.cluster.local", "job-trainer-1.job-trainer.ml.svc", "job-trainer-1.job-trainer"):
        assert names[name] == {"127.0.6.1"}, name
    # The pod's own names, the FQDN first as the kubelet writes it, and the Service's name with every address.
    assert names["job-trainer-0.job-trainer"] == {"127.0.5.1"} and names["job-trainer-0"] == {"127.0.5.1"}
    assert names["job-trainer.ml.svc.cluster.local"] == {"127.0.5.1", "127.0.6.1"}
    assert "other-0.job-trainer" not in names and names["other-0.job-trainer.elsewhere.svc"] == {"127.0.8.1"}
    assert not any(name.startswith("web.") for name in names), "a Service with a ClusterIP gets no pod records"
    assert names["kubernetes.default.svc"] == {"127.0.0.10"}


def test_hosts_files_follow_the_slices_in_place(tmp_path: Path) -> None:
    slices: list[dict[str, Any]] = []
    dns = ClusterDns(lambda: slices, interval_s=0.05)
    path = tmp_path / "hosts"
    path.write_text("")
    inode = path.stat().st_ino
    dns.start()
    try:
        dns.register("uid-0", pod_hosts(path))
        assert "job-trainer-1.job-trainer" not in hosts_of(path.read_text())
        slices.append(endpoint_slice("job-trainer", [("127.0.6.1", "job-trainer-1")]))
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
