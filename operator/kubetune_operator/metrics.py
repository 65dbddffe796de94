"""Operator metrics, and the /metrics, /healthz and /readyz endpoints: prometheus_client's WSGI app plus two probes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from kubetune_operator.usage import UsageTable

HEARTBEAT_STALE_SECONDS = 60.0
HEARTBEAT_SECONDS = 5.0

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class JobTable(Collector):
    """Phase of every FinetuneJob the operator sees; exported as gauges at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            phases = dict(self._phases)
        counts = GaugeMetricFamily("kubetune_operator_finetunejobs", "FinetuneJobs by namespace and phase.", labels=["namespace", "phase"])
        for (namespace, phase), count in sorted(Tally((ns, phase) for (ns, _), phase in phases.items()).items()):
            counts.add_metric([namespace, phase], count)
        info = GaugeMetricFamily(
            "kubetune_operator_finetunejob_info", "One series per FinetuneJob, with its phase.", labels=["namespace", "finetunejob", "phase"]
        )
        for (namespace, name), phase in sorted(phases.items()):
            info.add_metric([namespace, name, phase], 1)
        yield counts
        yield info


class OperatorMetrics:
    """Every operator metric, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.jobs = JobTable()
        self.registry.register(self.jobs)
        self.usage = UsageTable()
        self.registry.register(self.usage)
        self.reconcile_duration = Histogram(
            "kubetune_operator_reconcile_duration_seconds",
            "Time spent in one handler run.",
            ["handler"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.reconcile_errors = Counter("kubetune_operator_reconcile_errors", "Handler runs that failed, by kind of error.", ["kind"], registry=self.registry)
        self.jobs_created = Counter("kubetune_operator_jobs_created", "Trainer Jobs created.", ["namespace"], registry=self.registry)
        self.api_writes = Counter(
            "kubetune_operator_api_writes", "Writes to the Kubernetes API made by the operator.", ["verb", "resource"], registry=self.registry
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """Liveness from a heartbeat of the operator's event loop; readiness once it has started."""

    def __init__(self) -> None:
        self._beat = time.monotonic()
        self.ready = threading.Event()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._beat < HEARTBEAT_STALE_SECONDS

    async def keep_beating(self) -> None:
        """Liveness: the event loop proves it still runs by beating every few seconds."""
        while True:
            self.beat()
            await asyncio.sleep(HEARTBEAT_SECONDS)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


def health_app(metrics: OperatorMetrics, health: Health) -> WsgiApp:
    """/metrics (prometheus_client's own app), /healthz (the event loop beats) and /readyz (kopf has started)."""
    exposition = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = exposition(environ, start_response)
            return body
        if path == "/healthz":
            ok, text = health.alive(), b"event loop stalled\n"
        elif path == "/readyz":
            ok, text = health.ready.is_set(), b"starting\n"
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found\n"]
        start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"ok\n" if ok else text]

    return app


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on a background thread."""

    def __init__(self, host: str, port: int, metrics: OperatorMetrics, health: Health) -> None:
        self._server = make_server(host, port, health_app(metrics, health), server_class=ThreadingWSGIServer, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
