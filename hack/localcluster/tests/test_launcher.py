"""Fast checks of the launcher's pure parts and process handling (no binaries needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cryptography import x509

from localcluster.config import DEFAULT_FAKE_NODES
from localcluster.kwok import node_manifest, write_kwok_config
from localcluster.pki import create_pki, first_service_ip
from localcluster.process import ProcessRecord, group_members, is_alive, spawn, start_ticks, terminate
from localcluster.state import ClusterState, read_state, write_state

pytestmark = pytest.mark.unit


def test_apiserver_certificate_is_signed_by_the_ca_and_names_the_service_ip(tmp_path: Path) -> None:
    pki = create_pki(tmp_path, "10.96.0.0/16")
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    serving = x509.load_pem_x509_certificate(pki.apiserver.cert.read_bytes())
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kubernetes.default.svc" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.96.0.1"}
    assert first_service_ip("10.0.0.0/24") == "10.0.0.1"


def test_only_job_pods_complete_on_fake_nodes(tmp_path: Path) -> None:
    stages = list(yaml.safe_load_all(write_kwok_config(tmp_path / "kwok.yaml", 1500).read_text()))
    completing = [s for s in stages if "phase: Succeeded" in s["spec"]["next"].get("statusTemplate", "")]
    assert len(completing) == 1
    expressions = completing[0]["spec"]["selector"]["matchExpressions"]
    assert {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]} in expressions
    assert completing[0]["spec"]["delay"]["durationMilliseconds"] == 1500


def test_fake_gpu_nodes_are_tainted_and_have_gpu_capacity() -> None:
    manifests = {n.name: node_manifest(n) for n in DEFAULT_FAKE_NODES}
    assert {name: m["status"]["allocatable"]["nvidia.com/gpu"] for name, m in manifests.items()} == {
        "gpu-node-a": "8",
        "gpu-node-b": "8",
        "gpu-node-c": "1",
    }
    for manifest in manifests.values():
        assert manifest["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
        assert manifest["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"}


def test_terminate_kills_a_process_group_that_ignores_sigterm(tmp_path: Path) -> None:
    script = "trap '' TERM; sleep 300 & sleep 300; wait"
    popen, record = spawn("stubborn", ["bash", "-c", script], tmp_path / "stubborn.log", tmp_path)
    try:
        assert is_alive(record)
        assert terminate(record, popen, timeout=0.5)
        assert not is_alive(record)
        assert group_members(record.pid) == []
        assert popen.returncode is not None
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()


def test_state_file_round_trips(tmp_path: Path) -> None:
    popen, record = spawn("sleep", ["sleep", "300"], tmp_path / "sleep.log", tmp_path)
    try:
        state = ClusterState("https://127.0.0.1:1", tmp_path / "kubeconfig", tmp_path / "ca.crt", tmp_path, (record,))
        write_state(tmp_path / "state.json", state)
        assert read_state(tmp_path / "state.json") == state
        assert read_state(tmp_path / "missing.json") is None
    finally:
        assert terminate(record, popen, timeout=5)


def test_a_recycled_pid_is_never_taken_for_the_recorded_process(tmp_path: Path) -> None:
    popen, record = spawn("sleep", ["sleep", "300"], tmp_path / "sleep.log", tmp_path)
    try:
        assert start_ticks(record.pid) == record.start_ticks
        # Same pid, another start time: what the state file would hold after the pid
        # was reused by an unrelated process.
        stale = ProcessRecord(name="sleep", pid=record.pid, start_ticks=record.start_ticks - 1, log=record.log)
        assert is_alive(record)
        assert not is_alive(stale)
        assert terminate(stale, None, timeout=1)  # nothing to do: the stale record is gone
        assert is_alive(record), "the unrelated process must not be signalled"
    finally:
        assert terminate(record, popen, timeout=5)
