"""Fixtures for the e2e tier: one local cluster per test session, or the cluster KUBETUNE_E2E_KUBECONFIG names.

Importing this module starts nothing; the cluster starts when the first test asks for
it. Missing binaries fail the tests (never skip them) with the command that builds them.
On an external cluster (hack/kind/e2e.sh) the tests marked ``local_cluster`` are skipped.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from localcluster import LocalCluster, MissingBinariesError, locate_bin_dir
from localcluster.process import interrupt
from tests.e2e.support.external_stack import ExternalConfig, ExternalStack
from tests.e2e.support.local_stack import KubetuneStack
from tests.e2e.support.stack import Stack, StackSettings


@pytest.fixture(scope="session", autouse=True)
def sigterm_tears_down() -> Iterator[None]:
    """A SIGTERM (a CI timeout, a supervisor) ends the session like Ctrl-C, so the fixtures below still stop
    every process they started instead of leaving a cluster behind."""
    previous = signal.signal(signal.SIGTERM, interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    external = ExternalConfig.from_env()
    if external is None:
        return
    skip = pytest.mark.skip(reason=f"needs the local cluster's own parts; {external.kubeconfig} names another cluster")
    for item in items:
        if item.get_closest_marker("local_cluster"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack on its own control plane: node agent, S3, Prometheus, kubetune installed by helm;
    or kubetune installed on the external cluster the environment names.

    Its files and every component's log stay in .cache/e2e after the session, for diagnosis.
    """
    external = ExternalConfig.from_env()
    workdir = REPO / ".cache" / ("e2e-external" if external else "e2e")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    running: Stack
    if external is not None:
        running = ExternalStack(StackSettings(workdir=workdir, jobs_namespace=external.jobs_namespace), external)
    else:
        request.getfixturevalue("cluster_bin_dir")
        running = KubetuneStack(StackSettings(workdir=workdir))
    try:
        running.start()
    except Exception as error:
        pytest.fail(f"the kubetune stack did not start: {error}\nlogs: {workdir}", pytrace=False)
    try:
        yield running
    finally:
        running.stop()
