"""Pod status as the kubelet reports it, computed from what the agent observed (pure)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Json = dict[str, Any]

WAITING = "waiting"
RUNNING = "running"
TERMINATED = "terminated"

PENDING = "Pending"
RUNNING_PHASE = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
TERMINAL_PHASES = (SUCCEEDED, FAILED)


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ContainerRecord:
    """What the agent knows about one container: current state and the previous run."""

    name: str
    image: str
    state: str = WAITING
    reason: str = "ContainerCreating"
    message: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    restart_count: int = 0
    last_terminated: Json | None = None
    ready: bool = False
    started: bool = False
    container_id: str = ""

    def terminated_state(self) -> Json:
        state: Json = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": timestamp(self.started_at) if self.started_at else None,
            "finishedAt": timestamp(self.finished_at) if self.finished_at else None,
            "containerID": self.container_id or None,
        }
        if self.message:
            state["message"] = self.message
        return {k: v for k, v in state.items() if v is not None}

    def to_status(self) -> Json:
        if self.state == RUNNING:
            state: Json = {RUNNING: {"startedAt": timestamp(self.started_at or now())}}
        elif self.state == TERMINATED:
            state = {TERMINATED: self.terminated_state()}
        else:
            waiting: Json = {"reason": self.reason}
            if self.message:
                waiting["message"] = self.message
            state = {WAITING: waiting}
        status: Json = {
            "name": self.name,
            "image": self.image,
            "imageID": f"localcluster://{self.image}",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {TERMINATED: self.last_terminated} if self.last_terminated else {},
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


@dataclass
class ConditionClock:
    """Keeps lastTransitionTime stable while a condition's status does not change."""

    seen: dict[str, tuple[str, str]] = field(default_factory=dict)

    def condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> Json:
        status = "True" if ok else "False"
        previous = self.seen.get(kind)
        if previous is None or previous[0] != status:
            self.seen[kind] = (status, timestamp(now()))
        condition: Json = {
            "type": kind,
            "status": status,
            "lastProbeTime": None,
            "lastTransitionTime": self.seen[kind][1],
        }
        if reason:
            condition["reason"] = reason
        if message:
            condition["message"] = message
        return condition


def pod_event(pod: Json, node_name: str, kind: str, reason: str, message: str) -> Json:
    """A core/v1 Event about the pod, reported as the kubelet of `node_name`."""
    meta = pod["metadata"]
    moment = timestamp(now())
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
        "type": kind,
        "reason": reason,
        "message": message,
        "source": {"component": "kubelet", "host": node_name},
        "reportingComponent": "kubelet",
        "reportingInstance": node_name,
        "firstTimestamp": moment,
        "lastTimestamp": moment,
        "count": 1,
    }


def _names(records: list[ContainerRecord]) -> str:
    return "[" + " ".join(r.name for r in records) + "]"


def pod_conditions(
    clock: ConditionClock,
    phase: str,
    sandbox_ready: bool,
    init_records: list[ContainerRecord],
    records: list[ContainerRecord],
) -> list[Json]:
    incomplete_init = [r for r in init_records if not (r.state == TERMINATED and r.exit_code == 0)]
    unready = [r for r in records if not r.ready]
    if phase == SUCCEEDED:
        ready_reason, ready_message = "PodCompleted", ""
    elif unready:
        ready_reason, ready_message = "ContainersNotReady", f"containers with unready status: {_names(unready)}"
    else:
        ready_reason, ready_message = "", ""
    initialized = not incomplete_init or phase == SUCCEEDED
    all_ready = not unready and phase == RUNNING_PHASE
    return [
        clock.condition("PodReadyToStartContainers", sandbox_ready and phase not in TERMINAL_PHASES),
        clock.condition(
            "Initialized",
            initialized,
            "" if initialized else "ContainersNotInitialized",
            "" if initialized else f"containers with incomplete status: {_names(incomplete_init)}",
        ),
        clock.condition("Ready", all_ready, ready_reason if not all_ready else "", ready_message if not all_ready else ""),
        clock.condition(
            "ContainersReady",
            all_ready,
            ready_reason if not all_ready else "",
            ready_message if not all_ready else "",
        ),
        clock.condition("PodScheduled", True),
    ]


def pod_status(
    *,
    phase: str,
    reason: str,
    message: str,
    pod_ip: str,
    host_ip: str,
    start_time: datetime,
    conditions: list[Json],
    init_records: list[ContainerRecord],
    records: list[ContainerRecord],
) -> Json:
    return {
        "phase": phase,
        "reason": reason or None,
        "message": message or None,
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": timestamp(start_time),
        "conditions": conditions,
        "initContainerStatuses": [r.to_status() for r in init_records] or None,
        "containerStatuses": [r.to_status() for r in records],
    }


def abandoned_status(pod: Json) -> Json:
    """Status for a pod an earlier agent ran and whose processes are gone: Failed."""
    status = dict(pod.get("status") or {})
    moment = timestamp(now())

    def lost(previous: Json) -> Json:
        record = ContainerRecord(previous["name"], previous.get("image", ""))
        running = (previous.get("state") or {}).get("running") or {}
        terminated = (previous.get("state") or {}).get("terminated")
        entry = record.to_status()
        entry["restartCount"] = previous.get("restartCount", 0)
        entry["state"] = {
            "terminated": terminated
            or {
                "exitCode": 137,
                "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was terminated",
                "startedAt": running.get("startedAt", moment),
                "finishedAt": moment,
            }
        }
        return entry

    records = [ContainerRecord(s["name"], s.get("image", "")) for s in status.get("containerStatuses") or []]
    return {
        "phase": FAILED,
        "reason": "NodeAgentRestarted",
        "message": "The node agent restarted; the processes of this pod were lost",
        "conditions": pod_conditions(ConditionClock(), FAILED, False, [], records),
        "containerStatuses": [lost(s) for s in status.get("containerStatuses") or []],
        "initContainerStatuses": [lost(s) for s in status.get("initContainerStatuses") or []] or None,
    }
