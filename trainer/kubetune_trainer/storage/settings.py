"""How a store behaves: its retry budget and backoff, transfer tuning, and who hears about its traffic."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal, Protocol

Direction = Literal["upload", "download"]


class StorageObserver(Protocol):
    """Receives transfer volume and retry events, e.g. to feed Prometheus counters."""

    def on_bytes(self, direction: Direction, n: int) -> None: ...

    def on_retry(self) -> None: ...


class NullObserver:
    """Observer that discards events."""

    def on_bytes(self, direction: Direction, n: int) -> None:
        return None

    def on_retry(self) -> None:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by the total time spent on one operation."""

    max_total_seconds: float = 300.0
    initial_delay_seconds: float = 0.5
    max_delay_seconds: float = 20.0
    multiplier: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Sleep before retry number ``attempt`` (0-based): half fixed, half random so writers spread out."""
        ceiling = min(self.max_delay_seconds, self.initial_delay_seconds * self.multiplier**attempt)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class StoreSettings:
    """Connection tuning; the defaults suit real S3, tests shorten them."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    multipart_threshold_bytes: int = 64 * 1024 * 1024
    multipart_chunk_bytes: int = 64 * 1024 * 1024
    max_concurrency: int = 4
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 60.0
