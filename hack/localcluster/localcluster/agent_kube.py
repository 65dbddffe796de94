"""The node agent's narrow view of the Kubernetes API, with objects as plain JSON dicts.

Pods, Secrets and ConfigMaps are handled as the JSON the apiserver sends (camelCase keys,
exactly what a manifest says), so the agent reads container specs the way a user wrote
them instead of through generated model classes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

Json = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"

Model = TypeVar("Model")

# The watch helper is untyped; its stream() yields dicts when deserialize=False.
new_watch: Callable[[], Any] = watch.Watch


def is_not_found(error: ApiException) -> bool:
    return bool(error.status == 404)


def _model(model_class: Any, data: Json) -> Any:
    """A generated model from plain JSON (the typed create calls want model instances)."""
    model = model_class.from_dict(data)
    if model is None:
        raise ValueError(f"{model_class.__name__} from empty data")
    return model


def _decode(response: Any) -> Json:
    decoded: Json = json.loads(response.data)
    return decoded


class KubeApi:
    """The calls a kubelet makes: pods on its node, their Secrets/ConfigMaps, tokens, its Node."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    # pods

    def list_node_pods(self, node_name: str) -> tuple[list[Json], str]:
        listing = _decode(self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node_name}", _preload_content=False))
        items: list[Json] = listing.get("items") or []
        return items, str(listing["metadata"]["resourceVersion"])

    def watch_node_pods(self, node_name: str, resource_version: str, timeout_s: int, stopper: Any) -> Iterator[Json]:
        """Yields raw watch events; raises ApiException(410) when the version expired."""
        events: Iterator[Json] = stopper.stream(
            self.core.list_pod_for_all_namespaces,
            field_selector=f"spec.nodeName={node_name}",
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout_s,
            deserialize=False,
        )
        yield from events

    def get_pod(self, namespace: str, name: str) -> Json | None:
        try:
            return _decode(self.core.read_namespaced_pod(name, namespace, _preload_content=False))
        except ApiException as error:
            if is_not_found(error):
                return None
            raise

    def patch_pod_status(self, namespace: str, name: str, status: Json) -> None:
        self.core.patch_namespaced_pod_status(
            name,
            namespace,
            {"status": status},
            _content_type=MERGE_PATCH,
            _preload_content=False,
        )

    def delete_pod_now(self, namespace: str, name: str, uid: str) -> None:
        """The kubelet's final delete: grace 0, and only the pod instance this agent ran."""
        body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid))
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body, _preload_content=False)
        except ApiException as error:
            # 404: already gone; 409: the uid precondition failed, so a new pod took the name.
            if error.status not in (404, 409):
                raise

    def list_services(self) -> list[Json]:
        """Every Service of the cluster; those without a cluster IP are the ones cluster DNS gives per-pod names."""
        listing = _decode(self.core.list_service_for_all_namespaces(_preload_content=False))
        items: list[Json] = listing.get("items") or []
        return items

    def list_live_pods(self) -> list[Json]:
        """Every pod of the cluster that is not terminal: headless Services select among them."""
        listing = _decode(self.core.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed", _preload_content=False))
        items: list[Json] = listing.get("items") or []
        return items

    # what containers consume

    def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """Base64 values as stored, or None when the Secret does not exist."""
        try:
            secret = _decode(self.core.read_namespaced_secret(name, namespace, _preload_content=False))
        except ApiException as error:
            if is_not_found(error):
                return None
            raise
        data: dict[str, str] = secret.get("data") or {}
        return data

    def get_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """String values (binaryData is base64, prefixed with a marker), or None when missing."""
        try:
            config_map = _decode(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))
        except ApiException as error:
            if is_not_found(error):
                return None
            raise
        data: dict[str, str] = dict(config_map.get("data") or {})
        return data

    def request_token(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str],
        expiration_seconds: int,
        pod: Json,
    ) -> str:
        body = _model(
            client.AuthenticationV1TokenRequest,
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": audiences,
                    "expirationSeconds": expiration_seconds,
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": pod["metadata"]["name"],
                        "uid": pod["metadata"]["uid"],
                    },
                },
            },
        )
        issued = _decode(self.core.create_namespaced_service_account_token(service_account, namespace, body, _preload_content=False))
        token: str = issued["status"]["token"]
        return token

    def create_event(self, event: Json) -> None:
        self.core.create_namespaced_event(event["metadata"]["namespace"], _model(client.CoreV1Event, event), _preload_content=False)

    # the node

    def ensure_node(self, node: Json) -> None:
        try:
            self.core.create_node(_model(client.V1Node, node), _preload_content=False)
        except ApiException as error:
            if error.status != 409:
                raise
            patch = {"metadata": {"labels": node["metadata"]["labels"]}}
            self.core.patch_node(node["metadata"]["name"], patch, _content_type=MERGE_PATCH, _preload_content=False)

    def get_node_uid(self, name: str) -> str:
        node = _decode(self.core.read_node(name, _preload_content=False))
        uid: str = node["metadata"]["uid"]
        return uid

    def patch_node_status(self, name: str, status: Json) -> None:
        self.core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False)

    def renew_lease(self, namespace: str, lease: Json) -> None:
        name = lease["metadata"]["name"]
        try:
            self.coordination.patch_namespaced_lease(
                name,
                namespace,
                {"spec": lease["spec"]},
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        except ApiException as error:
            if not is_not_found(error):
                raise
            self.coordination.create_namespaced_lease(namespace, _model(client.V1Lease, lease), _preload_content=False)
