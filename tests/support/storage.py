"""A trainer store on a test S3 endpoint, and an observer that counts what the store reports."""

from __future__ import annotations

from kubetune_api.recipe import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
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
