"""Where a FinetuneJob's files live in S3: one folder per job name, one folder per run inside it.

    <output.prefix>/<namespace>/<name>/latest.json                       the newest published run (a pointer)
    <output.prefix>/<namespace>/<name>/runs/<run>/attempt.json           the attempt allowed to write the run
    <output.prefix>/<namespace>/<name>/runs/<run>/checkpoints/step-<N>/  resumable checkpoints:
        checkpoint.json                                                  the marker, written last
        <attempt>/...                                                    the files of the attempt the marker names
    <output.prefix>/<namespace>/<name>/runs/<run>/adapter/               the published adapter, manifest.json last
    <output.prefix>/<namespace>/<name>/runs/<run>/merged/                the merged model, when asked for
    <output.prefix>/<namespace>/<name>/runs/<run>/prepared/<key>.npz     tokenized, packed data from the preparation step
    <output.prefix>/<namespace>/<name>/runs/<run>/rejected/              an adapter that failed spec.evaluation, kept unpublished
    <output.prefix>/<namespace>/<name>/runs/<run>/logs/<pod>.jsonl       each attempt's structured trainer log (its newest 4 MiB)

``<run>`` is the FinetuneJob's metadata.uid (a hash of the recipe for runs started by hand), so a
FinetuneJob deleted and created again under the same name is a new run: it never resumes from,
withdraws or overwrites the files of an earlier one, whose adapter stays where its status said it
was. ``latest.json`` is the one file runs of a name share: after each successful publication it
names that run's adapter (what model registries and scripts read to find "the" adapter of a job).
``<attempt>`` is the trainer pod's metadata.uid: each attempt writes checkpoint files only into its
own folder, and only the attempt named in ``attempt.json`` may commit a marker or a manifest.

Helpers taking ``run`` take a ``run_prefix``; anything else that belongs to one run (its logs, an
adapter it did not publish) gets a folder of its own name there, beside ``adapter/``, so that a
namesake never mixes it up with its own. Only ``latest.json`` lives outside a run's folder.

The trainer writes these keys and the operator reports them; both build them only here.
"""

from __future__ import annotations

RUNS_FOLDER = "runs"
CHECKPOINTS_FOLDER = "checkpoints"
ADAPTER_FOLDER = "adapter"
MERGED_FOLDER = "merged"
PREPARED_FOLDER = "prepared"
REJECTED_FOLDER = "rejected"
LOGS_FOLDER = "logs"
CHECKPOINT_MARKER = "checkpoint.json"
"""Written last into a checkpoint folder: it lists every file, so its presence means complete."""
MANIFEST = "manifest.json"
"""Written last into a publication folder: it lists every file with its size and SHA-256."""
ATTEMPT_LEASE = "attempt.json"
"""Names the attempt (trainer pod) that may write the run; each new attempt takes it over when it starts."""
LATEST = "latest.json"
"""Names the newest published run of a FinetuneJob name (``kubetune_api.result.PublishedRun``)."""


def join_key(*parts: str) -> str:
    """Join key segments with single slashes, dropping empty ones."""
    return "/".join(part.strip("/") for part in parts if part.strip("/"))


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def job_prefix(output_prefix: str, namespace: str, name: str) -> str:
    """Key prefix shared by every run of a FinetuneJob name: <output.prefix>/<namespace>/<name> (no trailing slash)."""
    return join_key(output_prefix, namespace, name)


def run_prefix(output_prefix: str, namespace: str, name: str, run: str) -> str:
    """Key prefix of one run: <output.prefix>/<namespace>/<name>/runs/<run> (no trailing slash)."""
    return join_key(job_prefix(output_prefix, namespace, name), RUNS_FOLDER, run)


def latest_key(job: str) -> str:
    """Key of the pointer to the newest published run under a ``job_prefix``."""
    return join_key(job, LATEST)


def attempt_key(run: str) -> str:
    return join_key(run, ATTEMPT_LEASE)


def checkpoints_prefix(run: str) -> str:
    return join_key(run, CHECKPOINTS_FOLDER) + "/"


def step_prefix(run: str, step: int) -> str:
    """Folder of the checkpoint taken at ``step`` (ends in '/')."""
    return join_key(run, CHECKPOINTS_FOLDER, f"step-{step}") + "/"


def step_files_prefix(run: str, step: int, attempt: str) -> str:
    """Folder of the files one attempt wrote for the checkpoint at ``step`` (ends in '/')."""
    return join_key(step_prefix(run, step), attempt) + "/"


def adapter_prefix(run: str) -> str:
    return join_key(run, ADAPTER_FOLDER)


def merged_prefix(run: str) -> str:
    return join_key(run, MERGED_FOLDER)


def prepared_prefix(run: str) -> str:
    """Folder of the run's prepared (tokenized and packed) data, one file per cache key."""
    return join_key(run, PREPARED_FOLDER)


def rejected_prefix(run: str) -> str:
    return join_key(run, REJECTED_FOLDER)


def logs_prefix(run: str) -> str:
    """Folder of the trainer logs of every attempt (ends in '/')."""
    return join_key(run, LOGS_FOLDER) + "/"


def logs_key(run: str, pod: str) -> str:
    return join_key(run, LOGS_FOLDER, f"{pod}.jsonl")


def checkpoint_uri(bucket: str, run: str, step: int) -> str:
    return uri(bucket, step_prefix(run, step))
