"""Which Kubernetes Events a status change deserves (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune_operator import conditions as st

WARNING_REASONS = frozenset(
    {
        st.REASON_UNSCHEDULABLE,
        st.REASON_WAITING_FOR_SECRET,
        st.REASON_CREATE_CONTAINER_CONFIG_ERROR,
        st.REASON_IMAGE_PULL,
        st.REASON_OOM_KILLED,
        st.REASON_RETRYING,
        st.REASON_GPU_RESOURCE_NOT_FOUND,
    }
)
"""Reasons of False conditions that point at something a user must look at."""


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
        elif old_phase is None or phase in ("Running", "Suspended"):
            # Pending after Running is a retry, which the Retrying or OOMKilled warning reports.
            events.append(Event("Normal", str(phase), new.get("message") or str(phase)))
    for kind, (status, reason, message) in after.items():
        if status == "True" or reason not in WARNING_REASONS:
            continue
        if before.get(kind, ("", "", ""))[:2] != (status, reason):
            events.append(Event("Warning", reason, message or reason))
    return events
