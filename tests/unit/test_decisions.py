"""The reconciler's pure decisions: which Event a suspend change deserves, and when a child's name is taken."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubetune_operator import manifests
from kubetune_operator.api import FinetuneJob
from kubetune_operator.events import suspend_events
from kubetune_operator.reconciler import name_taken
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.snapshots import suspend_before

pytestmark = pytest.mark.unit

BODY: dict[str, Any] = {
    "metadata": {"name": "llama", "namespace": "team-a", "uid": "uid-now", "generation": 1},
    "spec": {"model": {"source": "x/y"}, "dataset": {"source": "data.jsonl"}, "training": {"maxSteps": 10}, "output": {"bucket": "adapters"}},
}


def owned_by(**owner: Any) -> dict[str, Any]:
    return {"metadata": {"name": "llama-config", "ownerReferences": [{"controller": True, **owner}] if owner else []}}


@pytest.mark.parametrize(
    ("before", "suspend", "queued", "reasons"),
    [
        (None, True, False, []),
        (False, False, False, []),
        (False, True, False, ["Suspending"]),
        (True, False, False, ["Resuming"]),
        (False, True, True, ["SuspendManagedByKueue"]),
    ],
)
def test_a_suspend_change_gets_one_event(before: bool | None, suspend: bool, queued: bool, reasons: list[str]) -> None:
    assert [event.reason for event in suspend_events(before, suspend, queued)] == reasons


def test_a_childs_name_is_free_when_absent_or_ours_and_taken_otherwise() -> None:
    ftj = FinetuneJob.from_body(copy.deepcopy(BODY))
    child = manifests.build_config_map(ftj, OperatorSettings())
    assert name_taken(ftj, child, None) is None
    assert name_taken(ftj, child, owned_by(kind="FinetuneJob", name="llama", uid="uid-now")) is None
    earlier = name_taken(ftj, child, owned_by(kind="FinetuneJob", name="llama", uid="uid-before"))
    assert earlier is not None and "earlier FinetuneJob of this name" in earlier
    by_user = name_taken(ftj, child, owned_by())
    assert by_user == "ConfigMap team-a/llama-config exists and is not owned by this FinetuneJob (it has no controller): delete or rename it"
    other = name_taken(ftj, child, owned_by(kind="Deployment", name="web", uid="uid-web"))
    assert other is not None and "controlled by Deployment web" in other
    another_finetunejob = name_taken(ftj, child, owned_by(kind="FinetuneJob", name="mistral", uid="uid-mistral"))
    assert another_finetunejob is not None and "(controlled by FinetuneJob mistral): delete or rename it" in another_finetunejob


def test_suspend_before_a_change_is_read_from_kopfs_diff() -> None:
    assert suspend_before([("change", ("suspend",), False, True)], current=True) is False
    assert suspend_before([("change", ("spec", "suspend"), True, False)], current=False) is True
    assert suspend_before([("change", ("backoffLimit",), 3, 5)], current=True) is True
