"""The whole kubetune stack on loopback: control plane, node agent, S3, Prometheus, the chart.

Used by the end-to-end suite and by ``make demo``. ``stop()`` ends every process it started.

- the control plane and kwok's fake GPU nodes (``LocalCluster``);
- two node agents, which run the pods bound to ``cpu-node-0`` and ``cpu-node-1`` as local processes, the
  operator's pod from the chart's Deployment included (with its ServiceAccount's projected token), and give
  them cluster DNS for headless Services (a 2-node job spreads over both);
- moto's S3 server behind a stoppable proxy, holding the tiny model and the demo dataset;
- Debian's Prometheus discovering annotated pods through the apiserver;
- ``helm upgrade --install`` of ``charts/kubetune`` into a namespace that enforces the Pod Security
  ``restricted`` profile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localcluster.cluster import LocalCluster
from localcluster.process import wait_or_kill
from localcluster.prometheus import JobRule, Prometheus
from localcluster.s3 import MotoS3Server
from localcluster.tools import locate_bin_dir
from localcluster.watchdog import Watchdog
from tests.e2e.support.stack import Stack, StackSettings, merge_values

# The job names the chart's ServiceMonitor and PodMonitor give the operator and the trainers; its
# dashboards and alert rules select on them.
CPU_NODES = ("cpu-node-0", "cpu-node-1")
"""The node agents' nodes: two, so that a 2-node job runs one pod on each."""

CHART_JOBS: list[JobRule] = [
    ({"app.kubernetes.io/part-of": "kubetune", "app.kubernetes.io/component": "operator"}, "kubetune-operator"),
    ({"app.kubernetes.io/name": "kubetune-trainer"}, "kubetune-trainer"),
]


def local_chart_values(settings: StackSettings) -> dict[str, Any]:
    """Chart values for the local cluster: the host's environment stands in for the images."""
    values: dict[str, Any] = {
        "operator": {
            "image": {"repository": "kubetune/operator", "tag": "local", "pullPolicy": "Never"},
            "progressIntervalSeconds": 1,
            # Every pod of the local node shares the host's network stack: binding the pod's own address
            # lets several local clusters (the e2e stack and the demo) run an operator each on one port.
            "extraEnv": [{"name": "KUBETUNE_OPERATOR_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        },
        "trainer": {"image": {"repository": "kubetune/trainer", "tag": "local", "pullPolicy": "Never"}},
        # A price for every node, so each job has an estimated cost (0 for the CPU jobs) for the dashboard to show.
        "cost": {"defaultGpuHourPrice": 2.5},
    }
    return merge_values(values, settings.helm_values)


class KubetuneStack(Stack):
    """Everything on loopback. Start with ``start()`` (or as a context manager); ``stop()`` ends everything it started."""

    local = True

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.workdir = settings.workdir.resolve()
        self.cluster: LocalCluster | None = None
        self.s3: MotoS3Server | None = None
        self.prometheus: Prometheus | None = None
        self._agents: list[subprocess.Popen[bytes]] = []
        # Everything below the workdir dies with this process, even when it is killed without stop().
        self._watchdog = Watchdog(self.workdir)

    # lifecycle

    def start(self, progress: Callable[[str], None] = lambda _: None) -> None:
        try:
            progress("building or reusing the Kubernetes binaries")
            bin_dir = locate_bin_dir(build=True)
            self._watchdog.start()
            progress("starting etcd, kube-apiserver, controller-manager, scheduler and kwok")
            self.cluster = LocalCluster(self.workdir / "cluster", bin_dir, watchdog=False)
            self.cluster.start()
            progress(f"starting the node agents ({', '.join(CPU_NODES)})")
            self.start_agent()
            progress("starting S3 (moto) and uploading the tiny model and dataset")
            self.s3 = MotoS3Server(port=self.settings.s3_port)
            self.s3.start()
            self.seed_s3()
            progress("starting Prometheus")
            self.prometheus = Prometheus(self.workdir / "prometheus", self.cluster.kubeconfig, self.settings.prometheus_interval_seconds, job_rules=CHART_JOBS)
            self.prometheus.start()
            progress("installing kubetune with helm")
            self.prepare_namespaces()
            self.helm_install(local_chart_values(self.settings))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
            self.prometheus = None
        self.stop_agent()
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.s3 is not None:
            self.s3.close()
            self.s3 = None
        self._watchdog.stop()

    def __enter__(self) -> KubetuneStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # parts

    @property
    def kubeconfig(self) -> Path:
        assert self.cluster is not None, "the stack is not started"
        return self.cluster.kubeconfig

    def start_agent(self) -> None:
        assert self.cluster is not None
        for index, node in enumerate(CPU_NODES):
            # cpu-node-0 keeps the log and pod folders it had as the only node.
            suffix = f"-{index}" if index else ""
            with (self.workdir / f"nodeagent{suffix}.log").open("ab") as log:
                self._agents.append(self._spawn_agent(log, node, index, self.workdir / f"node{suffix}"))
        self.wait_for(lambda: all(self.node_ready(node) for node in CPU_NODES), 60, f"{', '.join(CPU_NODES)} Ready")

    def node_ready(self, node: str) -> bool:
        ready = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
        return self.kubectl("get", "node", node, "-o", ready, check=False).stdout == "True"

    def _spawn_agent(self, log: Any, node: str, index: int, workdir: Path) -> subprocess.Popen[bytes]:
        assert self.cluster is not None
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "localcluster.nodeagent",
                "--kubeconfig",
                str(self.cluster.kubeconfig),
                "--node-name",
                node,
                "--workdir",
                str(workdir),
                "--address-salt",
                str(self.workdir),
                "--pod-subnet-offset",
                str(index),
                "--api-url",
                self.cluster.api_url,
                "--restart-backoff-seconds",
                "2",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop_agent(self) -> None:
        for agent in self._agents:
            agent.terminate()
        for agent in self._agents:
            wait_or_kill(agent, timeout=60)
        self._agents.clear()

    @property
    def kubectl_binary(self) -> str:
        assert self.cluster is not None, "the stack is not started"
        return str(self.cluster.bin_dir / "kubectl")

    @property
    def helm_binary(self) -> str:
        assert self.cluster is not None, "the stack is not started"
        return str(self.cluster.bin_dir / "helm")

    def restart_control_plane(self, component: str, down_seconds: float) -> None:
        """Stop etcd or the kube-apiserver for ``down_seconds`` and start it again, with its data."""
        assert self.cluster is not None, "the stack is not started"
        self.cluster.restart(component, down_seconds)

    def crash_pod(self, pod: dict[str, Any]) -> None:
        """SIGKILL every process the node agent runs for the trainer pod."""
        pids = pids_of_pod(pod["metadata"]["name"])
        if not pids:
            raise RuntimeError(f"no process found for pod {pod['metadata']['name']}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def pids_of_pod(pod_name: str) -> list[int]:
    """Processes the node agent runs for a trainer pod, found by the pod name the operator puts in their environment."""
    marker = f"KUBETUNE_POD_NAME={pod_name}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids
