"""Typed settings for the local control plane."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
FAKE_NODE_ANNOTATION_VALUE = "fake"
FAKE_NODE_LABEL = "kubetune.io/fake-node"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"
# Annotation on a pod that overrides how long kwok keeps a Job's pod Running before it
# reports Succeeded (milliseconds, as kwok's Stage API expects).
FAKE_RUN_MILLISECONDS_ANNOTATION = "kubetune.io/fake-run-milliseconds"


@dataclass(frozen=True)
class FakeGpuNode:
    """A node simulated by kwok: real scheduling inputs, no kubelet behind it."""

    name: str
    gpus: int
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    cpu: str = "64"
    memory: str = "512Gi"
    pods: int = 110


DEFAULT_FAKE_NODES: tuple[FakeGpuNode, ...] = (
    FakeGpuNode(name="gpu-node-a", gpus=8),
    FakeGpuNode(name="gpu-node-b", gpus=8),
    FakeGpuNode(name="gpu-node-c", gpus=1),
)


@dataclass(frozen=True)
class ClusterConfig:
    """Everything that decides how the local cluster is started.

    `workdir` holds certificates, kubeconfigs, etcd data, logs and the state file; it is
    the one place to look when something goes wrong and the one thing `down` cleans up.
    """

    workdir: Path
    bin_dir: Path
    service_cluster_ip_range: str = "10.96.0.0/16"
    pod_cidr: str = "10.244.0.0/16"
    fake_nodes: tuple[FakeGpuNode, ...] = DEFAULT_FAKE_NODES
    # Every controller that is on by default in a real kube-controller-manager, so
    # Deployments, Jobs, garbage collection and service-account tokens behave as in
    # production clusters.
    controllers: tuple[str, ...] = ("*",)
    # How long a Job's pod on a fake node stays Running before kwok marks it Succeeded.
    fake_pod_run_milliseconds: int = 1000
    start_timeout_seconds: float = 120.0
    stop_timeout_seconds: float = 15.0
    extra_apiserver_args: tuple[str, ...] = field(default=())

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def etcd_data_dir(self) -> Path:
        return self.workdir / "etcd-data"

    @property
    def kubeconfig_dir(self) -> Path:
        return self.workdir / "kubeconfigs"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    @property
    def admin_kubeconfig(self) -> Path:
        # A fixed, short path: `export KUBECONFIG=<workdir>/kubeconfig`.
        return self.workdir / "kubeconfig"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name
