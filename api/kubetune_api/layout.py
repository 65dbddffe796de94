"""Where a run's files live in S3: one prefix per run, checkpoints and publications below it.

    <output.prefix>/<namespace>/<name>/checkpoints/step-<N>/   resumable checkpoints, checkpoint.json last
    <output.prefix>/<namespace>/<name>/adapter/                the published adapter, manifest.json last
    <output.prefix>/<namespace>/<name>/merged/                 the merged model, when asked for

The trainer writes these keys and the operator reports them; both build them only here.
"""

from __future__ import annotations

CHECKPOINTS_FOLDER = "checkpoints"
ADAPTER_FOLDER = "adapter"
MERGED_FOLDER = "merged"
CHECKPOINT_MARKER = "checkpoint.json"
"""Written last into a checkpoint folder: it lists every file, so its presence means complete."""
MANIFEST = "manifest.json"
"""Written last into a publication folder: it lists every file with its size and SHA-256."""


def join_key(*parts: str) -> str:
    """Join key segments with single slashes, dropping empty ones."""
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def run_prefix(output_prefix: str, namespace: str, name: str) -> str:
    """Key prefix of one run: <output.prefix>/<namespace>/<name> (no trailing slash)."""
    return join_key(output_prefix, namespace, name)


def checkpoints_prefix(run: str) -> str:
    return join_key(run, CHECKPOINTS_FOLDER) + "/"


def step_prefix(run: str, step: int) -> str:
    """Folder of the checkpoint taken at ``step`` (ends in '/')."""
    return join_key(run, CHECKPOINTS_FOLDER, f"step-{step}") + "/"


def adapter_prefix(run: str) -> str:
    return join_key(run, ADAPTER_FOLDER)


def merged_prefix(run: str) -> str:
    return join_key(run, MERGED_FOLDER)


def checkpoint_uri(bucket: str, run: str, step: int) -> str:
    return uri(bucket, step_prefix(run, step))
