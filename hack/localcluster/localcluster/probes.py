"""HTTP(S) probes and a small API client for waiting on the components."""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .process import ProcessRecord, is_alive, log_tail


class ComponentFailedError(RuntimeError):
    """A component exited or did not become ready; the message ends with its log tail."""


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports. All sockets stay open until every port is chosen,
    so the kernel cannot hand out the same port twice."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def admin_ssl_context(ca_file: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.load_cert_chain(str(cert), str(key))
    return context


def loopback_ssl_context() -> ssl.SSLContext:
    # kube-controller-manager and kube-scheduler serve /healthz with a certificate they
    # generate themselves at start-up; the probe talks to 127.0.0.1 only and reads a
    # health flag, so it does not verify that certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def http_ok(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError, OSError):
        return False


class ApiClient:
    """Just enough of the Kubernetes REST API to wait for readiness and create nodes."""

    def __init__(self, api_url: str, context: ssl.SSLContext) -> None:
        self.api_url = api_url
        self._context = context

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api_url + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._context) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return error.code, json.loads(payload)
            except json.JSONDecodeError:
                return error.code, payload.decode(errors="replace")

    def get(self, path: str) -> Any | None:
        status, body = self.request("GET", path)
        return body if status == 200 else None


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    process: ProcessRecord | None = None,
    interval: float = 0.2,
) -> None:
    """Polls `check` until it holds; fails early if `process` exits, with its log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if process is not None and not is_alive(process):
            raise ComponentFailedError(f"{process.name} exited while waiting for {what}; last lines of {process.log}:\n" + log_tail(process.log))
        if time.monotonic() >= deadline:
            tail = f"; last lines of {process.log}:\n{log_tail(process.log)}" if process is not None else ""
            raise ComponentFailedError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)
