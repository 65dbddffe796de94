"""Which Kubernetes Events a status change deserves (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune_operator import conditions as st

WARNING_REASONS = frozenset(
    {
        st.REASON_UNSCHEDULABLE,
        st.REASON_WAITING_FOR_SECRET,
        st.REASON_NAME_TAKEN,
        st.REASON_CREATE_CONTAINER_CONFIG_ERROR,
        st.REASON_IMAGE_PULL,
        st.REASON_OOM_KILLED,
        st.REASON_RETRYING,
        st.REASON_GPU_RESOURCE_NOT_FOUND,
    }
)
"""Reasons of False conditions that point at something a user must look at."""

REASON_SUSPENDING = "Suspending"
REASON_RESUMING = "Resuming"
REASON_SUSPEND_MANAGED_BY_KUEUE = "SuspendManagedByKueue"
REASON_JOB_UPDATE_REJECTED = "JobUpdateRejected"
REASON_CHECKPOINT_PASSED_OVER = "DamagedCheckpointPassedOver"


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


def _conditions(status: dict[str, Any] | None) -> dict[str, tuple[str, str, str]]:
    found: dict[str, tuple[str, str, str]] = {}
    for condition in (status or {}).get("conditions") or []:
        found[condition["type"]] = (condition.get("status", ""), condition.get("reason", ""), condition.get("message", ""))
    return found


def transition_events(old: dict[str, Any] | None, new: dict[str, Any]) -> list[Event]:
    """Events for a phase change, and for each condition that newly reports a problem."""
    events: list[Event] = []
    old_phase = (old or {}).get("phase")
    phase = new.get("phase")
    before = _conditions(old)
    after = _conditions(new)
    if phase != old_phase:
        if phase == "Failed":
            _, reason, message = after.get(st.FAILED, ("", "Failed", ""))
            events.append(Event("Warning", reason, message or new.get("message") or "the FinetuneJob failed"))
        elif phase == "Succeeded":
            uri = (new.get("result") or {}).get("adapterUri", "")
            events.append(Event("Normal", st.REASON_SUCCEEDED, f"adapter published at {uri}" if uri else "the FinetuneJob succeeded"))
            events += passed_over_events(new.get("result") or {})
        elif old_phase is None or phase in ("Preparing", "Running", "Suspended"):
            # Pending after Running is a retry, which the Retrying or OOMKilled warning reports.
            events.append(Event("Normal", str(phase), new.get("message") or str(phase)))
    prepared = after.get(st.PREPARED)
    if prepared is not None and prepared[0] == "True" and before.get(st.PREPARED, ("",))[0] != "True":
        events.append(Event("Normal", prepared[1], prepared[2]))
    diverged = after.get(st.DIVERGED)
    if diverged is not None and diverged[0] == "True" and before.get(st.DIVERGED, ("",))[0] != "True" and phase != "Failed":
        # A run that stopped on divergence says so in its Failed event; this one goes on training.
        events.append(Event("Warning", diverged[1], diverged[2] or diverged[1]))
    for kind, (status, reason, message) in after.items():
        if status == "True" or reason not in WARNING_REASONS:
            continue
        if before.get(kind, ("", "", ""))[:2] != (status, reason):
            events.append(Event("Warning", reason, message or reason))
    return events


def passed_over_events(result: dict[str, Any]) -> list[Event]:
    """A warning for each damaged checkpoint the final attempt passed over: the run succeeded, but from an older
    checkpoint than the newest, and the damaged one is still in the bucket for someone to look at."""
    return [
        Event("Warning", REASON_CHECKPOINT_PASSED_OVER, f"checkpoint step {item.get('step')} at {item.get('uri')} was passed over: {item.get('reason')}")
        for item in result.get("skippedCheckpoints") or []
    ]


def suspend_events(suspended_before: bool | None, suspend: bool, queued: bool) -> list[Event]:
    """The Event for a change of spec.suspend (``suspended_before`` None: not known, so none); under Kueue, which
    decides when a queued Job runs, the change does not reach the Job."""
    if suspended_before is None or suspended_before == suspend:
        return []
    if queued:
        return [Event("Normal", REASON_SUSPEND_MANAGED_BY_KUEUE, "the trainer Job is queued in Kueue, which decides when it runs")]
    if suspend:
        return [Event("Normal", REASON_SUSPENDING, "suspend requested")]
    return [Event("Normal", REASON_RESUMING, "resuming from the newest checkpoint")]


def job_update_rejected(reason: str) -> Event:
    return Event("Warning", REASON_JOB_UPDATE_REJECTED, f"the trainer Job rejected the change: {reason}")
