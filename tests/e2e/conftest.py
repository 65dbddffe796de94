"""Fixtures for the e2e tier: one local cluster per test session.

Importing this module starts nothing; the cluster starts when the first test asks for
it. Missing binaries fail the tests (never skip them) with the command that builds them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import LocalCluster, MissingBinariesError, locate_bin_dir
from localcluster.stack import KubetuneStack, StackSettings


@pytest.fixture(scope="session")
def cluster_bin_dir() -> Path:
    """The directory of upstream binaries built by hack/build-tools.sh."""
    try:
        return locate_bin_dir(build=False)
    except MissingBinariesError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_bin_dir: Path) -> Iterator[LocalCluster]:
    """A running local cluster (etcd, apiserver, controller-manager, scheduler, kwok with
    the fake GPU nodes), stopped at the end of the session."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster"), cluster_bin_dir)
    local.start()
    try:
        yield local
    finally:
        local.stop()


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def stack(cluster_bin_dir: Path) -> Iterator[KubetuneStack]:
    """The whole stack on its own control plane: node agent, S3, Prometheus, kubetune installed by helm.

    Its files and every component's log stay in .cache/e2e after the session, for diagnosis.
    """
    workdir = REPO / ".cache" / "e2e"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    running = KubetuneStack(StackSettings(workdir=workdir))
    try:
        running.start()
    except Exception as error:
        pytest.fail(f"the kubetune stack did not start: {error}\nlogs: {workdir}", pytrace=False)
    try:
        yield running
    finally:
        running.stop()
