"""Readiness, liveness and startup probes: httpGet, tcpSocket and exec, with the kubelet's timing.

httpGet and tcpSocket connect to the pod's own loopback address (status.podIP) unless the
probe names a host. exec probes run the command in a fresh namespace with the container's
mounts and environment (through a caller-supplied runner). gRPC probes are not supported:
such a probe counts as failing and the agent logs a warning.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Json = dict[str, Any]

log = logging.getLogger(__name__)

ExecRunner = Callable[[list[str], float], int]


def _port(value: int | str, container: Json) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ValueError(f"port {value!r} is not declared by the container")


def run_probe(probe: Json, container: Json, pod_ip: str, run_exec: ExecRunner) -> bool:
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "httpGet" in probe:
            spec = probe["httpGet"]
            host = spec.get("host") or pod_ip
            port = _port(spec["port"], container)
            connection: http.client.HTTPConnection
            if str(spec.get("scheme", "HTTP")).upper() == "HTTPS":
                # The kubelet does not verify probe certificates either.
                context = ssl._create_unverified_context()
                connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
            else:
                connection = http.client.HTTPConnection(host, port, timeout=timeout)
            headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/localcluster")
            try:
                connection.request("GET", spec.get("path") or "/", headers=headers)
                status = connection.getresponse().status
            finally:
                connection.close()
            return 200 <= status < 400
        if "tcpSocket" in probe:
            spec = probe["tcpSocket"]
            address = (spec.get("host") or pod_ip, _port(spec["port"], container))
            with socket.create_connection(address, timeout=timeout):
                return True
        if "exec" in probe:
            return run_exec(list(probe["exec"]["command"]), timeout) == 0
    except (OSError, ValueError, http.client.HTTPException) as error:
        log.debug("probe of %s failed: %s", container.get("name"), error)
        return False
    log.warning("container %s: unsupported probe kind %s", container.get("name"), sorted(probe))
    return False


@dataclass
class ProbeState:
    """Tracks one probe of one container run: thresholds, period, initial delay."""

    probe: Json
    started: float
    result: bool
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    @classmethod
    def create(cls, probe: Json, initial_result: bool) -> ProbeState:
        now = time.monotonic()
        return cls(
            probe=probe,
            started=now,
            result=initial_result,
            next_at=now + float(probe.get("initialDelaySeconds") or 0),
        )

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def record(self, ok: bool) -> bool:
        """Feeds one outcome; returns the (thresholded) probe result."""
        self.next_at = time.monotonic() + float(self.probe.get("periodSeconds") or 10)
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= int(self.probe.get("successThreshold") or 1):
                self.result = True
        else:
            self.successes, self.failures = 0, self.failures + 1
            if self.failures >= int(self.probe.get("failureThreshold") or 3):
                self.result = False
        return self.result
