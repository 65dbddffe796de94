"""Starting and stopping component processes without leaving any behind.

Each component runs in its own session (and so its own process group), with its output
in a log file. Stopping signals the whole group, so helpers a component may have started
go too, and a process is identified by pid plus kernel start time, so a recycled pid is
never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    """What the state file keeps about one running component."""

    name: str
    pid: int
    start_ticks: int
    log: Path


def _read_stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are
    # fixed, so split after the last ')'.
    head, _, tail = raw.rpartition(")")
    return [head.split(" (", 1)[0], "comm", *tail.split()]


def start_ticks(pid: int) -> int | None:
    """Start time of a process in clock ticks since boot, or None if it is gone."""
    fields = _read_stat(pid)
    return int(fields[21]) if fields is not None else None


def is_alive(record: ProcessRecord) -> bool:
    """True while the recorded process runs (zombies and recycled pids count as gone)."""
    fields = _read_stat(record.pid)
    if fields is None:
        return False
    return fields[2] != "Z" and int(fields[21]) == record.start_ticks


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _read_stat(int(entry.name))
        if fields is not None and fields[2] != "Z" and int(fields[4]) == pgid:
            members.append(int(entry.name))
    return members


def processes_mentioning(text: str, *, environment: bool = False) -> list[int]:
    """Live processes whose command line (or, with ``environment``, environment) contains `text` (e.g. a
    cluster's workdir). Pods of the node agent carry its workdir in their environment, not their command line."""
    own = os.getpid()
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            mentions = needle in (entry / "cmdline").read_bytes()
            if not mentions and environment:
                mentions = needle in (entry / "environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = _read_stat(int(entry.name))
        if fields is not None and fields[2] != "Z" and mentions:
            found.append(int(entry.name))
    return found


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Starts `argv` detached from the caller's terminal and process group."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    ticks = start_ticks(proc.pid)
    if ticks is None:
        # It already exited; keep a record that is_alive() reports as gone.
        ticks = -1
    return proc, ProcessRecord(name=name, pid=proc.pid, start_ticks=ticks, log=log)


def _reap(proc: subprocess.Popen[bytes] | None) -> None:
    # Collects the exit status of our own child, so it neither lingers as a zombie nor
    # makes Popen warn that it is "still running" when garbage-collected.
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)


def _wait_gone(record: ProcessRecord, proc: subprocess.Popen[bytes] | None, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not _owns_group(record):
            _reap(proc)
            return True
        time.sleep(0.05)
    return False


def _owns_group(record: ProcessRecord) -> bool:
    """True while the process group `record.pid` is the one the component started.

    The kernel does not hand out a pid while a process group of that id exists, so
    members of a group whose leader died are still the component's own children. If a
    live process holds the pid with another start time, the pid was recycled and the
    group (if any) is someone else's.
    """
    if is_alive(record):
        return True
    ticks = start_ticks(record.pid)
    # ticks is None: the pid is free. Equal ticks: our leader, exited but not yet reaped.
    return (ticks is None or ticks == record.start_ticks) and bool(group_members(record.pid))


def _signal_group(record: ProcessRecord, sig: signal.Signals) -> None:
    # The group id is the leader's pid (start_new_session).
    if _owns_group(record):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, sig)


def terminate(record: ProcessRecord, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """SIGTERM the component's group, then SIGKILL after `timeout`. True when all are gone."""
    if not _owns_group(record):
        _reap(proc)
        return True
    _signal_group(record, signal.SIGTERM)
    if _wait_gone(record, proc, time.monotonic() + timeout):
        return True
    _signal_group(record, signal.SIGKILL)
    return _wait_gone(record, proc, time.monotonic() + 5.0)


def wait_or_kill(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait up to ``timeout`` for a child asked to exit (SIGTERM, a closed pipe), then SIGKILL and reap it."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(log: Path, lines: int = 40) -> str:
    """The last lines of a component log, for error messages."""
    try:
        content = log.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(content[-lines:])


def interrupt(signum: int, frame: object) -> None:
    """Signal handler that ends the program like Ctrl-C, so ``finally`` blocks and fixture teardowns
    stop what was started; the same signal is ignored afterwards so a second one cannot cut that short."""
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)
