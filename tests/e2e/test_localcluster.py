"""The local cluster behaves like a real one: admission, scheduling on GPU capacity,
Jobs completing, garbage collection, ServiceAccount tokens and RBAC, clean shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from localcluster import ClusterConfig, LocalCluster, processes_mentioning
from localcluster.process import group_members
from localcluster.tools import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

T = TypeVar("T")

RESTRICTED_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.25)


def get_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def apply(cluster: LocalCluster, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def create_namespace(cluster: LocalCluster, name: str) -> str:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        },
    )
    # Pods are only admitted once the ServiceAccount controller has made `default`.
    wait_until(
        f"ServiceAccount {name}/default",
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
    )
    return name


def gpu_pod_spec(gpus: int) -> dict[str, Any]:
    return {
        "restartPolicy": "Never",
        "tolerations": [GPU_TOLERATION],
        "containers": [
            {
                "name": "trainer",
                "image": "registry.invalid/trainer:test",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                "securityContext": RESTRICTED_SECURITY_CONTEXT,
            }
        ],
    }


def gpu_job(name: str, namespace: str, gpus: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "backoffLimit": 0,
            "template": {"metadata": {"annotations": annotations or {}}, "spec": gpu_pod_spec(gpus)},
        },
    }


def job_pods(cluster: LocalCluster, namespace: str, job: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = get_json(cluster, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={job}")["items"]
    return items


def has_condition(obj: dict[str, Any], kind: str, status: str = "True") -> bool:
    return any(c["type"] == kind and c["status"] == status for c in obj.get("status", {}).get("conditions") or [])


def test_fake_gpu_nodes_are_ready_tainted_and_have_gpu_capacity(cluster: LocalCluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in get_json(cluster, "nodes")["items"]}
    expected = {"gpu-node-a": "8", "gpu-node-b": "8", "gpu-node-c": "1"}
    assert set(expected) <= set(nodes)
    for name, gpus in expected.items():
        node = nodes[name]
        assert has_condition(node, "Ready"), node["status"]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == gpus
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert node["metadata"]["labels"]["kubetune.io/fake-node"] == "true"


def test_restricted_namespace_rejects_a_privileged_pod(cluster: LocalCluster) -> None:
    namespace = create_namespace(cluster, "psa-check")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in result.stderr


def test_gpu_job_is_scheduled_on_a_fake_gpu_node_and_completes(cluster: LocalCluster) -> None:
    namespace = create_namespace(cluster, "gpu-job")
    apply(cluster, gpu_job("two-gpus", namespace, gpus=2))

    job = wait_until(
        "Job two-gpus Complete",
        lambda: j if has_condition(j := get_json(cluster, "job", "two-gpus", "-n", namespace), "Complete") else None,
    )
    assert job["status"]["succeeded"] == 1
    pods = job_pods(cluster, namespace, "two-gpus")
    assert len(pods) == 1
    # gpu-node-c has a single GPU, so only the 8-GPU nodes fit a 2-GPU pod.
    assert pods[0]["spec"]["nodeName"] in {"gpu-node-a", "gpu-node-b"}
    assert pods[0]["status"]["phase"] == "Succeeded"
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0


def test_pod_asking_for_more_gpus_than_any_node_stays_pending(cluster: LocalCluster) -> None:
    namespace = create_namespace(cluster, "too-big")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "sixteen-gpus", "namespace": namespace},
        "spec": gpu_pod_spec(16),
    }
    apply(cluster, pod)

    def unschedulable() -> dict[str, Any] | None:
        current: dict[str, Any] = get_json(cluster, "pod", "sixteen-gpus", "-n", namespace)
        return current if has_condition(current, "PodScheduled", "False") else None

    current = wait_until("PodScheduled=False on sixteen-gpus", unschedulable)
    condition = next(c for c in current["status"]["conditions"] if c["type"] == "PodScheduled")
    assert condition["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in condition["message"]
    assert current["status"]["phase"] == "Pending"
    assert "nodeName" not in current["spec"]


def test_deleting_a_job_garbage_collects_its_pods(cluster: LocalCluster) -> None:
    namespace = create_namespace(cluster, "gc")
    # Keep the pod Running long enough that only garbage collection can remove it.
    apply(cluster, gpu_job("long", namespace, gpus=1, annotations={"kubetune.io/fake-run-milliseconds": "600000"}))
    pods = wait_until(
        "a Running pod of Job long",
        lambda: [p for p in job_pods(cluster, namespace, "long") if p["status"].get("phase") == "Running"],
    )
    assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "Job"

    cluster.kubectl("delete", "job", "long", "-n", namespace, "--cascade=background", "--wait=false")
    wait_until("pods of Job long deleted", lambda: job_pods(cluster, namespace, "long") == [])


def test_service_account_kubeconfig_uses_a_token_request_and_rbac(cluster: LocalCluster, tmp_path: Path) -> None:
    namespace = create_namespace(cluster, "sa-check")
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    kubeconfig = cluster.service_account_kubeconfig(namespace, "reader", tmp_path / "reader.kubeconfig")

    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:reader"
    denied = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr

    cluster.kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    cluster.kubectl("create", "rolebinding", "reader", "--role=pod-reader", f"--serviceaccount={namespace}:reader", "-n", namespace)
    wait_until(
        "RBAC to allow the reader",
        lambda: cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False).returncode == 0,
    )
    # The root CA is published into every namespace for in-cluster clients.
    ca = get_json(cluster, "configmap", "kube-root-ca.crt", "-n", namespace)
    assert ca["data"]["ca.crt"] == cluster.ca_file.read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localcluster", *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_up_status_down_is_idempotent_and_leaves_no_process(tmp_path: Path, cluster_bin_dir: Path) -> None:
    workdir = tmp_path / "cli-cluster"
    common = ["--workdir", str(workdir), "--bin-dir", str(cluster_bin_dir)]
    try:
        up = run_cli("up", *common)
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={workdir / 'kubeconfig'}" in up.stdout
        again = run_cli("up", *common)
        assert again.returncode == 0, again.stderr
        assert "already up" in again.stdout

        status = run_cli("status", "--workdir", str(workdir))
        assert status.returncode == 0, status.stdout
        attached = LocalCluster.attach(workdir)
        assert {p.name for p in attached.processes} == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
        assert processes_mentioning(str(workdir)), "the detached components should be running"
        nodes = attached.kubectl("get", "nodes", "-o", "name").stdout.split()
        assert "node/gpu-node-c" in nodes
    finally:
        down = run_cli("down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stderr
    assert processes_mentioning(str(workdir)) == []
    assert run_cli("down", "--workdir", str(workdir)).returncode == 0
    assert run_cli("status", "--workdir", str(workdir)).returncode == 1
    assert (workdir / "logs" / "kube-apiserver.log").stat().st_size > 0


def test_stop_leaves_no_process_behind(tmp_path: Path, cluster_bin_dir: Path) -> None:
    workdir = tmp_path / "stop-cluster"
    # A short grace period: the stubborn process below only goes with SIGKILL.
    with LocalCluster(config=ClusterConfig(workdir=workdir, bin_dir=cluster_bin_dir, stop_timeout_seconds=2.0)) as local:
        # An extra process that ignores SIGTERM and has a child of its own, started the
        # way the node agent or a demo would attach to the cluster.
        extra = local.add_process("stubborn", ["bash", "-c", "trap '' TERM; sleep 600 & sleep 600; wait"])
        pids = [p.pid for p in local.processes]
        assert len(pids) == 6
        assert json.loads((workdir / "state.json").read_text())["processes"][-1]["name"] == "stubborn"
        wait_until("the extra process and its children", lambda: len(group_members(extra.pid)) >= 3)
        # The control-plane components all name the workdir on their command lines.
        assert set(pids[:5]) <= set(processes_mentioning(str(workdir)))
    assert processes_mentioning(str(workdir)) == []
    assert group_members(extra.pid) == []
    assert not (workdir / "state.json").exists()


def test_sigterm_to_the_test_session_stops_its_cluster(tmp_path: Path) -> None:
    """A CI timeout's SIGTERM mid-session still runs the fixtures' teardown: no cluster process survives."""
    basetemp = tmp_path / "inner"
    argv = [sys.executable, "-m", "pytest", "-m", "e2e", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}"]
    argv += ["tests/e2e/test_localcluster.py", "-k", "not sigterm and not sigkill and not cli_up and not stop_leaves"]
    session = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert session.stdout is not None
    # The first test's progress mark: the session-scoped cluster is up and tests are running.
    first = session.stdout.read(1)
    assert first in ".FEs", first + session.stdout.read()
    assert processes_mentioning(str(basetemp)), "the inner session's cluster is not running"
    session.terminate()
    output, _ = session.communicate(timeout=120)
    assert session.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    assert "KeyboardInterrupt" in output
    assert processes_mentioning(str(basetemp)) == [], output[-3000:]


def test_sigkill_of_the_test_session_leaves_no_cluster_process(tmp_path: Path) -> None:
    """A session killed outright runs no teardown; the cluster's watchdog ends its components instead."""
    basetemp = tmp_path / "inner"
    argv = [sys.executable, "-m", "pytest", "-m", "e2e", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}"]
    argv += ["tests/e2e/test_localcluster.py", "-k", "not sigterm and not sigkill and not cli_up and not stop_leaves"]
    session = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert session.stdout is not None
    first = session.stdout.read(1)
    assert first in ".FEs", first + session.stdout.read()
    assert processes_mentioning(str(basetemp)), "the inner session's cluster is not running"
    session.kill()
    session.wait(timeout=30)
    session.stdout.close()
    wait_until("no process of the killed session's cluster", lambda: processes_mentioning(str(basetemp), environment=True) == [], timeout=20)
