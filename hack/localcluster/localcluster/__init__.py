"""A local Kubernetes control plane built from upstream binaries, for tests and demos.

    from localcluster import LocalCluster
    with LocalCluster(workdir=Path("/tmp/kc"), bin_dir=locate_bin_dir(build=False)) as cluster:
        cluster.kubectl("get", "nodes")

The CLI (`python -m localcluster up|down|status --workdir DIR`) runs the same launcher
detached, recording process ids in DIR/state.json.
"""

from .cluster import ClusterStartError, ClusterStopError, LocalCluster
from .config import DEFAULT_FAKE_NODES, ClusterConfig, FakeGpuNode
from .process import ProcessRecord, processes_mentioning
from .tools import MissingBinariesError, locate_bin_dir

__all__ = [
    "DEFAULT_FAKE_NODES",
    "ClusterConfig",
    "ClusterStartError",
    "ClusterStopError",
    "FakeGpuNode",
    "LocalCluster",
    "MissingBinariesError",
    "ProcessRecord",
    "locate_bin_dir",
    "processes_mentioning",
]
