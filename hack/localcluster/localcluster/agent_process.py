"""Container processes: a private mount and UTS namespace per process, one process group each.

Each container run starts as `unshare -m -u --propagation private -- /bin/sh launch.sh
COMMAND...`. The script sets the pod's hostname, bind-mounts the pod's volume directories
at their mountPaths (mounts stay inside the new namespace, so the host and other pods
keep their view), enters workingDir and execs the command, which therefore keeps the
process id the agent waits on. A failure before exec is written to a start-error file so
it can be reported like the kubelet's StartError (exit code 128).

Every container process carries two marker variables (agent and pod uid) in its
environment; they are inherited by its children, which lets the agent find and kill
anything a container left behind even if it moved to another process group.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from localcluster.agent_volumes import Mount

# The agent instance (node name and workdir: two clusters on one host may both have a
# cpu-node-0) and the pod each process belongs to.
AGENT_MARKER = "LOCALCLUSTER_AGENT"
POD_MARKER = "LOCALCLUSTER_POD_UID"
START_ERROR_EXIT_CODE = 128
# The kubelet's limits: 4 KiB of termination message, or the last 80 lines / 2 KiB of log.
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
_PYTHON_NAMES = ("python", "python3")
# Where a container's volume sources are gathered inside its mount namespace (the host
# sees one empty directory); the first path that no mountPath covers is used.
STAGING_CANDIDATES = ("/run/localcluster-stage", "/var/lib/localcluster-stage", "/opt/localcluster-stage")
HOME_CANDIDATES = ("/run/localcluster-home", "/var/lib/localcluster-home", "/opt/localcluster-home")


def resolve_command(argv: Sequence[str]) -> list[str]:
    """`python`/`python3` mean the interpreter the agent runs with (the project's venv)."""
    resolved = list(argv)
    if resolved and resolved[0] in _PYTHON_NAMES:
        resolved[0] = sys.executable
    return resolved


def interpreter_bin_dir() -> str:
    # Not resolved through symlinks: a venv's bin/python links to the base interpreter.
    return os.path.dirname(sys.executable)


@dataclass
class LaunchSpec:
    argv: list[str]
    env: dict[str, str]
    working_dir: str
    hostname: str
    mounts: list[Mount]
    run_dir: Path
    log_file: Path
    termination_file: Path
    termination_path: str


def image_paths() -> list[str]:
    """Host paths that stand in for the image's files: the interpreter, its environment and the checkout.

    A volume mounted over one of their parents (an emptyDir on /tmp when the checkout lives under /tmp)
    must not hide them, just as a volume never hides what a real image has outside its mountPath.
    """
    checkout = Path(__file__).resolve().parents[3]
    return sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, str(checkout))})


def is_under(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def uncovered_path(mounts: Sequence[Mount], candidates: Sequence[str]) -> str:
    """The first candidate path that no mountPath covers or lies under."""
    targets = [os.path.realpath(m.target) for m in mounts]
    for candidate in candidates:
        if not any(is_under(candidate, target) or is_under(target, candidate) for target in targets):
            return candidate
    raise ValueError(f"every one of {', '.join(candidates)} is covered by a mountPath")


def launch_script(spec: LaunchSpec, start_error_file: Path) -> str:
    quote = shlex.quote
    # Sources are bound at a staging directory before any target is mounted: a mount over
    # /tmp (common with read-only root filesystems) would otherwise hide every source under
    # /tmp, such as the agent's own workdir in tests.
    stage = uncovered_path(spec.mounts, STAGING_CANDIDATES)
    lines = [
        # Opened before any mount, so the report reaches the agent even if a mount hides the path.
        f"exec 3> {quote(str(start_error_file))}",
        "fail() {",
        "  printf '%s' \"$1\" >&3",
        '  echo "localcluster: $1" >&2',
        f"  exit {START_ERROR_EXIT_CODE}",
        "}",
        f"hostname {quote(spec.hostname)} || fail 'cannot set hostname'",
        f"mkdir -p {stage} && mount -t tmpfs -o mode=700,size=1m tmpfs {stage} || fail 'cannot create {stage}'",
    ]
    # First every source at a stable place, then the targets, parents first so a mount below
    # another mount's path lands on top of it.
    for index, mount in enumerate(spec.mounts):
        staged = quote(f"{stage}/{index}")
        create = f"mkdir {staged}" if mount.source.is_dir() else f": > {staged}"
        lines.append(f"{create} && mount --bind {quote(str(mount.source))} {staged} || fail {quote(f'cannot stage {mount.source}')}")
    targets = [os.path.realpath(m.target) for m in spec.mounts]
    shadowed = [p for p in image_paths() if any(is_under(p, t) and p != t for t in targets)]
    for index, path in enumerate(shadowed):
        staged = quote(f"{stage}/image-{index}")
        lines.append(f"mkdir {staged} && mount --bind {quote(path)} {staged} || fail {quote(f'cannot stage {path}')}")
    for index, mount in sorted(enumerate(spec.mounts), key=lambda pair: len(Path(pair[1].target).parts)):
        staged, target = quote(f"{stage}/{index}"), quote(mount.target)
        # Missing mount points are created where they are missing: inside an earlier
        # volume when one covers them, otherwise (empty) on the host.
        if mount.source.is_dir():
            lines.append(f"[ -e {target} ] || mkdir -p {target}")
        else:
            lines.append(f"[ -e {target} ] || {{ mkdir -p {quote(os.path.dirname(mount.target))} && : > {target}; }}")
        lines.append(f"mount --bind {staged} {target} || fail {quote(f'cannot mount {mount.source} at {mount.target}')}")
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target} || fail {quote(f'cannot make {mount.target} read-only')}")
    # The image's own files come back on top of any volume that covered their parent directory.
    for index, path in enumerate(shadowed):
        lines.append(f"mkdir -p {quote(path)} && mount --bind {quote(f'{stage}/image-{index}')} {quote(path)} || fail {quote(f'cannot keep {path}')}")
    workdir = quote(spec.working_dir)
    lines += [
        f"umount -l {stage}",
        f"mkdir -p {workdir} && cd {workdir} || fail {quote(f'cannot enter workingDir {spec.working_dir}')}",
        'command -v "$1" >/dev/null 2>&1 || fail "exec: \\"$1\\": executable file not found in \\$PATH"',
        "exec 3>&-",
        'exec "$@"',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class ContainerProcess:
    """One run of a container; exit codes follow the runtime's 128+signal convention."""

    popen: subprocess.Popen[bytes]
    started_at: datetime
    start_error_file: Path
    exit_code: int | None = None
    finished_at: datetime | None = None
    signalled: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        if self.exit_code is not None:
            return self.exit_code
        code = self.popen.poll()
        if code is None:
            return None
        self.exit_code = 128 - code if code < 0 else code
        self.finished_at = datetime.now(UTC)
        # The group may still hold children the main process left behind; they go with it.
        self._signal_group(signal.SIGKILL)
        return self.exit_code

    def start_error(self) -> str | None:
        if self.exit_code == START_ERROR_EXIT_CODE and self.start_error_file.exists():
            return self.start_error_file.read_text(errors="replace")
        return None

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signum)

    def send_term(self) -> None:
        self.signalled.add(signal.SIGTERM)
        self._signal_group(signal.SIGTERM)

    def stop(self, grace_s: float) -> int:
        """SIGTERM to the process group, SIGKILL once the grace period is over."""
        if self.poll() is not None:
            assert self.exit_code is not None
            return self.exit_code
        self.send_term()
        deadline = time.monotonic() + max(grace_s, 0.0)
        while time.monotonic() < deadline:
            if self.poll() is not None:
                assert self.exit_code is not None
                return self.exit_code
            time.sleep(0.05)
        self._signal_group(signal.SIGKILL)
        self.popen.wait()
        code = self.poll()
        assert code is not None
        return code


