"""Ends what an owner started when the owner dies without stopping it (SIGKILL, the OOM killer).

``Watchdog(workdir).start()`` runs ``python -m localcluster.watchdog DIR`` in a session of its own, with a
pipe on its standard input whose write end only the owner holds (pipes are not inherited by the owner's
other children). A clean stop writes ``stop`` and closes the pipe, and the watchdog exits. When the owner
dies instead, the kernel closes the pipe and the watchdog kills every process whose command line or
environment mentions DIR (components, the node agent, its pods and their children), again and again until
none is left, so a killed demo or test session leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from localcluster.process import processes_mentioning, wait_or_kill

STOP = b"stop"
QUIET_ROUNDS = 5
"""Rounds in a row that must find nothing before the watchdog is sure no process respawned."""


def reap(workdir: str, timeout: float = 60.0) -> list[int]:
    """SIGKILL every process mentioning ``workdir`` until none is left; returns the pids killed."""
    killed: list[int] = []
    quiet = 0
    deadline = time.monotonic() + timeout
    while quiet < QUIET_ROUNDS and time.monotonic() < deadline:
        found = processes_mentioning(workdir, environment=True)
        quiet = 0 if found else quiet + 1
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return killed


class Watchdog:
    """The owner's side: start it before anything else, stop it after everything else."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir.resolve()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self._process is not None:
            return
        self._process = subprocess.Popen(
            [sys.executable, "-m", "localcluster.watchdog", str(self.workdir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Tell the watchdog that everything was stopped cleanly, and wait for it to exit."""
        if self._process is None:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(STOP)
            self._process.stdin.close()
        except BrokenPipeError:
            pass
        wait_or_kill(self._process, timeout=10)
        self._process = None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m localcluster.watchdog WORKDIR", file=sys.stderr)
        return 2
    # A Ctrl-C or SIGTERM meant for the owner must not take the watchdog first.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    message = sys.stdin.buffer.read()
    if message.strip() == STOP:
        return 0
    reap(args[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
