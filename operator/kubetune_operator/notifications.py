"""CloudEvents 1.0 over HTTP (structured JSON, the ``cloudevents`` SDK) on every phase change of a FinetuneJob.

``phase_events`` is pure: the event of a transition, with an id derived from the FinetuneJob's UID and the phase it
entered, so a receiver drops the duplicate a restarted operator may send. ``Notifier`` sends from a thread of its
own, never from a handler: a slow or failing sink cannot hold up reconciliation. Each delivery is retried with
exponential backoff; what still fails is counted. With a signing key, ``X-Kubetune-Signature: sha256=<hex>`` is the
HMAC-SHA256 of the body, as GitHub's webhooks sign theirs. Events carry the status figures only, never a Secret.
"""

from __future__ import annotations

import hashlib
import hmac
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudevents.core.bindings.http import to_structured_event
from cloudevents.core.v1.event import CloudEvent
from prometheus_client import CollectorRegistry, Counter

from kubetune_operator.api import GROUP, PLURAL, VERSION

EVENT_TYPE_PREFIX = "io.kubetune.finetunejob."
SIGNATURE_HEADER = "X-Kubetune-Signature"
QUEUE_LIMIT = 10000
"""Events waiting to be sent; beyond it new ones are dropped (and counted) rather than held in memory."""


def event_id(uid: str, phase: str) -> str:
    """The same for every send of one transition of one FinetuneJob, whichever operator process sends it."""
    return hashlib.sha256(f"{uid}/{phase}".encode()).hexdigest()[:32]


def phase_events(body: dict[str, Any], old: dict[str, Any] | None, new: dict[str, Any]) -> list[CloudEvent]:
    """The CloudEvent of a phase change (none without one); completion events carry the adapter, usage and gate."""
    phase = new.get("phase")
    if not phase or phase == (old or {}).get("phase"):
        return []
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    failed = next((c for c in new.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"), None)
    data: dict[str, Any] = {"namespace": namespace, "name": name, "phase": phase, "message": new.get("message")}
    if failed is not None:
        data["reason"] = failed.get("reason")
    if phase in ("Succeeded", "Failed"):
        result = new.get("result") or {}
        data.update(adapterUri=result.get("adapterUri"), usage=new.get("usage"), evaluation=new.get("evaluation"))
    attributes = {
        "specversion": "1.0",
        "id": event_id(str(meta.get("uid") or ""), str(phase)),
        "source": f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
        "type": EVENT_TYPE_PREFIX + str(phase).lower(),
        "subject": name,
        "datacontenttype": "application/json",
    }
    return [CloudEvent(attributes, {k: v for k, v in data.items() if v is not None})]


def signature(body: bytes, key: str) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Delivery:
    url: str
    headers: dict[str, str]
    body: bytes


class Notifier:
    """Sends CloudEvents to every sink from a background thread, with retries; ``notify`` never blocks."""

    def __init__(
        self,
        sinks: list[str],
        registry: CollectorRegistry,
        *,
        signing_key: str | None = None,
        attempts: int = 5,
        backoff_seconds: float = 1.0,
        timeout_seconds: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.sinks = list(sinks)
        self.signing_key = signing_key
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
        if self.sinks and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
            self._thread.start()

    def notify(self, events: list[CloudEvent]) -> None:
        for event in events if self.sinks else []:
            message = to_structured_event(event)
            headers = dict(message.headers)
            if self.signing_key:
                headers[SIGNATURE_HEADER] = signature(message.body, self.signing_key)
            for url in self.sinks:
                try:
                    self._queue.put_nowait(Delivery(url, headers, message.body))
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
            self._deliver(delivery)

    def _deliver(self, delivery: Delivery) -> None:
        for attempt in range(self.attempts):
            if attempt:
                self.retries.inc()
                self._sleep(self.backoff_seconds * 2 ** (attempt - 1))
            request = urllib.request.Request(delivery.url, data=delivery.body, headers=delivery.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    if 200 <= response.status < 300:
                        self.sent.inc()
                        return
            except (urllib.error.URLError, OSError, ValueError):
                continue
        self.failed.inc()
