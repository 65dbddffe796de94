"""What a kubelet eviction of a trainer pod means for the spec: the field to raise (pure).

The kubelet puts its reason in the pod's status message (and the DisruptionTarget condition's), in one of a few
fixed forms: an emptyDir over its sizeLimit, a container or the pod over its ephemeral-storage limit, or the node
low on a resource. Each names a spec field here, so an eviction loop ends in a message that says what to change.
"""

from __future__ import annotations

import re
from typing import Any

from kubetune_operator.resourcesspec import ResourcesSpec

Obj = dict[str, Any]

VOLUME_FIELDS = {"scratch": "scratchSize", "tmp": "tmpSize", "dshm": "shmSize"}
"""The trainer pod's emptyDir volumes and the spec.resources field that sets each one's sizeLimit."""

_EMPTY_DIR = re.compile(r'Usage of EmptyDir volume "(?P<volume>[^"]+)" exceeds the limit "(?P<limit>[^"]+)"')
_STORAGE_LIMIT = re.compile(r"(exceeded its local ephemeral storage limit|Pod ephemeral local storage usage exceeds)")
_NODE_LOW = re.compile(r"The node was low on resource: (?P<resource>[a-z-]+)")


def eviction_text(pod: Obj) -> str:
    """The kubelet's words on why it evicted ``pod``: the pod's status message, else its DisruptionTarget condition's."""
    status = pod.get("status") or {}
    if status.get("message"):
        return str(status["message"])
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("message"):
            return str(condition["message"])
    return ""


def eviction_advice(text: str, resources: ResourcesSpec) -> str | None:
    """The spec field to raise for an eviction the kubelet explained with ``text``, or None when it names none."""
    volume = _EMPTY_DIR.search(text)
    if volume is not None and volume["volume"] in VOLUME_FIELDS:
        field = VOLUME_FIELDS[volume["volume"]]
        return f"the {volume['volume']} volume outgrew its limit {volume['limit']}: raise spec.resources.{field}"
    if _STORAGE_LIMIT.search(text):
        return f"the pod outgrew its local disk (spec.resources.ephemeralStorage={resources.ephemeral_storage}): raise spec.resources.ephemeralStorage"
    node = _NODE_LOW.search(text)
    if node is not None and node["resource"] == "ephemeral-storage":
        return (
            "the node ran out of local disk: set spec.resources.ephemeralStorage to what the run writes "
            f"(the scratch volume plus tmpSize {resources.tmp_size}), so the scheduler picks a node that has it"
        )
    if node is not None and node["resource"] == "memory":
        memory = resources.memory or "unset"
        return f"the node ran out of memory: set spec.resources.memory (now {memory}) to what the trainer uses, so the scheduler reserves it"
    return None


def disruption_summary(pods: list[Obj], resources: ResourcesSpec) -> str:
    """What to change after the evictions among ``pods`` (newest first): the newest eviction with advice, else ''."""
    for pod in pods:
        advice = eviction_advice(eviction_text(pod), resources)
        if advice is not None:
            return advice
    return ""
