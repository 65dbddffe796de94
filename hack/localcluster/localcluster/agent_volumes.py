"""Pod volumes as per-pod directories on the host, and the bind mounts each container gets.

Every volume is a directory under the pod's directory in the agent's workdir (a
PersistentVolumeClaim is a per-claim directory shared by all pods that name it), filled
before the containers start. The process launcher bind-mounts them at each volumeMount's
mountPath inside a private mount namespace, so pods see the usual paths
(/var/run/secrets/kubernetes.io/serviceaccount, /dev/shm, ...) without touching the host's.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from localcluster.agent_env import ContainerConfigError, expand, field_value, parse_quantity, resource_value

Json = dict[str, Any]

log = logging.getLogger(__name__)

DEFAULT_FILE_MODE = 0o644
DEFAULT_TOKEN_SECONDS = 3600
# Volume types whose content comes from the API are read-only to containers, as with the kubelet.
_API_BACKED = ("configMap", "secret", "downwardAPI", "projected")


class VolumeNotReady(Exception):
    """A volume cannot be set up yet (the kubelet keeps the pod in ContainerCreating)."""


class VolumeSource(Protocol):
    def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def get_config_map_data(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def request_token(
        self,
        namespace: str,
        service_account: str,
        audiences: list[str],
        expiration_seconds: int,
        pod: Json,
    ) -> str: ...


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool


@dataclass
class _Token:
    file: Path
    audience: str
    expiration_seconds: int
    issued_at: float
    mode: int


def _write_file(root: Path, relative: str, content: bytes, mode: int) -> Path:
    target = (root / relative).resolve()
    if root.resolve() not in target.parents:
        raise VolumeNotReady(f"path {relative!r} leaves the volume")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_bytes(content)
    os.chmod(staging, mode)
    os.replace(staging, target)
    return target


def _reset_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


class PodVolumes:
    """Materialises one pod's volumes and answers which host directory backs each mount."""

    def __init__(
        self,
        pod_dir: Path,
        claims_dir: Path,
        source: VolumeSource,
        node_allocatable: Mapping[str, str],
    ) -> None:
        self.volumes_dir = pod_dir / "volumes"
        self.claims_dir = claims_dir
        self.source = source
        self.node_allocatable = node_allocatable
        self._paths: dict[str, Path] = {}
        self._tmpfs: list[Path] = []
        self._tokens: list[_Token] = []

    # setup

    def prepare(self, pod: Json) -> None:
        """Creates every volume; raises VolumeNotReady with the kubelet-style reason."""
        self._tokens.clear()
        for volume in pod["spec"].get("volumes") or []:
            self._paths[volume["name"]] = self._prepare_volume(pod, volume)

    def _prepare_volume(self, pod: Json, volume: Json) -> Path:
        name = volume["name"]
        namespace = pod["metadata"]["namespace"]
        path: Path = self.volumes_dir / str(name)
        if "emptyDir" in volume:
            return self._empty_dir(path, volume["emptyDir"] or {})
        if "persistentVolumeClaim" in volume:
            claim: Path = self.claims_dir / namespace / str(volume["persistentVolumeClaim"]["claimName"])
            claim.mkdir(parents=True, exist_ok=True)
            return claim
        if "hostPath" in volume:
            host = Path(str(volume["hostPath"]["path"]))
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                host.mkdir(parents=True, exist_ok=True)
            if not host.exists():
                raise VolumeNotReady(f"hostPath type check failed: {host} does not exist")
            return host
        _reset_dir(path)
        if "configMap" in volume:
            self._config_map(path, namespace, volume["configMap"], None)
        elif "secret" in volume:
            self._secret(path, namespace, volume["secret"], None)
        elif "downwardAPI" in volume:
            self._downward_api(path, pod, volume["downwardAPI"], None)
        elif "projected" in volume:
            projected = volume["projected"]
            mode = projected.get("defaultMode", DEFAULT_FILE_MODE)
            for projection in projected.get("sources") or []:
                self._projection(path, pod, projection, mode)
        else:
            raise VolumeNotReady(f"volume {name!r}: unsupported type {sorted(set(volume) - {'name'})}")
        return path

    def _empty_dir(self, path: Path, spec: Json) -> Path:
        if spec.get("medium") != "Memory":
            path.mkdir(parents=True, exist_ok=True)
            # World-writable like the kubelet's, so any user a container runs as can write.
            os.chmod(path, 0o777)
            return path
        if path in self._tmpfs:
            return path
        path.mkdir(parents=True, exist_ok=True)
        options = "mode=1777"
        if spec.get("sizeLimit"):
            options += f",size={int(parse_quantity(str(spec['sizeLimit'])))}"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
        self._tmpfs.append(path)
        return path

    def _items(self, data: Mapping[str, bytes], spec: Json, mode: int, what: str) -> list[tuple[str, bytes, int]]:
        items = spec.get("items")
        if not items:
            return [(key, value, mode) for key, value in data.items()]
        chosen = []
        for item in items:
            if item["key"] not in data:
                if spec.get("optional"):
                    continue
                raise VolumeNotReady(
                    f"configmap references non-existent config key: {item['key']}"
                    if what == "configmap"
                    else f"references non-existent secret key: {item['key']}"
                )
            chosen.append((item["path"], data[item["key"]], item.get("mode", mode)))
        return chosen

    def _config_map(self, root: Path, namespace: str, spec: Json, mode: int | None) -> None:
        data = self.source.get_config_map_data(namespace, spec["name"])
        if data is None:
            if spec.get("optional"):
                return
            raise VolumeNotReady(f'configmap "{spec["name"]}" not found')
        encoded = {key: value.encode() for key, value in data.items()}
        file_mode = spec.get("defaultMode", DEFAULT_FILE_MODE) if mode is None else mode
        for relative, content, item_mode in self._items(encoded, spec, file_mode, "configmap"):
            _write_file(root, relative, content, item_mode)

    def _secret(self, root: Path, namespace: str, spec: Json, mode: int | None) -> None:
        name = spec.get("secretName") or spec.get("name") or ""
        data = self.source.get_secret_data(namespace, name)
        if data is None:
            if spec.get("optional"):
                return
            raise VolumeNotReady(f'secret "{name}" not found')
        decoded = {key: base64.b64decode(value) for key, value in data.items()}
        file_mode = spec.get("defaultMode", DEFAULT_FILE_MODE) if mode is None else mode
        for relative, content, item_mode in self._items(decoded, spec, file_mode, "secret"):
            _write_file(root, relative, content, item_mode)

    def _downward_api(self, root: Path, pod: Json, spec: Json, mode: int | None) -> None:
        file_mode = spec.get("defaultMode", DEFAULT_FILE_MODE) if mode is None else mode
        for item in spec.get("items") or []:
            try:
                if "fieldRef" in item:
                    value = field_value(pod, item["fieldRef"]["fieldPath"])
                else:
                    value = resource_value(pod, "", item["resourceFieldRef"], self.node_allocatable)
            except ContainerConfigError as error:
                raise VolumeNotReady(str(error)) from error
            _write_file(root, item["path"], value.encode(), item.get("mode", file_mode))

    def _projection(self, root: Path, pod: Json, projection: Json, mode: int) -> None:
        namespace = pod["metadata"]["namespace"]
        if "configMap" in projection:
            self._config_map(root, namespace, projection["configMap"], mode)
        elif "secret" in projection:
            self._secret(root, namespace, projection["secret"], mode)
        elif "downwardAPI" in projection:
            self._downward_api(root, pod, projection["downwardAPI"], mode)
        elif "serviceAccountToken" in projection:
            spec = projection["serviceAccountToken"]
            token = _Token(
                file=root / spec["path"],
                audience=spec.get("audience") or "",
                expiration_seconds=int(spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
                issued_at=0.0,
                mode=mode,
            )
            self._issue(pod, token)
            self._tokens.append(token)
        else:
            raise VolumeNotReady(f"unsupported projection {sorted(projection)}")

    def _issue(self, pod: Json, token: _Token) -> None:
        service_account = pod["spec"].get("serviceAccountName") or "default"
        try:
            value = self.source.request_token(
                pod["metadata"]["namespace"],
                service_account,
                [token.audience] if token.audience else [],
                token.expiration_seconds,
                pod,
            )
        except Exception as error:
            raise VolumeNotReady(f"failed to fetch token: {error}") from error
        _write_file(token.file.parent, token.file.name, value.encode(), token.mode)
        token.issued_at = time.monotonic()

    def refresh_tokens(self, pod: Json) -> None:
        """Re-issues tokens past 80% of their lifetime, as the kubelet's token manager does."""
        for token in self._tokens:
            if time.monotonic() - token.issued_at > 0.8 * token.expiration_seconds:
                try:
                    self._issue(pod, token)
                except VolumeNotReady as error:
                    log.warning("token refresh for %s failed: %s", token.file, error)

    # per container

    def mounts_for(self, pod: Json, container: Json, env: Mapping[str, str]) -> list[Mount]:
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts = []
        for volume_mount in container.get("volumeMounts") or []:
            name = volume_mount["name"]
            if name not in self._paths:
                raise ContainerConfigError(f"cannot find volume {name!r} to mount into container")
            source = self._paths[name]
            sub_path = volume_mount.get("subPath") or ""
            if volume_mount.get("subPathExpr"):
                sub_path = expand(volume_mount["subPathExpr"], env)
            if sub_path:
                if os.path.isabs(sub_path) or ".." in Path(sub_path).parts:
                    raise ContainerConfigError(f"subPath {sub_path!r} must be a relative path inside the volume")
                source = source / sub_path
                if not source.exists():
                    source.mkdir(parents=True)
            api_backed = any(kind in volumes[name] for kind in _API_BACKED)
            mounts.append(
                Mount(
                    source=source,
                    target=volume_mount["mountPath"],
                    read_only=bool(volume_mount.get("readOnly")) or api_backed,
                )
            )
        return mounts

    def cleanup(self) -> None:
        for path in self._tmpfs:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
        self._tmpfs.clear()
