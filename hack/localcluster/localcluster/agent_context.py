"""Node-wide settings shared by the node agent and its pod workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from localcluster.agent_dns import ClusterDns
from localcluster.agent_kube import KubeApi


@dataclass(frozen=True)
class AgentContext:
    """Node-wide settings every pod worker shares."""

    node_name: str
    api: KubeApi
    workdir: Path
    host_ip: str
    service_env: dict[str, str]
    image_env: dict[str, str]
    node_allocatable: dict[str, str]
    restart_backoff_s: float
    max_restart_backoff_s: float
    stop_grace_s: float
    # Where kubernetes.default.svc points in pods' /etc/hosts (None: not served).
    service_ip: str | None = None
    # Keeps pods' hosts files current with the cluster's headless Services (None: only the pod's own names).
    dns: ClusterDns | None = None

    @property
    def agent_id(self) -> str:
        """Marks this agent's processes; stable across restarts with the same workdir."""
        return f"{self.node_name}@{self.workdir}"
