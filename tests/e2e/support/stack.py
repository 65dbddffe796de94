"""A cluster with kubetune installed, S3 and Prometheus: what the e2e tests and ``make demo`` talk to.

``Stack`` holds what every kind of cluster shares: seeding the demo bucket with the tiny model and the
demo dataset, the namespaces (Pod Security ``restricted``) and the S3 Secret, ``helm upgrade --install``
of ``charts/kubetune``, and the kubectl helpers the tests use. ``local_stack.KubetuneStack`` starts
every part on loopback; ``external_stack.ExternalStack`` reaches them on a cluster someone else runs (kind).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from localcluster.prometheus import PrometheusQueries
from localcluster.s3 import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY

REPO = Path(__file__).resolve().parents[3]

CHART = REPO / "charts" / "kubetune"
DEMO_BUCKET = "kubetune-demo"
MODEL_PREFIX = "models/tiny-llama/"
DATASET_KEY = "datasets/memorise.jsonl"
DATASET_FILE = REPO / "examples" / "data" / "memorise.jsonl"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@dataclass
class StackSettings:
    """Where the stack keeps its files and how it installs kubetune."""

    workdir: Path
    operator_namespace: str = "kubetune-system"
    jobs_namespace: str = "ml"
    release: str = "kubetune"
    s3_port: int | None = None
    prometheus_interval_seconds: float = 1.0
    helm_values: dict[str, Any] = field(default_factory=dict)


def merge_values(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = merge_values(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


class S3Endpoint(Protocol):
    """The S3 service of a stack: ``endpoint_url`` for this process, ``pod_endpoint_url`` for trainer pods."""

    @property
    def endpoint_url(self) -> str: ...

    @property
    def pod_endpoint_url(self) -> str: ...

    def env(self) -> dict[str, str]: ...

    def client(self, service: str = "s3") -> Any: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Stack(ABC):
    """A cluster with kubetune installed, S3 and Prometheus: what the e2e tests and the demo use."""

    settings: StackSettings
    workdir: Path
    s3: S3Endpoint | None = None
    prometheus: PrometheusQueries | None = None
    #: Whether the cluster is the local one, with kwok's fake GPU nodes and trainers as host processes.
    local: bool = False

    @property
    @abstractmethod
    def kubeconfig(self) -> Path: ...

    @property
    @abstractmethod
    def kubectl_binary(self) -> str: ...

    @property
    @abstractmethod
    def helm_binary(self) -> str: ...

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def crash_pod(self, pod: dict[str, Any]) -> None:
        """End a running pod's containers without letting them finish their work."""

    crash_fails_pod = True
    """Whether `crash_pod` leaves a Failed pod that the Job controller counts (False: the pod object is deleted)."""

    # setup shared by every kind of cluster

    def seed_s3(self) -> None:
        """The demo bucket with the tiny model (built here, deterministic) and the demo dataset."""
        assert self.s3 is not None
        model_dir = self.workdir / "tiny-llama"
        if not (model_dir / "config.json").exists():
            subprocess.run([sys.executable, "-m", "tinymodel", "--out", str(model_dir)], check=True)
        s3 = self.s3.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=DEMO_BUCKET)
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), DEMO_BUCKET, MODEL_PREFIX + path.relative_to(model_dir).as_posix())
        s3.upload_file(str(DATASET_FILE), DEMO_BUCKET, DATASET_KEY)

    def prepare_namespaces(self) -> None:
        for namespace in (self.settings.operator_namespace, self.settings.jobs_namespace):
            self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": RESTRICTED}})
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-credentials", "namespace": self.settings.jobs_namespace},
                "stringData": {"AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_ACCESS_KEY},
            }
        )

    def helm_install(self, chart_values: dict[str, Any]) -> None:
        values = self.workdir / "values.yaml"
        values.write_text(yaml.safe_dump(chart_values))
        self.helm(
            "upgrade",
            "--install",
            self.settings.release,
            str(CHART),
            "--namespace",
            self.settings.operator_namespace,
            "--values",
            str(values),
            "--wait",
            "--timeout",
            "180s",
        )

    # clients

    def run(self, argv: list[str], *, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])}... failed ({result.returncode}):\n{result.stderr}{result.stdout}")
        return result

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.run([self.kubectl_binary, "--kubeconfig", str(self.kubeconfig), *args], check=check, stdin=stdin)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([self.helm_binary, "--kubeconfig", str(self.kubeconfig), *args], check=check)

    def apply(self, body: dict[str, Any], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "--server-side", "--field-manager", "kubetune-tests", "-f", "-", stdin=json.dumps(body), check=check)

    def get_json(self, *args: str) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.kubectl("get", *args, "-o", "json").stdout)
        return loaded

    def finetunejob(self, name: str) -> dict[str, Any]:
        return self.get_json("finetunejob", name, "-n", self.settings.jobs_namespace)

    def example(self, filename: str, **overrides: Any) -> dict[str, Any]:
        """An example FinetuneJob pointed at this stack's S3 endpoint, with top-level spec overrides."""
        assert self.s3 is not None
        body: dict[str, Any] = yaml.safe_load((REPO / "examples" / filename).read_text())
        body["metadata"]["namespace"] = self.settings.jobs_namespace
        body["spec"]["output"]["endpointUrl"] = self.s3.pod_endpoint_url
        body["spec"] = merge_values(body["spec"], overrides)
        return body

    @staticmethod
    def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_for_phase(self, name: str, phases: set[str], timeout: float = 300.0) -> dict[str, Any]:
        """Wait until the FinetuneJob reaches one of ``phases``; returns the object."""
        seen: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal seen
            seen = self.finetunejob(name)
            return seen.get("status", {}).get("phase") in phases

        try:
            self.wait_for(reached, timeout, f"FinetuneJob {name} to reach {sorted(phases)}", interval=1.0)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; last status: {json.dumps(seen.get('status'), indent=1)}") from error
        return seen

    def watch_progress(self, name: str, timeout: float = 600.0) -> Iterator[dict[str, Any]]:
        """Yield the FinetuneJob's status whenever it changes, until it finishes."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            status = self.finetunejob(name).get("status", {})
            if status != last:
                last = status
                yield status
            if status.get("phase") in ("Succeeded", "Failed"):
                return
            time.sleep(1.0)
        raise TimeoutError(f"FinetuneJob {name} did not finish in {timeout:.0f}s")
