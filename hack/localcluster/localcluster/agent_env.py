"""Container environments the way the kubelet builds them: envFrom, env, valueFrom, $(VAR).

A missing Secret, ConfigMap or key that is not optional raises ContainerConfigError with
the kubelet's message, and the caller keeps the container waiting in
CreateContainerConfigError until it appears.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Protocol

from kubernetes.utils import parse_quantity as _client_parse_quantity

Json = dict[str, Any]

# The client's parser is untyped; it returns a Decimal.
parse_quantity: Callable[[str], Decimal] = _client_parse_quantity

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_LABEL_OR_ANNOTATION = re.compile(r"^metadata\.(labels|annotations)\[['\"]?(.+?)['\"]?\]$")


class ContainerConfigError(Exception):
    """The container cannot be configured yet (kubelet reason CreateContainerConfigError)."""


class ObjectSource(Protocol):
    def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def get_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None: ...


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: `$$` escapes, unknown references stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 >= len(text):
            out.append(char)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            close = text.find(")", i + 2)
            if close == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : close]
            out.append(variables[name] if name in variables else text[i : close + 1])
            i = close + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


def field_value(pod: Json, field_path: str) -> str:
    """A downward API fieldRef value (env vars and downwardAPI volumes share the rules)."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
    }
    if field_path in simple:
        return str(simple[field_path])
    if field_path == "status.podIPs":
        return ",".join(str(entry.get("ip", "")) for entry in status.get("podIPs") or [])
    if field_path == "status.hostIPs":
        return ",".join(str(entry.get("ip", "")) for entry in status.get("hostIPs") or [])
    if field_path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(field_path.split(".")[1]) or {}
        return "\n".join(f'{key}="{values[key]}"' for key in sorted(values))
    match = _LABEL_OR_ANNOTATION.match(field_path)
    if match:
        values = metadata.get(match.group(1)) or {}
        return str(values.get(match.group(2), ""))
    raise ContainerConfigError(f'unsupported fieldPath "{field_path}"')


def resource_value(pod: Json, default_container: str, ref: Json, node_allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef value: ceil(quantity / divisor); a missing limit means the node's."""
    container_name = ref.get("containerName") or default_container
    containers = (pod["spec"].get("containers") or []) + (pod["spec"].get("initContainers") or [])
    container = next((c for c in containers if c.get("name") == container_name), None)
    if container is None:
        raise ContainerConfigError(f'container "{container_name}" not found in pod')
    kind, _, resource = str(ref["resource"]).partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(resource)
    if raw is None:
        raw = node_allocatable.get(resource, "0") if kind == "limits" else "0"
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(str(raw)) / divisor))


def _secret(source: ObjectSource, namespace: str, name: str) -> dict[str, str] | None:
    data = source.get_secret_data(namespace, name)
    if data is None:
        return None
    return {key: base64.b64decode(value).decode("utf-8", "replace") for key, value in data.items()}


def _value_from(
    value_from: Json,
    pod: Json,
    container_name: str,
    source: ObjectSource,
    node_allocatable: Mapping[str, str],
) -> str | None:
    """The referenced value, or None when an optional reference is missing."""
    namespace = pod["metadata"]["namespace"]
    for ref_key, kind in (("secretKeyRef", "secret"), ("configMapKeyRef", "configmap")):
        ref = value_from.get(ref_key)
        if ref is None:
            continue
        optional = bool(ref.get("optional"))
        data = _secret(source, namespace, ref["name"]) if kind == "secret" else source.get_config_map_data(namespace, ref["name"])
        if data is None:
            if optional:
                return None
            raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
        if ref["key"] not in data:
            if optional:
                return None
            raise ContainerConfigError(f"couldn't find key {ref['key']} in {'Secret' if kind == 'secret' else 'ConfigMap'} {namespace}/{ref['name']}")
        value: str = data[ref["key"]]
        return value
    if "fieldRef" in value_from:
        return field_value(pod, value_from["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in value_from:
        return resource_value(pod, container_name, value_from["resourceFieldRef"], node_allocatable)
    raise ContainerConfigError(f"unsupported valueFrom {sorted(value_from)}")


def container_env(
    pod: Json,
    container: Json,
    source: ObjectSource,
    service_env: Mapping[str, str],
    node_allocatable: Mapping[str, str],
) -> dict[str, str]:
    """The variables the container's spec defines, in the kubelet's order and precedence."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for env_from in container.get("envFrom") or []:
        prefix = env_from.get("prefix") or ""
        for ref_key, kind in (("secretRef", "secret"), ("configMapRef", "configmap")):
            ref = env_from.get(ref_key)
            if ref is None:
                continue
            data = _secret(source, namespace, ref["name"]) if kind == "secret" else source.get_config_map_data(namespace, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
            for key, value in data.items():
                if _ENV_NAME.match(prefix + key):
                    env[prefix + key] = value
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" in var:
            resolved = _value_from(var["valueFrom"], pod, container["name"], source, node_allocatable)
            if resolved is not None:
                env[name] = resolved
        else:
            env[name] = expand(var.get("value") or "", {**service_env, **env})
    for name, value in service_env.items():
        env.setdefault(name, value)
    return env
