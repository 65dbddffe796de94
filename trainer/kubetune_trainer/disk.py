"""A full volume told apart from other faults: which of the pod's volumes filled up, and which spec field sizes it.

Retrying cannot help (the next pod gets a volume of the same size), so DiskFull fails the job at once.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from kubetune_api.exitcodes import ExitCode
from kubetune_api.runtime import MODELS_DIR
from kubetune_trainer.errors import TrainerError, causes

TMP_DIR = Path("/tmp")
NO_SPACE = "No space left on device"


class DiskFullError(TrainerError):
    exit_code = ExitCode.DISK_FULL


def volumes(work_dir: Path) -> list[tuple[Path, str, str]]:
    """(mount path, volume name, spec field that sizes it) of every writable volume the operator gives the trainer."""
    return [
        (work_dir, "scratch", "spec.resources.scratchSize"),
        (TMP_DIR, "tmp", "spec.resources.tmpSize"),
        (Path(MODELS_DIR), "models", "the size of spec.model.cacheVolumeClaim"),
    ]


def full(error: BaseException, work_dir: Path) -> DiskFullError | None:
    """The DiskFullError describing ``error`` when it is (or wraps) "no space left on device"; None otherwise."""
    for cause in causes(error):
        if (isinstance(cause, OSError) and cause.errno == errno.ENOSPC) or NO_SPACE in str(cause):
            filename = getattr(cause, "filename", None)
            return DiskFullError(_message(Path(filename) if filename else None, work_dir))
    return None


def _message(path: Path | None, work_dir: Path) -> str:
    known = volumes(work_dir)
    for mount, name, field in known:
        if path is not None and path.is_relative_to(mount):
            return f"The {name} volume ({mount}) is full: writing {path} failed ({NO_SPACE}). Raise {field}."
    # Libraries that write through C (torch.save, safetensors) do not say which file: report every volume's free space.
    free = ", ".join(f"{name} at {mount}: {_free(mount)} free ({field})" for mount, name, field in known if mount.is_dir())
    return f"A volume of the pod is full ({NO_SPACE}); {free}. Raise the field of the volume that is full."


def _free(mount: Path) -> str:
    return f"{shutil.disk_usage(mount).free / 2**30:.1f} GiB"
