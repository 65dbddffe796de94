"""The network identity of pods on the local node: loopback addresses and in-cluster variables."""

from __future__ import annotations

import ipaddress
import os
import threading
import urllib.parse
import zlib
from collections.abc import Sequence

from localcluster import agent_process

HOST_IP = "127.0.0.1"
# Variables of the agent's own environment that pods inherit, as they would from an image.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "SSL_CERT_FILE", "TMPDIR")
POD_NETWORK = ipaddress.ip_network("127.0.0.0/16")


class PodAddresses:
    """Hands out 127.0.K.1, 127.0.K.2, ... (127.0.0.x stays the host's).

    K comes from ``salt`` (the agent's workdir, or one the agents of a cluster share) plus ``offset``, so
    agents of different local clusters on one host, and the nodes of one cluster, start in different /24s.
    """

    def __init__(self, salt: str = "", offset: int = 0) -> None:
        self._used: set[str] = set()
        self._lock = threading.Lock()
        self._first_subnet = 1 + ((zlib.crc32(salt.encode()) if salt else 0) + offset) % 254

    def _candidates(self) -> list[str]:
        hosts = [str(h) for h in POD_NETWORK.hosts()]
        start = self._first_subnet * 256
        return hosts[start:] + hosts[:start]

    def claim(self, wanted: str | None = None) -> str:
        with self._lock:
            if wanted and wanted not in self._used and self._valid(wanted):
                self._used.add(wanted)
                return wanted
            for address in self._candidates():
                if self._valid(address) and address not in self._used:
                    self._used.add(address)
                    return address
        raise RuntimeError("no free pod address left in 127.0.0.0/16")

    @staticmethod
    def _valid(address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        octets = str(parsed).split(".")
        return parsed in POD_NETWORK and octets[2] != "0" and octets[3] not in ("0", "255")

    def release(self, address: str) -> None:
        with self._lock:
            self._used.discard(address)


def service_env(api_url: str) -> dict[str, str]:
    """The variables the kubelet derives from the `kubernetes` Service, aimed at the apiserver."""
    parsed = urllib.parse.urlsplit(api_url)
    host = parsed.hostname or HOST_IP
    port = str(parsed.port or 443)
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{port}_TCP_PORT": port,
        f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
    }


def image_env(inherited: Sequence[str] = INHERITED_ENV) -> dict[str, str]:
    env = {name: os.environ[name] for name in inherited if name in os.environ}
    path = env.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env["PATH"] = f"{agent_process.interpreter_bin_dir()}:{path}"
    return env
