"""Operator benchmark: FinetuneJob -> trainer Job latency, memory and API writes per job.

Creates 100 FinetuneJobs at once (gpus: 1, so they land on kwok's fake GPU nodes and run),
then 1,000 suspended ones, against a real apiserver with the operator running as a process,
once the cluster is quiet (a control plane that has just started bootstraps for a few seconds).
Prints, for each batch, p50/p99 of the time from FinetuneJob to trainer Job (from the
creationTimestamps, whole seconds as the apiserver stores them, and from a watch, in
milliseconds), and, on the local cluster, from the apiserver's audit log (when each object was
stored, in microseconds, free of this client's own delays); the operator's peak RSS, API writes
per job and duplicate Jobs (must be 0).

    python bench/operator_latency.py                    # starts its own local cluster
    python bench/operator_latency.py --kubeconfig PATH  # an existing cluster with the CRD installed

Targets (docs: DESIGN.md): p50 <= 1 s and p99 <= 5 s for 100 at once; RSS <= 300 MiB with 1,000.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

from kubetune_operator import api, crdgen, manifests

# The apiserver counts a server-side apply under its own verb, APPLY, not PATCH.
WRITE_VERBS = ("POST", "PATCH", "APPLY", "PUT", "DELETE")
OPERATOR_RESOURCES = ("finetunejobs", "configmaps", "services", "jobs", "events")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def finetunejob(name: str, namespace: str, suspend: bool) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "meta-llama/Llama-3.1-8B"},
            "dataset": {"source": "s3://bench/data.jsonl"},
            "training": {"maxSteps": 10},
            "output": {"bucket": "bench"},
            "resources": {"gpus": 1},
            "suspend": suspend,
        },
    }


def apiserver_writes(api_client: client.ApiClient, resources: tuple[str, ...] | None = OPERATOR_RESOURCES) -> Counter[str]:
    """Write requests so far by resource[/subresource] (None: all resources), from the apiserver's own counter."""
    method, url, headers, body, post = api_client.param_serialize("GET", "/metrics", auth_settings=["BearerToken"])
    response: Any = api_client.call_api(method, url, headers, body, post)
    response.read()
    text: str = response.data.decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.rindex("}")].replace('"', "").split(","))
        if labels.get("verb") in WRITE_VERBS and (resources is None or labels.get("resource") in resources):
            key = f"{labels.get('verb')} {labels['resource']}" + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            totals[key] += int(float(line.rsplit(" ", 1)[1]))
    return totals


def wait_until_quiet(api_client: client.ApiClient, window: float = 2.0, timeout: float = 90.0) -> float:
    """Wait until the apiserver sees no writes (node leases aside) for `window` seconds; the seconds it took.

    A control plane that has just started spends its first seconds bootstrapping (RBAC roles, service
    accounts, node status): a burst measured then measures that, not the operator.
    """
    start = time.monotonic()
    before = apiserver_writes(api_client, None)
    while time.monotonic() - start < timeout:
        time.sleep(window)
        after = apiserver_writes(api_client, None)
        busy = {key: count for key, count in (after - before).items() if not key.endswith(" leases")}
        if not busy:
            return time.monotonic() - start
        before = after
    raise RuntimeError(f"the apiserver kept receiving writes for {timeout:.0f} s: {busy}")


AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {"level": "Metadata", "verbs": ["create"], "resources": [{"group": api.GROUP, "resources": [api.PLURAL]}]},
        # The operator creates its Jobs with a create; a server-side apply (a patch) would be logged as well.
        {"level": "Metadata", "verbs": ["create", "patch"], "resources": [{"group": "batch", "resources": ["jobs"]}]},
        {"level": "None"},
    ],
}


def audit_args(workdir: Path) -> tuple[str, ...]:
    """kube-apiserver flags that log when each FinetuneJob and Job was created."""
    policy = workdir / "audit-policy.yaml"
    policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    return (f"--audit-policy-file={policy}", f"--audit-log-path={workdir / 'audit.log'}", "--audit-log-mode=blocking")


def stored_at(audit_log: Path, namespace: str) -> dict[tuple[str, str], datetime]:
    """(resource, name) -> when the apiserver finished creating it, from the audit log."""
    times: dict[tuple[str, str], datetime] = {}
    with audit_log.open(encoding="utf-8") as lines:
        for line in lines:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if event.get("stage") == "ResponseComplete" and ref.get("namespace") == namespace and event.get("responseStatus", {}).get("code") == 201:
                times[(ref["resource"], ref.get("name", ""))] = timestamp(event["stageTimestamp"])
    return times


