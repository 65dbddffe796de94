"""Every call the operator makes to the Kubernetes API: create and apply children, patch Jobs and status, read
Secret keys, post Events. Each write is counted in kubetune_operator_api_writes_total.

Responses are decoded from the raw body (``_preload_content=False``): building the client's models would cost
more than the call. Every response is read to its end (``_decode`` or ``_done``), which is what returns its
connection to the pool: an unread one is dropped, and the next call pays a new TLS handshake.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune_operator import api
from kubetune_operator.events import Event
from kubetune_operator.metrics import OperatorMetrics

Obj = dict[str, Any]

FIELD_MANAGER = "kubetune-operator"
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
MAX_EVENT_MESSAGE = 1024

log = logging.getLogger(__name__)


class Rejected(Exception):
    """The apiserver refused a change as invalid (422); the message is its reason."""


class SecretsForbidden(Exception):
    """The operator may not read Secrets here (cluster-wide mode grants no Secret access)."""


def _status(error: ApiException) -> Obj:
    """The Status object an API error carries."""
    try:
        status: Obj = json.loads(error.body or "{}")
    except ValueError:
        return {}
    return status


def _invalid_fields(error: ApiException) -> set[str]:
    """The fields a 422 names."""
    return {str(cause.get("field")) for cause in _status(error).get("details", {}).get("causes") or []}


def _message(error: ApiException) -> str:
    return str(_status(error).get("message") or error.reason)


def _decode(response: Any) -> Obj:
    data: Obj = json.loads(response.data)
    response.release_conn()
    return data


def _done(response: Any) -> None:
    """Read a response whose body is not needed, so its connection goes back to the pool."""
    response.drain_conn()
    response.release_conn()


class Kube:
    """The operator's API calls, through one client (one connection pool shared by the handler threads)."""

    def __init__(self, api_client: client.ApiClient, metrics: OperatorMetrics, instance: str | None = None) -> None:
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.metrics = metrics
        self.instance = instance or socket.gethostname()
        # kind -> (create, read, patch)
        self._children: dict[str, tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]] = {
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map, self.core.patch_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service, self.core.patch_namespaced_service),
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job, self.batch.patch_namespaced_job),
            "NetworkPolicy": (
                self.networking.create_namespaced_network_policy,
                self.networking.read_namespaced_network_policy,
                self.networking.patch_namespaced_network_policy,
            ),
        }

    def _wrote(self, verb: str, resource: str) -> None:
        self.metrics.api_writes.labels(verb=verb, resource=resource).inc()

    def create(self, manifest: Obj) -> bool:
        """Create a child that is not there yet; False, and nothing written, when an object holds its name (409).

        One call for the common case, a new FinetuneJob: a create cannot write over anything, so the ownership check
        (a read) is needed only when the name is taken. Later changes are server-side applies (``apply``).
        """
        create, _, _ = self._children[manifest["kind"]]
        meta = manifest["metadata"]
        try:
            _done(create(meta["namespace"], manifest, field_manager=FIELD_MANAGER, _preload_content=False))
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        self._wrote("create", manifest["kind"].lower())
        if manifest["kind"] == "Job":
            self.metrics.jobs_created.labels(namespace=meta["namespace"]).inc()
        return True

    def read(self, manifest: Obj) -> Obj | None:
        """The object named like ``manifest`` (same kind, namespace and name), or None when there is none."""
        _, read, _ = self._children[manifest["kind"]]
        meta = manifest["metadata"]
        try:
            return _decode(read(meta["name"], meta["namespace"], _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def apply(self, manifest: Obj, uid: str) -> Obj:
        """Server-side apply of a child onto the object with ``uid``, which this FinetuneJob owns, with the operator's
        field manager: the apiserver answers 409 when no object has the uid and 422 when another object holds the
        name, and conflicts with other managers are overridden."""
        _, _, patch = self._children[manifest["kind"]]
        meta = manifest["metadata"]
        body = {**manifest, "metadata": {**meta, "uid": uid}}
        response = patch(meta["name"], meta["namespace"], body, field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH, _preload_content=False)
        self._wrote("apply", manifest["kind"].lower())
        return _decode(response)

    def patch_job_spec(self, namespace: str, name: str, uid: str, spec: Obj) -> bool:
        """Merge-patch fields of the Job with this uid (None removes a field); False when it no longer exists."""
        body = {"metadata": {"uid": uid}, "spec": spec}
        try:
            _done(self.batch.patch_namespaced_job(name, namespace, body, field_manager=FIELD_MANAGER, _content_type=MERGE_PATCH, _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return False
            if error.status == 422:
                if _invalid_fields(error) == {"metadata.uid"}:
                    return False  # another Job holds the name now
                raise Rejected(_message(error)) from error
            raise
        self._wrote("patch", "job")
        return True

    def delete_job(self, namespace: str, name: str, uid: str) -> bool:
        """Delete the Job with this uid, its pods in the background; False when it is gone or another Job holds the name."""
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid), propagation_policy="Background")
        try:
            _done(self.batch.delete_namespaced_job(name, namespace, body=options, _preload_content=False))
        except ApiException as error:
            if error.status in (404, 409):
                return False
            raise
        self._wrote("delete", "job")
        return True

    def patch_status(self, namespace: str, name: str, status: Obj) -> None:
        """Merge-patch a FinetuneJob's status subresource."""
        response = self.custom.patch_namespaced_custom_object_status(
            api.GROUP,
            api.VERSION,
            namespace,
            api.PLURAL,
            name,
            {"status": status},
            field_manager=FIELD_MANAGER,
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )
        _done(response)
        self._wrote("patch", "finetunejobs/status")

    def _secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data (base64 values), or None when it does not exist; SecretsForbidden without the right to read it."""
        try:
            response = self.core.read_namespaced_secret(name, namespace, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return None
            if error.status == 403:
                raise SecretsForbidden(f"cannot read Secrets in {namespace}") from error
            raise
        return dict(_decode(response).get("data") or {})

    def secret_keys(self, namespace: str, name: str) -> frozenset[str] | None:
        """The key names of a Secret (never its values), or None when it does not exist."""
        data = self._secret_data(namespace, name)
        return None if data is None else frozenset(data)

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        """One value of a Secret (a notification sink's auth header or signing key), or None where the Secret or the
        key does not exist. The caller puts it in a request header only; it is never logged."""
        encoded = (self._secret_data(namespace, name) or {}).get(key)
        return None if encoded is None else base64.b64decode(encoded).decode()

    def post_event(self, about: Obj, event: Event) -> None:
        """Post an Event about a FinetuneJob. A lost Event must not fail the reconcile it reports on: logged, not raised."""
        meta = about.get("metadata", {})
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": about.get("apiVersion", api.API_VERSION),
                "kind": about.get("kind", api.KIND),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:MAX_EVENT_MESSAGE],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": self.instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            _done(self.core.create_namespaced_event(meta.get("namespace"), client.CoreV1Event.model_validate(body), _preload_content=False))
        except ApiException as error:
            log.warning("could not post Event %s about %s/%s: %s", event.reason, meta.get("namespace"), meta.get("name"), error.reason)
            return
        self._wrote("create", "events")
