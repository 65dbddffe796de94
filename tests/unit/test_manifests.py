"""The pure builders: every child manifest a FinetuneJob produces, checked field by field."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient, V1ConfigMap, V1Job, V1Service

from kubetune_api.exitcodes import NON_RETRIABLE
from kubetune_api.runtime import RuntimeConfig, TrainerConfig, TrainerEnvironment, env_name
from kubetune_operator import api, manifests
from kubetune_operator.api import FinetuneJob
from kubetune_operator.settings import OperatorSettings
from tests.support.reports import preparation_report

pytestmark = pytest.mark.unit

BASE: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FinetuneJob",
    "metadata": {"name": "llama", "namespace": "team-a", "uid": "0f6c-uid", "generation": 1},
    "spec": {
        "model": {"source": "meta-llama/Llama-3.1-8B", "tokenSecretRef": {"name": "hf-token", "key": "token"}},
        "dataset": {"source": "s3://data/alpaca.jsonl", "format": "instruction"},
        "training": {"maxSteps": 100},
        "output": {"bucket": "adapters", "prefix": "runs", "credentialsSecret": {"name": "s3-creds"}},
        "resources": {"gpus": 1},
    },
}


def make(**spec_overrides: Any) -> FinetuneJob:
    body = copy.deepcopy(BASE)
    for key, value in spec_overrides.items():
        body["spec"][key] = value
    return FinetuneJob.from_body(body)


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = job["spec"]["template"]["spec"]
    return spec


def container(job: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = pod_spec(job)["containers"][0]
    return found


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(job)["env"]}


SETTINGS = OperatorSettings()

TOPOLOGY_ENV = {"NNODES", "NPROC_PER_NODE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "KUBETUNE_NAMESPACE"}
"""Variables that used to carry the topology; it is sent once, in the ConfigMap's runtime config."""


def runtime_of(ftj: FinetuneJob, settings: OperatorSettings = SETTINGS) -> RuntimeConfig:
    """The runtime config the trainer reads from the job's ConfigMap."""
    config_map = manifests.build_config_map(ftj, settings)
    return TrainerConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"])).runtime


def round_trip(manifest: dict[str, Any], model: type[V1Job] | type[V1ConfigMap] | type[V1Service]) -> dict[str, Any]:
    """Deserialize into the Kubernetes client's typed model and back: unknown or mistyped fields do not survive."""
    client = ApiClient()
    result: dict[str, Any] = client.sanitize_for_serialization(model.from_dict(manifest))  # type: ignore[no-untyped-call]
    return result


