"""A small kubelet stand-in: runs the pods bound to one CPU node as real local processes.

    python -m localcluster.nodeagent --kubeconfig K --node-name cpu-node-0 --workdir DIR

or, from a fixture, `NodeAgent(kubeconfig=..., workdir=...).start()` and later `.stop()`.

The agent registers its Node (Ready, with a heartbeat Lease), watches the pods whose
spec.nodeName is that node and runs their containers: init containers in order, then
the containers, each as a process in its own process group and private mount
namespace. Container images are ignored: the host's environment stands in for every
image (PATH begins with the bin directory of the interpreter the agent runs with, and
`python`/`python3` as a command mean that interpreter), so a pod runs whatever the
host has installed. HOME is a per-pod directory (seen at /run/localcluster-home), and a
container without workingDir starts in /, as in an image without WORKDIR.

Each pod gets its own loopback address (127.0.N.M, reported as status.podIP) and
in-cluster variables that point at the real apiserver, so in-cluster clients work and
servers bound to $POD_IP do not collide (all pods share the host's network stack: a
server bound to 0.0.0.0 takes its port on every address). hostNetwork pods get 127.0.0.1.
Pods also get a kubelet-style /etc/hosts in which kubernetes.default.svc names an address
where the agent relays port 443 to the apiserver (see agent_service), and in which the names
cluster DNS gives the pods of headless Services are kept current (see agent_dns). Several
agents of one cluster (one per Node) pass one --address-salt and distinct --pod-subnet-offset. `kubectl logs` is not served; read the
files, or `NodeAgent.container_log()` from a test.

The agent must run as root (mount namespaces and bind mounts need it). Pods inherit the
agent's PATH, locale and PYTHONPATH, nothing else of its environment (no KUBECONFIG: an
in-cluster client must use the pod's own ServiceAccount token).

Not emulated: securityContext (processes run as the agent's user; the interpreter may
live where other users cannot read, e.g. under /root), resource limits
(reported through the downward API, not enforced), image pulls, exec/attach/logs through
the apiserver, sidecar init containers (restartPolicy Always on an init container), and
network isolation beyond the separate addresses.

Per pod, everything lives under DIR/pods/<namespace>_<name>_<uid>/: volumes/, logs/
(container output, `<container>/<restart>.log`, kept for diagnosis), containers/ (launch
scripts and termination-message files). PersistentVolumeClaims are DIR/claims/<ns>/<claim>.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from localcluster import agent_node, agent_process
from localcluster.agent_context import AgentContext
from localcluster.agent_dns import ClusterDns
from localcluster.agent_kube import KubeApi, new_watch
from localcluster.agent_network import HOST_IP, POD_NETWORK, PodAddresses, image_env, service_env
from localcluster.agent_pod import PodWorker
from localcluster.agent_service import ApiServiceProxy
from localcluster.agent_status import TERMINAL_PHASES, abandoned_status, now, timestamp

Json = dict[str, Any]

log = logging.getLogger("localcluster.nodeagent")

DEFAULT_NODE_NAME = "cpu-node-0"
WATCH_TIMEOUT_S = 60
# The client's loader is untyped.
load_kube_config: Callable[..., None] = config.load_kube_config


def _started_by_someone(pod: Json) -> bool:
    status = pod.get("status") or {}
    statuses = (status.get("containerStatuses") or []) + (status.get("initContainerStatuses") or [])
    return any("running" in (s.get("state") or {}) or "terminated" in (s.get("state") or {}) for s in statuses)


class NodeAgent:
    """Registers the node, keeps it Ready and runs its pods until stop()."""

    def __init__(
        self,
        kubeconfig: Path | str,
        workdir: Path | str,
        node_name: str = DEFAULT_NODE_NAME,
        api_url: str | None = None,
        *,
        restart_backoff_s: float = 10.0,
        max_restart_backoff_s: float = 300.0,
        stop_grace_s: float = 5.0,
        heartbeat_s: float = 10.0,
        pod_subnet_offset: int = 0,
        address_salt: str | None = None,
    ) -> None:
        configuration = client.Configuration()
        load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = 64
        self.api = KubeApi(client.ApiClient(configuration))
        self.node_name = node_name
        self.workdir = Path(workdir).resolve()
        self.api_url = api_url or str(configuration.host)
        self.heartbeat_s = heartbeat_s
        self.ctx = AgentContext(
            node_name=node_name,
            api=self.api,
            workdir=self.workdir,
            host_ip=HOST_IP,
            service_env=service_env(self.api_url),
            image_env=image_env(),
            node_allocatable=agent_node.capacity(),
            restart_backoff_s=restart_backoff_s,
            max_restart_backoff_s=max_restart_backoff_s,
            stop_grace_s=stop_grace_s,
        )
        # Agents of one cluster share a salt and differ in offset, so their nodes' pods never share an address.
        self.addresses = PodAddresses(salt=address_salt or str(self.workdir), offset=pod_subnet_offset)
        self._dns = ClusterDns(self.api.list_services, self.api.list_live_pods)
        self._workers: dict[str, PodWorker] = {}
        self._abandoned: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch = new_watch()
        self._ready_since = timestamp(now())
        self._kubelet_version = "v0.0.0"
        upstream = urllib.parse.urlsplit(self.api_url)
        self._service = ApiServiceProxy(upstream.hostname or HOST_IP, upstream.port or 443)

    # lifecycle

    def start(self) -> None:
        """Registers the node and starts the heartbeat and pod watch; returns at once."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Processes of an earlier agent for this node cannot be waited on; they go, and
        # the pods they ran are failed below.
        leftovers = agent_process.kill_marked(self.ctx.agent_id)
        if leftovers:
            log.warning("killed %d processes left by an earlier agent", len(leftovers))
        self._kubelet_version = self._server_version()
        self.ctx = dataclasses.replace(self.ctx, service_ip=self._service.start(), dns=self._dns)
        self._dns.start()
        self.api.ensure_node(agent_node.node_object(self.node_name))
        self._heartbeat_once()
        pods, resource_version = self.api.list_node_pods(self.node_name)
        for pod in pods:
            if pod.get("status", {}).get("phase") not in TERMINAL_PHASES and _started_by_someone(pod):
                self._fail_abandoned(pod)
            else:
                self._dispatch(pod)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (lambda: self._watch_loop(resource_version), "watch")):
            thread = threading.Thread(target=target, name=f"nodeagent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("node %s is up (pods get addresses in %s)", self.node_name, POD_NETWORK)

    def stop(self) -> None:
        """Kills every pod process (SIGTERM, then SIGKILL after stop_grace_s) and stops."""
        self._stopping.set()
        self._watch.stop()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.request_stop(self.ctx.stop_grace_s)
        for worker in workers:
            worker.join(self.ctx.stop_grace_s + 10)
        agent_process.kill_marked(self.ctx.agent_id)
        self._dns.stop()
        self._service.stop()
        for thread in self._threads:
            thread.join(1.0)
        log.info("node %s stopped; its pods' processes are gone", self.node_name)

    def container_log(self, namespace: str, pod_name: str, container: str) -> str:
        """Output of the newest run of a container of the newest pod with that name, or ""."""
        pod_dirs = sorted(
            (self.workdir / "pods").glob(f"{namespace}_{pod_name}_*"),
            key=lambda path: path.stat().st_mtime,
        )
        if not pod_dirs:
            return ""
        runs = sorted((pod_dirs[-1] / "logs" / container).glob("*.log"), key=lambda path: int(path.stem))
        return runs[-1].read_text(errors="replace") if runs else ""

    def __enter__(self) -> NodeAgent:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # the node

    def _server_version(self) -> str:
        try:
            info: Any = client.VersionApi(self.api.api_client).get_code(_preload_content=False)
            version: str = json.loads(info.data)["gitVersion"]
            return version
        except (ApiException, KeyError, ValueError):
            return "v0.0.0"

    def _heartbeat_once(self) -> None:
        status = agent_node.node_status(HOST_IP, self._kubelet_version, self._ready_since)
        try:
            self.api.patch_node_status(self.node_name, status)
        except ApiException as error:
            if error.status != 404:
                raise
            if self._stopping.is_set():
                return
            # Someone deleted the Node: register again, as the kubelet does.
            self.api.ensure_node(agent_node.node_object(self.node_name))
            self.api.patch_node_status(self.node_name, status)
        node_uid = self.api.get_node_uid(self.node_name)
        self.api.renew_lease(agent_node.LEASE_NAMESPACE, agent_node.lease_object(self.node_name, node_uid))

    def _heartbeat_loop(self) -> None:
        while not self._stopping.wait(self.heartbeat_s):
            try:
                self._heartbeat_once()
            except Exception as error:
                log.warning("node heartbeat failed: %s", error)

    # pods

    def _watch_loop(self, resource_version: str) -> None:
        while not self._stopping.is_set():
            try:
                for event in self.api.watch_node_pods(self.node_name, resource_version, WATCH_TIMEOUT_S, self._watch):
                    if self._stopping.is_set():
                        return
                    pod = event["object"]
                    resource_version = pod["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        self._forget(pod)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        self._dispatch(pod)
            except ApiException as error:
                if error.status != 410:
                    log.warning("pod watch failed (%s); listing again", error.status)
                    self._stopping.wait(1.0)
                resource_version = self._relist()
            except Exception as error:
                if self._stopping.is_set():
                    return
                # The client's watch helper raises KeyError on an ERROR event (an expired
                # resourceVersion) when events are not deserialised; both mean: list again.
                log.info("pod watch ended (%r); listing again", error)
                self._stopping.wait(1.0)
                resource_version = self._relist()

    def _relist(self) -> str:
        while not self._stopping.is_set():
            try:
                pods, resource_version = self.api.list_node_pods(self.node_name)
            except Exception as error:
                log.warning("listing pods failed: %s", error)
                self._stopping.wait(1.0)
                continue
            present = {p["metadata"]["uid"] for p in pods}
            with self._lock:
                gone = [w for uid, w in self._workers.items() if uid not in present]
            for worker in gone:
                self._forget(worker.pod)
            for pod in pods:
                self._dispatch(pod)
            return resource_version
        return ""

    def _dispatch(self, pod: Json) -> None:
        if self._stopping.is_set():
            return
        meta = pod["metadata"]
        phase = (pod.get("status") or {}).get("phase")
        with self._lock:
            worker = self._workers.get(meta["uid"])
            runnable = phase not in TERMINAL_PHASES and meta["uid"] not in self._abandoned
            if worker is None and runnable and not meta.get("deletionTimestamp"):
                if pod["spec"].get("hostNetwork"):
                    address = HOST_IP
                else:
                    address = self.addresses.claim((pod.get("status") or {}).get("podIP"))
                worker = PodWorker(self.ctx, pod, address)
                self._workers[meta["uid"]] = worker
                worker.start()
                return
        if worker is not None and worker.is_alive():
            worker.update(pod)
        elif meta.get("deletionTimestamp"):
            # Nothing runs for this pod any more: the kubelet's final delete.
            self.api.delete_pod_now(meta["namespace"], meta["name"], meta["uid"])

    def _forget(self, pod: Json) -> None:
        with self._lock:
            worker = self._workers.pop(pod["metadata"]["uid"], None)
        if worker is None:
            return
        worker.vanish()
        worker.join(5.0)
        self.addresses.release(worker.pod_ip)

    def _fail_abandoned(self, pod: Json) -> None:
        """A pod an earlier agent ran: its processes are gone, so it ends Failed."""
        meta = pod["metadata"]
        self._abandoned.add(meta["uid"])
        agent_process.kill_marked(self.ctx.agent_id, meta["uid"])
        patch = abandoned_status(pod)
        try:
            self.api.patch_pod_status(meta["namespace"], meta["name"], patch)
            if meta.get("deletionTimestamp"):
                self.api.delete_pod_now(meta["namespace"], meta["name"], meta["uid"])
        except ApiException as error:
            if error.status != 404:
                raise
        log.warning("pod %s/%s was running under an earlier agent; marked Failed", meta["namespace"], meta["name"])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m localcluster.nodeagent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, type=Path, help="credentials with node and pod rights")
    parser.add_argument("--node-name", default=DEFAULT_NODE_NAME)
    parser.add_argument("--workdir", required=True, type=Path, help="pod directories, logs and claims")
    parser.add_argument("--api-url", help="apiserver URL for in-cluster clients (default: the kubeconfig's)")
    parser.add_argument("--pod-subnet-offset", type=int, default=0, help="which /24 after the salted first one this node's pods take")
    parser.add_argument("--address-salt", help="picks the pods' first /24; the agents of one cluster share it (default: the workdir)")
    parser.add_argument("--restart-backoff-seconds", type=float, default=10.0)
    parser.add_argument("--stop-grace-seconds", type=float, default=5.0)
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    agent = NodeAgent(
        kubeconfig=args.kubeconfig,
        workdir=args.workdir,
        node_name=args.node_name,
        api_url=args.api_url,
        restart_backoff_s=args.restart_backoff_seconds,
        stop_grace_s=args.stop_grace_seconds,
        pod_subnet_offset=args.pod_subnet_offset,
        address_salt=args.address_salt,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.start()
    while not done.wait(1.0):
        pass
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
