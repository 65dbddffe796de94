"""How the pods of a multi-node run meet: the launcher's rendezvous settings and the failure that names a missing rank."""

from __future__ import annotations

import pytest

from kubetune_api.exitcodes import NON_RETRIABLE, ExitCode
from kubetune_api.runtime import RuntimeConfig
from kubetune_operator import manifests
from kubetune_operator.settings import OperatorSettings
from kubetune_trainer import distributed
from kubetune_trainer.errors import classify
from tests.unit.test_manifests import make

pytestmark = pytest.mark.unit


def runtime_of(**spec: object) -> RuntimeConfig:
    return manifests.trainer_config(make(**spec), OperatorSettings()).runtime


def test_pods_of_a_cpu_gang_meet_in_a_c10d_rendezvous_hosted_by_rank_0() -> None:
    runtime = runtime_of(resources={"gpus": 0, "nodes": 2}, backoffLimit=4, distributed={"joinTimeoutSeconds": 45, "collectiveTimeoutSeconds": 30})
    assert runtime.peer_hosts == ["llama-trainer-0.llama-trainer", "llama-trainer-1.llama-trainer"]
    assert (runtime.join_timeout_seconds, runtime.collective_timeout_seconds, runtime.max_restarts) == (45, 30, 4)
    host, joiner = (distributed.rendezvous_settings(distributed.topology(runtime, rank)) for rank in (0, 1))
    assert host["rdzv_backend"] == joiner["rdzv_backend"] == "c10d"
    assert host["rdzv_endpoint"] == joiner["rdzv_endpoint"] == "llama-trainer-0.llama-trainer:29500"
    assert (host["rdzv_configs"]["is_host"], joiner["rdzv_configs"]["is_host"]) == (True, False)
    assert host["rdzv_configs"]["join_timeout"] == 45 and host["max_restarts"] == 4
    # Each pod names itself by its stable name, so ranks follow the completion indexes and rank 0's name resolves everywhere.
    assert (host["local_addr"], joiner["local_addr"]) == tuple(runtime.peer_hosts)


def test_one_pod_restarts_as_a_whole() -> None:
    runtime = runtime_of(resources={"gpus": 4}, backoffLimit=4)
    settings = distributed.rendezvous_settings(distributed.topology(runtime, 0))
    assert settings["rdzv_backend"] == "static" and settings["max_restarts"] == 0 and runtime.peer_hosts == []


def test_a_rendezvous_timeout_names_the_rank_whose_pod_never_started() -> None:
    topo = distributed.topology(runtime_of(resources={"gpus": 0, "nodes": 3}, distributed={"joinTimeoutSeconds": 60}), 0)

    def resolve(host: str) -> str:
        if host.startswith("llama-trainer-2."):
            raise OSError("Name or service not known")
        return "127.0.5.1"

    error = distributed.rendezvous_timeout(topo, resolve)
    assert error.exit_code is ExitCode.RENDEZVOUS_TIMEOUT and error.exit_code in NON_RETRIABLE and error.reason == "RendezvousTimeout"
    assert "node rank 2 (pod llama-trainer-2)" in error.message and "node rank 1" not in error.message
    assert "spec.distributed.joinTimeoutSeconds=60" in error.message
    everyone = distributed.rendezvous_timeout(topo, lambda host: "127.0.5.1")
    assert "every pod of the 3 nodes has an address" in everyone.message


def test_a_collective_timeout_is_retried_with_its_reason() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation to complete")
    failure = classify(gloo)
    assert failure.exit_code is ExitCode.COLLECTIVE_TIMEOUT and failure.exit_code not in NON_RETRIABLE and failure.reason == "CollectiveTimeout"
    assert "spec.distributed.collectiveTimeoutSeconds" in failure.message and "30000ms" in failure.message
    assert classify(RuntimeError("Connection reset by peer")).exit_code is ExitCode.RUNTIME_ERROR
