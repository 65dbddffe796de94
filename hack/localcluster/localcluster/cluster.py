"""LocalCluster: a real Kubernetes control plane on loopback, with kwok's fake GPU nodes."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from . import components, kwok
from .config import ClusterConfig
from .kubeconfig import (
    request_service_account_token,
    write_client_cert_kubeconfig,
    write_token_kubeconfig,
)
from .pki import ClusterPki, create_pki
from .probes import (
    ApiClient,
    ComponentFailedError,
    admin_ssl_context,
    free_ports,
    http_ok,
    loopback_ssl_context,
    wait_for,
)
from .process import ProcessRecord, group_members, is_alive, spawn, terminate
from .state import ClusterState, read_state, write_state
from .tools import MissingBinariesError, check_binaries
from .watchdog import Watchdog

# Subdirectories of the workdir that a start recreates. Only these are removed, so a
# workdir shared with other tools (the node agent's pod directories) keeps its content.
_RUNTIME_DIRS = ("pki", "etcd-data", "kubeconfigs", "logs", "controller-manager", "scheduler", "kwok")

_START_ATTEMPTS = 3

__all__ = ["ClusterStartError", "ClusterStopError", "LocalCluster", "MissingBinariesError"]


class ClusterStartError(RuntimeError):
    """The cluster did not come up; everything that was started has been stopped."""


class ClusterStopError(RuntimeError):
    """Some processes survived SIGKILL (should not happen; the message lists them)."""


class LocalCluster:
    """Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok.

    Use as a context manager, or call start()/stop(). `attach(workdir)` returns a handle
    on a cluster started by another process (`python -m localcluster up`).

    With ``watchdog`` (the default) a watchdog process kills every component if this process dies
    without calling stop() (SIGKILL, OOM); `up` turns it off, since its cluster outlives the CLI.

    With ``apiserver_only``, only etcd and kube-apiserver start (what controller-runtime's envtest gives a
    Go operator): the real API, RBAC and admission, and no controller, scheduler or node that would change
    an object behind a test that drives a controller in-process.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        bin_dir: Path | None = None,
        *,
        config: ClusterConfig | None = None,
        watchdog: bool = True,
        apiserver_only: bool = False,
    ) -> None:
        if config is None:
            if workdir is None or bin_dir is None:
                raise TypeError("pass workdir and bin_dir, or config")
            config = ClusterConfig(workdir=workdir.resolve(), bin_dir=bin_dir.resolve())
        self.config = config
        self._records: list[ProcessRecord] = []
        self._popens: dict[int, subprocess.Popen[bytes]] = {}
        self._api_url: str | None = None
        self._watchdog = Watchdog(config.workdir) if watchdog else None
        self._apiserver_only = apiserver_only
        self._launches: dict[str, tuple[list[str], str, Callable[[], bool]]] = {}
        """Per component: its command line, and what its readiness probe checks and how."""

    # ----- public properties -------------------------------------------------------

    @property
    def workdir(self) -> Path:
        return self.config.workdir

    @property
    def bin_dir(self) -> Path:
        return self.config.bin_dir

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig (client certificate in group system:masters, embedded)."""
        return self.config.admin_kubeconfig

    @property
    def ca_file(self) -> Path:
        return self.config.pki_dir / "ca.crt"

    @property
    def api_url(self) -> str:
        if self._api_url is None:
            raise RuntimeError("the cluster is not started")
        return self._api_url

    @property
    def processes(self) -> tuple[ProcessRecord, ...]:
        return tuple(self._records)

    @property
    def logs_dir(self) -> Path:
        return self.config.logs_dir

    # ----- lifecycle ---------------------------------------------------------------

    @classmethod
    def attach(cls, workdir: Path) -> LocalCluster:
        """A handle on the cluster whose state file is in `workdir` (see `up`)."""
        workdir = workdir.resolve()
        state = read_state(workdir / "state.json")
        if state is None:
            raise FileNotFoundError(f"no cluster state in {workdir}; run `python -m localcluster up`")
        cluster = cls(config=ClusterConfig(workdir=workdir, bin_dir=state.bin_dir), watchdog=False)
        cluster._records = list(state.processes)
        cluster._api_url = state.api_url
        return cluster

    def is_running(self) -> bool:
        """True when every recorded component process is alive."""
        return bool(self._records) and all(is_alive(r) for r in self._records)

    def start(self) -> None:
        check_binaries(self.config.bin_dir)
        existing = read_state(self.config.state_file)
        if existing is not None and any(is_alive(p) for p in existing.processes):
            raise ClusterStartError(f"a cluster is already running from {self.workdir} (see {self.config.state_file}); stop it first")
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._start()
                return
            except BaseException as error:
                with contextlib.suppress(ClusterStopError):
                    self.stop()
                if not isinstance(error, ComponentFailedError):
                    raise
                # Ports are chosen free but bound a moment later, so another process
                # (another cluster starting in parallel) can take one in between.
                if "address already in use" in str(error) and attempt < _START_ATTEMPTS:
                    continue
                raise ClusterStartError(str(error)) from error

    def stop(self) -> None:
        """Stops every recorded process (reverse start order) and verifies none is left."""
        survivors: list[str] = []
        for record in reversed(self._records):
            popen = self._popens.get(record.pid)
            if not terminate(record, popen, self.config.stop_timeout_seconds):
                survivors.append(f"{record.name} (pid {record.pid}, group {group_members(record.pid)})")
        self._records.clear()
        self._popens.clear()
        self._api_url = None
        self.config.state_file.unlink(missing_ok=True)
        if self._watchdog is not None:
            self._watchdog.stop()
        if survivors:
            raise ClusterStopError("processes still running after SIGKILL: " + ", ".join(survivors))

    def restart(self, name: str, down_seconds: float = 0.0) -> None:
        """Stop one component (``etcd``, ``kube-apiserver``...), leave it down ``down_seconds``, and start it again with the
        same command line, ports and data: what a node reboot or a control-plane upgrade does to it. Returns once ready."""
        argv, what, ready = self._launches[name]
        (record,) = [r for r in self._records if r.name == name]
        if not terminate(record, self._popens.pop(record.pid, None), self.config.stop_timeout_seconds):
            raise ClusterStopError(f"{name} (pid {record.pid}) is still running after SIGKILL")
        self._records.remove(record)
        time.sleep(down_seconds)
        wait_for(what, ready, self.config.start_timeout_seconds, self._spawn(name, argv))
        self._write_state()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ----- helpers for tests and tools ---------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the cluster's kubectl as admin (or with `kubeconfig`)."""
        argv = [str(self.config.binary("kubectl")), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        result = subprocess.run([*argv, *args], input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, [*argv, *args], result.stdout, result.stderr)
        return result

    def api(self) -> ApiClient:
        """A minimal REST client authenticated as the admin."""
        pki = self.config.pki_dir
        context = admin_ssl_context(self.ca_file, pki / "admin.crt", pki / "admin.key")
        return ApiClient(self.api_url, context)

    def service_account_kubeconfig(
        self,
        namespace: str,
        service_account: str,
        path: Path | None = None,
        duration: str = "1h",
    ) -> Path:
        """Writes a kubeconfig that acts as the ServiceAccount, with a TokenRequest token."""
        token = request_service_account_token(self.config.binary("kubectl"), self.kubeconfig, namespace, service_account, duration)
        if path is None:
            path = self.config.kubeconfig_dir / f"sa-{namespace}-{service_account}.kubeconfig"
        return write_token_kubeconfig(path, self.api_url, self.ca_file, token, f"system:serviceaccount:{namespace}:{service_account}")

    def add_process(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> ProcessRecord:
        """Starts an extra process that belongs to the cluster: it is logged under
        logs/<name>.log, recorded in the state file and stopped (first) by stop()/down."""
        popen, record = spawn(name, argv, self.logs_dir / f"{name}.log", self.workdir, env)
        self._records.append(record)
        self._popens[record.pid] = popen
        if self.config.state_file.exists():
            self._write_state()
        return record

    # ----- internals ---------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> ProcessRecord:
        # Appending keeps the log of the run before a restart.
        popen, record = spawn(name, argv, self.logs_dir / f"{name}.log", self.workdir)
        self._records.append(record)
        self._popens[record.pid] = popen
        return record

    def _write_state(self) -> None:
        write_state(
            self.config.state_file,
            ClusterState(
                api_url=self.api_url,
                kubeconfig=self.kubeconfig,
                ca_file=self.ca_file,
                bin_dir=self.bin_dir,
                processes=tuple(self._records),
            ),
        )

    def _prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for name in _RUNTIME_DIRS:
            shutil.rmtree(self.workdir / name, ignore_errors=True)
        self.config.state_file.unlink(missing_ok=True)
        self.config.admin_kubeconfig.unlink(missing_ok=True)
        self.logs_dir.mkdir()

    def _write_kubeconfigs(self, pki: ClusterPki) -> components.Kubeconfigs:
        directory = self.config.kubeconfig_dir
        url = self.api_url

        def write(stem: str, cert: Path, key: Path, user: str) -> Path:
            return write_client_cert_kubeconfig(directory / f"{stem}.kubeconfig", url, pki.ca.cert, cert, key, user)

        admin = write_client_cert_kubeconfig(self.config.admin_kubeconfig, url, pki.ca.cert, pki.admin.cert, pki.admin.key, "kubetune-admin")
        return components.Kubeconfigs(
            admin=admin,
            controller_manager=write(
                "controller-manager",
                pki.controller_manager.cert,
                pki.controller_manager.key,
                "system:kube-controller-manager",
            ),
            scheduler=write("scheduler", pki.scheduler.cert, pki.scheduler.key, "system:kube-scheduler"),
            kwok=write("kwok", pki.kwok.cert, pki.kwok.key, "kwok-controller"),
        )

    def _start(self) -> None:
        config = self.config
        timeout = config.start_timeout_seconds
        self._prepare_workdir()
        if self._watchdog is not None:
            self._watchdog.start()
        pki = create_pki(config.pki_dir, config.service_cluster_ip_range)
        ports = components.Ports(*free_ports(6))
        self._api_url = f"https://127.0.0.1:{ports.apiserver}"
        kubeconfigs = self._write_kubeconfigs(pki)

        admin_context = admin_ssl_context(pki.ca.cert, pki.admin.cert, pki.admin.key)
        api_url = self.api_url
        self._launches["etcd"] = (components.etcd_argv(config, ports), "etcd /health", lambda: http_ok(f"http://127.0.0.1:{ports.etcd_client}/health"))
        self._launches["kube-apiserver"] = (
            components.apiserver_argv(config, ports, pki),
            "kube-apiserver /readyz",
            lambda: http_ok(f"{api_url}/readyz", admin_context),
        )
        for name in ("etcd", "kube-apiserver"):
            argv, what, ready = self._launches[name]
            wait_for(what, ready, timeout, self._spawn(name, argv))
        if self._apiserver_only:
            self._write_state()
            return

        loopback = loopback_ssl_context()
        kcm = self._spawn(
            "kube-controller-manager",
            components.controller_manager_argv(config, ports, pki, kubeconfigs),
        )
        scheduler = self._spawn("kube-scheduler", components.scheduler_argv(config, ports, kubeconfigs))
        kwok_config = kwok.write_kwok_config(config.workdir / "kwok" / "kwok.yaml", config.fake_pod_run_milliseconds)
        kwok_process = self._spawn("kwok", components.kwok_argv(config, ports, kubeconfigs, kwok_config))
        wait_for("kube-controller-manager /healthz", lambda: http_ok(f"https://127.0.0.1:{ports.controller_manager}/healthz", loopback), timeout, kcm)
        wait_for("kube-scheduler /healthz", lambda: http_ok(f"https://127.0.0.1:{ports.scheduler}/healthz", loopback), timeout, scheduler)
        wait_for("kwok /healthz", lambda: http_ok(f"http://127.0.0.1:{ports.kwok}/healthz"), timeout, kwok_process)

        api = ApiClient(self.api_url, admin_context)
        for node in config.fake_nodes:
            status, body = api.request("POST", "/api/v1/nodes", kwok.node_manifest(node))
            if status not in (201, 409):
                raise ComponentFailedError(f"creating node {node.name} failed ({status}): {body}")
        names = [n.name for n in config.fake_nodes]
        wait_for(f"fake nodes {names} Ready", lambda: _nodes_ready(api, names), timeout, kwok_process)
        # The ServiceAccount and root-CA controllers have run once these exist, so pods
        # can be admitted and mount tokens as soon as start() returns.
        wait_for("ServiceAccount default/default", lambda: api.get("/api/v1/namespaces/default/serviceaccounts/default") is not None, timeout, kcm)
        wait_for("ConfigMap default/kube-root-ca.crt", lambda: api.get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt") is not None, timeout, kcm)
        self._write_state()


def _nodes_ready(api: ApiClient, names: list[str]) -> bool:
    selector = urllib.parse.quote("kubetune.io/fake-node=true")
    listing: Any = api.get(f"/api/v1/nodes?labelSelector={selector}")
    if listing is None:
        return False
    ready = set()
    for item in listing.get("items", []):
        for condition in item.get("status", {}).get("conditions") or []:
            if condition.get("type") == "Ready" and condition.get("status") == "True":
                ready.add(item["metadata"]["name"])
    return all(name in ready for name in names)