class JobWatch:
    """Records when each trainer Job is first seen by a watch, as the operator's latency seen from outside."""

    def __init__(self, batch: client.BatchV1Api, namespace: str) -> None:
        self.seen: dict[str, float] = {}
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batch, namespace), daemon=True)

    def _run(self, batch: client.BatchV1Api, namespace: str) -> None:
        selector = f"{manifests.LABEL_MANAGED_BY}={manifests.MANAGED_BY}"
        while not self._stopped.is_set():
            # A loaded apiserver may cut the stream; a new one lists again, and only first sightings count.
            with contextlib.suppress(Exception):
                stream = self._watch.stream(batch.list_namespaced_job, namespace, label_selector=selector, timeout_seconds=300)  # type: ignore[no-untyped-call]
                for event in stream:
                    owner = event["object"].metadata.labels.get(manifests.LABEL_FINETUNEJOB)
                    if owner and owner not in self.seen:
                        self.seen[owner] = time.monotonic()

    def __enter__(self) -> JobWatch:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *_: object) -> None:
        self._stopped.set()
        self._watch.stop()  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def operator_process(kubeconfig: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "KUBETUNE_OPERATOR_HOST": "127.0.0.1",
        "KUBETUNE_OPERATOR_PORT": str(port),
    }
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "kubetune_operator"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            if process.poll() is not None:
                raise RuntimeError(f"operator exited; see {log}")
            time.sleep(0.2)
        else:
            raise RuntimeError(f"operator not ready in 60 s; see {log}")
        yield process, port
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def memory_kib(pid: int) -> dict[str, int]:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def operator_writes(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("kubetune_operator_api_writes_total{"))


def raw_json(response: Any) -> Any:
    """Body of a ``_preload_content=False`` call: the listing without building client models."""
    return json.loads(response.data)


def timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_batch(
    clients: tuple[client.CustomObjectsApi, client.BatchV1Api, client.ApiClient], namespace: str, count: int, suspend: bool, port: int, audit_log: Path | None
) -> None:
    custom, batch, api_client = clients
    names = [f"{'s' if suspend else 'g'}{i:04d}" for i in range(count)]
    writes_before, own_before = apiserver_writes(api_client), operator_writes(port)
    created_at: dict[str, float] = {}

    def create(name: str) -> None:
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, finetunejob(name, namespace, suspend), _preload_content=False)
        created_at[name] = time.monotonic()

    with JobWatch(batch, namespace) as seen:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(create, names))
        submit = time.monotonic() - start
        deadline = time.monotonic() + max(120, count * 0.5)
        while time.monotonic() < deadline and not all(n in seen.seen for n in names):
            time.sleep(0.2)
        missing = [n for n in names if n not in seen.seen]
        watched = [seen.seen[n] - created_at[n] for n in names if n in seen.seen]
    time.sleep(3)  # let status patches and Events of the batch land before counting writes
    jobs = raw_json(batch.list_namespaced_job(namespace, _preload_content=False))["items"]
    ftjs = raw_json(custom.list_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, _preload_content=False))["items"]
    ftj_created = {f["metadata"]["name"]: timestamp(f["metadata"]["creationTimestamp"]) for f in ftjs}
    owners = Counter(j["metadata"]["labels"].get(manifests.LABEL_FINETUNEJOB) for j in jobs)
    stamped = [
        (timestamp(j["metadata"]["creationTimestamp"]) - ftj_created[owner]).total_seconds()
        for j in jobs
        if (owner := j["metadata"]["labels"].get(manifests.LABEL_FINETUNEJOB)) in names and owner in ftj_created
    ]
    writes = apiserver_writes(api_client) - writes_before
    writes["POST finetunejobs"] -= count  # the benchmark's own creates
    per_job = {k: round(v / count, 2) for k, v in sorted(writes.items()) if v > 0}
    kind = "suspended" if suspend else "gpus: 1, running on kwok"
    print(f"\n== {count} FinetuneJobs at once ({kind}); submitted in {submit:.1f} s ==")
    print(f"jobs created: {len(watched)}/{count}; missing: {len(missing)}; duplicate Jobs: {sum(v - 1 for v in owners.values() if v > 1)}")
    if watched:
        p50, p99, worst = statistics.median(watched) * 1000, percentile(watched, 0.99) * 1000, max(watched) * 1000
        print(f"latency by watch (FinetuneJob create returned -> first Job seen): p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms")
    if stamped:
        p50, p99, worst = statistics.median(stamped), percentile(stamped, 0.99), max(stamped)
        print(f"latency by creationTimestamp (1 s resolution): p50 {p50:.0f} s, p99 {p99:.0f} s, max {worst:.0f} s")
    if audit_log is not None:
        stored = stored_at(audit_log, namespace)
        # The first Job of a FinetuneJob with GPUs is its preparation Job; the trainer Job follows its report.
        first_job: dict[str, datetime] = {}
        for (resource, job), when in stored.items():
            # <finetunejob>-prepare or <finetunejob>-trainer (older operators have no preparation Job)
            owner = job.rsplit("-", 1)[0]
            if resource == "jobs" and (owner not in first_job or when < first_job[owner]):
                first_job[owner] = when
        audited = [(first_job[n] - stored[(api.PLURAL, n)]).total_seconds() for n in names if n in first_job and (api.PLURAL, n) in stored]
        if audited:
            p50, p99, worst = statistics.median(audited) * 1000, percentile(audited, 0.99) * 1000, max(audited) * 1000
            print(f"latency by audit log (FinetuneJob -> first Job stored; {len(audited)} pairs): p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {worst:.0f} ms")
    print(f"operator handler writes per job (own metric): {(operator_writes(port) - own_before) / count:.2f}")
    print(f"apiserver writes per job on {', '.join(OPERATOR_RESOURCES)} (all clients, minus the benchmark's creates): {sum(per_job.values()):.2f} {per_job}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster (CRD installed) instead of starting a local one")
    parser.add_argument("--small", type=int, default=100, help="FinetuneJobs in the latency batch")
    parser.add_argument("--large", type=int, default=1000, help="FinetuneJobs in the memory batch (suspended)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kubetune-bench-")))
        kubeconfig = args.kubeconfig
        audit_log: Path | None = None
        if kubeconfig is None:
            from localcluster import ClusterConfig, LocalCluster, locate_bin_dir

            audit_log = workdir / "audit.log"
            cluster_config = ClusterConfig(workdir=workdir / "cluster", bin_dir=locate_bin_dir(build=False), extra_apiserver_args=audit_args(workdir))
            cluster = stack.enter_context(LocalCluster(config=cluster_config))
            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(crdgen.build_crd()))
            cluster.kubectl("wait", "--for=condition=Established", f"crd/{api.PLURAL}.{api.GROUP}", "--timeout=60s")
            kubeconfig = cluster.kubeconfig
        api_client = config.new_client_from_config(str(kubeconfig))  # type: ignore[no-untyped-call]
        api_client.configuration.connection_pool_maxsize = 32
        core, custom, batch = client.CoreV1Api(api_client), client.CustomObjectsApi(api_client), client.BatchV1Api(api_client)
        namespace = f"bench-{int(time.time())}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        try:
            process, port = stack.enter_context(operator_process(kubeconfig, workdir / "operator.log"))
            print(f"operator pid {process.pid}; RSS at start {memory_kib(process.pid)['VmRSS'] / 1024:.0f} MiB")
            print(f"cluster quiet (no writes for 2 s) after {wait_until_quiet(api_client):.1f} s")
            run_batch((custom, batch, api_client), namespace, args.small, suspend=False, port=port, audit_log=audit_log)
            print(f"operator RSS {memory_kib(process.pid)['VmRSS'] / 1024:.0f} MiB")
            run_batch((custom, batch, api_client), namespace, args.large, suspend=True, port=port, audit_log=audit_log)
            time.sleep(10)  # idle with every job loaded: indexes, watches and timers at rest
            memory = memory_kib(process.pid)
            rss, peak = memory["VmRSS"] / 1024, memory["VmHWM"] / 1024
            print(f"\noperator RSS with {args.small + args.large} FinetuneJobs: {rss:.0f} MiB, peak {peak:.0f} MiB (target <= 300 MiB)")
        finally:
            core.delete_namespace(namespace, propagation_policy="Background")


if __name__ == "__main__":
    main()
