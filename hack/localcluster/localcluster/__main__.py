"""CLI: python -m localcluster up|down|status [--workdir DIR] [--bin-dir DIR] [--no-build]."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cluster import ClusterStartError, ClusterStopError, LocalCluster
from .probes import admin_ssl_context, http_ok
from .process import is_alive
from .state import read_state
from .tools import REPO_ROOT, MissingBinariesError, locate_bin_dir

WORKDIR_ENV = "KUBETUNE_CLUSTER_DIR"


def _default_workdir() -> Path:
    return Path(os.environ.get(WORKDIR_ENV, REPO_ROOT / ".cache" / "localcluster"))


def _api_ready(cluster: LocalCluster) -> bool:
    pki = cluster.config.pki_dir
    context = admin_ssl_context(cluster.ca_file, pki / "admin.crt", pki / "admin.key")
    return http_ok(f"{cluster.api_url}/readyz", context)


def _up(workdir: Path, bin_dir: Path | None, build: bool) -> int:
    if read_state(workdir / "state.json") is not None:
        existing = LocalCluster.attach(workdir)
        if existing.is_running() and _api_ready(existing):
            print(f"already up: {existing.api_url}")
            print(f"export KUBECONFIG={existing.kubeconfig}")
            return 0
        print("found a partly stopped cluster; stopping what is left", file=sys.stderr)
        existing.stop()
    cluster = LocalCluster(workdir, bin_dir or locate_bin_dir(build=build), watchdog=False)
    cluster.start()
    # The components run in their own sessions and outlive this process; `down` finds
    # them through the state file.
    print(f"up: {cluster.api_url} (logs in {cluster.logs_dir})")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _down(workdir: Path) -> int:
    if read_state(workdir / "state.json") is None:
        print(f"not running (no state in {workdir})")
        return 0
    LocalCluster.attach(workdir).stop()
    print("stopped")
    return 0


def _status(workdir: Path) -> int:
    state = read_state(workdir / "state.json")
    if state is None:
        print(f"not running (no state in {workdir})")
        return 1
    healthy = True
    for record in state.processes:
        alive = is_alive(record)
        healthy = healthy and alive
        print(f"{record.name:<24} pid {record.pid:<8} {'running' if alive else 'NOT RUNNING'}")
    cluster = LocalCluster.attach(workdir)
    ready = _api_ready(cluster)
    print(f"{'kube-apiserver /readyz':<24} {state.api_url} {'ok' if ready else 'NOT READY'}")
    print(f"export KUBECONFIG={state.kubeconfig}")
    return 0 if healthy and ready else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localcluster", description=__doc__)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--workdir", type=Path, default=None, help=f"cluster directory (default ${WORKDIR_ENV} or .cache/localcluster)")
    parser.add_argument("--bin-dir", type=Path, default=None, help="directory with the binaries (default: hack/build-tools.sh output)")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    args = parser.parse_args(argv)
    workdir = (args.workdir or _default_workdir()).resolve()
    try:
        if args.command == "up":
            return _up(workdir, args.bin_dir, build=not args.no_build)
        if args.command == "down":
            return _down(workdir)
        return _status(workdir)
    except (ClusterStartError, ClusterStopError, MissingBinariesError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
