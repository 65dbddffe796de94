"""The Node object the agent registers and keeps Ready (status conditions and a node Lease)."""

from __future__ import annotations

import os
import platform
from typing import Any

from localcluster.agent_status import now, timestamp

Json = dict[str, Any]

LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
MAX_PODS = 110
LOCAL_NODE_LABEL = "kubetune.io/local-node"


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemTotal missing from /proc/meminfo")


def capacity() -> dict[str, str]:
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{host_memory_bytes() // 1024}Ki",
        "pods": str(MAX_PODS),
        "ephemeral-storage": f"{_disk_bytes() // 1024}Ki",
    }


def _disk_bytes() -> int:
    stats = os.statvfs("/")
    return stats.f_blocks * stats.f_frsize


def node_object(name: str) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": _arch(),
                "kubernetes.io/hostname": name,
                LOCAL_NODE_LABEL: "true",
            },
        },
        "spec": {},
    }


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def node_status(host_ip: str, kubelet_version: str, ready_since: str) -> Json:
    """Status for one heartbeat; the conditions have held since the agent started."""
    moment = timestamp(now())
    resources = capacity()

    def condition(kind: str, status: str, reason: str, message: str) -> Json:
        return {
            "type": kind,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": moment,
            "lastTransitionTime": ready_since,
        }

    return {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": host_ip},
            {"type": "Hostname", "address": platform.node()},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": "",
            "systemUUID": "",
            "bootID": "",
            "kernelVersion": platform.release(),
            "osImage": "localcluster host",
            "containerRuntimeVersion": "localcluster://processes",
            "kubeletVersion": kubelet_version,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": _arch(),
        },
    }


def lease_object(name: str, node_uid: str) -> Json:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": node_uid}],
        },
        "spec": {
            "holderIdentity": name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": now().strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        },
    }
