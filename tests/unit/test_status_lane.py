"""The status lane: plain refreshes of one FinetuneJob coalesce, and none is lost while one runs."""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kubetune_operator.metrics import Health, OperatorMetrics
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

KEY = ("ml", "tiny-lora")


def settle(runtime: Runtime) -> None:
    """Wait until the single lane thread has run everything deferred so far (it runs in order)."""
    done = threading.Event()
    runtime.defer(("ml", "sentinel"), done.set)
    assert done.wait(5)


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    lane = Runtime(settings=OperatorSettings(status_workers=1), metrics=OperatorMetrics(), health=Health())
    yield lane
    lane.close()


def test_refreshes_waiting_for_the_lane_coalesce(runtime: Runtime) -> None:
    release, runs = threading.Event(), list[int]()
    runtime.defer(("ml", "other"), lambda: None if release.wait(5) else None)  # holds the only lane thread
    for n in range(5):
        runtime.defer(KEY, functools.partial(runs.append, n))
    release.set()
    settle(runtime)
    assert runs == [0]


def test_an_event_during_a_refresh_queues_another(runtime: Runtime) -> None:
    started, release, runs = threading.Event(), threading.Event(), list[str]()

    def slow() -> None:
        runs.append("first")
        started.set()
        release.wait()

    runtime.defer(KEY, slow)
    assert started.wait(5)
    runtime.defer(KEY, lambda: runs.append("second"))
    release.set()
    settle(runtime)
    assert runs == ["first", "second"]


def test_a_failing_refresh_is_counted_and_the_next_one_runs(runtime: Runtime) -> None:
    runs: list[str] = []

    def broken() -> Any:
        raise RuntimeError("apiserver went away")

    runtime.defer(KEY, broken)
    settle(runtime)
    runtime.defer(KEY, lambda: runs.append("again"))
    settle(runtime)
    assert runs == ["again"]
    errors = runtime.metrics.registry.get_sample_value("kubetune_operator_reconcile_errors_total", {"kind": "RuntimeError"})
    assert errors == 1


CALLER = contextvars.ContextVar[str]("caller")


def test_a_refresh_runs_in_its_callers_context(runtime: Runtime) -> None:
    """kopf reaches its Event queue through context variables; a refresh on the lane must still post Events."""
    seen: list[str] = []
    token = CALLER.set("kopf handler")
    try:
        runtime.defer(KEY, lambda: seen.append(CALLER.get("no context")))
    finally:
        CALLER.reset(token)
    settle(runtime)
    assert seen == ["kopf handler"]