def start(spec: LaunchSpec) -> ContainerProcess:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    spec.log_file.parent.mkdir(parents=True, exist_ok=True)
    spec.termination_file.write_bytes(b"")
    mounts = [*spec.mounts, Mount(spec.termination_file, spec.termination_path, read_only=False)]
    start_error_file = spec.run_dir / "start-error"
    start_error_file.unlink(missing_ok=True)
    script = spec.run_dir / "launch.sh"
    script.write_text(launch_script(LaunchSpec(**{**spec.__dict__, "mounts": mounts}), start_error_file))
    argv = ["unshare", "-m", "-u", "--propagation", "private", "--", "/bin/sh", str(script)]
    with open(spec.log_file, "ab") as log_file:
        popen = subprocess.Popen(
            argv + resolve_command(spec.argv),
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    return ContainerProcess(popen=popen, started_at=datetime.now(UTC), start_error_file=start_error_file)


def termination_message(termination_file: Path, log_file: Path, fallback_to_logs: bool) -> str:
    """What the container wrote to its terminationMessagePath, else (if asked) its log tail."""
    try:
        message = termination_file.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
    except OSError:
        message = ""
    if message or not fallback_to_logs:
        return message
    try:
        lines = log_file.read_bytes().splitlines()[-FALLBACK_LOG_LINES:]
    except OSError:
        return ""
    return b"\n".join(lines)[-FALLBACK_LOG_BYTES:].decode(errors="replace")


def run_in_container(env: dict[str, str], mounts: list[Mount], run_dir: Path, command: list[str], timeout_s: float) -> int:
    """Runs a command (an exec probe) with a container's environment and mounts; -1 on timeout."""
    process = start(
        LaunchSpec(
            argv=command,
            env=env,
            working_dir="/",
            hostname=env.get("HOSTNAME", "localhost"),
            mounts=mounts,
            run_dir=run_dir,
            log_file=run_dir / "output.log",
            termination_file=run_dir / "termination-log",
            termination_path=str(run_dir / "termination-log"),
        )
    )
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        if time.monotonic() > deadline:
            process.stop(0)
            return -1
        time.sleep(0.05)
    assert process.exit_code is not None
    return process.exit_code


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, _, value in pairs}


def marked_processes(agent_id: str, pod_uid: str | None = None) -> Iterator[int]:
    """Processes started by this agent (for this pod, if given), found through their markers."""
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        environ = _environ(int(entry.name))
        if environ.get(AGENT_MARKER) != agent_id:
            continue
        if pod_uid is None or environ.get(POD_MARKER) == pod_uid:
            yield int(entry.name)


def kill_marked(agent_id: str, pod_uid: str | None = None) -> list[int]:
    killed = []
    for pid in marked_processes(agent_id, pod_uid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed
