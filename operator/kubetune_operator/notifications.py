"""CloudEvents 1.0 over HTTP (structured JSON, the ``cloudevents`` SDK) on every phase change of a FinetuneJob.

``phase_events`` is pure: the event of a transition, with an id derived from the FinetuneJob's UID, the phase it
entered and when (status.phaseTransitionTime), so a receiver drops the duplicate a restarted operator may send,
while a phase entered again (Running after Suspended) gets an id of its own. ``replayed_events`` is what a process
sends for a FinetuneJob it sees for the first time: the event of the phase the status holds, which the previous
process may have written but not delivered. ``Notifier`` sends from a thread of its own, never from a handler: a
slow or failing sink cannot hold up reconciliation. The sinks are the operator's (chart-wide) plus the
FinetuneJob's own (spec.notifications); Secrets a sink names are read on that thread, when it sends. Each delivery
is retried with exponential backoff; what still fails is counted. With a signing key, ``X-Kubetune-Signature:
sha256=<hex>`` is the HMAC-SHA256 of the body, as GitHub's webhooks sign theirs. Events carry the status figures
only; Secret values go into request headers, never into a body or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.v1.event import CloudEvent
from prometheus_client import CollectorRegistry, Counter
from pydantic import ValidationError

from kubetune_operator.api import GROUP, PLURAL, VERSION, Phase
from kubetune_operator.sinkspec import NotificationSink

EVENT_TYPE_PREFIX = "io.kubetune.finetunejob."
SIGNATURE_HEADER = "X-Kubetune-Signature"
QUEUE_LIMIT = 10000
"""Events waiting to be sent; beyond it new ones are dropped (and counted) rather than held in memory."""
REPLAY_WINDOW = timedelta(hours=1)
"""A FinetuneJob that finished longer ago than this gets no replayed event when a new operator process starts."""

log = logging.getLogger(__name__)

SecretValue = Callable[[str, str, str], str | None]
"""(namespace, Secret name, key) -> the value, or None where the Secret or key does not exist; raises when unreadable."""


def event_id(uid: str, phase: str, since: str | None = None) -> str:
    """The same for every send of one transition of one FinetuneJob, whichever operator process sends it."""
    entered = f"/{_instant(since)}" if since else ""
    return hashlib.sha256(f"{uid}/{phase}{entered}".encode()).hexdigest()[:32]


def _instant(text: str) -> str:
    """One spelling of a stored timestamp (Z or +00:00, fractions or none), so the id does not hang on it."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return text


def _event(body: dict[str, Any], status: dict[str, Any]) -> CloudEvent:
    phase = str(status.get("phase"))
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"), None)
    data: dict[str, Any] = {"namespace": namespace, "name": name, "phase": phase, "message": status.get("message")}
    if failed is not None:
        data["reason"] = failed.get("reason")
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        result = status.get("result") or {}
        data.update(adapterUri=result.get("adapterUri"), usage=status.get("usage"), evaluation=status.get("evaluation"))
    attributes = {
        "specversion": "1.0",
        "id": event_id(str(meta.get("uid") or ""), phase, status.get("phaseTransitionTime")),
        "source": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
        "type": EVENT_TYPE_PREFIX + phase.lower(),
        "subject": name,
        "datacontenttype": "application/json",
    }
    return CloudEvent(attributes, {k: v for k, v in data.items() if v is not None})


def phase_events(body: dict[str, Any], old: dict[str, Any] | None, new: dict[str, Any]) -> list[CloudEvent]:
    """The CloudEvent of a phase change (none without one); completion events carry the adapter, usage and gate."""
    phase = new.get("phase")
    if not phase or phase == (old or {}).get("phase"):
        return []
    return [_event(body, new)]


def replayed_events(body: dict[str, Any], now: datetime) -> list[CloudEvent]:
    """The event of the phase a FinetuneJob's stored status holds, sent again by a process that sees it first: the
    process before may have written that phase and stopped before its sink got the event. Same id, so a receiver
    that got it already drops it. None for a FinetuneJob without a phase or one that finished long ago."""
    status = body.get("status") or {}
    if not status.get("phase"):
        return []
    finished = status.get("completionTime")
    if status["phase"] in (Phase.SUCCEEDED, Phase.FAILED) and (
        not isinstance(finished, str) or datetime.fromisoformat(finished.replace("Z", "+00:00")) < now - REPLAY_WINDOW
    ):
        return []
    return [_event(body, status)]


def signature(body: bytes, key: str) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Sink:
    """Where one event goes: a URL, and the headers it needs (a key already known, or Secret keys to read when sending)."""

    url: str
    namespace: str = ""
    spec: NotificationSink | None = None
    signing_key: str | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        """The URL without path or query, which may hold a token: what log lines name."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def job_sinks(body: dict[str, Any]) -> list[Sink]:
    """The FinetuneJob's own sinks (spec.notifications); none where the spec does not parse (its status says why)."""
    namespace = str((body.get("metadata") or {}).get("namespace") or "")
    sinks = []
    for item in (body.get("spec") or {}).get("notifications") or []:
        try:
            spec = NotificationSink.model_validate(item)
        except ValidationError:
            continue
        sinks.append(Sink(url=spec.url, namespace=namespace, spec=spec))
    return sinks


class SinkSecretError(Exception):
    """A Secret a sink names cannot be read; the message names the Secret and key, never a value."""


@dataclass(frozen=True)
class Delivery:
    sink: Sink
    headers: dict[str, str]
    body: bytes
    event_type: str


class Notifier:
    """Sends CloudEvents to every sink from a background thread, with retries; ``notify`` never blocks."""

    def __init__(
        self,
        sinks: list[str],
        registry: CollectorRegistry,
        *,
        signing_key: str | None = None,
        secret_value: SecretValue | None = None,
        attempts: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.sinks = [Sink(url=url, signing_key=signing_key) for url in sinks]
        self._secret_value = secret_value
        self.attempts, self.backoff_seconds, self.timeout_seconds = attempts, backoff_seconds, timeout_seconds
        self._sleep = sleep
        self._queue: queue.Queue[Delivery | None] = queue.Queue(maxsize=QUEUE_LIMIT)
        self.sent = Counter("kubetune_operator_notifications_sent", "CloudEvents delivered to a sink.", registry=registry)
        self.retries = Counter("kubetune_operator_notification_retries", "CloudEvent deliveries retried after a failure.", registry=registry)
        self.failed = Counter(
            "kubetune_operator_notifications_failed", "CloudEvents given up on after every retry, or dropped from a full queue.", registry=registry
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
            self._thread.start()

    def notify(self, events: list[CloudEvent], job_sinks: list[Sink] | None = None) -> None:
        """Queue each event for the operator's sinks and ``job_sinks``; returns at once."""
        sinks = self.sinks + list(job_sinks or [])
        for event in events if sinks else []:
            message = to_structured_event(event)
            for sink in sinks:
                try:
                    self._queue.put_nowait(Delivery(sink, dict(message.headers), message.body, event.get_type()))
                except queue.Full:
                    self.failed.inc()

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued (within ``timeout``), then end the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while (delivery := self._queue.get()) is not None:
            try:
                self._deliver(delivery)
            except Exception:  # the thread must outlive one bad delivery
                log.exception("notification to %s failed", delivery.sink.host)
                self.failed.inc()

    def _secret(self, sink: Sink, ref: Any) -> str:
        if self._secret_value is None:
            raise SinkSecretError(f"Secret {sink.namespace}/{ref.name} cannot be read here")
        try:
            value = self._secret_value(sink.namespace, ref.name, ref.key)
        except Exception as error:
            raise SinkSecretError(f"cannot read Secret {sink.namespace}/{ref.name} ({type(error).__name__})") from None
        if value is None:
            raise SinkSecretError(f'Secret {sink.namespace}/{ref.name} or its key "{ref.key}" does not exist')
        return value

    def _headers(self, delivery: Delivery) -> dict[str, str]:
        """The request headers, with the sink's auth header and signature; Secrets are read now, at each try."""
        headers, sink = dict(delivery.headers), delivery.sink
        key = sink.signing_key
        if sink.spec is not None:
            if sink.spec.auth_secret_ref is not None:
                headers[sink.spec.auth_header] = self._secret(sink, sink.spec.auth_secret_ref).strip()
            if sink.spec.signing_secret_ref is not None:
                key = self._secret(sink, sink.spec.signing_secret_ref)
        if key:
            headers[SIGNATURE_HEADER] = signature(delivery.body, key)
        return headers

    def _deliver(self, delivery: Delivery) -> None:
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                self.retries.inc()
                self._sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                headers = self._headers(delivery)
                request = urllib.request.Request(delivery.sink.url, data=delivery.body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    if 200 <= response.status < 300:
                        self.sent.inc()
                        return
                    why = f"HTTP {response.status}"
            except SinkSecretError as error:
                why = str(error)
            except urllib.error.HTTPError as error:
                why = f"HTTP {error.code}"
            except (urllib.error.URLError, OSError, ValueError) as error:
                why = type(error).__name__
        log.warning("gave up on %s to %s after %d tries: %s", delivery.event_type, delivery.sink.host, self.attempts, why)
        self.failed.inc()
