"""A trainer store on a test S3 endpoint, and an observer that counts what the store reports."""

from __future__ import annotations

from typing import Any

from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.fencing import Attempt
from kubetune_trainer.storage.settings import StoreSettings
from kubetune_trainer.storage.store import S3Store
from localcluster.s3 import REGION, MotoS3Server


class CountingObserver:
    def __init__(self) -> None:
        self.bytes: dict[str, int] = {"upload": 0, "download": 0}
        self.retries = 0

    def on_bytes(self, direction: str, n: int) -> None:
        self.bytes[direction] += n

    def on_retry(self) -> None:
        self.retries += 1


def make_store(server: MotoS3Server, bucket: str, *, settings: StoreSettings | None = None, observer: CountingObserver | None = None) -> S3Store:
    """A store for ``bucket`` with the credentials and endpoint the server gives a trainer pod."""
    output = OutputSpec(bucket=bucket, endpoint_url=server.endpoint_url, region=REGION)
    return S3Store.from_output(output, environment=TrainerEnvironment.model_validate(server.env()), settings=settings, observer=observer)


RUN_UID = "0f6c1d2e-run"
"""The run (FinetuneJob UID) the storage tests write as."""


def attempt_on(store: S3Store, run_prefix: str, token: str = "attempt-a", *, run_uid: str = RUN_UID, claim: bool = True) -> Attempt:
    """An attempt of a run on ``store``; ``claim`` takes the run over for it, as a starting trainer does."""
    attempt = Attempt(store, run_prefix, run_uid, token, pod=f"pod-{token}")
    if claim:
        attempt.claim()
    return attempt


def json_object(store: S3Store, key: str) -> dict[str, Any]:
    """A JSON object stored at ``key``, which must exist."""
    document = store.get_json(key)
    assert isinstance(document, dict), f"{key} holds {document!r}"
    return document
