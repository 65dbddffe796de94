"""CloudEvents on phase changes: deduplicable ids, the completion payload, the signature, retries, and a real receiver.

The receiver is a real HTTP server on loopback that decodes each request with the cloudevents SDK, as a sink would.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from prometheus_client import CollectorRegistry

from kubetune_operator.notifications import SIGNATURE_HEADER, Notifier, event_id, phase_events

pytestmark = pytest.mark.unit

BODY = {"metadata": {"name": "llama", "namespace": "team-a", "uid": "uid-1"}}
SUCCEEDED = {
    "phase": "Succeeded",
    "message": "adapter published at s3://a/runs/team-a/llama/adapter/",
    "result": {"adapterUri": "s3://a/runs/team-a/llama/adapter/"},
    "usage": {"gpuSeconds": 3600.0},
    "evaluation": {"gate": "Passed", "baseEvalLoss": 2.0, "finalEvalLoss": 1.5},
}


class Receiver:
    """A sink that answers ``failures`` requests with 503 before accepting."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.failures > 0:
                    outer.failures -= 1
                    self.send_response(503)
                else:
                    outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    outer.got.set()
                    self.send_response(202)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    sink = Receiver(failures=2)
    yield sink
    sink.server.shutdown()
    sink.server.server_close()


def test_one_event_per_phase_change_with_an_id_from_uid_and_phase() -> None:
    (running,) = phase_events(BODY, {"phase": "Pending"}, {"phase": "Running", "message": "training"})
    assert running.get_type() == "io.kubetune.finetunejob.running"
    assert running.get_source() == "/apis/kubetune.io/v1alpha1/namespaces/team-a/finetunejobs/llama"
    assert running.get_id() == event_id("uid-1", "Running") == phase_events(BODY, None, {"phase": "Running"})[0].get_id()
    assert running.get_id() != event_id("uid-2", "Running")
    assert phase_events(BODY, {"phase": "Running"}, {"phase": "Running", "message": "other"}) == []


def test_the_completion_event_carries_adapter_usage_and_gate() -> None:
    (done,) = phase_events(BODY, {"phase": "Running"}, SUCCEEDED)
    data = done.get_data()
    assert isinstance(data, dict)
    assert data["adapterUri"] == "s3://a/runs/team-a/llama/adapter/" and data["usage"]["gpuSeconds"] == 3600.0
    assert data["evaluation"]["gate"] == "Passed"


def test_a_real_sink_gets_signed_events_after_retries(receiver: Receiver) -> None:
    registry = CollectorRegistry()
    notifier = Notifier([receiver.url], registry, signing_key="k3y-for-signing", backoff_seconds=0.01)
    notifier.start()
    try:
        notifier.notify(phase_events(BODY, {"phase": "Running"}, SUCCEEDED))
        assert receiver.got.wait(30), "the sink received nothing"
    finally:
        notifier.stop()
    ((headers, body),) = receiver.received
    event = from_http_event(HTTPMessage(headers=headers, body=body))
    assert event.get_id() == event_id("uid-1", "Succeeded") and event.get_specversion() == "1.0"
    expected = "sha256=" + hmac.new(b"k3y-for-signing", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER.lower()], expected)
    assert b"k3y-for-signing" not in body
    assert registry.get_sample_value("kubetune_operator_notification_retries_total") == 2.0
    assert registry.get_sample_value("kubetune_operator_notifications_sent_total") == 1.0


def test_a_sink_that_never_answers_is_counted_and_never_blocks_the_caller() -> None:
    registry = CollectorRegistry()
    slept: list[float] = []
    notifier = Notifier(["http://127.0.0.1:9/unreachable"], registry, attempts=3, backoff_seconds=1.0, sleep=slept.append)
    notifier.start()
    notifier.notify(phase_events(BODY, None, {"phase": "Pending"}))
    notifier.stop()
    assert slept == [1.0, 2.0]
    assert registry.get_sample_value("kubetune_operator_notifications_failed_total") == 1.0
