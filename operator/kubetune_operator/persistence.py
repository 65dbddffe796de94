"""kopf's per-object handling state, kept in this process instead of written onto each FinetuneJob.

kopf stores two things per object by default: the last handled spec (the base of the next diff)
and each handler's progress, both as annotations, which costs one PATCH of every new FinetuneJob
(and the watch event that PATCH echoes) right when a burst of creations is busiest. The children
are found again by name and owner, so nothing here has to outlive the process: after a
restart or a failover every FinetuneJob counts as new, ``ensure`` finds its Job and only
observes, and a spec change made meanwhile is found by comparing with the Job itself.

Retries still work across watch events: a handler that asks to be retried later is woken by
kopf's "touch" annotation, the one write these storages make, and only on that path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import kopf


def _uid(body: kopf.Body) -> str:
    return str(body.get("metadata", {}).get("uid") or "")


class HandledState:
    """The in-memory records of both storages, keyed by object uid, so one call forgets a deleted object.

    Only kopf's event loop reads and writes them, so they need no lock."""

    def __init__(self) -> None:
        self.essences: dict[str, kopf.BodyEssence] = {}
        self.progress: dict[str, dict[str, kopf.ProgressRecord]] = {}

    def forget(self, uid: str) -> None:
        self.essences.pop(uid, None)
        self.progress.pop(uid, None)

    def __len__(self) -> int:
        return len(self.essences.keys() | self.progress.keys())


class MemoryDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """The last handled essence per object, in memory; built like kopf's annotation storage, never written.

    kopf builds an essence (a deep copy) on every event of every watched kind, but only the kind with
    create/update handlers ever compares them: other kinds (pods, Jobs, nodes) get an empty one.
    """

    def __init__(self, state: HandledState, prefix: str, kind: str) -> None:
        super().__init__(prefix=prefix, key="last-handled-configuration")
        self.state = state
        self.kind = kind

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        if body.get("kind") != self.kind:
            return cast(kopf.BodyEssence, {})
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self.state.essences.get(_uid(body))

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self.state.essences[_uid(body)] = essence


class MemoryProgressStorage(kopf.AnnotationsProgressStorage):
    """Handler progress per object, in memory; ``touch`` (the retry wake-up) and ``clear`` stay kopf's annotations."""

    def __init__(self, state: HandledState, prefix: str) -> None:
        super().__init__(prefix=prefix)
        self.state = state

    def fetch(self, *, key: Any, body: kopf.Body) -> kopf.ProgressRecord | None:
        return self.state.progress.get(_uid(body), {}).get(str(key))

    def store(self, *, key: Any, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch) -> None:
        self.state.progress.setdefault(_uid(body), {})[str(key)] = record

    def purge(self, *, key: Any, body: kopf.Body, patch: kopf.Patch) -> None:
        records = self.state.progress.get(_uid(body))
        if records is not None:
            records.pop(str(key), None)
            if not records:
                self.state.progress.pop(_uid(body), None)
