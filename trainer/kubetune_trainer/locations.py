"""Where a model or dataset source points: an S3 prefix or object, a local path, or the Hugging Face hub.

Only the spelling decides, never whether a path happens to exist in the trainer's working directory:
``org/name`` is a hub id even if a folder of that name is there. Local paths are absolute, explicitly
relative (``./``, ``../``), in a home directory (``~``) or ``file://`` URLs. A source that is none of
these forms (``s3:/one-slash``, another scheme, an s3:// key with '.' or '..' segments that would
land outside the download folder) is refused with the message the apiserver gives for it, so a source
that reached the trainer by another road than the FinetuneJob schema is checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from kubetune_api.messages import message
from kubetune_api.schema import FILE_SCHEME, S3_SCHEME, source_problem
from kubetune_trainer.errors import ConfigError

Location = Literal["s3", "local", "hub"]

LOCAL_PREFIXES = ("/", "./", "../", "~", FILE_SCHEME)

__all__ = ["FILE_SCHEME", "LOCAL_PREFIXES", "S3_SCHEME", "Location", "local_path", "location"]


def location(source: str) -> Location:
    """Where ``source`` points: ``s3``, ``local`` or ``hub``; ``ConfigError`` for a source of no valid form."""
    problem = source_problem(source)
    if problem is not None:
        raise ConfigError(message(problem, field=repr(source)))
    if source.startswith(S3_SCHEME):
        return "s3"
    if source.startswith(LOCAL_PREFIXES):
        return "local"
    return "hub"


def local_path(source: str) -> Path:
    """The path a local source names, with ``file://`` removed and ``~`` expanded."""
    return Path(source.removeprefix(FILE_SCHEME)).expanduser()
