"""The trainer as a child process whose stdout and stderr reach the container log only after redaction.

The trainer pod's terminationMessagePolicy is FallbackToLogsOnError: when the trainer dies without
writing its termination message (a crash in a C extension, the elastic launcher's own traceback),
the kubelet copies the log's last lines into the pod status, and from there the operator copies
them into the FinetuneJob's status and Events. Those bytes never pass the JSON logger, so this
parent (PID 1 of the container) replaces every credential value in them with *** first.

The child runs in a process group of its own so that a signal meant for the trainer reaches each
of its processes exactly once: the parent forwards SIGTERM and SIGINT to that group (the kubelet
signals PID 1 only, the local node agent signals PID 1's group). The child is killed with the
parent if the parent dies first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

CHILD_FLAG = "--redacted-child"
"""Hidden command-line flag that marks the child, which must not wrap itself again."""
MAX_LINE_BYTES = 64 * 1024
"""Longer lines are redacted in pieces of this size (a progress bar without newlines)."""
PIPE_DRAIN_SECONDS = 10.0
"""How long the last output may take to pass once the trainer has exited (a process that left the group may hold a pipe)."""
_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT)


def run(command: Sequence[str], secrets: Sequence[str]) -> int:
    """Run ``command`` with its output redacted onto this process's stdout/stderr; its exit code (128 + n if killed by signal n)."""
    encoded = tuple(value.encode() for value in secrets if value)
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0, preexec_fn=_die_with_parent)
    assert child.stdout is not None and child.stderr is not None

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    pumps = [
        threading.Thread(target=pump, args=(child.stdout, sys.stdout.buffer, encoded), daemon=True),
        threading.Thread(target=pump, args=(child.stderr, sys.stderr.buffer, encoded), daemon=True),
    ]
    try:
        for thread in pumps:
            thread.start()
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # Workers the child left behind go with it, as they would with the container; they also hold the pipes open.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
    for thread in pumps:
        thread.join(timeout=PIPE_DRAIN_SECONDS)
    return 128 - code if code < 0 else code


def pump(source: IO[bytes], sink: IO[bytes], secrets: Sequence[bytes]) -> None:
    """Copy ``source`` to ``sink`` line by line with every secret replaced by ***.

    A line longer than MAX_LINE_BYTES arrives in pieces; the end of each piece that could begin a secret is held back
    and redacted with the next piece, so a value split across two pieces is still found."""
    held = max((len(value) for value in secrets), default=1) - 1
    pending = b""
    for piece in iter(lambda: source.readline(MAX_LINE_BYTES), b""):
        text = redact(pending + piece, secrets)
        cut = len(text) if text.endswith(b"\n") else max(0, len(text) - held)
        text, pending = text[:cut], text[cut:]
        sink.write(text)
        sink.flush()
    sink.write(pending)
    sink.flush()
    source.close()


def redact(text: bytes, secrets: Sequence[bytes]) -> bytes:
    for value in secrets:
        text = text.replace(value, b"***")
    return text


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a SIGKILLed parent must not leave a trainer running.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
