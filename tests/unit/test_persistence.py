"""kopf's per-object state kept in memory: nothing is written onto a FinetuneJob except a retry's wake-up."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kubetune_operator.persistence import HandledState, MemoryDiffBaseStorage, MemoryProgressStorage

pytestmark = pytest.mark.unit

PREFIX = "kubetune.io"


def body(kind: str = "FinetuneJob", uid: str = "uid-1", **annotations: str) -> kopf.Body:
    raw: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "tiny", "namespace": "ml", "uid": uid, "annotations": dict(annotations)},
        "spec": {"suspend": False, "model": {"source": "/models/tiny"}},
        "status": {"phase": "Running"},
    }
    return kopf.Body(raw)  # type: ignore[arg-type]


def test_the_handled_spec_is_remembered_per_object_and_never_patched() -> None:
    state = HandledState()
    storage = MemoryDiffBaseStorage(state, prefix=PREFIX, kind="FinetuneJob")
    first = body()
    assert storage.fetch(body=first) is None  # never handled by this process: kopf treats it as new
    essence = storage.build(body=first)
    assert essence == {"spec": {"suspend": False, "model": {"source": "/models/tiny"}}}
    patch = kopf.Patch()
    storage.store(body=first, patch=patch, essence=essence)
    assert not patch
    assert storage.fetch(body=first) == essence
    assert storage.fetch(body=body(uid="uid-2")) is None  # a namesake created later is another object
    state.forget("uid-1")
    assert storage.fetch(body=first) is None and len(state) == 0


def test_other_kinds_get_an_empty_essence_without_copying_their_body() -> None:
    storage = MemoryDiffBaseStorage(HandledState(), prefix=PREFIX, kind="FinetuneJob")
    assert storage.build(body=body(kind="Pod")) == {}
    assert storage.build(body=body(kind="Job")) == {}


def test_handler_progress_lives_in_memory_until_purged() -> None:
    state = HandledState()
    storage = MemoryProgressStorage(state, prefix=PREFIX)
    job, patch = body(), kopf.Patch()
    record: kopf.ProgressRecord = {"started": "2026-11-27T10:00:00+00:00", "retries": 1, "success": False, "delayed": "2026-11-27T10:00:10+00:00"}
    storage.store(key="ensure", record=record, body=job, patch=patch)
    assert not patch
    assert storage.fetch(key="ensure", body=job) == record
    storage.purge(key="ensure", body=job, patch=patch)
    assert not patch
    assert storage.fetch(key="ensure", body=job) is None and len(state) == 0


def test_a_retry_still_wakes_kopf_through_an_annotation_that_the_diff_ignores() -> None:
    """kopf retries a delayed handler by touching the object; that write must stay and must not look like a spec change."""
    state = HandledState()
    progress = MemoryProgressStorage(state, prefix=PREFIX)
    diffbase = MemoryDiffBaseStorage(state, prefix=PREFIX, kind="FinetuneJob")
    patch = kopf.Patch()
    progress.touch(body=body(), patch=patch, value="2026-11-27T10:00:10+00:00")
    touched = patch["metadata"]["annotations"]
    assert touched[f"{PREFIX}/touch-dummy"] == "2026-11-27T10:00:10+00:00"
    after = body(**touched)
    assert progress.clear(essence=diffbase.build(body=after)) == progress.clear(essence=diffbase.build(body=body()))
