"""The `kubernetes` Service for pods: kubernetes.default.svc:443 reaches the real apiserver.

In a cluster, clients that do not read KUBERNETES_SERVICE_HOST (kopf's service-account
login, for one) dial https://kubernetes.default.svc, resolved by cluster DNS to the
Service's ClusterIP and forwarded by kube-proxy. Here each pod gets a kubelet-style
/etc/hosts naming a loopback address of the agent's, where a small TCP forwarder listens
on port 443 and relays bytes to the apiserver (TLS stays end to end; the apiserver's
certificate names kubernetes.default.svc).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

log = logging.getLogger(__name__)

SERVICE_NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")
SERVICE_PORT = 443
# 127.0.0.x stays outside the pods' addresses (127.0.1.1 and up); each agent takes the
# first free one, so agents of several local clusters can run side by side.
_CANDIDATE_HOSTS = tuple(f"127.0.0.{n}" for n in range(10, 250))


def hosts_file(pod_ip: str, hostname: str, service_ip: str | None) -> str:
    lines = [
        "# Kubernetes-managed hosts file (written by the localcluster node agent).",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{pod_ip}\t{hostname}",
    ]
    if service_ip:
        lines.append(f"{service_ip}\t{' '.join(SERVICE_NAMES)}")
    return "\n".join(lines) + "\n"


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


class ApiServiceProxy:
    """Listens on <loopback>:443 and relays each connection to the apiserver."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.address: str | None = None
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> str | None:
        """Binds the first free candidate address; None when none is free."""
        for host in _CANDIDATE_HOSTS:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind((host, SERVICE_PORT))
            except OSError:
                listener.close()
                continue
            listener.listen(64)
            listener.settimeout(0.5)
            self._listener, self.address = listener, host
            self._thread = threading.Thread(target=self._accept_loop, name="nodeagent-kubernetes-service", daemon=True)
            self._thread.start()
            return host
        log.warning("no free address for kubernetes.default.svc:%d; pods will not resolve it", SERVICE_PORT)
        return None

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.close()
            self._open.clear()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), name="nodeagent-kubernetes-relay", daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        client.settimeout(None)
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError as error:
            log.warning("kubernetes service: apiserver unreachable: %s", error)
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        backwards = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        backwards.start()
        _pump(client, upstream)
        backwards.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()
