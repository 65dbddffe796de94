"""Where a model or dataset source points: an S3 prefix or object, a local path, or the Hugging Face hub.

Only the spelling decides, never whether a path happens to exist in the trainer's working directory:
``org/name`` is a hub id even if a folder of that name is there. Local paths are absolute, explicitly
relative (``./``, ``../``), in a home directory (``~``) or ``file://`` URLs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Location = Literal["s3", "local", "hub"]

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"
LOCAL_PREFIXES = ("/", "./", "../", "~", FILE_SCHEME)


def location(source: str) -> Location:
    """Where ``source`` points: ``s3``, ``local`` or ``hub``."""
    if source.startswith(S3_SCHEME):
        return "s3"
    if source.startswith(LOCAL_PREFIXES):
        return "local"
    return "hub"


def local_path(source: str) -> Path:
    """The path a local source names, with ``file://`` removed and ``~`` expanded."""
    return Path(source.removeprefix(FILE_SCHEME)).expanduser()
