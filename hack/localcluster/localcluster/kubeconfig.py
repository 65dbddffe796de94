"""Kubeconfig files for the components, the admin and service accounts."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import yaml


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _document(server: str, ca_file: Path, user: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-local",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_file)},
            }
        ],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": "kubetune-local", "user": name}}],
        "current-context": name,
    }


def _write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)
    return path


def write_client_cert_kubeconfig(path: Path, server: str, ca_file: Path, cert: Path, key: Path, user: str) -> Path:
    """A self-contained kubeconfig (certificates embedded) for a client-certificate user."""
    credentials = {"client-certificate-data": _b64(cert), "client-key-data": _b64(key)}
    return _write(path, _document(server, ca_file, credentials, user))


def write_token_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str) -> Path:
    """A kubeconfig that authenticates with a bearer token."""
    return _write(path, _document(server, ca_file, {"token": token}, user))


def request_service_account_token(
    kubectl: Path,
    admin_kubeconfig: Path,
    namespace: str,
    service_account: str,
    duration: str = "1h",
    audiences: tuple[str, ...] = (),
) -> str:
    """A bound token for the ServiceAccount, issued by the TokenRequest API."""
    argv = [
        str(kubectl),
        f"--kubeconfig={admin_kubeconfig}",
        "create",
        "token",
        service_account,
        f"--namespace={namespace}",
        f"--duration={duration}",
    ]
    argv += [f"--audience={audience}" for audience in audiences]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"TokenRequest for {namespace}/{service_account} failed: {result.stderr.strip()}")
    return result.stdout.strip()
