"""Operator metrics and the /metrics, /healthz, /readyz HTTP server."""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

HEARTBEAT_STALE_SECONDS = 60.0


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
            "kubetune_operator_api_writes", "Writes to the Kubernetes API made by the handlers.", ["verb", "resource"], registry=self.registry
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


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.server.health.alive()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
        elif path == "/readyz":
            ok = self.server.health.ready.is_set()
            self._reply(200 if ok else 503, b"ok\n" if ok else b"starting\n")
        else:
            self._reply(404, b"not found\n")

    def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds would flood the log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: OperatorMetrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        super().__init__(address, _Handler)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz on a background thread."""

    def __init__(self, host: str, port: int, metrics: OperatorMetrics, health: Health) -> None:
        self._server = _Server((host, port), metrics, health)
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
