"""CloudEvents on phase changes: deduplicable ids, the completion payload, the signature, retries, and a real receiver.

The receiver is a real HTTP server on loopback that decodes each request with the cloudevents SDK, as a sink would.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from prometheus_client import CollectorRegistry

from kubetune_operator.notifications import SIGNATURE_HEADER, Notifier, event_id, job_sinks, phase_events, replayed_events
from kubetune_operator.status import Observed, compute_status

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


def _job_sink(url: str) -> dict[str, Any]:
    return {
        "url": url,
        "authSecretRef": {"name": "hook", "key": "token"},
        "authHeader": "Authorization",
        "signingSecretRef": {"name": "hook", "key": "hmac"},
    }


def test_a_job_sink_gets_its_auth_header_and_signature_from_its_secret(receiver: Receiver) -> None:
    """The Secret store is a dict standing in for the apiserver (the e2e tier reads real Secrets)."""
    secrets = {("team-a", "hook", "token"): "Bearer t0ken-value", ("team-a", "hook", "hmac"): "job-hmac-key"}
    registry = CollectorRegistry()
    notifier = Notifier([], registry, secret_value=lambda ns, name, key: secrets.get((ns, name, key)), backoff_seconds=0.01)
    notifier.start()
    body = {**BODY, "spec": {"notifications": [_job_sink(receiver.url)]}}
    try:
        notifier.notify(phase_events(body, {"phase": "Running"}, SUCCEEDED), job_sinks(body))
        assert receiver.got.wait(30), "the job's sink received nothing"
    finally:
        notifier.stop()
    ((headers, payload),) = receiver.received
    assert headers["authorization"] == "Bearer t0ken-value"
    expected = "sha256=" + hmac.new(b"job-hmac-key", payload, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER.lower()], expected)
    assert b"t0ken-value" not in payload and b"job-hmac-key" not in payload


def test_a_job_sink_whose_secret_is_missing_gets_nothing_and_is_counted(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    notifier = Notifier([], registry, secret_value=lambda ns, name, key: None, attempts=2, backoff_seconds=0.0)
    notifier.start()
    body = {**BODY, "spec": {"notifications": [_job_sink(receiver.url)]}}
    notifier.notify(phase_events(body, None, {"phase": "Pending"}), job_sinks(body))
    notifier.stop()
    assert receiver.received == []
    assert registry.get_sample_value("kubetune_operator_notifications_failed_total") == 1.0
    assert 'Secret team-a/hook or its key "token" does not exist' in caplog.text


def test_chart_and_job_sinks_both_get_every_event() -> None:
    first, second = Receiver(), Receiver()
    notifier = Notifier([first.url], CollectorRegistry())
    notifier.start()
    body = {**BODY, "spec": {"notifications": [{"url": second.url}]}}
    notifier.notify(phase_events(body, None, {"phase": "Pending"}), job_sinks(body))
    notifier.stop()
    for sink in (first, second):
        sink.server.shutdown()
        sink.server.server_close()
    assert len(first.received) == len(second.received) == 1
    assert first.received[0][1] == second.received[0][1]


def test_a_phase_entered_again_gets_a_new_id_and_a_replay_keeps_it() -> None:
    (first,) = phase_events(BODY, {"phase": "Suspended"}, {"phase": "Running", "phaseTransitionTime": "2026-01-01T10:00:00Z"})
    (again,) = phase_events(BODY, {"phase": "Suspended"}, {"phase": "Running", "phaseTransitionTime": "2026-01-01T11:00:00Z"})
    assert first.get_id() != again.get_id()
    stored = {**BODY, "status": {"phase": "Running", "phaseTransitionTime": "2026-01-01T11:00:00Z"}}
    (replayed,) = replayed_events(stored, datetime(2026, 1, 1, 12, tzinfo=UTC))
    assert replayed.get_id() == again.get_id()


def test_a_replay_skips_jobs_that_finished_long_ago() -> None:
    done = {**BODY, "status": {**SUCCEEDED, "completionTime": "2026-01-01T10:00:00Z"}}
    assert len(replayed_events(done, datetime(2026, 1, 1, 10, 30, tzinfo=UTC))) == 1
    assert replayed_events(done, datetime(2026, 1, 2, tzinfo=UTC)) == []
    assert replayed_events({**BODY, "status": {}}, datetime(2026, 1, 2, tzinfo=UTC)) == []


def test_the_phase_transition_time_stays_while_the_phase_does_and_moves_with_it() -> None:
    from tests.unit.test_status import NOW, ftj, job, observe, pod

    running = pod("Running", state={"running": {"startedAt": "2026-11-27T07:00:00Z"}})
    first = compute_status(ftj(), observe(job=job(active=1), pods=[running]))
    later = compute_status(ftj(first), Observed(now=NOW + timedelta(minutes=5), job=job(active=1), pods=[running]))
    assert first["phase"] == later["phase"] == "Running" and later["phaseTransitionTime"] == first["phaseTransitionTime"]
    suspended = compute_status(ftj(later), Observed(now=NOW + timedelta(minutes=9), job=job(suspend=True)))
    assert suspended["phase"] == "Suspended" and suspended["phaseTransitionTime"] != first["phaseTransitionTime"]
    (event,) = phase_events(BODY, later, suspended)
    assert event.get_id() == event_id("uid-1", "Suspended", suspended["phaseTransitionTime"])
