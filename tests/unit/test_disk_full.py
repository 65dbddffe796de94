"""No space left on device ends as DiskFull (not retried), naming the volume and the spec field that sizes it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from kubetune_api.exitcodes import NON_RETRIABLE, ExitCode
from kubetune_trainer.disk import DiskFullError, full
from kubetune_trainer.errors import classify

pytestmark = pytest.mark.unit


def test_a_real_enospc_names_every_volume_and_its_field(tmp_path: Path) -> None:
    # /dev/full answers every write with ENOSPC, as a full disk does, and does not say which file it was.
    with pytest.raises(OSError) as raised, open("/dev/full", "wb") as device:
        device.write(b"checkpoint bytes")
        device.flush()
    failure = full(raised.value, tmp_path)
    assert isinstance(failure, DiskFullError)
    assert failure.exit_code is ExitCode.DISK_FULL and failure.exit_code in NON_RETRIABLE and failure.reason == "DiskFull"
    assert f"scratch at {tmp_path}" in failure.message and "(spec.resources.scratchSize)" in failure.message
    assert "tmp at /tmp" in failure.message and "(spec.resources.tmpSize)" in failure.message


def test_a_full_volume_named_by_the_failing_path(tmp_path: Path) -> None:
    error = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "hf" / "model.safetensors"))
    wrapped = RuntimeError("download failed")
    wrapped.__cause__ = error
    failure = full(wrapped, tmp_path)
    assert failure is not None
    assert failure.message == (
        f"The scratch volume ({tmp_path}) is full: writing {tmp_path / 'hf' / 'model.safetensors'} failed (No space left on device). "
        "Raise spec.resources.scratchSize."
    )
    tmp_failure = full(OSError(errno.ENOSPC, "No space left on device", "/tmp/torch-extension.so"), tmp_path)
    assert tmp_failure is not None and tmp_failure.message.endswith("Raise spec.resources.tmpSize.")


def test_other_os_errors_stay_runtime_faults(tmp_path: Path) -> None:
    error = OSError(errno.EIO, "Input/output error", str(tmp_path / "x"))
    assert full(error, tmp_path) is None
    assert classify(error).exit_code is ExitCode.RUNTIME_ERROR
    assert classify(error).message.startswith("Unexpected OSError")
