"""One pod's life on the node: volumes, init containers, containers, probes, restarts, deletion.

A PodWorker thread owns one pod (by uid). The agent hands it every new version of the pod
seen on the watch; the worker drives its processes towards that spec and patches the
pod's status whenever what it observed changed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from localcluster import agent_process
from localcluster.agent_context import AgentContext
from localcluster.agent_dns import PodHosts, render
from localcluster.agent_env import ContainerConfigError, container_env, expand
from localcluster.agent_probe import ProbeState, run_probe
from localcluster.agent_status import (
    FAILED,
    PENDING,
    RUNNING,
    RUNNING_PHASE,
    SUCCEEDED,
    TERMINAL_PHASES,
    TERMINATED,
    WAITING,
    ConditionClock,
    ContainerRecord,
    now,
    pod_conditions,
    pod_event,
    pod_status,
)
from localcluster.agent_volumes import Mount, PodVolumes, VolumeNotReady

Json = dict[str, Any]

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30
CONFIG_RETRY_S = 1.0
TICK_S = 0.25
_OWN_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")


@dataclass
class _Running:
    """A live container run and the probes watching it."""

    process: agent_process.ContainerProcess
    env: dict[str, str]
    mounts: list[Mount]
    run_dir: Path
    probes: dict[str, ProbeState] = field(default_factory=dict)


def pod_dir_name(pod: Json) -> str:
    meta = pod["metadata"]
    return f"{meta['namespace']}_{meta['name']}_{meta['uid']}"


class PodWorker(threading.Thread):
    def __init__(self, ctx: AgentContext, pod: Json, pod_ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.ctx = ctx
        self.uid: str = meta["uid"]
        self.pod_ip = pod_ip
        self.pod_dir = ctx.workdir / "pods" / pod_dir_name(pod)
        self._pod = pod
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_grace: float | None = None
        self._vanished = False
        self.volumes = PodVolumes(self.pod_dir, ctx.workdir / "claims", ctx.api, ctx.node_allocatable)
        spec = pod["spec"]
        self.init_records = [ContainerRecord(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []]
        self.records = [ContainerRecord(c["name"], c.get("image", "")) for c in spec.get("containers") or []]
        self.running: dict[str, _Running] = {}
        self.next_start: dict[str, float] = {}
        self.backoff: dict[str, float] = {}
        self.init_index = 0
        self.phase = PENDING
        self.reason = ""
        self.message = ""
        self.sandbox_ready = False
        self.start_time = now()
        self.clock = ConditionClock()
        self._last_sent: Json | None = None
        self._last_event: dict[str, str] = {}

    # called from the agent's threads

    def update(self, pod: Json) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def vanish(self) -> None:
        """The pod is gone from the API (force-deleted): kill its processes and stop."""
        self._vanished = True
        self._wake.set()

    def request_stop(self, grace_s: float) -> None:
        """The agent is stopping: kill the processes, leave the pod's status as it is."""
        self._stop_grace = grace_s
        self._wake.set()

    @property
    def pod(self) -> Json:
        with self._lock:
            return self._pod

    # the loop

    def run(self) -> None:
        try:
            self._lifecycle()
        except Exception:
            log.exception("pod worker %s failed", self.name)
        finally:
            if self.ctx.dns is not None:
                self.ctx.dns.unregister(self.uid)
            self._kill_all(0)
            agent_process.kill_marked(self.ctx.agent_id, self.uid)
            self.volumes.cleanup()

    def _lifecycle(self) -> None:
        (self.pod_dir / "home").mkdir(parents=True, exist_ok=True)
        while True:
            if self._stop_grace is not None:
                self._kill_all(self._stop_grace)
                return
            if self._vanished:
                self._kill_all(min(self._grace(self.pod), 2.0))
                return
            try:
                if self._iterate(self.pod):
                    return
            except Exception:
                # An apiserver restart or a failed mount must not leave the pod unattended.
                log.exception("pod worker %s: retrying after an error", self.name)
                self._wake.wait(CONFIG_RETRY_S)
            self._wake.wait(TICK_S)
            self._wake.clear()

    def _iterate(self, pod: Json) -> bool:
        """One pass towards the pod's spec; True once nothing is left to do for it."""
        if pod["metadata"].get("deletionTimestamp"):
            self._handle_deletion(pod)
            return True
        self._check_deadline(pod)
        if self.phase not in TERMINAL_PHASES:
            if not self.sandbox_ready:
                self._prepare_sandbox(pod)
            else:
                self.volumes.refresh_tokens(pod)
                self._step(pod)
        self._sync_status(pod)
        return self.phase in TERMINAL_PHASES and (self._last_sent or {}).get("phase") == self.phase

    def _prepare_sandbox(self, pod: Json) -> None:
        try:
            self.volumes.prepare(pod)
        except VolumeNotReady as error:
            message = f"MountVolume.SetUp failed: {error}"
            for record in self.init_records + self.records:
                record.reason, record.message = "ContainerCreating", ""
            self.message = message
            self._event(pod, "Warning", "FailedMount", message)
            self._wake.wait(CONFIG_RETRY_S)
            return
        self.sandbox_ready = True
        self.message = ""
        waiting_reason = "PodInitializing" if self.init_records else "ContainerCreating"
        for record in self.init_records + self.records:
            record.reason = waiting_reason

    def _step(self, pod: Json) -> None:
        spec = pod["spec"]
        policy = spec.get("restartPolicy") or "Always"
        init_specs = spec.get("initContainers") or []
        while self.init_index < len(init_specs):
            container, record = init_specs[self.init_index], self.init_records[self.init_index]
            code = self._advance(pod, container, record)
            if code is None:
                return
            if code == 0:
                self.init_index += 1
                continue
            if policy == "Never":
                self.phase = FAILED
                return
            self._schedule_restart(pod, record)
            return
        for container, record in zip(spec.get("containers") or [], self.records, strict=False):
            if record.state == TERMINATED and record.name not in self.next_start:
                continue
            code = self._advance(pod, container, record)
            if code is None:
                continue
            if policy == "Always" or (policy == "OnFailure" and code != 0):
                self._schedule_restart(pod, record)
        if any(r.started_at is not None or r.restart_count for r in self.records):
            self.phase = RUNNING_PHASE
        if policy != "Always" and all(r.state == TERMINATED for r in self.records):
            self.phase = SUCCEEDED if all(r.exit_code == 0 for r in self.records) else FAILED

    def _advance(self, pod: Json, container: Json, record: ContainerRecord) -> int | None:
        """Starts, probes or reaps one container; returns its exit code once it ended."""
        running = self.running.get(record.name)
        if running is None:
            if time.monotonic() >= self.next_start.get(record.name, 0.0):
                self._start(pod, container, record)
            return None
        code = running.process.poll()
        if code is None:
            self._probe(pod, container, record, running)
            return None
        self._finish(container, record, running)
        return code

    # container runs

    def _start(self, pod: Json, container: Json, record: ContainerRecord) -> None:
        try:
            env = container_env(pod, container, self.ctx.api, self.ctx.service_env, self.ctx.node_allocatable)
            mounts = self.volumes.mounts_for(pod, container, env)
            command = [expand(part, env) for part in (container.get("command") or []) + (container.get("args") or [])]
            if not container.get("command"):
                raise ContainerConfigError("no command: the host's environment stands in for the image, which has no entrypoint here")
            # HOME is the pod's home directory, mounted at a fixed path no volume covers (the
            # workdir itself may be hidden, e.g. by an emptyDir at /tmp while it lives under /tmp).
            home = agent_process.uncovered_path(mounts, agent_process.HOME_CANDIDATES)
        except (ContainerConfigError, ValueError, ApiException) as error:
            message = f"reading a referenced object failed: {error.status} {error.reason}" if isinstance(error, ApiException) else str(error)
            record.state, record.reason, record.message = WAITING, "CreateContainerConfigError", message
            self.next_start[record.name] = time.monotonic() + CONFIG_RETRY_S
            self._event(pod, "Warning", "Failed", f"Error: {message}")
            return
        attempt = record.restart_count
        run_dir = self.pod_dir / "containers" / record.name / str(attempt)
        mounts = [*mounts, Mount(self.pod_dir / "home", home, read_only=False)]
        if not pod["spec"].get("hostNetwork") and not any(agent_process.is_under("/etc/hosts", m.target) for m in mounts):
            hosts = self.pod_dir / "etc-hosts"
            self._write_hosts(pod, hosts)
            mounts.append(Mount(hosts, "/etc/hosts", read_only=False))
        full_env = {
            **self.ctx.image_env,
            "HOME": home,
            "HOSTNAME": self._hostname(pod),
            **env,
            agent_process.AGENT_MARKER: self.ctx.agent_id,
            agent_process.POD_MARKER: self.uid,
        }
        spec = agent_process.LaunchSpec(
            argv=command,
            env=full_env,
            # An image without WORKDIR starts in /.
            working_dir=container.get("workingDir") or "/",
            hostname=self._hostname(pod),
            mounts=mounts,
            run_dir=run_dir,
            log_file=self.pod_dir / "logs" / record.name / f"{attempt}.log",
            termination_file=run_dir / "termination-log",
            termination_path=container.get("terminationMessagePath") or "/dev/termination-log",
        )
        process = agent_process.start(spec)
        running = _Running(process=process, env=full_env, mounts=mounts, run_dir=run_dir)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if container.get(kind):
                running.probes[kind] = ProbeState.create(container[kind], initial_result=kind == "livenessProbe")
        self.running[record.name] = running
        self.next_start.pop(record.name, None)
        record.state, record.reason, record.message = RUNNING, "", ""
        record.started_at, record.finished_at, record.exit_code = process.started_at, None, None
        record.container_id = f"localcluster://{uuid.uuid4().hex}"
        record.started = "startupProbe" not in running.probes
        record.ready = record.started and "readinessProbe" not in running.probes
        self._event(pod, "Normal", "Started", f"Started container {record.name}", dedupe=False)

    def _probe(self, pod: Json, container: Json, record: ContainerRecord, running: _Running) -> None:
        def run_exec(command: list[str], timeout: float) -> int:
            return agent_process.run_in_container(running.env, running.mounts, running.run_dir / "probe", command, timeout)

        for kind, state in running.probes.items():
            if kind != "startupProbe" and not record.started:
                continue
            if kind == "startupProbe" and record.started:
                continue
            if not state.due():
                continue
            result = state.record(run_probe(state.probe, container, self.pod_ip, run_exec))
            if kind == "startupProbe":
                record.started = result
                if result and "readinessProbe" not in running.probes:
                    record.ready = True
            elif kind == "readinessProbe":
                record.ready = result
            if not result and state.failures >= int(state.probe.get("failureThreshold") or 3):
                if kind == "readinessProbe":
                    self._event(pod, "Warning", "Unhealthy", f"Readiness probe failed for {record.name}")
                    continue
                self._event(pod, "Normal", "Killing", f"Container {record.name} failed {kind}, will be restarted")
                running.process.stop(self._grace(pod))

    def _finish(self, container: Json, record: ContainerRecord, running: _Running) -> None:
        process = running.process
        del self.running[record.name]
        record.state, record.exit_code = TERMINATED, process.exit_code
        record.started_at, record.finished_at = process.started_at, process.finished_at or now()
        record.ready = record.started = False
        start_error = process.start_error()
        if start_error is not None:
            record.reason, record.message = "StartError", start_error
            return
        record.reason = "Completed" if process.exit_code == 0 else "Error"
        record.message = agent_process.termination_message(
            running.run_dir / "termination-log",
            self.pod_dir / "logs" / record.name / f"{record.restart_count}.log",
            fallback_to_logs=container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and process.exit_code != 0,
        )

    def _schedule_restart(self, pod: Json, record: ContainerRecord) -> None:
        delay = self.backoff.get(record.name, self.ctx.restart_backoff_s)
        self.backoff[record.name] = min(delay * 2, self.ctx.max_restart_backoff_s)
        self.next_start[record.name] = time.monotonic() + delay
        record.last_terminated = record.terminated_state()
        record.restart_count += 1
        record.state, record.reason = WAITING, "CrashLoopBackOff"
        record.message = (
            f"back-off {delay:g}s restarting failed container={record.name} pod={pod['metadata']['name']}_{pod['metadata']['namespace']}({self.uid})"
        )
        self._event(pod, "Warning", "BackOff", "Back-off restarting failed container", dedupe=False)

    def _kill_all(self, grace_s: float) -> None:
        for running in self.running.values():
            running.process.send_term()
        deadline = time.monotonic() + grace_s
        for running in self.running.values():
            running.process.stop(max(deadline - time.monotonic(), 0.0))

    # deletion and deadlines

    @staticmethod
    def _grace(pod: Json) -> float:
        grace = pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
        return float(grace)

    def _stop_containers(self, pod: Json, grace_s: float) -> None:
        if self.running:
            names = ", ".join(sorted(self.running))
            self._event(pod, "Normal", "Killing", f"Stopping container {names}", dedupe=False)
        self._kill_all(grace_s)
        specs = {c["name"]: c for c in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]}
        for record in self.init_records + self.records:
            running = self.running.get(record.name)
            if running is not None:
                self._finish(specs[record.name], record, running)
            self.next_start.pop(record.name, None)

    def _handle_deletion(self, pod: Json) -> None:
        self._stop_containers(pod, self._grace(pod))
        if self.phase not in TERMINAL_PHASES:
            ran_clean = all(r.state == TERMINATED and r.exit_code == 0 for r in self.records)
            policy = pod["spec"].get("restartPolicy") or "Always"
            self.phase = SUCCEEDED if ran_clean and policy != "Always" else FAILED
        self._sync_status(pod)
        self.ctx.api.delete_pod_now(pod["metadata"]["namespace"], pod["metadata"]["name"], self.uid)

    def _check_deadline(self, pod: Json) -> None:
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if deadline is None or self.phase in TERMINAL_PHASES:
            return
        if (now() - self.start_time).total_seconds() <= float(deadline):
            return
        self._stop_containers(pod, self._grace(pod))
        self.phase, self.reason = FAILED, "DeadlineExceeded"
        self.message = "Pod was active on the node longer than the specified deadline"
        self._event(pod, "Normal", "DeadlineExceeded", self.message)

    def _write_hosts(self, pod: Json, path: Path) -> None:
        entry = PodHosts(path, pod["metadata"]["namespace"], self.pod_ip, self._hostname(pod), pod["spec"].get("subdomain"), self.ctx.service_ip)
        if self.ctx.dns is not None:
            self.ctx.dns.register(self.uid, entry)
        else:
            path.write_text(render(entry, []))

    # reporting

    def _hostname(self, pod: Json) -> str:
        name: str = pod["spec"].get("hostname") or pod["metadata"]["name"]
        return name[:63]

    def status(self, pod: Json) -> Json:
        conditions = pod_conditions(self.clock, self.phase, self.sandbox_ready, self.init_records, self.records)
        observed = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}
        if "PodScheduled" in observed:
            conditions = [c for c in conditions if c["type"] != "PodScheduled"] + [observed["PodScheduled"]]
        foreign = [c for kind, c in observed.items() if kind not in _OWN_CONDITIONS]
        return pod_status(
            phase=self.phase,
            reason=self.reason,
            message=self.message,
            pod_ip=self.pod_ip,
            host_ip=self.ctx.host_ip,
            start_time=self.start_time,
            conditions=conditions + foreign,
            init_records=self.init_records,
            records=self.records,
        )

    def _sync_status(self, pod: Json) -> None:
        status = self.status(pod)
        if status == self._last_sent:
            return
        meta = pod["metadata"]
        try:
            self.ctx.api.patch_pod_status(meta["namespace"], meta["name"], status)
        except ApiException as error:
            if error.status == 404:
                self._vanished = True
                return
            log.warning("status patch for %s failed (%s); retrying", self.name, error.status)
            return
        except Exception as error:
            # Connection errors while the apiserver restarts: the next pass retries.
            log.warning("status patch for %s failed: %s; retrying", self.name, error)
            return
        self._last_sent = status

    def _event(self, pod: Json, kind: str, reason: str, message: str, dedupe: bool = True) -> None:
        if dedupe and self._last_event.get(reason) == message:
            return
        self._last_event[reason] = message
        try:
            self.ctx.api.create_event(pod_event(pod, self.ctx.node_name, kind, reason, message))
        except Exception as error:
            # Events are best effort, as in the kubelet.
            log.debug("event %s for %s not recorded: %s", reason, self.name, error)
