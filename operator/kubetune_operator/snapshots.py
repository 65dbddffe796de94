"""Slim copies of watched objects (what the status function reads) and body parsing helpers.

kopf indexes keep one snapshot per object for the operator's lifetime; keeping only the
fields the status function reads (no managedFields, no annotations) keeps memory flat.
"""

from __future__ import annotations

import json
from typing import Any

import kopf
from pydantic import ValidationError

from kubetune_operator import api, manifests

Obj = dict[str, Any]


def slim_pod(body: kopf.Body) -> Obj:
    """The parts of a pod the status function reads; indexes keep these for every trainer pod."""
    meta, status = body.get("metadata", {}), body.get("status", {})
    return {
        "metadata": {
            "name": meta.get("name"),
            "creationTimestamp": meta.get("creationTimestamp"),
            "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k == manifests.COMPLETION_INDEX_ANNOTATION},
        },
        "spec": {"nodeName": body.get("spec", {}).get("nodeName")},
        "status": {k: status.get(k) for k in ("phase", "reason", "message", "podIP", "conditions", "containerStatuses") if status.get(k) is not None},
    }


def slim_finetunejob(body: kopf.Body) -> Obj:
    """What refreshes need: spec, status and the identity Events refer to (no managedFields or annotations)."""
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp") if k in meta},
        "spec": body.get("spec", {}),
        "status": body.get("status", {}),
    }


LIFECYCLE_FIELDS = ("suspend", "backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished")
"""The trainer Job's fields a FinetuneJob may change; kept in the index to notice drift after a restart."""


def slim_job(body: kopf.Body | Obj) -> Obj:
    meta = body.get("metadata", {})
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"), "creationTimestamp": meta.get("creationTimestamp"), "ownerUid": controller_uid(meta)},
        "spec": {field: (body.get("spec") or {}).get(field) for field in LIFECYCLE_FIELDS},
        "status": dict(body.get("status") or {}),
    }


def controller_uid(meta: Any) -> str | None:
    for owner in meta.get("ownerReferences") or []:
        if owner.get("controller"):
            return str(owner.get("uid"))
    return None


def owner_name(labels: kopf.Labels) -> str | None:
    return labels.get(manifests.LABEL_FINETUNEJOB)


def first(store: Any) -> Any:
    for value in store or ():
        return value
    return None


def finished(ftj: api.FinetuneJob) -> bool:
    return ftj.status is not None and ftj.status.phase in (api.Phase.SUCCEEDED, api.Phase.FAILED)


def raw_json(response: Any) -> Obj:
    """Decode a raw (``_preload_content=False``) API response; skipping the client models is much cheaper."""
    data: Obj = json.loads(response.data)
    return data


def parse(body: Obj | kopf.Body, written: Obj | None = None) -> api.FinetuneJob:
    """The FinetuneJob model of a body; the status we last wrote wins over the watched copy, which may lag."""
    status = written if written is not None else (body.get("status") or {})
    return api.FinetuneJob.from_body({**body, "status": status or None})


def previous_status(body: kopf.Body) -> api.FinetuneJobStatus | None:
    raw = body.get("status") or {}
    try:
        return api.FinetuneJobStatus.model_validate(raw) if raw else None
    except ValidationError:
        return None


def short_errors(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)
