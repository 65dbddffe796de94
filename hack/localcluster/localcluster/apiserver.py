"""ApiServerOnly: etcd and kube-apiserver alone, for tests that drive a controller in-process.

What controller-runtime's envtest gives Go operators: the real API (schemas, CEL, RBAC, server-side
apply, admission) in a few seconds, with no controllers, scheduler or nodes, so nothing changes an
object unless the test or the code under test does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from . import components
from .config import ClusterConfig
from .kubeconfig import write_client_cert_kubeconfig
from .pki import create_pki
from .probes import ApiClient, ComponentFailedError, admin_ssl_context, free_ports, http_ok, wait_for
from .process import ProcessRecord, spawn, terminate
from .watchdog import Watchdog

BINARIES = ("etcd", "kube-apiserver")
_RUNTIME_DIRS = ("pki", "etcd-data", "logs")
_START_ATTEMPTS = 3


class ApiServerOnly:
    """Starts etcd and kube-apiserver (RBAC on, admin client certificate in system:masters).

    ``kubeconfig`` is the admin's; ``api()`` a minimal admin REST client. A watchdog stops both
    processes if the owner dies without calling stop().
    """

    def __init__(self, workdir: Path, bin_dir: Path) -> None:
        self.config = ClusterConfig(workdir=workdir.resolve(), bin_dir=bin_dir.resolve())
        self._processes: list[tuple[ProcessRecord, subprocess.Popen[bytes]]] = []
        self._api_url: str | None = None
        self._watchdog = Watchdog(self.config.workdir)

    @property
    def kubeconfig(self) -> Path:
        return self.config.admin_kubeconfig

    @property
    def api_url(self) -> str:
        if self._api_url is None:
            raise RuntimeError("the apiserver is not started")
        return self._api_url

    def start(self) -> None:
        missing = [name for name in BINARIES if not self.config.binary(name).is_file()]
        if missing:
            raise FileNotFoundError(f"missing {', '.join(missing)} in {self.config.bin_dir}; build them with hack/build-tools.sh")
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start()
                return
            except ComponentFailedError as error:
                self.stop()
                # A port chosen free can be taken by another process before the component binds it.
                if "address already in use" not in str(error) or attempt == _START_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        for record, popen in reversed(self._processes):
            terminate(record, popen, self.config.stop_timeout_seconds)
        self._processes.clear()
        self._api_url = None
        self._watchdog.stop()

    def api(self) -> ApiClient:
        pki = self.config.pki_dir
        return ApiClient(self.api_url, admin_ssl_context(pki / "ca.crt", pki / "admin.crt", pki / "admin.key"))

    def __enter__(self) -> ApiServerOnly:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, name: str, argv: list[str]) -> ProcessRecord:
        popen, record = spawn(name, argv, self.config.logs_dir / f"{name}.log", self.config.workdir)
        self._processes.append((record, popen))
        return record

    def _start(self) -> None:
        config = self.config
        config.workdir.mkdir(parents=True, exist_ok=True)
        for name in _RUNTIME_DIRS:
            shutil.rmtree(config.workdir / name, ignore_errors=True)
        self._watchdog.start()
        pki = create_pki(config.pki_dir, config.service_cluster_ip_range)
        etcd_client, etcd_peer, apiserver = free_ports(3)
        # The components this mode leaves out get no port.
        ports = components.Ports(etcd_client, etcd_peer, apiserver, controller_manager=0, scheduler=0, kwok=0)
        self._api_url = f"https://127.0.0.1:{ports.apiserver}"
        write_client_cert_kubeconfig(config.admin_kubeconfig, self._api_url, pki.ca.cert, pki.admin.cert, pki.admin.key, "kubetune-admin")
        timeout = config.start_timeout_seconds
        etcd = self._spawn("etcd", components.etcd_argv(config, ports))
        wait_for("etcd /health", lambda: http_ok(f"http://127.0.0.1:{ports.etcd_client}/health"), timeout, etcd)
        process = self._spawn("kube-apiserver", components.apiserver_argv(config, ports, pki))
        context = admin_ssl_context(pki.ca.cert, pki.admin.cert, pki.admin.key)
        wait_for("kube-apiserver /readyz", lambda: http_ok(f"{self._api_url}/readyz", context), timeout, process)
        # /readyz can answer before the system namespaces are written; objects go into default.
        wait_for("namespace default", lambda: self.api().get("/api/v1/namespaces/default") is not None, timeout, process)
