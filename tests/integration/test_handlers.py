"""The kopf registrations drive the reconciler: kopf itself runs here, once, against the real apiserver.

The other integration tests call the reconciler as the handlers would; this one checks that the handlers
really do (their keyword arguments, kopf's indexes and diff) for the paths a user meets first.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator

import kopf
import pytest
from kubernetes.config import kube_config

from kubetune_operator.__main__ import kopf_settings
from kubetune_operator.handlers import register
from tests.integration.harness import NAMESPACE, ControlPlane, Harness, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def operator(control_plane: ControlPlane, harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    """kopf watching the test namespace, its handlers calling the harness's reconciler (kopf logs in as the admin)."""
    # kopf logs in through the client library's default kubeconfig (read when called, not the KUBECONFIG of now).
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(control_plane.kubeconfig))
    registry = kopf.OperatorRegistry()
    register(registry, harness.reconciler)
    stop, ready = threading.Event(), threading.Event()
    run = kopf.operator(
        registry=registry,
        settings=kopf_settings(harness.runtime.settings, harness.runtime.handled),
        standalone=True,
        namespaces=[NAMESPACE],
        stop_flag=stop,
        ready_flag=ready,
    )
    thread = threading.Thread(target=asyncio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(30), "kopf did not start"
    try:
        yield harness
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "kopf did not stop"
        gc.collect()  # what kopf left open is closed now, while this test ignores the warnings about it


# Stopped from outside, kopf may leave a watch connection for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_kopf_handlers_create_update_and_refresh_through_the_reconciler(operator: Harness) -> None:
    operator.create_finetunejob("by-kopf")
    wait_for(lambda: operator.job("by-kopf") is not None, "the trainer Job")
    wait_for(lambda: operator.status("by-kopf").get("jobName") == "by-kopf-trainer", "the status from the Job's watch event")
    operator.patch_spec("by-kopf", suspend=True)
    wait_for(lambda: (operator.job("by-kopf") or {}).get("spec", {}).get("suspend") is True, "the suspend to reach the Job")
    wait_for(lambda: "Suspending" in operator.event_reasons("by-kopf"), "a Suspending Event")
    wait_for(lambda: operator.status("by-kopf").get("phase") == "Suspended", "phase Suspended")
