"""Alert rules and dashboard queries, checked by Prometheus itself.

promtool parses and unit-tests the rules the chart's PrometheusRule ships and parses every
dashboard query; a real Prometheus (Debian's) scraping a loopback exporter of every contract
series runs every dashboard query and must return data. These tests fail (never skip) when
promtool or prometheus is missing, with the install hint.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboards import CONTRACT_METRICS, dashboard_queries, metric_names, variable_queries

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubetune"
RULES = CHART / "files" / "prometheus" / "kubetune-alerts.yaml"
RULE_TESTS = CHART / "tests" / "kubetune-alerts.test.yaml"

REQUIRED_ALERTS = {
    "KubetuneFinetuneJobFailed",
    "KubetuneTrainingStalled",
    "KubetuneLossNotFinite",
    "KubetuneLossDiverging",
    "KubetuneGPUMemoryNearlyFull",
    "KubetuneOperatorDown",
    "KubetuneOperatorReconcileErrors",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: `apt-get install -y prometheus` (Debian's package ships promtool)")
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, check=False)


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_rules_pass_their_promtool_unit_tests() -> None:
    result = run_promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_catch_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests are only worth something if a broken expectation fails them."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(RULES)]
    case = tests["tests"][0]["alert_rule_test"][0]
    case["exp_alerts"] = []
    broken = tmp_path / "broken.test.yaml"
    broken.write_text(yaml.safe_dump(tests))
    assert run_promtool("test", "rules", str(broken)).returncode != 0


def test_every_alert_is_required_documented_and_unit_tested() -> None:
    names = {rule["alert"] for rule in alerts()}
    assert names >= REQUIRED_ALERTS
    tested = {
        case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test.get("alert_rule_test", []) if case.get("exp_alerts")
    }
    assert tested == names, f"alerts without a firing unit test: {names - tested}"
    for rule in alerts():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_rules_only_use_contract_metrics() -> None:
    for rule in alerts():
        names = metric_names(rule["expr"])
        assert names and names <= CONTRACT_METRICS, f"{rule['alert']}: {names - CONTRACT_METRICS}"


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """Each query becomes a recording rule, so promtool's PromQL parser checks it."""
    queries = dashboard_queries("team-a", "tiny-lora")
    expressions = [query.expr for query in queries]
    for board, variable, query in variable_queries():
        # label_values(metric{...}, label) is Grafana's; the selector inside is PromQL.
        selector = query.removeprefix("label_values(").rsplit(",", 1)[0]
        expressions.append(selector.replace("$namespace", "team-a"))
        assert query.startswith("label_values("), f"{board}/{variable}"
    rules = {"groups": [{"name": "dashboards", "rules": [{"record": f"kubetune:dashboard_query:{i}", "expr": expr} for i, expr in enumerate(expressions)]}]}
    rules_file = tmp_path / "dashboards.rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules))
    result = run_promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------- a real Prometheus

NAMESPACE, FINETUNEJOB = "team-a", "tiny-lora"
_JOB = f'namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}",rank="0"'
_GPU = f'{_JOB},gpu="0"'


def _histogram(name: str, labels: str) -> str:
    buckets = "".join(f'{name}_bucket{{{labels},le="{le}"}} {count}\n' for le, count in (("0.5", 1), ("1.0", 2), ("+Inf", 2)))
    return f"# TYPE {name} histogram\n{buckets}{name}_sum{{{labels}}} 1.2\n{name}_count{{{labels}}} 2\n"