def test_single_gpu_job_requests_the_gpu_and_tolerates_its_taint() -> None:
    job = manifests.build_job(make(), SETTINGS)
    assert job["metadata"]["name"] == "llama-trainer"
    assert job["metadata"]["namespace"] == "team-a"
    assert container(job)["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(job)["tolerations"]
    runtime = runtime_of(make())
    assert (runtime.nodes, runtime.processes_per_node, runtime.rendezvous_host) == (1, 1, "127.0.0.1")
    assert not TOPOLOGY_ENV & set(env_of(job))
    assert "completionMode" not in job["spec"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["suspend"] is False
    assert job["spec"]["backoffLimit"] == 3


def test_multi_gpu_job_runs_one_process_per_gpu() -> None:
    job = manifests.build_job(make(resources={"gpus": 4, "gpuResourceName": "amd.com/gpu", "cpu": "16", "memory": "128Gi"}), SETTINGS)
    limits = container(job)["resources"]["limits"]
    assert limits == {"amd.com/gpu": "4", "cpu": "16", "memory": "128Gi"}
    assert container(job)["resources"]["requests"] == limits
    runtime = runtime_of(make(resources={"gpus": 4, "gpuResourceName": "amd.com/gpu", "cpu": "16", "memory": "128Gi"}))
    assert runtime.processes_per_node == 4
    assert runtime.world_size == 4
    assert pod_spec(job)["tolerations"][0] == {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_multi_node_job_is_indexed_with_a_headless_service_for_rendezvous() -> None:
    ftj = make(resources={"gpus": 8, "nodes": 3})
    job = manifests.build_job(ftj, SETTINGS)
    service = manifests.build_service(ftj, SETTINGS)
    assert service is not None
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert pod_spec(job)["subdomain"] == "llama-trainer" == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in service["spec"]["selector"].items())
    runtime = runtime_of(ftj)
    assert runtime.rendezvous_host == "llama-trainer-0.llama-trainer"
    assert runtime.rendezvous_port == 29500
    # The node rank is JOB_COMPLETION_INDEX, which the Job controller itself sets in an Indexed Job's pods.
    assert not TOPOLOGY_ENV & set(env_of(job)) and "JOB_COMPLETION_INDEX" not in env_of(job)
    assert runtime.nodes == 3
    assert runtime.world_size == 24
    assert [c["kind"] for c in manifests.build_children(ftj, SETTINGS)] == ["ConfigMap", "Job"]  # the preparation Job first
    prepared = make(resources={"gpus": 8, "nodes": 3}, preparation={"mode": "InTrainer"})
    assert [c["kind"] for c in manifests.build_children(prepared, SETTINGS)] == ["ConfigMap", "Service", "Job"]


def test_single_node_has_no_service() -> None:
    ftj = make()
    assert manifests.build_service(ftj, SETTINGS) is None
    assert [c["kind"] for c in manifests.build_children(ftj, SETTINGS)] == ["ConfigMap", "Job"]


def test_cpu_job_asks_for_no_gpu_and_adds_no_gpu_toleration() -> None:
    job = manifests.build_job(make(resources={"gpus": 0}), SETTINGS)
    assert "resources" not in container(job)
    assert "tolerations" not in pod_spec(job)
    assert runtime_of(make(resources={"gpus": 0})).processes_per_node == 1


def test_kueue_job_is_labelled_and_created_suspended_and_suspend_is_left_to_kueue() -> None:
    ftj = make(queueName="team-a-queue")
    job = manifests.build_job(ftj, SETTINGS)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-queue"
    assert job["spec"]["suspend"] is True
    update = manifests.job_update(ftj)
    assert update is not None and "suspend" not in update


def test_suspend_and_lifecycle_fields_reach_the_job() -> None:
    ftj = make(suspend=True, backoffLimit=5, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=600)
    job = manifests.build_job(ftj, SETTINGS)
    assert job["spec"]["suspend"] is True
    assert job["spec"]["backoffLimit"] == 5
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    # The operator keeps the TTL itself, after recording the outcome: the Job gets none, and one it has is removed.
    assert "ttlSecondsAfterFinished" not in job["spec"]
    assert manifests.job_update(ftj) == {"suspend": True, "backoffLimit": 5, "activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": None}
    # Unset limits are removed from the Job by the merge patch.
    assert (manifests.job_update(make()) or {})["activeDeadlineSeconds"] is None


def test_a_changed_spec_is_found_by_comparing_with_the_job_as_built() -> None:
    """After an operator restart, a spec change made while it was down is found by comparing with the Job."""
    ftj = make(backoffLimit=5)
    built = manifests.build_job(ftj, SETTINGS)["spec"]
    assert manifests.job_update(ftj, built) is None
    assert manifests.job_update(ftj, {**built, "suspend": None}) is None  # the apiserver's default is false
    assert manifests.job_update(make(backoffLimit=5, suspend=True), built) is not None
    assert manifests.job_update(make(backoffLimit=5, activeDeadlineSeconds=600), built) is not None
    assert manifests.job_update(ftj, {**built, "ttlSecondsAfterFinished": 60}) is not None
    # With Kueue the Job's suspend is Kueue's: a Job it admitted (suspend false) has not drifted.
    queued = make(queueName="team-a-queue")
    assert manifests.job_update(queued, {**manifests.build_job(queued, SETTINGS)["spec"], "suspend": False}) is None


def test_the_job_fields_a_finetunejob_may_change_are_the_mutable_spec_fields() -> None:
    """One list, derived from the model: what the CRD lets change, what the Job is built with and what is re-applied."""
    ftj = make(suspend=True, backoffLimit=5, activeDeadlineSeconds=7200, ttlSecondsAfterFinished=600)
    job_spec = manifests.build_job(ftj, SETTINGS)["spec"]
    assert set(manifests.job_update(ftj) or {}) == set(api.MUTABLE_FIELDS) == {"suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"}
    assert {field: job_spec.get(field) for field in api.MUTABLE_FIELDS} == manifests.job_update(ftj)


def test_scheduling_constraints_come_from_the_spec() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]}]
            }
        }
    }
    ftj = make(
        resources={
            "gpus": 2,
            "nodeSelector": {"pool": "training"},
            "tolerations": [{"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
            "affinity": affinity,
            "priorityClassName": "low",
        }
    )
    pod = pod_spec(manifests.build_job(ftj, SETTINGS))
    assert pod["nodeSelector"] == {"pool": "training"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    ]
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "low"


def test_credentials_only_via_secret_key_refs_and_never_in_the_config_map() -> None:
    ftj = make()
    env = env_of(manifests.build_job(ftj, SETTINGS))
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    for entry in env.values():
        if entry["name"].startswith("AWS_") or entry["name"] == "HF_TOKEN":
            assert "value" not in entry
    config_map = manifests.build_config_map(ftj, SETTINGS)
    text = config_map["data"]["config.yaml"]
    # Only references (Secret names and keys) appear; the ConfigMap has no environment or values of them.
    assert "valueFrom" not in text and "AWS_ACCESS_KEY_ID=" not in text
    assert set(config_map) == {"apiVersion", "kind", "metadata", "data"}


def test_every_variable_the_trainer_reads_is_named_by_its_environment_model() -> None:
    ftj = make(model={"source": "x/y", "cacheVolumeClaim": "cache", "tokenSecretRef": {"name": "hf", "key": "token"}})
    names = set(env_of(manifests.build_job(ftj, SETTINGS)))
    ours = {env_name(field) for field in TrainerEnvironment.model_fields}
    # HOME, HF_HOME and PYTHONUNBUFFERED are read by Python and the Hugging Face libraries, not by the trainer.
    assert names - ours == {"HOME", "HF_HOME", "PYTHONUNBUFFERED"}
    assert names & ours == {
        "KUBETUNE_POD_IP",
        "KUBETUNE_POD_NAME",
        "KUBETUNE_POD_UID",
        "HF_HUB_CACHE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
    }


def test_each_attempt_gets_its_pod_uid_as_its_fencing_token() -> None:
    env = {item["name"]: item for item in manifests.build_job(make(), SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[env_name("pod_uid")]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}


def test_without_secrets_no_credential_env_is_set() -> None:
    ftj = make(model={"source": "/models/tiny"}, output={"bucket": "adapters", "endpointUrl": "http://127.0.0.1:9000"})
    env = env_of(manifests.build_job(ftj, SETTINGS))
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} & set(env)


def test_config_map_holds_the_trainer_config_with_runtime() -> None:
    ftj = make(resources={"gpus": 2, "nodes": 2})
    config_map = manifests.build_config_map(ftj, OperatorSettings(trainer_metrics_port=9300))
    assert config_map["metadata"]["name"] == "llama-config"
    config = TrainerConfig.model_validate(yaml.safe_load(config_map["data"]["config.yaml"]))
    assert config.model.source == "meta-llama/Llama-3.1-8B"
    assert config.training.max_steps == 100
    assert config.runtime.namespace == "team-a"
    assert config.runtime.job_name == "llama"
    assert config.runtime.gpus_per_node == 2
    assert config.runtime.nodes == 2
    assert config.runtime.metrics_port == 9300
    # The FinetuneJob's UID names the run: a namesake created later writes a folder of its own.
    assert config.runtime.run_uid == "0f6c-uid"
    assert config.job_prefix == "runs/team-a/llama"
    assert config.run_prefix == "runs/team-a/llama/runs/0f6c-uid"
    namesake = make().model_copy(update={"metadata": make().metadata.model_copy(update={"uid": "7a1e-uid"})})
    other = manifests.trainer_config(namesake, SETTINGS)
    assert other.run_prefix == "runs/team-a/llama/runs/7a1e-uid" and other.job_prefix == config.job_prefix


def test_a_run_started_by_hand_is_named_by_its_recipe() -> None:
    """No runUid (a config written by hand): the recipe's hash names the run, so changing what it trains is a new run."""
    config = manifests.trainer_config(make(), SETTINGS)
    by_hand = config.model_copy(update={"runtime": config.runtime.model_copy(update={"run_uid": ""})})
    assert by_hand.run_id.startswith("recipe-") and by_hand.run_prefix == f"runs/team-a/llama/runs/{by_hand.run_id}"
    moved = by_hand.runtime.model_copy(update={"work_dir": "/elsewhere", "termination_message_path": "/tmp/t"})
    assert by_hand.model_copy(update={"runtime": moved}).run_id == by_hand.run_id, "where it runs does not make it another run"
    lower = by_hand.model_copy(update={"training": by_hand.training.model_copy(update={"learning_rate": 1e-5})})
    assert lower.run_id != by_hand.run_id


def test_every_child_is_owned_and_labelled() -> None:
    ftj = make(resources={"gpus": 8, "nodes": 2})
    in_trainer = make(resources={"gpus": 8, "nodes": 2}, preparation={"mode": "InTrainer"})
    for child in manifests.build_children(ftj, SETTINGS) + manifests.build_children(in_trainer, SETTINGS):
        meta = child["metadata"]
        meta["labels"].pop(manifests.LABEL_COMPONENT, None)
        assert meta["ownerReferences"] == [
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FinetuneJob", "name": "llama", "uid": "0f6c-uid", "controller": True, "blockOwnerDeletion": True}
        ]
        assert meta["labels"] == {
            "app.kubernetes.io/name": "kubetune-trainer",
            "app.kubernetes.io/instance": "llama",
            "app.kubernetes.io/managed-by": "kubetune",
            "kubetune.io/finetunejob": "llama",
        }


def test_pod_exposes_metrics_for_prometheus_and_the_pod_ip_to_the_trainer() -> None:
    job = manifests.build_job(make(), SETTINGS)
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "9184"}
    assert {"name": "metrics", "containerPort": 9184, "protocol": "TCP"} in container(job)["ports"]
    env = env_of(job)
    assert env["KUBETUNE_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["KUBETUNE_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["HF_HOME"]["value"] == "/var/lib/kubetune/hf"


def test_volumes_shm_scratch_config_and_model_cache() -> None:
    ftj = make(model={"source": "meta-llama/Llama-3.1-8B", "cacheVolumeClaim": "model-cache"}, resources={"gpus": 1, "shmSize": "16Gi"})
    job = manifests.build_job(ftj, SETTINGS)
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(job)["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert mounts["/dev/shm"] == "dshm"
    assert mounts["/var/lib/kubetune"] == "scratch" and "emptyDir" in volumes["scratch"]
    assert mounts["/etc/kubetune"] == "config" and volumes["config"]["configMap"]["name"] == "llama-config"
    assert mounts["/models"] == "models" and volumes["models"]["persistentVolumeClaim"] == {"claimName": "model-cache"}
    assert container(job)["args"] == ["--config", "/etc/kubetune/config.yaml"]
    no_cache = manifests.build_job(make(), SETTINGS)
    assert "models" not in {v["name"] for v in pod_spec(no_cache)["volumes"]}


def test_scratch_and_tmp_are_bounded_and_ephemeral_storage_is_requested_when_asked() -> None:
    defaults = manifests.build_job(make(), OperatorSettings())
    volumes = {v["name"]: v for v in pod_spec(defaults)["volumes"]}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "200Gi"} and volumes["tmp"]["emptyDir"] == {"sizeLimit": "10Gi"}
    assert "ephemeral-storage" not in container(defaults)["resources"]["requests"]

    sized = manifests.build_job(make(resources={"gpus": 1, "scratchSize": "500Gi", "tmpSize": "2Gi", "ephemeralStorage": "520Gi"}), OperatorSettings())
    volumes = {v["name"]: v for v in pod_spec(sized)["volumes"]}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "500Gi"} and volumes["tmp"]["emptyDir"] == {"sizeLimit": "2Gi"}
    resources = container(sized)["resources"]
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "520Gi"


def test_pod_failure_policy_fails_fast_on_input_errors_and_ignores_disruptions() -> None:
    policy = manifests.build_job(make(), SETTINGS)["spec"]["podFailurePolicy"]
    fail, ignore = policy["rules"]
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": sorted(int(c) for c in NON_RETRIABLE)}
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_trainer_command_and_image_overrides() -> None:
    settings = OperatorSettings(trainer_cpu_command=["/opt/venv/bin/python", "-m", "kubetune_trainer"], trainer_image="registry.local/trainer:dev")
    job = manifests.build_job(make(), settings)
    assert container(job)["command"] == ["/opt/venv/bin/python", "-m", "kubetune_trainer"]
    assert container(job)["image"] == "registry.local/trainer:dev"
    assert container(manifests.build_job(make(), SETTINGS))["command"] == ["python", "-m", "kubetune_trainer"]
    custom = make(resources={"gpus": 1, "image": "example.com/custom:1"})
    assert container(manifests.build_job(custom, settings))["image"] == "example.com/custom:1"


def test_builders_are_deterministic() -> None:
    ftj = make(resources={"gpus": 8, "nodes": 2})
    assert manifests.build_children(ftj, SETTINGS) == manifests.build_children(make(resources={"gpus": 8, "nodes": 2}), SETTINGS)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"resources": {"gpus": 0}},
        {"resources": {"gpus": 8, "nodes": 4, "cpu": "32", "memory": "256Gi"}},
        {"queueName": "q", "suspend": True, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60},
        {"model": {"source": "x/y", "cacheVolumeClaim": "cache"}, "resources": {"gpus": 1, "priorityClassName": "high", "nodeSelector": {"a": "b"}}},
    ],
)
def test_manifests_survive_the_kubernetes_api_models(overrides: dict[str, Any]) -> None:
    ftj = make(**overrides)
    job = manifests.build_job(ftj, SETTINGS)
    assert round_trip(job, V1Job) == job
    config_map = manifests.build_config_map(ftj, SETTINGS)
    assert round_trip(config_map, V1ConfigMap) == config_map
    service = manifests.build_service(ftj, SETTINGS)
    if service is not None:
        assert round_trip(service, V1Service) == service


