"""The trainer's structured log, kept next to the run's checkpoints so it outlives the pod.

Rank 0 keeps the JSON lines it writes to stderr (already redacted by the formatter) in a bounded buffer, the
newest ``MAX_BYTES`` of them, and uploads them to ``layout.logs_key`` at every checkpoint and when the run ends,
so ``kubectl delete pod`` or a TTL does not take the only copy.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from kubetune_api import layout
from kubetune_trainer.logs import JsonFormatter
from kubetune_trainer.storage.store import S3Store

MAX_BYTES = 4 * 1024 * 1024
"""What one attempt's log may take in S3; older lines are dropped first."""


class LogArchive(logging.Handler):
    """A root-logger handler that keeps the newest lines, rendered by the same formatter as stderr's."""

    def __init__(self, formatter: logging.Formatter, max_bytes: int = MAX_BYTES) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.max_bytes = max_bytes
        self._lines: deque[bytes] = deque()
        self._size = 0
        self.dropped = 0
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8")
        except Exception:
            self.handleError(record)
            return
        with self._guard:
            self._lines.append(line)
            self._size += len(line)
            while self._size > self.max_bytes and len(self._lines) > 1:
                self._size -= len(self._lines.popleft())
                self.dropped += 1

    def contents(self) -> bytes:
        with self._guard:
            return b"".join(self._lines)

    def upload(self, store: S3Store, key: str) -> None:
        store.put_bytes(key, self.contents(), content_type="application/x-ndjson")


def attach() -> LogArchive | None:
    """Keep what the process's JSON handler writes (``logs.setup`` must have run); None without one."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if isinstance(h.formatter, JsonFormatter)), None)
    if formatter is None:
        return None
    archive = LogArchive(formatter)
    root.addHandler(archive)
    return archive


def detach(archive: LogArchive | None) -> None:
    if archive is not None:
        logging.getLogger().removeHandler(archive)


def key_for(run_prefix: str, pod_name: str) -> str:
    return layout.logs_key(run_prefix, pod_name or "local")
