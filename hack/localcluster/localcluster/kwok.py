"""kwok's configuration (the Stages that drive fake nodes and pods) and the fake GPU nodes.

Behaviour of pods bound to a fake node, in order:
1. Pending -> Running (all containers running, Ready) as soon as kwok sees the pod.
2. Running -> Succeeded (exit code 0) after `fake_pod_run_milliseconds`, but ONLY for pods
   owned by a Job, which is what trainer pods are. Pods of Deployments, StatefulSets or bare
   pods stay Running until deleted, as a long-running server would.
   A pod can change its own run time with the annotation
   `kubetune.io/fake-run-milliseconds`.
3. A pod with a deletionTimestamp is removed at once (kwok plays the kubelet).
Fake nodes become Ready when kwok first sees them and keep a node Lease renewed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import (
    FAKE_NODE_ANNOTATION,
    FAKE_NODE_ANNOTATION_VALUE,
    FAKE_NODE_LABEL,
    FAKE_RUN_MILLISECONDS_ANNOTATION,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    FakeGpuNode,
)

_NODE_HEARTBEAT_STATUS = """\
{{ $now := Now }}
conditions:
{{ range NodeConditions }}
- lastHeartbeatTime: {{ $now | Quote }}
  lastTransitionTime: {{ $now | Quote }}
  message: {{ .message | Quote }}
  reason: {{ .reason | Quote }}
  status: {{ .status | Quote }}
  type: {{ .type | Quote }}
{{ end }}
"""

# A node becomes Ready with the heartbeat conditions plus its addresses, resources and identity.
_NODE_READY_STATUS = (
    _NODE_HEARTBEAT_STATUS
    + """\
addresses:
- address: {{ NodeIP | Quote }}
  type: InternalIP
- address: {{ .metadata.name | Quote }}
  type: Hostname
allocatable:
{{ YAML .status.allocatable 1 }}
capacity:
{{ YAML .status.capacity 1 }}
nodeInfo:
  architecture: amd64
  operatingSystem: linux
  kubeletVersion: {{ printf "kwok-%s" Version | Quote }}
  kubeProxyVersion: {{ printf "kwok-%s" Version | Quote }}
  containerRuntimeVersion: {{ printf "kwok-%s" Version | Quote }}
  kernelVersion: {{ printf "kwok-%s" Version | Quote }}
  bootID: ""
  machineID: ""
  osImage: ""
  systemUUID: ""
phase: Running
"""
)

_POD_RUNNING_STATUS = """\
{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: PodScheduled
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Initialized
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: ContainersReady
- lastTransitionTime: {{ $now | Quote }}
  status: "True"
  type: Ready
containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  ready: true
  started: true
  restartCount: 0
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
initContainerStatuses:
{{ range .spec.initContainers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  ready: true
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      reason: Completed
      startedAt: {{ $now | Quote }}
      finishedAt: {{ $now | Quote }}
{{ end }}
{{ with NodeIPWith .spec.nodeName }}
hostIP: {{ . | Quote }}
{{ end }}
{{ with PodIPWith .spec.nodeName ( or .spec.hostNetwork false ) ( or .metadata.uid "" ) ( or .metadata.name "" ) ( or .metadata.namespace "" ) }}
podIP: {{ . | Quote }}
{{ end }}
phase: Running
startTime: {{ $now | Quote }}
"""

_POD_SUCCEEDED_STATUS = """\
{{ $now := Now }}
{{ $started := .status.startTime }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodCompleted
  type: ContainersReady
- lastTransitionTime: {{ $now | Quote }}
  status: "False"
  reason: PodCompleted
  type: Ready
containerStatuses:
{{ range .spec.containers }}
- name: {{ .name | Quote }}
  image: {{ .image | Quote }}
  ready: false
  started: false
  restartCount: 0
  state:
    terminated:
      exitCode: 0
      reason: Completed
      startedAt: {{ $started | Quote }}
      finishedAt: {{ $now | Quote }}
{{ end }}
phase: Succeeded
"""


def _stage(name: str, kind: str, expressions: list[dict[str, Any]], next_: dict[str, Any], delay: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "resourceRef": {"apiGroup": "v1", "kind": kind},
        "selector": {"matchExpressions": expressions},
        "next": next_,
    }
    if delay is not None:
        spec["delay"] = delay
    return {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Stage", "metadata": {"name": name}, "spec": spec}


def _ready_is(operator: str) -> dict[str, Any]:
    return {
        "key": '.status.conditions.[] | select( .type == "Ready" ) | .status',
        "operator": operator,
        "values": ["True"],
    }


def stages(fake_pod_run_milliseconds: int) -> list[dict[str, Any]]:
    """The Stage objects described in this module's docstring."""
    not_deleted = {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}
    return [
        _stage("kubetune-node-initialize", "Node", [_ready_is("NotIn")], {"statusTemplate": _NODE_READY_STATUS}),
        # The node Lease (renewed by kwok itself) is the real liveness signal; this stage
        # only refreshes the condition heartbeats now and then.
        _stage(
            "kubetune-node-heartbeat",
            "Node",
            [{"key": ".status.phase", "operator": "In", "values": ["Running"]}, _ready_is("In")],
            {"statusTemplate": _NODE_HEARTBEAT_STATUS},
            delay={"durationMilliseconds": 20000, "jitterDurationMilliseconds": 25000},
        ),
        _stage(
            "kubetune-pod-running",
            "Pod",
            [not_deleted, {"key": ".status.phase", "operator": "In", "values": ["Pending"]}, _ready_is("NotIn")],
            {"statusTemplate": _POD_RUNNING_STATUS},
        ),
        _stage(
            "kubetune-job-pod-succeeded",
            "Pod",
            [
                not_deleted,
                {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                {"key": ".metadata.ownerReferences.[].kind", "operator": "In", "values": ["Job"]},
            ],
            {"statusTemplate": _POD_SUCCEEDED_STATUS},
            delay={
                "durationMilliseconds": fake_pod_run_milliseconds,
                "durationFrom": {"expressionFrom": f'.metadata.annotations["{FAKE_RUN_MILLISECONDS_ANNOTATION}"]'},
            },
        ),
        _stage("kubetune-pod-delete", "Pod", [{"key": ".metadata.deletionTimestamp", "operator": "Exists"}], {"delete": True}),
    ]


class _BlockStyleDumper(yaml.SafeDumper):
    """Writes multi-line strings (the status templates) as readable `|` blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _represent_str)


def write_kwok_config(path: Path, fake_pod_run_milliseconds: int) -> Path:
    """kwok's --config file."""
    # Only Stages: options come from flags (components.kwok_argv), because a
    # KwokConfiguration document here replaces kwok's defaults for every option it omits.
    documents = stages(fake_pod_run_milliseconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump_all(documents, Dumper=_BlockStyleDumper, sort_keys=False))
    return path


def node_manifest(node: FakeGpuNode) -> dict[str, Any]:
    """A Node object kwok will manage, with GPU capacity the scheduler counts."""
    resources = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods), GPU_RESOURCE: str(node.gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "annotations": {FAKE_NODE_ANNOTATION: FAKE_NODE_ANNOTATION_VALUE},
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                FAKE_NODE_LABEL: "true",
                GPU_PRODUCT_LABEL: node.gpu_product,
                "nvidia.com/gpu.count": str(node.gpus),
            },
        },
        # Real GPU pools are tainted so only pods that tolerate it (GPU pods) land there.
        "spec": {"taints": [{"key": GPU_TAINT_KEY, "value": GPU_TAINT_VALUE, "effect": "NoSchedule"}]},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }
