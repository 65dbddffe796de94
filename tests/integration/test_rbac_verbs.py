"""The chart grants the operator exactly the verbs its code calls: none missing, none spare.

What the operator's own code calls is read from its source: every Kubernetes client method that
kubetune_operator/kube.py uses (the module that holds every API call) and every resource that
handlers.py registers with kopf. What kopf itself calls, whatever the handlers, is declared below.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest

from kubetune_operator import api
from tests.support.chart import ROOT, of_kind, render

pytestmark = pytest.mark.integration

OPERATOR = ROOT / "operator" / "kubetune_operator"
Grant = dict[tuple[str, str], set[str]]

CLIENT_GROUPS = {"core": "", "batch": "batch", "custom": api.GROUP, "networking": "networking.k8s.io"}
"""The Kube class's client attributes and the API group each one calls."""
METHOD = re.compile(r"^(?P<verb>read|patch|create|list|delete|replace)_namespaced_(?P<kind>\w+?)(?P<status>_status)?$")
VERBS = {"read": "get", "replace": "update"}
CLUSTER_SCOPED = {("", "nodes"), ("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions"), ("kopf.dev", "clusterkopfpeerings")}

KOPF_ITSELF: Grant = {
    # Discovers the resources it serves (and the peering resources) by watching CRDs.
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    # Posts its own Events about handler failures.
    ("", "events"): {"create"},
}
KOPF_CLUSTER_WIDE: Grant = {("", "namespaces"): {"list", "watch"}}
KOPF_PEERING = {"get", "list", "watch", "patch"}
WATCHING_HANDLERS = {"index", "event", "create", "resume", "update", "delete", "field", "daemon", "timer"}
STATEFUL_HANDLERS = {"create", "resume", "update", "delete", "field"}
"""kopf handlers that kopf retries by patching a "touch" annotation onto the object."""


def _add(grant: Grant, key: tuple[str, str], *verbs: str) -> None:
    grant.setdefault(key, set()).update(verbs)


def _client_calls(tree: ast.AST) -> list[tuple[str, str, bool]]:
    """(client, method, applied) for every ``self.<client>.<method>`` in kube.py; applied when it sits in ``_children``."""
    applied: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(target, ast.Attribute) and target.attr == "_children" for target in targets) and node.value is not None:
                applied |= {id(sub) for sub in ast.walk(node.value)}
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr in CLIENT_GROUPS:
            calls.append((node.value.attr, node.attr, id(node) in applied and node.attr.startswith("patch_")))
    return calls


def kube_module_needs() -> Grant:
    grant: Grant = {}
    for client, method, applied in _client_calls(ast.parse((OPERATOR / "kube.py").read_text())):
        match = METHOD.match(method)
        assert match, f"kube.py calls {client}.{method}, which this test cannot map to a verb: extend METHOD"
        kind = match["kind"]
        singular = kind.replace("_", "")
        resource = api.PLURAL if kind == "custom_object" else singular[:-1] + "ies" if singular.endswith("y") else singular + "s"
        resource += "/status" if match["status"] else ""
        verb = VERBS.get(match["verb"], match["verb"])
        # Server-side apply creates the object when it is absent, which the apiserver authorizes as create.
        _add(grant, (CLIENT_GROUPS[client], resource), verb, *(["create"] if applied else []))
    return grant


def handler_needs() -> Grant:
    """list+watch for every resource kopf indexes or handles; patch where a handler may be retried."""
    grant: Grant = {}
    for node in ast.walk(ast.parse((OPERATOR / "handlers.py").read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        kind = node.func.attr
        if ast.unparse(node.func.value) not in {"kopf", "kopf.on"} or kind not in WATCHING_HANDLERS:
            continue
        if any(isinstance(arg, ast.Starred) for arg in node.args):
            key = (api.GROUP, api.PLURAL)  # the FinetuneJob resource tuple
        else:
            literal = [str(arg.value) for arg in node.args if isinstance(arg, ast.Constant)]
            key = ("" if len(literal) == 2 else literal[0], literal[-1])
        _add(grant, key, "list", "watch", *(["patch"] if kind in STATEFUL_HANDLERS else []))
    return grant


def needed(*, namespaced: bool, peering: bool) -> Grant:
    grant: Grant = {}
    for part in (kube_module_needs(), handler_needs(), KOPF_ITSELF, {} if namespaced else KOPF_CLUSTER_WIDE):
        for key, verbs in part.items():
            _add(grant, key, *verbs)
    if not namespaced:
        # Cluster-wide mode reads no Secrets; the reconciler treats the 403 as "cannot check".
        grant.pop(("", "secrets"))
    if peering:
        _add(grant, ("kopf.dev", "kopfpeerings" if namespaced else "clusterkopfpeerings"), *KOPF_PEERING)
    return grant


def granted(docs: list[dict[str, Any]], kind: str) -> Grant:
    grant: Grant = {}
    for doc in of_kind(docs, kind):
        for rule in doc.get("rules", []):
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    _add(grant, (group, resource), *rule["verbs"])
    return grant


def test_the_operator_code_is_read_as_expected() -> None:
    # Guards the derivation itself: an empty or skewed reading would make the comparisons below vacuous.
    code = kube_module_needs()
    assert code[("batch", "jobs")] >= {"get", "create", "patch"} and code[(api.GROUP, "finetunejobs/status")] == {"patch"}
    assert code[("", "secrets")] == {"get"} and code[("", "events")] == {"create"}
    assert handler_needs()[(api.GROUP, "finetunejobs")] == {"list", "watch", "patch"}
    assert handler_needs()[("", "nodes")] == {"list", "watch"}


@pytest.mark.parametrize("peering", [False, True], ids=["standalone", "peering"])
def test_cluster_wide_grants_are_what_the_code_calls(peering: bool, tmp_path: Path) -> None:
    docs = render({"peering": {"enabled": peering}}, [], tmp_path)
    assert granted(docs, "ClusterRole") == needed(namespaced=False, peering=peering)


@pytest.mark.parametrize("peering", [False, True], ids=["standalone", "peering"])
def test_namespaced_grants_are_what_the_code_calls(peering: bool, tmp_path: Path) -> None:
    docs = render({"watchNamespaces": ["team-a", "team-b"], "peering": {"enabled": peering}}, [], tmp_path)
    need = needed(namespaced=True, peering=peering)
    assert granted(docs, "ClusterRole") == {key: verbs for key, verbs in need.items() if key in CLUSTER_SCOPED}
    for role in of_kind(docs, "Role"):
        assert granted([role], "Role") == {key: verbs for key, verbs in need.items() if key not in CLUSTER_SCOPED}, role["metadata"]["namespace"]
