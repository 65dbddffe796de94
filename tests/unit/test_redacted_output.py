"""Output that bypasses the trainer's logger is redacted before it can become a termination message.

The trainer is started as its container starts it (``python -m kubetune_trainer``); a
``sitecustomize`` module stands in for a C extension that prints a credential to the raw stderr
and aborts the process before any termination message is written. The log it leaves is read back
the way the kubelet reads it for FallbackToLogsOnError (the local node agent's implementation).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer.redacted_output import MAX_LINE_BYTES, pump
from localcluster.agent_process import termination_message

pytestmark = pytest.mark.unit

SECRET = "s3cr3t-Value-0123456789"
REPO = Path(__file__).resolve().parents[2]

CHILD_BEHAVIOUR = f"""
import os, signal, sys, time
# Only the trainer itself (the child) acts; a wrapper that does not start one never prints a line.
if "--redacted-child" in sys.orig_argv and os.environ.get("ON_START") == "crash":
    os.write(2, b"libfoo: connecting with secret_key={SECRET} failed\\n")
    os.write(1, b"stdout also saw {SECRET}\\n")
    os.abort()
if "--redacted-child" in sys.orig_argv and os.environ.get("ON_START") == "count-sigterms":
    received = []
    signal.signal(signal.SIGTERM, lambda *_: received.append(1))
    os.write(1, b"ready\\n")
    while not received:
        time.sleep(0.05)
    time.sleep(1.0)
    os.write(1, b"sigterms=%d\\n" % len(received))
    os._exit(3)
if "--redacted-child" in sys.orig_argv and os.environ.get("ON_START") == "leave-a-worker":
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
    os.write(1, b"trainer done\\n")
    os._exit(7)
"""


def start_trainer(tmp_path: Path, on_start: str, start_new_session: bool = False) -> subprocess.Popen[bytes]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CHILD_BEHAVIOUR)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "AWS_ACCESS_KEY_ID": "key-id-value",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "ON_START": on_start,
    }
    config = tmp_path / "config.yaml"
    config.write_text("{}")
    command = [sys.executable, "-m", "kubetune_trainer", "--config", str(config)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=start_new_session)


def test_secret_on_raw_stderr_of_a_crash_is_redacted_in_the_fallback_message(tmp_path: Path) -> None:
    process = start_trainer(tmp_path, "crash")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGABRT, err.decode(errors="replace")
    log = tmp_path / "container.log"
    log.write_bytes(out + err)
    fallback = termination_message(tmp_path / "no-termination-file", log, fallback_to_logs=True)
    assert "libfoo: connecting with secret_key=*** failed" in fallback
    assert "stdout also saw ***" in fallback
    assert SECRET not in fallback and SECRET.encode() not in out + err


def test_sigterm_to_the_pod_reaches_the_trainer_exactly_once(tmp_path: Path) -> None:
    # The local node agent signals the container's whole process group, the kubelet only its first process;
    # either way the trainer must see one SIGTERM (a second one would cut the launcher's shutdown short).
    process = start_trainer(tmp_path, "count-sigterms", start_new_session=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert (process.returncode, out) == (3, b"sigterms=1\n"), err.decode(errors="replace")


def test_a_worker_left_behind_does_not_keep_the_pod_running(tmp_path: Path) -> None:
    # The trainer exits while a process it started still holds stdout and stderr open.
    process = start_trainer(tmp_path, "leave-a-worker", start_new_session=True)
    try:
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert (process.returncode, out) == (7, b"trainer done\n"), err.decode(errors="replace")


@pytest.mark.parametrize("offset", [1, len(SECRET) // 2, len(SECRET) - 1])
def test_a_secret_split_across_the_pieces_of_a_long_line_is_redacted(offset: int) -> None:
    """A progress bar without newlines is read in MAX_LINE_BYTES pieces; the secret straddles the first boundary."""
    before = b"#" * (MAX_LINE_BYTES - offset)
    line = before + SECRET.encode() + b"#" * 100 + b" done\n" + b"next line " + SECRET.encode()
    sink = io.BytesIO()
    pump(io.BytesIO(line), sink, [SECRET.encode()])
    assert sink.getvalue() == before + b"***" + b"#" * 100 + b" done\n" + b"next line ***"
