"""CloudEvents from the operator the chart deployed to a real HTTP receiver process, across an operator restart.

The FinetuneJob names its own sink (spec.notifications) with a Secret holding the auth header value and another key
holding the HMAC key. The receiver refuses the Running event while the first operator process runs, so that process
gives up on it; the operator is then stopped and started again, and the second process must deliver it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localcluster.process import wait_or_kill
from localcluster.s3 import DUMMY_ACCESS_KEY_ID, DUMMY_SECRET_ACCESS_KEY
from tests.e2e.support.stack import REPO, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.local_cluster]

TOKEN = "Bearer e2e-sink-t0ken-4d1c"
HMAC_KEY = "e2e-hmac-k3y-9f2a"
RUNNING = "io.kubetune.finetunejob.running"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Path]:
    """The receiver process; yields the file it records requests in."""
    out = tmp_path / "received.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "tests.e2e.support.receiver", str(out)], cwd=REPO, start_new_session=True)
    try:
        Stack.wait_for(lambda: out.with_name(out.name + ".port").exists(), 30, "the receiver to listen")
        yield out
    finally:
        process.terminate()
        wait_or_kill(process, timeout=10)


def received(out: Path) -> list[dict[str, Any]]:
    if not out.exists():
        return []
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    for record in records:
        record["raw"] = base64.b64decode(record["body"])
        record["event"] = json.loads(record["raw"])
    return records


def grant_secret_read(stack: Stack, namespace: str, secret: str) -> None:
    """What an admin does for a cluster-wide operator: get on one Secret in the job's namespace, nothing wider."""
    operators = stack.settings.operator_namespace
    account = stack.get_json("deployment", "-n", operators, "-l", "app.kubernetes.io/name=kubetune")["items"][0]["spec"]["template"]["spec"]
    meta = {"name": "kubetune-notification-secrets", "namespace": namespace}
    stack.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get"]}],
        }
    )
    stack.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": meta["name"]},
            "subjects": [{"kind": "ServiceAccount", "name": account["serviceAccountName"], "namespace": operators}],
        }
    )


def restart_operator(stack: Stack, while_down: Any) -> None:
    operators = stack.settings.operator_namespace
    deployment = stack.kubectl("get", "deployment", "-n", operators, "-l", "app.kubernetes.io/name=kubetune", "-o", "name").stdout.split()[0]
    stack.kubectl("scale", deployment, "-n", operators, "--replicas=0")
    try:
        stack.wait_for(lambda: not stack.get_json("pods", "-n", operators, "-l", "app.kubernetes.io/name=kubetune")["items"], 120, "the operator to stop")
        while_down()
    finally:
        stack.kubectl("scale", deployment, "-n", operators, "--replicas=1")
        stack.kubectl("rollout", "status", deployment, "-n", operators, "--timeout=120s")


def test_a_job_sink_gets_every_transition_once_signed_across_an_operator_restart(stack: Stack, receiver: Path) -> None:
    namespace, name = stack.settings.jobs_namespace, "notified"
    port = receiver.with_name(receiver.name + ".port").read_text()
    refuse = receiver.with_name(receiver.name + ".refuse")
    refuse.write_text(RUNNING)
    stack.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "notified-hook", "namespace": namespace},
            "stringData": {"token": TOKEN, "hmac": HMAC_KEY},
        }
    )
    grant_secret_read(stack, namespace, "notified-hook")
    body = stack.example("tiny-cpu-lora.yaml", training={"maxSteps": 120, "checkpointEvery": 20})
    body["metadata"]["name"] = name
    body["spec"]["notifications"] = [
        {
            "url": f"http://127.0.0.1:{port}/hooks/kubetune",
            "authSecretRef": {"name": "notified-hook", "key": "token"},
            "signingSecretRef": {"name": "notified-hook", "key": "hmac"},
        }
    ]
    stack.apply(body)
    # The first operator process tries the Running event and is refused.
    stack.wait_for(lambda: any(r["event"]["type"] == RUNNING for r in received(receiver)), 240, "the Running event to be tried")
    restart_operator(stack, while_down=lambda: refuse.unlink())
    status = stack.wait_for_phase(name, {"Succeeded", "Failed"}, timeout=600)["status"]
    assert status["phase"] == "Succeeded", status
    stack.wait_for(lambda: any(r["event"]["type"].endswith(".succeeded") for r in received(receiver)), 60, "the Succeeded event")

    records = received(receiver)
    accepted = [r for r in records if r["accepted"]]
    unique: dict[str, dict[str, Any]] = {}
    for record in accepted:
        unique.setdefault(record["event"]["id"], record)
    phases = [r["event"]["data"]["phase"] for r in unique.values()]
    assert phases == ["Pending", "Running", "Succeeded"], [(r["event"]["type"], r["event"]["id"], r["accepted"]) for r in records]
    uid = stack.finetunejob(name)["metadata"]["uid"]
    for record in records:
        headers = {k.lower(): v for k, v in record["headers"].items()}
        expected = "sha256=" + hmac.new(HMAC_KEY.encode(), record["raw"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-kubetune-signature"], expected)
        assert headers["authorization"] == TOKEN
        assert record["event"]["specversion"] == "1.0" and record["event"]["source"].endswith(f"/namespaces/{namespace}/finetunejobs/{name}")
        for secret in (TOKEN.split()[-1], HMAC_KEY, DUMMY_SECRET_ACCESS_KEY, DUMMY_ACCESS_KEY_ID):
            assert secret.encode() not in record["raw"], f"a secret value is in the {record['event']['type']} event"
    done = next(r["event"]["data"] for r in unique.values() if r["event"]["data"]["phase"] == "Succeeded")
    assert done["adapterUri"] == status["result"]["adapterUri"] and uid in done["adapterUri"]
    assert done["usage"]["gpuSeconds"] == status["usage"]["gpuSeconds"] and done["evaluation"]["gate"]
    with contextlib.suppress(RuntimeError):
        stack.kubectl("delete", "ftj", name, "-n", namespace, "--wait=true")