# One scrape of each contract series, as a trainer with one GPU and the operator expose them.
TRAINER_EXPOSITION = (
    "".join(
        f"# TYPE kubetune_trainer_{name} gauge\nkubetune_trainer_{name}{{{_JOB}}} {value}\n"
        for name, value in (
            ("step", 40),
            ("total_steps", 60),
            ("epoch", 1.5),
            ("progress_ratio", 0.66),
            ("loss", 1.2),
            ("eval_loss", 1.4),
            ("learning_rate", 0.003),
            ("tokens_per_second", 900),
            ("eta_seconds", 20),
            ("last_checkpoint_step", 40),
            ("resident_memory_bytes", 2e9),
        )
    )
    + "".join(
        f"# TYPE kubetune_trainer_gpu_{name} gauge\nkubetune_trainer_gpu_{name}{{{_GPU}}} {value}\n"
        for name, value in (
            ("memory_allocated_bytes", 6e9),
            ("memory_reserved_bytes", 7e9),
            ("memory_peak_bytes", 6.5e9),
            ("memory_total_bytes", 8e10),
            ("memory_used_bytes", 7.5e9),
            ("utilization_ratio", 0.9),
        )
    )
    + f"# TYPE kubetune_trainer_tokens_total counter\nkubetune_trainer_tokens_total{{{_JOB}}} 36000\n"
    + f"# TYPE kubetune_trainer_s3_retries_total counter\nkubetune_trainer_s3_retries_total{{{_JOB}}} 0\n"
    + "# TYPE kubetune_trainer_s3_bytes_total counter\n"
    + f'kubetune_trainer_s3_bytes_total{{{_JOB},direction="upload"}} 1e6\n'
    + f'kubetune_trainer_s3_bytes_total{{{_JOB},direction="download"}} 5e6\n'
    + f'# TYPE kubetune_trainer_info gauge\nkubetune_trainer_info{{{_JOB},method="lora",base_model="tiny"}} 1\n'
    + _histogram("kubetune_trainer_checkpoint_save_seconds", _JOB)
    + _histogram("kubetune_trainer_checkpoint_upload_seconds", _JOB)
)
OPERATOR_EXPOSITION = (
    "# TYPE kubetune_operator_finetunejobs gauge\n"
    f'kubetune_operator_finetunejobs{{namespace="{NAMESPACE}",phase="Running"}} 1\n'
    f'kubetune_operator_finetunejobs{{namespace="{NAMESPACE}",phase="Failed"}} 1\n'
    "# TYPE kubetune_operator_finetunejob_info gauge\n"
    f'kubetune_operator_finetunejob_info{{namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}",phase="Running"}} 1\n'
    f'kubetune_operator_finetunejob_info{{namespace="{NAMESPACE}",finetunejob="broken",phase="Failed"}} 1\n'
    "# TYPE kubetune_operator_reconcile_errors_total counter\n"
    'kubetune_operator_reconcile_errors_total{kind="ApiException"} 1\n'
    "# TYPE kubetune_operator_jobs_created_total counter\n"
    f'kubetune_operator_jobs_created_total{{namespace="{NAMESPACE}"}} 2\n'
    "# TYPE kubetune_finetunejob_gpu_seconds_total counter\n"
    f'kubetune_finetunejob_gpu_seconds_total{{namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}"}} 7200\n'
    "# TYPE kubetune_finetunejob_lost_work_gpu_seconds_total counter\n"
    f'kubetune_finetunejob_lost_work_gpu_seconds_total{{namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}"}} 360\n'
    "# TYPE kubetune_finetunejob_lost_work_seconds_total counter\n"
    f'kubetune_finetunejob_lost_work_seconds_total{{namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}"}} 180\n'
    "# TYPE kubetune_finetunejob_redone_steps_total counter\n"
    f'kubetune_finetunejob_redone_steps_total{{namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}"}} 12\n'
    "# TYPE kubetune_finetunejob_estimated_cost gauge\n"
    f'kubetune_finetunejob_estimated_cost{{namespace="{NAMESPACE}",finetunejob="{FINETUNEJOB}",currency="USD"}} 8.2\n'
    + _histogram("kubetune_operator_reconcile_duration_seconds", 'handler="create"')
)


class _Exporter(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {"/trainer": TRAINER_EXPOSITION, "/operator": OPERATOR_EXPOSITION}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write((body or "").encode())

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: scrapes are not worth a log line."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        payload = json.load(response)
    assert payload["status"] == "success", payload
    result: list[dict[str, Any]] = payload["data"]["result"]
    return result


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian's) scraping a loopback exporter of every contract series."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `apt-get install -y prometheus` (or `bash hack/setup-system.sh`)")
    exporter = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    target = f"127.0.0.1:{exporter.server_address[1]}"
    workdir = tmp_path_factory.mktemp("prometheus")
    jobs = [("kubetune-trainer", "/trainer"), ("kubetune-operator", "/operator")]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": job, "honor_labels": True, "metrics_path": path, "static_configs": [{"targets": [target]}]} for job, path in jobs],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (workdir / "prometheus.log").open("w")
    process = subprocess.Popen(
        [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        # Three scrapes of each job: enough samples for rate() over the 1m window.
        while time.monotonic() < deadline:
            try:
                if len(_query(base, "count_over_time(up[1m]) >= 3")) == len(jobs):
                    break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"Prometheus did not scrape the exporter in 30 s; see {workdir / 'prometheus.log'}")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        exporter.shutdown()
        exporter.server_close()


def test_every_dashboard_query_returns_data_from_a_real_prometheus(prometheus: str) -> None:
    empty = [f"{query.dashboard}/{query.panel}: {query.expr}" for query in dashboard_queries(NAMESPACE, FINETUNEJOB) if not _query(prometheus, query.expr)]
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_running_jobs_table_lists_only_running_jobs(prometheus: str) -> None:
    running = next(q for q in dashboard_queries(NAMESPACE, FINETUNEJOB) if q.panel == "Running FinetuneJobs")
    assert [sample["metric"]["finetunejob"] for sample in _query(prometheus, running.expr)] == [FINETUNEJOB]
    failed = next(q for q in dashboard_queries(NAMESPACE, FINETUNEJOB) if q.panel == "Failed FinetuneJobs")
    assert [sample["metric"]["finetunejob"] for sample in _query(prometheus, failed.expr)] == ["broken"]
