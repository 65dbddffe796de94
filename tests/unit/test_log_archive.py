"""The trainer's log kept in S3 next to the checkpoints: bounded, redacted, and named in the status."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from kubetune_api.runtime import TrainerEnvironment
from kubetune_operator.status import compute_status
from kubetune_trainer import log_archive, logs
from tests.support.s3 import MotoS3Server
from tests.support.storage import make_store
from tests.unit.test_status import ftj, job, observe, pod

pytestmark = pytest.mark.unit

SECRET = "wJalrXUtnFEMI-not-a-real-key"


@pytest.fixture
def json_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.setup(environment=TrainerEnvironment.model_validate({"AWS_SECRET_ACCESS_KEY": SECRET}), rank=0)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_the_archive_keeps_the_newest_lines_redacted_and_uploads_them(json_logging: None, s3_server: MotoS3Server, s3_bucket: str) -> None:
    archive = log_archive.attach()
    assert archive is not None
    archive.max_bytes = 2000
    try:
        for step in range(100):
            logs.event("progress", step=step, note=f"key {SECRET}")
    finally:
        log_archive.detach(archive)
    store = make_store(s3_server, s3_bucket)
    key = log_archive.key_for("runs/team-a/tiny", "tiny-trainer-0-abcde")
    assert key == "runs/team-a/tiny/logs/tiny-trainer-0-abcde.jsonl"
    archive.upload(store, key)
    text = (store.get_bytes(key) or b"").decode()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(text.encode()) <= 2000 and archive.dropped > 0
    assert lines[-1]["step"] == 99 and lines[0]["step"] > 0
    assert SECRET not in text and "***" in text


def test_status_names_the_logs_folder_once_a_trainer_started() -> None:
    assert "logsUri" not in compute_status(ftj(), observe(job=job(active=1), pods=[pod("Pending", node=None)]))
    running = pod("Running", state={"running": {"startedAt": "2026-11-27T07:01:00Z"}})
    status = compute_status(ftj(), observe(job=job(active=1), pods=[running]))
    assert status["logsUri"] == "s3://adapters/runs/team-a/llama/runs/uid-1/logs/"
