"""A real S3 endpoint on loopback: moto's server in a subprocess behind a loopback TCP proxy.

Outages are made at the TCP level. ``stop()`` closes the proxy's listening socket and every
connection through it, so clients see refused connects and reset sockets exactly as during a
network or endpoint outage, while the moto process behind it keeps its in-memory buckets; ``start()``
listens on the same port again. ``outage_on(pattern)`` starts such an outage at the moment a client sends a
request that matches ``pattern`` (dropping that request), so a test can begin it at an exact point of a
client's work, such as the first upload of a publication, instead of guessing the time. Restarting moto itself would lose every object (its backend
lives only in process memory), which would make "the upload survives an outage" untestable;
``stop(keep_state=False)`` does that when a test wants a store that comes back empty.

Used by the local stack (``make demo``, the end-to-end suite) and, through the fixtures in
``tests/support/s3.py``, by the trainer tests. Every socket binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config

from localcluster.process import wait_or_kill

LOOPBACK = "127.0.0.1"
DUMMY_ACCESS_KEY_ID = "kubetune-test-key"
DUMMY_SECRET_ACCESS_KEY = "kubetune-test-secret"
REGION = "us-east-1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def client_env(endpoint_url: str) -> dict[str, str]:
    """Environment for a client of a test S3 endpoint (any key pair is accepted)."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }


def boto3_client(endpoint_url: str, service: str = "s3", *, access_key_id: str = DUMMY_ACCESS_KEY_ID, secret_access_key: str = DUMMY_SECRET_ACCESS_KEY) -> Any:
    """A boto3 client of a test endpoint: path-style addressing, one attempt (tests arrange state, they do not retry)."""
    return boto3.session.Session().client(
        service,
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
    )


class LoopbackProxy:
    """Forwards TCP connections from ``host:port`` to ``host:upstream_port`` until stopped."""

    def __init__(self, host: str, port: int, upstream_port: int) -> None:
        self.host = host
        self.port = port
        self.upstream_port = upstream_port
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._pumps: list[threading.Thread] = []
        self._tripwire: tuple[re.Pattern[bytes], float | None, threading.Event] | None = None

    @property
    def running(self) -> bool:
        return self._listener is not None

    def outage_on(self, pattern: bytes, seconds: float | None = None) -> threading.Event:
        """Once, when bytes a client sends match ``pattern`` (a regular expression): drop them, ``stop()``, and
        ``start()`` again after ``seconds`` (None: when the caller does). The Event is set once the outage began."""
        began = threading.Event()
        with self._lock:
            self._tripwire = (re.compile(pattern), seconds, began)
        return began

    def _tripped(self, data: bytes) -> bool:
        with self._lock:
            wire = self._tripwire
            if wire is None or not wire[0].search(data):
                return False
            self._tripwire = None
        threading.Thread(target=self._outage, args=wire[1:], name=f"s3-outage-{self.port}", daemon=True).start()
        return True

    def _outage(self, seconds: float | None, began: threading.Event) -> None:
        self.stop()
        began.set()
        if seconds is not None:
            time.sleep(seconds)
            self.start()

    def start(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Rebinding the same port right after stop() must work although closed connections linger in TIME_WAIT.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._stopping.clear()
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(listener,), name=f"s3-proxy-{self.port}", daemon=True)
        self._accept_thread.start()

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        if self._listener is None:
            return
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join()
        self._listener.close()
        self._listener = None
        with self._lock:
            connections = list(self._connections)
            self._connections.clear()
            pumps = list(self._pumps)
            self._pumps.clear()
        for connection in connections:
            _abort(connection)
        for pump in pumps:
            pump.join(timeout=5)

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.host, self.upstream_port), timeout=5)
            except OSError:
                _abort(client)
                continue
            pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            with self._lock:
                self._connections.update({client, upstream})
                self._pumps.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        """Copy bytes both ways, passing half-closes on, until both directions have ended."""
        peers = {client: upstream, upstream: client}
        reading = {client, upstream}
        # A direction whose receiver went away is drained and discarded, so the other
        # direction can still deliver a response the server sent before closing.
        broken: set[socket.socket] = set()
        graceful = False
        try:
            while reading and not self._stopping.is_set():
                readable, _, _ = select.select(list(reading), [], [], 0.1)
                for source in readable:
                    data = source.recv(65536)
                    target = peers[source]
                    if not data:
                        reading.discard(source)
                        if source not in broken:
                            _shutdown_write(target)
                        continue
                    if source in broken or (source is client and self._tripped(data)):
                        continue
                    try:
                        target.sendall(data)
                    except OSError:
                        broken.add(source)
            graceful = not reading
        except (OSError, ValueError):
            graceful = False
        finally:
            with self._lock:
                self._connections.discard(client)
                self._connections.discard(upstream)
            for sock in (client, upstream):
                if graceful:
                    sock.close()
                else:
                    _abort(sock)


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _abort(sock: socket.socket) -> None:
    """Close with an RST rather than a FIN, as a dropped network path looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


_BACKEND_MAIN = """
import os, sys, threading

