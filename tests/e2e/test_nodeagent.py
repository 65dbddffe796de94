"""The node agent runs pods bound to its node as real local processes, like a kubelet.

Each agent here registers its own node (not cpu-node-0, which belongs to the session's
agent when one runs): these tests stop and restart agents, and a node name shared with
another live agent would have two agents running the same pods. Nodes created here are
deleted at the end, so nothing is scheduled onto them afterwards.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from localcluster import LocalCluster
from localcluster.agent_process import image_paths, marked_processes
from localcluster.nodeagent import NodeAgent

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

T = TypeVar("T")
Json = dict[str, Any]

NODE = "nodeagent-e2e-0"


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def apply(cluster: LocalCluster, *manifests: Json) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(manifests)}))


def get(cluster: LocalCluster, kind: str, name: str, namespace: str) -> Json | None:
    result = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found", check=False)
    if result.returncode != 0 or not result.stdout.strip():
        return None
    found: Json = json.loads(result.stdout)
    return found


def pod_in_phase(cluster: LocalCluster, name: str, namespace: str, *phases: str) -> Json:
    def probe() -> Json | None:
        pod = get(cluster, "pod", name, namespace)
        return pod if pod and pod.get("status", {}).get("phase") in phases else None

    return wait_until(f"pod {name} in {phases}", probe)


def python_pod(name: str, namespace: str, script: str, node: str = NODE, **spec: Any) -> Json:
    container: Json = {"name": "main", "image": "python:3.11", "command": ["python", "-c", script]}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node, "restartPolicy": "Never", "containers": [container], **spec},
    }


def terminated(pod: Json) -> Json:
    state: Json = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    return state


@pytest.fixture(scope="module")
def namespace(cluster: LocalCluster) -> Iterator[str]:
    name = f"nodeagent-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    # The controller-manager creates the default ServiceAccount; pods need it for admission.
    wait_until("default ServiceAccount", lambda: get(cluster, "serviceaccount", "default", name))
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


def start_agent(cluster: LocalCluster, workdir: Path, node: str) -> NodeAgent:
    agent = NodeAgent(
        kubeconfig=cluster.kubeconfig,
        workdir=workdir,
        node_name=node,
        api_url=cluster.api_url,
        restart_backoff_s=1.0,
        stop_grace_s=2.0,
    )
    agent.start()
    return agent


@pytest.fixture(scope="module")
def agent(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    running = start_agent(cluster, tmp_path_factory.mktemp("nodeagent"), NODE)
    try:
        yield running
    finally:
        running.stop()
        cluster.kubectl("delete", "node", NODE, "--ignore-not-found")


def test_node_registers_ready_with_capacity_and_lease(cluster: LocalCluster, agent: NodeAgent) -> None:
    node = wait_until("node", lambda: get(cluster, "node", NODE, "default"))
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/hostname"] == NODE
    assert labels["kubetune.io/local-node"] == "true"
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert int(node["status"]["capacity"]["pods"]) == 110
    assert "nvidia.com/gpu" not in node["status"]["capacity"]
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert ready["Ready"] == "True"
    lease = get(cluster, "lease", NODE, "kube-node-lease")
    assert lease is not None and lease["spec"]["holderIdentity"] == NODE


def test_pod_reads_secret_configmap_and_downward_api_and_reports_termination_message(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    script = (
        "import os, socket\n"
        "greeting = open('/etc/greeting/text').read()\n"
        "app = open('/etc/podinfo/app').read()\n"
        "msg = ' '.join([os.environ['TOKEN'], greeting, app, os.environ['POD_NAME'], os.environ['POD_IP'], socket.gethostname()])\n"
        "open('/dev/termination-log', 'w').write(msg)\n"
    )
    apply(
        cluster,
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds", "namespace": namespace}, "stringData": {"token": "s3cr3t"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "greeting", "namespace": namespace}, "data": {"text": "hello"}},
        python_pod(
            "reader",
            namespace,
            script,
            container={
                "env": [
                    {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "volumeMounts": [{"name": "greeting", "mountPath": "/etc/greeting"}, {"name": "podinfo", "mountPath": "/etc/podinfo"}],
            },
            volumes=[
                {"name": "greeting", "configMap": {"name": "greeting"}},
                {"name": "podinfo", "downwardAPI": {"items": [{"path": "app", "fieldRef": {"fieldPath": "metadata.labels['app']"}}]}},
            ],
        ),
    )
    pod = pod_in_phase(cluster, "reader", namespace, "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Succeeded"
    pod_ip = pod["status"]["podIP"]
    assert pod_ip.startswith("127.0.") and pod_ip != "127.0.0.1"
    assert pod["status"]["hostIP"] == "127.0.0.1"
    state = terminated(pod)
    assert state["exitCode"] == 0 and state["reason"] == "Completed"
    assert state["message"] == f"s3cr3t hello reader reader {pod_ip} reader"
    assert state["startedAt"] <= state["finishedAt"]


def test_volume_over_tmp_keeps_the_other_volumes_and_read_only_mounts(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    """Trainer and operator pods mount an emptyDir at /tmp; the agent's own files (under /tmp
    in tests) must stay reachable for the other mounts and the termination message."""
    script = (
        "import os\n"
        "open('/tmp/nested/own', 'w').write('nested')\n"
        "try:\n"
        "    open('/etc/greeting/new-file', 'w')\n"
        "    read_only = 'writable'\n"
        "except OSError:\n"
        "    read_only = 'read-only'\n"
        "listing = sorted(os.listdir('/tmp'))\n"
        "msg = ' '.join([open('/etc/greeting/text').read(), read_only, ','.join(listing), open('/tmp/nested/own').read()])\n"
        "open('/dev/termination-log', 'w').write(msg)\n"
    )
    apply(
        cluster,
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "over-tmp", "namespace": namespace}, "data": {"text": "hi"}},
        python_pod(
            "over-tmp",
            namespace,
            script,
            container={
                "volumeMounts": [
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "nested", "mountPath": "/tmp/nested"},
                    {"name": "greeting", "mountPath": "/etc/greeting", "readOnly": True},
                ]
            },
            volumes=[
                {"name": "tmp", "emptyDir": {}},
                {"name": "nested", "emptyDir": {}},
                {"name": "greeting", "configMap": {"name": "over-tmp"}},
            ],
        ),
    )
    pod = pod_in_phase(cluster, "over-tmp", namespace, "Succeeded", "Failed")
    assert str(agent.workdir).startswith("/tmp/"), "the case this test guards needs the workdir under /tmp"
    # Besides its own content, /tmp shows the image's files that live under /tmp (a checkout there keeps its interpreter).
    image_dirs = {Path(p).relative_to("/tmp").parts[0] for p in image_paths() if p.startswith("/tmp/")}
    listing = ",".join(sorted({"nested"} | image_dirs))
    assert terminated(pod)["message"] == f"hi read-only {listing} nested", agent.container_log(namespace, "over-tmp", "main")


def test_nonzero_exit_fails_pod_with_exit_code_and_log_tail(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    apply(
        cluster,
        python_pod(
            "exit3",
            namespace,
            "import sys; print('bad input: epochs must be positive', file=sys.stderr); sys.exit(3)",
            container={"terminationMessagePolicy": "FallbackToLogsOnError"},
        ),
    )
    pod = pod_in_phase(cluster, "exit3", namespace, "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Failed"
    state = terminated(pod)
    assert state["exitCode"] == 3 and state["reason"] == "Error"
    assert "epochs must be positive" in state["message"]
    assert "epochs must be positive" in agent.container_log(namespace, "exit3", "main")


def test_two_pods_serve_the_same_port_on_their_own_addresses(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    # A port nothing on the host listens on, on any address (pods share the host's stack).
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    server = (
        "import http.server, os\n"
        "class Name(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(200); self.end_headers(); self.wfile.write(os.environ['POD_NAME'].encode())\n"
        "http.server.HTTPServer((os.environ['POD_IP'], int(os.environ['PORT'])), Name).serve_forever()\n"
    )
    container = {
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "PORT", "value": str(port)},
        ],
        "ports": [{"name": "http", "containerPort": port}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
    }
    apply(cluster, *(python_pod(name, namespace, server, container=container, terminationGracePeriodSeconds=5) for name in ("web-a", "web-b")))
    for name in ("web-a", "web-b"):
        pod = pod_in_phase(cluster, name, namespace, "Running")

        def ready(pod_name: str = name) -> Json | None:
            current = get(cluster, "pod", pod_name, namespace)
            conditions = {c["type"]: c["status"] for c in (current or {}).get("status", {}).get("conditions", [])}
            return current if conditions.get("Ready") == "True" else None

        pod = wait_until(f"{name} Ready", ready)
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:{port}/", timeout=5) as response:
            assert response.read().decode() == name
    cluster.kubectl("delete", "pod", "web-a", "web-b", "-n", namespace)


def test_missing_secret_waits_in_create_container_config_error_until_it_exists(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    apply(
        cluster,
        python_pod(
            "late-secret",
            namespace,
            "import os; open('/dev/termination-log', 'w').write(os.environ['KEY'])",
            container={"env": [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "arrives-later", "key": "key"}}}]},
        ),
    )

    def config_error() -> Json | None:
        pod = get(cluster, "pod", "late-secret", namespace) or {}
        statuses = pod.get("status", {}).get("containerStatuses") or [{}]
        waiting = statuses[0].get("state", {}).get("waiting", {})
        return waiting if waiting.get("reason") == "CreateContainerConfigError" else None

    waiting = wait_until("CreateContainerConfigError", config_error)
    assert waiting["message"] == 'secret "arrives-later" not found'
    assert (get(cluster, "pod", "late-secret", namespace) or {})["status"]["phase"] == "Pending"
    cluster.kubectl("create", "secret", "generic", "arrives-later", "--from-literal=key=finally", "-n", namespace)
    pod = pod_in_phase(cluster, "late-secret", namespace, "Succeeded", "Failed")
    assert pod["status"]["phase"] == "Succeeded"
    assert terminated(pod)["message"] == "finally"


def test_delete_delivers_sigterm_within_the_grace_period(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    script = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    open('/scratch/sigterm', 'w').write('received')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open('/scratch/started', 'w').write('yes')\n"
        "while True: time.sleep(0.1)\n"
    )
    pod = python_pod(
        "graceful",
        namespace,
        script,
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}, {"name": "shm", "mountPath": "/dev/shm"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}, {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}}],
        terminationGracePeriodSeconds=30,
    )
    apply(cluster, pod)
    running = pod_in_phase(cluster, "graceful", namespace, "Running")
    scratch = next(agent.workdir.glob(f"pods/{namespace}_graceful_{running['metadata']['uid']}/volumes/scratch"))
    wait_until("the process started", lambda: (scratch / "started").exists())
    began = time.monotonic()
    cluster.kubectl("delete", "pod", "graceful", "-n", namespace, "--wait=true", timeout=60)
    elapsed = time.monotonic() - began
    assert (scratch / "sigterm").read_text() == "received"
    # A SIGKILL would come only after the 30 s grace period; the handler exits at once.
    assert elapsed < 20, f"deletion took {elapsed:.1f}s"


def test_job_backoff_limit_retries_a_failing_pod(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    apply(
        cluster,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "always-fails", "namespace": namespace},
            "spec": {
                "backoffLimit": 1,
                "template": {
                    "spec": {
                        # Scheduled by kube-scheduler onto this agent's node, not bound by hand.
                        "nodeSelector": {"kubernetes.io/hostname": NODE},
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "python:3.11", "command": ["python", "-c", "raise SystemExit(1)"]}],
                    }
                },
            },
        },
    )

    def failed_job() -> Json | None:
        job = get(cluster, "job", "always-fails", namespace) or {}
        conditions = {c["type"]: c for c in job.get("status", {}).get("conditions", [])}
        return job if conditions.get("Failed", {}).get("status") == "True" else None

    job = wait_until("Job Failed", failed_job, timeout=120)
    assert job["status"]["failed"] == 2
    assert {c["reason"] for c in job["status"]["conditions"] if c["type"] == "Failed"} == {"BackoffLimitExceeded"}
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=always-fails", "-o", "json").stdout)["items"]
    assert len(pods) == 2
    assert all(p["spec"]["nodeName"] == NODE and terminated(p)["exitCode"] == 1 for p in pods)


def test_on_failure_restarts_the_container_in_place(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    script = (
        "import os, sys\n"
        "path = '/scratch/attempts'\n"
        "attempts = int(open(path).read()) + 1 if os.path.exists(path) else 1\n"
        "open(path, 'w').write(str(attempts))\n"
        "sys.exit(0 if attempts == 2 else 7)\n"
    )
    pod = python_pod(
        "retry-in-place",
        namespace,
        script,
        container={"volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
        volumes=[{"name": "scratch", "emptyDir": {}}],
        restartPolicy="OnFailure",
    )
    apply(cluster, pod)
    done = pod_in_phase(cluster, "retry-in-place", namespace, "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded"
    status = done["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 7


def test_in_cluster_client_uses_the_projected_token_and_rbac(cluster: LocalCluster, agent: NodeAgent, namespace: str) -> None:
    """Both ways in-cluster clients find the apiserver work: the KUBERNETES_SERVICE_* variables
    and https://kubernetes.default.svc (what kopf's service-account login dials)."""
    script = (
        "import os\n"
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "def read(api):\n"
        "    try:\n"
        "        return 'read ' + api.read_namespaced_pod(os.environ['POD_NAME'], os.environ['POD_NAMESPACE']).metadata.name\n"
        "    except client.ApiException as error:\n"
        "        return f'status {error.status}'\n"
        "by_service = client.Configuration.get_default_copy()\n"
        "by_service.host = 'https://kubernetes.default.svc'\n"
        "results = [read(client.CoreV1Api()), read(client.CoreV1Api(client.ApiClient(by_service)))]\n"
        "open('/dev/termination-log', 'w').write(' | '.join(results))\n"
    )
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    apply(
        cluster,
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "pod-reader", "namespace": namespace}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "get-pods", "namespace": namespace},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "pod-reader-gets-pods", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "get-pods"},
            "subjects": [{"kind": "ServiceAccount", "name": "pod-reader", "namespace": namespace}],
        },
    )
    apply(
        cluster,
        python_pod("allowed", namespace, script, container={"env": env}, serviceAccountName="pod-reader"),
        python_pod("denied", namespace, script, container={"env": env}),
    )
    allowed = pod_in_phase(cluster, "allowed", namespace, "Succeeded", "Failed")
    denied = pod_in_phase(cluster, "denied", namespace, "Succeeded", "Failed")
    assert terminated(allowed)["message"] == "read allowed | read allowed", agent.container_log(namespace, "allowed", "main")
    assert terminated(denied)["message"] == "status 403 | status 403", agent.container_log(namespace, "denied", "main")
    mounts = {m["mountPath"] for m in allowed["spec"]["containers"][0]["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts


def test_restarted_agent_fails_pods_it_lost_and_stop_leaves_nothing_running(cluster: LocalCluster, namespace: str, tmp_path: Path) -> None:
    node = "nodeagent-e2e-restart"
    first = start_agent(cluster, tmp_path, node)
    try:
        apply(cluster, python_pod("long-runner", namespace, "import time; time.sleep(600)", node=node))
        pod = pod_in_phase(cluster, "long-runner", namespace, "Running")
        assert list(marked_processes(first.ctx.agent_id, pod["metadata"]["uid"]))
        first.stop()
        assert not list(marked_processes(first.ctx.agent_id)), "the stopped agent left processes behind"

        second = start_agent(cluster, tmp_path, node)
        try:
            lost = pod_in_phase(cluster, "long-runner", namespace, "Failed", "Succeeded")
            assert lost["status"]["phase"] == "Failed"
            assert terminated(lost)["reason"] == "ContainerStatusUnknown"
            apply(cluster, python_pod("after-restart", namespace, "print('ok')", node=node))
            assert pod_in_phase(cluster, "after-restart", namespace, "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
        finally:
            second.stop()
        assert not list(marked_processes(second.ctx.agent_id))
    finally:
        first.stop()
        cluster.kubectl("delete", "node", node, "--ignore-not-found")
