"""Finding the upstream binaries built by hack/build-tools.sh."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-tools.sh"
REQUIRED_BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "helm",
)
# Points the launcher at a directory of binaries instead of the build cache.
BIN_DIR_ENV = "KUBETUNE_BIN_DIR"


class MissingBinariesError(RuntimeError):
    """The control-plane binaries are not built; the message says how to build them."""


def check_binaries(bin_dir: Path) -> None:
    missing = [b for b in REQUIRED_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise MissingBinariesError(f"missing binaries in {bin_dir}: {', '.join(missing)}; build them with: {BUILD_SCRIPT}")


def locate_bin_dir(build: bool) -> Path:
    """The directory holding the binaries for the current hack/tools pins.

    With build=True, runs hack/build-tools.sh (a no-op when already built; a cold build
    takes a long time). With build=False, only looks and raises MissingBinariesError.
    """
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        bin_dir = Path(override).resolve()
        check_binaries(bin_dir)
        return bin_dir
    argv = [str(BUILD_SCRIPT)] if build else [str(BUILD_SCRIPT), "--check"]
    result = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise MissingBinariesError(f"the Kubernetes binaries are not built (exit {result.returncode} from {' '.join(argv)}); build them with: {BUILD_SCRIPT}")
    bin_dir = Path(lines[-1])
    check_binaries(bin_dir)
    return bin_dir


def find_tool(name: str) -> str:
    """``kubectl`` or ``helm``: KUBETUNE_<NAME> if set, else the build for the current pins, else the one on PATH."""
    explicit = os.environ.get(f"KUBETUNE_{name.upper()}")
    if explicit:
        return explicit
    try:
        return str(locate_bin_dir(build=False) / name)
    except MissingBinariesError as missing:
        on_path = shutil.which(name)
        if on_path:
            return on_path
        raise MissingBinariesError(f"{name} not found: {missing} (or put {name} on PATH, or point KUBETUNE_{name.upper()} at one)") from missing
