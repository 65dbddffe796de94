"""What the reconciler shares across threads: settings, metrics, per-FinetuneJob write state and the status lane."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kubetune_operator.metrics import Health, OperatorMetrics
from kubetune_operator.notifications import Notifier
from kubetune_operator.persistence import HandledState
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.snapshots import Watched

Obj = dict[str, Any]
Key = tuple[str, str]


@dataclass
class Runtime:
    """Settings, metrics, and per-FinetuneJob write state, shared by the handler threads and the status lane."""

    settings: OperatorSettings
    metrics: OperatorMetrics
    health: Health
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _locks: dict[Key, threading.Lock] = field(default_factory=dict)
    # The status last written per FinetuneJob: watch events may lag behind our own writes.
    _written: dict[Key, Obj] = field(default_factory=dict)
    _queued: set[Key] = field(default_factory=set)
    _running: set[Key] = field(default_factory=set)
    # FinetuneJobs whose stored phase this process has announced to the notification sinks.
    _announced: set[Key] = field(default_factory=set)
    # When each finished trainer Job may be deleted (spec.ttlSecondsAfterFinished); the ticker refreshes them then.
    _expiries: dict[Key, datetime] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # kopf's per-object handling state (last handled spec, handler progress), kept in memory.
    handled: HandledState = field(default_factory=HandledState)
    # kopf's live index views, kept from the first handler call for the progress ticker.
    watched: Watched | None = None
    _status_lane: ThreadPoolExecutor | None = None
    # CloudEvents of phase changes, sent from a thread of their own; None sends none.
    notifier: Notifier | None = None

    def written(self, key: Key) -> Obj | None:
        """The status last written for ``key`` by this process."""
        with self._guard:
            return self._written.get(key)

    def remember(self, key: Key, status: Obj) -> None:
        with self._guard:
            self._written[key] = status

    def _add_new(self, members: set[Key], key: Key) -> bool:
        """Add ``key`` to ``members``; False when it was there already."""
        with self._guard:
            if key in members:
                return False
            members.add(key)
            return True

    def first_sight(self, key: Key) -> bool:
        """True once per FinetuneJob and process: the first time its status is about to be written here."""
        return self._add_new(self._announced, key)

    def track(self, key: Key, running: bool) -> None:
        """Remember which FinetuneJobs have a running trainer, whose progress the ticker reads."""
        with self._guard:
            if running:
                self._running.add(key)
            else:
                self._running.discard(key)

    def running_keys(self) -> list[Key]:
        with self._guard:
            return sorted(self._running)

    def expire_at(self, key: Key, when: datetime | None) -> None:
        """Remember when the finished Job of ``key`` may be deleted; None forgets it."""
        with self._guard:
            if when is None:
                self._expiries.pop(key, None)
            else:
                self._expiries[key] = when

    def expired_keys(self, moment: datetime) -> list[Key]:
        """The FinetuneJobs whose finished Job may be deleted by ``moment``, forgotten as they are returned."""
        with self._guard:
            due = sorted(key for key, when in self._expiries.items() if when <= moment)
            for key in due:
                del self._expiries[key]
            return due

    def lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def queue(self, key: Key) -> bool:
        """Mark a plain refresh of `key` as waiting; False when one is waiting already."""
        return self._add_new(self._queued, key)

    def defer(self, key: Key, refresh: Callable[[], None]) -> None:
        """Run a plain status refresh of ``key`` on the status lane, unless one is already waiting there.

        The refresh reads kopf's live indexes when it runs, so one run covers every event that arrived
        while it waited. Handler threads return at once, free for the next FinetuneJob's creation.
        """
        if not self.queue(key):
            return
        with self._guard:
            if self._status_lane is None:
                self._status_lane = ThreadPoolExecutor(max_workers=self.settings.status_workers, thread_name_prefix="status")
            lane = self._status_lane
        # The caller's context goes along: kopf finds its Event queue and settings through context variables.
        lane.submit(contextvars.copy_context().run, self._run_deferred, key, refresh)

    def _run_deferred(self, key: Key, refresh: Callable[[], None]) -> None:
        # Dequeued before reading anything: an event that arrives while this runs queues the next refresh.
        self.dequeue(key)
        try:
            with self.timed("status_refresh"):
                refresh()
        except Exception:  # a lane thread has no caller to raise to; the next event refreshes again
            logging.getLogger(__name__).exception("status refresh of %s/%s failed", *key)

    def close(self) -> None:
        with self._guard:
            lane, self._status_lane = self._status_lane, None
        if lane is not None:
            lane.shutdown(wait=True, cancel_futures=True)

    def dequeue(self, key: Key) -> None:
        with self._guard:
            self._queued.discard(key)

    def forget(self, key: Key) -> None:
        with self._guard:
            self._locks.pop(key, None)
            self._written.pop(key, None)
            self._queued.discard(key)
            self._running.discard(key)
            self._expiries.pop(key, None)
            self._announced.discard(key)

    @contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except (kopf.TemporaryError, kopf.PermanentError):
            raise
        except ApiException as error:
            self.metrics.reconcile_errors.labels(kind=f"api{error.status}").inc()
            raise
        except Exception as error:
            self.metrics.reconcile_errors.labels(kind=type(error).__name__).inc()
            raise
        finally:
            self.metrics.reconcile_duration.labels(handler=handler).observe(time.perf_counter() - start)


def now() -> datetime:
    return datetime.now(UTC)