def exit_with_parent():
    # stdin is a pipe from the test process: it reaches EOF when that process ends, even if killed.
    sys.stdin.buffer.read()
    os._exit(0)

threading.Thread(target=exit_with_parent, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"""


class MotoS3Server:
    """moto's S3 server (a subprocess) reachable at ``endpoint_url`` through a stoppable proxy.

    ``auth_free_requests``: when set, moto enforces IAM authentication and authorisation after
    that many requests (moto's INITIAL_NO_AUTH_ACTION_COUNT); the free ones create the users
    and buckets a test needs. When unset, any key pair is accepted.
    """

    def __init__(self, *, port: int | None = None, auth_free_requests: int | None = None) -> None:
        self.host = LOOPBACK
        self.port = port or free_port()
        self.auth_free_requests = auth_free_requests
        self._backend_port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_dir = tempfile.TemporaryDirectory(prefix="kubetune-moto-")
        self._proxy = LoopbackProxy(self.host, self.port, self._backend_port)
        self._closed = False

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pod_endpoint_url(self) -> str:
        """Pods of the local node are host processes: they reach the same loopback endpoint."""
        return self.endpoint_url

    @property
    def running(self) -> bool:
        return self._proxy.running

    @property
    def log_path(self) -> Path:
        return Path(self._log_dir.name) / "moto.log"

    def env(self) -> dict[str, str]:
        """Environment for a client of this endpoint, as the trainer pod receives it."""
        return client_env(self.endpoint_url)

    def client(self, service: str = "s3", *, access_key_id: str = DUMMY_ACCESS_KEY_ID, secret_access_key: str = DUMMY_SECRET_ACCESS_KEY) -> Any:
        """A boto3 client for arranging test state (creating buckets, IAM users)."""
        return boto3_client(self.endpoint_url, service, access_key_id=access_key_id, secret_access_key=secret_access_key)

    def create_bucket(self, name: str | None = None) -> str:
        bucket = name or f"test-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def start(self) -> None:
        """Start moto if it is not running, then accept connections on ``port``."""
        if self._closed:
            raise RuntimeError("this MotoS3Server is closed; create a new one")
        if self._process is None or self._process.poll() is not None:
            self._start_backend()
        self._proxy.start()

    def outage_on(self, pattern: bytes, seconds: float | None = None) -> threading.Event:
        """An outage that begins when a client sends a request matching ``pattern`` (see ``LoopbackProxy.outage_on``)."""
        return self._proxy.outage_on(pattern, seconds)

    def stop(self, *, keep_state: bool = True) -> None:
        """Drop every connection and refuse new ones; with ``keep_state=False`` moto exits too (all data lost)."""
        self._proxy.stop()
        if not keep_state:
            self._stop_backend()

    def close(self) -> None:
        self.stop(keep_state=False)
        self._closed = True
        self._log_dir.cleanup()

    def _start_backend(self) -> None:
        env = dict(os.environ)
        if self.auth_free_requests is not None:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.auth_free_requests)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BACKEND_MAIN, "-H", self.host, "-p", str(self._backend_port)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        if not wait_for_port(self.host, self._backend_port, timeout=30):
            self._stop_backend()
            raise RuntimeError(f"moto server did not listen on {self.host}:{self._backend_port}; log:\n{self.log_path.read_text(errors='replace')[-2000:]}")

    def _stop_backend(self) -> None:
        if self._process is None:
            return
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.terminate()
        wait_or_kill(self._process, timeout=10)
        self._process = None

    def __enter__(self) -> MotoS3Server:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
