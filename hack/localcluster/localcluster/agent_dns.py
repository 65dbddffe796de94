"""Cluster DNS for the pods the agent runs, served through each pod's /etc/hosts.

A cluster's DNS answers `<hostname>.<subdomain>.<namespace>.svc.cluster.local` for every pod that
a headless Service named `<subdomain>` selects (and `<service>.<namespace>.svc` with all of their
addresses); a pod's search path also makes `<hostname>.<subdomain>` resolve within its own
namespace. CoreDNS reads them from EndpointSlices, but the apiserver refuses loopback addresses in
an EndpointSlice, and every pod address here is one; so the records are derived as the
EndpointSlice controller derives its endpoints: from the headless Services and the pods their
selector matches (not terminal, with an address, and Ready unless the Service publishes not-ready
addresses). Both are listed every ``interval_s`` seconds, and the records are written into the
hosts file of every pod the agent runs, in place (the file is bind-mounted into the pod's mount
namespace, so its inode must stay). Several agents of one cluster each keep their own pods' files.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster.agent_service import hosts_file

Json = dict[str, Any]

log = logging.getLogger(__name__)

CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class Record:
    """One address and the names that resolve to it, in the namespace of the Service."""

    namespace: str
    address: str
    fqdns: tuple[str, ...]
    short: str | None = None
    """`<hostname>.<subdomain>`: what a pod of the same namespace resolves through its search path."""


@dataclass(frozen=True)
class PodHosts:
    """A pod's hosts file and what its own line says."""

    path: Path
    namespace: str
    pod_ip: str
    hostname: str
    subdomain: str | None
    service_ip: str | None


def records_from(services: list[Json], pods: list[Json]) -> list[Record]:
    """The DNS records of the headless Services and the pods they select, in a stable order."""
    records: list[Record] = []
    for service in services:
        meta = service["metadata"]
        if (service.get("spec") or {}).get("clusterIP") != "None":
            continue
        name, namespace = meta["name"], meta["namespace"]
        zone = f"{name}.{namespace}.svc"
        for pod in pods:
            if pod["metadata"].get("namespace") != namespace or not _selects(service, pod) or not _endpoint(service, pod):
                continue
            address = pod["status"]["podIP"]
            hostname = pod["spec"].get("hostname")
            if hostname and pod["spec"].get("subdomain") == name:
                records.append(Record(namespace, address, (f"{hostname}.{zone}.{CLUSTER_DOMAIN}", f"{hostname}.{zone}"), f"{hostname}.{name}"))
            records.append(Record(namespace, address, (f"{zone}.{CLUSTER_DOMAIN}", zone)))
    return sorted(set(records), key=lambda r: (r.namespace, r.fqdns, r.address))


def _selects(service: Json, pod: Json) -> bool:
    selector: dict[str, str] = (service.get("spec") or {}).get("selector") or {}
    labels: dict[str, str] = pod["metadata"].get("labels") or {}
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _endpoint(service: Json, pod: Json) -> bool:
    """Whether the EndpointSlice controller would list the pod for the Service."""
    status = pod.get("status") or {}
    if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed") or pod["metadata"].get("deletionTimestamp"):
        return False
    if (service.get("spec") or {}).get("publishNotReadyAddresses"):
        return True
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def own_names(pod: PodHosts) -> list[str]:
    """The pod's own names, as the kubelet writes them: the FQDN first when it has a subdomain."""
    if not pod.subdomain:
        return [pod.hostname]
    zone = f"{pod.subdomain}.{pod.namespace}.svc"
    return [f"{pod.hostname}.{zone}.{CLUSTER_DOMAIN}", f"{pod.hostname}.{zone}", f"{pod.hostname}.{pod.subdomain}", pod.hostname]


def render(pod: PodHosts, records: list[Record]) -> str:
    """The pod's hosts file: the kubelet's lines, then one line per record it can see (its own pod record is its first line)."""
    lines = [hosts_file(pod.pod_ip, " ".join(own_names(pod)), pod.service_ip).rstrip("\n")]
    for record in records:
        if record.address == pod.pod_ip and record.short is not None:
            continue  # its own line names it already
        names = [*record.fqdns, *([record.short] if record.short and record.namespace == pod.namespace else [])]
        lines.append(f"{record.address}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


class ClusterDns:
    """Keeps the hosts files of the registered pods current with the cluster's headless Services."""

    def __init__(self, list_services: Callable[[], list[Json]], list_pods: Callable[[], list[Json]], interval_s: float = 1.0) -> None:
        self._list_services = list_services
        self._list_pods = list_pods
        self._interval_s = interval_s
        self._pods: dict[str, PodHosts] = {}
        self._written: dict[str, str] = {}
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._refresh_records()
        self._thread = threading.Thread(target=self._loop, name="nodeagent-dns", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)

    def register(self, uid: str, pod: PodHosts) -> None:
        """Write the pod's hosts file now, and again whenever a record changes."""
        with self._lock:
            self._pods[uid] = pod
            self._written.pop(uid, None)
            self._write(uid)

    def unregister(self, uid: str) -> None:
        with self._lock:
            self._pods.pop(uid, None)
            self._written.pop(uid, None)

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self._refresh_records()

    def _refresh_records(self) -> None:
        try:
            records = records_from(self._list_services(), self._list_pods())
        except Exception as error:
            # An apiserver restart: the files keep the last records until the next listing.
            log.warning("listing Services and pods failed: %s", error)
            return
        with self._lock:
            self._records = records
            for uid in list(self._pods):
                self._write(uid)

    def _write(self, uid: str) -> None:
        pod = self._pods[uid]
        text = render(pod, self._records)
        if self._written.get(uid) == text:
            return
        try:
            # Opened for writing, not replaced: the bind mount in the pod follows the inode.
            with pod.path.open("w") as hosts:
                hosts.write(text)
        except OSError as error:
            log.warning("writing %s failed: %s", pod.path, error)
            return
        self._written[uid] = text
