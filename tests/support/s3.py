"""pytest fixtures for a real S3 endpoint (moto's server behind a stoppable loopback proxy).

Registered for every test by ``pytest_plugins`` in tests/conftest.py; the server itself lives in
``localcluster.s3`` because the local stack and the demo use it too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localcluster.s3 import (
    DUMMY_ACCESS_KEY_ID,
    DUMMY_SECRET_ACCESS_KEY,
    LOOPBACK,
    REGION,
    LoopbackProxy,
    MotoS3Server,
    free_port,
    wait_for_port,
)

__all__ = [
    "DUMMY_ACCESS_KEY_ID",
    "DUMMY_SECRET_ACCESS_KEY",
    "LOOPBACK",
    "REGION",
    "LoopbackProxy",
    "MotoS3Server",
    "free_port",
    "s3_bucket",
    "s3_server",
    "wait_for_port",
]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    """One moto S3 endpoint for the session; tests isolate themselves with their own bucket."""
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: MotoS3Server) -> str:
    """A fresh, empty bucket on the session's endpoint."""
    if not s3_server.running:
        s3_server.start()
    return s3_server.create_bucket()