def test_round_trip_catches_a_misspelt_field() -> None:
    job = manifests.build_job(make(), SETTINGS)
    job["spec"]["template"]["spec"]["restartPolcy"] = "Never"
    assert round_trip(job, V1Job) != job


RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Checks of the Pod Security "restricted" profile (v1.30+) that apply to a pod spec."""
    problems: list[str] = []
    pod_ctx = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(flag)
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']} uses {kinds}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        ctx = c.get("securityContext", {})
        if ctx.get("privileged"):
            problems.append(f"{c['name']} privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{c['name']} allowPrivilegeEscalation")
        caps = ctx.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{c['name']} drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{c['name']} adds capabilities")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{c['name']} runAsNonRoot")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) == 0:
            problems.append(f"{c['name']} runs as root")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{c['name']} seccomp")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                problems.append(f"{c['name']} hostPort")
    return problems


@pytest.mark.parametrize("resources", [{"gpus": 0}, {"gpus": 1}, {"gpus": 8, "nodes": 2}])
def test_pods_meet_pod_security_restricted(resources: dict[str, Any]) -> None:
    job = manifests.build_job(make(resources=resources), SETTINGS)
    pod = pod_spec(job)
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container(job)["terminationMessagePath"] == "/dev/termination-log"


def test_restricted_check_rejects_a_privileged_pod() -> None:
    pod = pod_spec(manifests.build_job(make(), SETTINGS))
    pod["containers"][0]["securityContext"] = {"privileged": True}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert len(restricted_violations(pod)) >= 4


def test_operator_defaults_fill_unset_resources_and_pull_secrets() -> None:
    settings = OperatorSettings(trainer_default_cpu="2", trainer_default_memory="4Gi", trainer_image_pull_secrets=["regcred"])
    job = manifests.build_job(make(resources={"gpus": 0}), settings)
    assert container(job)["resources"] == {"limits": {"cpu": "2", "memory": "4Gi"}, "requests": {"cpu": "2", "memory": "4Gi"}}
    assert pod_spec(job)["imagePullSecrets"] == [{"name": "regcred"}]
    explicit = manifests.build_job(make(resources={"gpus": 0, "memory": "8Gi"}), settings)
    assert container(explicit)["resources"]["limits"]["memory"] == "8Gi"
    assert round_trip(job, V1Job) == job


def test_a_multi_node_job_gets_a_network_policy_admitting_its_own_pods_only() -> None:
    on = OperatorSettings(trainer_peer_network_policy=True)
    gang = make(resources={"gpus": 1, "nodes": 2}, preparation={"mode": "InTrainer"})
    policy = manifests.build_peer_network_policy(gang, on)
    assert policy is not None and policy["metadata"]["name"] == "llama-peers" and policy["metadata"]["namespace"] == "team-a"
    own = {"matchLabels": {manifests.LABEL_FINETUNEJOB: "llama", manifests.LABEL_MANAGED_BY: manifests.MANAGED_BY}}
    assert policy["spec"] == {"podSelector": own, "policyTypes": ["Ingress"], "ingress": [{"from": [{"podSelector": own}]}]}
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "0f6c-uid"
    assert [child["kind"] for child in manifests.build_children(gang, on)] == ["ConfigMap", "Service", "NetworkPolicy", "Job"]
    assert manifests.build_peer_network_policy(make(), on) is None
    assert manifests.build_peer_network_policy(gang, OperatorSettings()) is None


def test_an_unset_scratch_size_is_derived_from_the_model_the_preparation_read() -> None:
    """8B parameters: 16-bit weights twice (download and merged model) with a quarter more, plus 20Gi."""
    eight_b = preparation_report(model_parameters=8_030_261_248)
    job = manifests.build_children(make(resources={"gpus": 1}), SETTINGS, eight_b)[-1]
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "58Gi"}
    seventy_b = manifests.build_children(make(resources={"gpus": 8}), SETTINGS, preparation_report(model_parameters=70_553_706_496))[-1]
    assert {v["name"]: v for v in pod_spec(seventy_b)["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "349Gi"}
    # A size in the spec wins; an unknown model size keeps the default.
    chosen = manifests.build_children(make(resources={"gpus": 1, "scratchSize": "64Gi"}), SETTINGS, eight_b)[-1]
    assert {v["name"]: v for v in pod_spec(chosen)["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "64Gi"}
    unknown = manifests.build_children(make(resources={"gpus": 1}), SETTINGS, preparation_report())[-1]
    assert {v["name"]: v for v in pod_spec(unknown)["volumes"]}["scratch"]["emptyDir"] == {"sizeLimit": "200Gi"}


def test_a_multi_node_job_places_one_pod_per_node_also_on_cpu() -> None:
    cpu_gang = make(resources={"gpus": 0, "nodes": 2})
    pod = manifests.build_job(cpu_gang, SETTINGS)["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    # The term selects exactly the pods the headless Service does: this job's ranks, no other job's.
    service = manifests.build_service(cpu_gang, SETTINGS)
    assert service is not None and term["labelSelector"]["matchLabels"] == service["spec"]["selector"]
    assert manifests.build_job(cpu_gang, SETTINGS)["spec"]["template"]["metadata"]["labels"].items() >= term["labelSelector"]["matchLabels"].items()
    assert pod["subdomain"] == service["metadata"]["name"] and "nvidia.com/gpu" not in str(pod["containers"][0].get("resources"))
    # The user's node affinity stays beside it; a one-node job gets no anti-affinity.
    zoned = make(
        resources={
            "gpus": 0,
            "nodes": 2,
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 5, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}
                    ]
                }
            },
        }
    )
    assert set(manifests.build_job(zoned, SETTINGS)["spec"]["template"]["spec"]["affinity"]) == {"nodeAffinity", "podAntiAffinity"}
    assert "affinity" not in manifests.build_job(make(resources={"gpus": 0}), SETTINGS)["spec"]["template"]["spec"]


def test_a_multi_node_job_may_not_pin_one_host() -> None:
    with pytest.raises(ValueError, match=r"spec.resources.nodeSelector.*kubernetes.io/hostname"):
        make(resources={"gpus": 0, "nodes": 2, "nodeSelector": {"kubernetes.io/hostname": "cpu-node-0"}})
    assert make(resources={"gpus": 0, "nodes": 1, "nodeSelector": {"kubernetes.io/hostname": "cpu-node-0"}}).spec.resources.nodes == 1
