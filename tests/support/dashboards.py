"""Every query of the chart's Grafana dashboards, ready to run against a real Prometheus.

The e2e suite runs each one and expects data; unit tests check that each parses and names only
metrics from the contract. Grafana variables are replaced by concrete values, since Prometheus
does not know them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "dashboards"

GPU_METRIC_PREFIX = "kubetune_trainer_gpu_"
"""Series a trainer only exports when it has GPUs; their queries are empty for CPU-only jobs."""

CONTRACT_METRICS = frozenset(
    {
        "kubetune_trainer_step",
        "kubetune_trainer_total_steps",
        "kubetune_trainer_epoch",
        "kubetune_trainer_progress_ratio",
        "kubetune_trainer_loss",
        "kubetune_trainer_eval_loss",
        "kubetune_trainer_learning_rate",
        "kubetune_trainer_tokens_per_second",
        "kubetune_trainer_tokens_total",
        "kubetune_trainer_eta_seconds",
        "kubetune_trainer_checkpoint_save_seconds",
        "kubetune_trainer_checkpoint_upload_seconds",
        "kubetune_trainer_last_checkpoint_step",
        "kubetune_trainer_s3_bytes_total",
        "kubetune_trainer_s3_retries_total",
        "kubetune_trainer_resident_memory_bytes",
        "kubetune_trainer_gpu_memory_allocated_bytes",
        "kubetune_trainer_gpu_memory_reserved_bytes",
        "kubetune_trainer_gpu_memory_peak_bytes",
        "kubetune_trainer_gpu_memory_total_bytes",
        "kubetune_trainer_gpu_memory_used_bytes",
        "kubetune_trainer_gpu_utilization_ratio",
        "kubetune_trainer_info",
        "kubetune_operator_finetunejobs",
        "kubetune_operator_finetunejob_info",
        "kubetune_operator_reconcile_duration_seconds",
        "kubetune_operator_reconcile_errors_total",
        "kubetune_operator_jobs_created_total",
        "kubetune_finetunejob_gpu_seconds_total",
        "kubetune_finetunejob_lost_work_gpu_seconds_total",
        "kubetune_finetunejob_lost_work_seconds_total",
        "kubetune_finetunejob_redone_steps_total",
        "kubetune_finetunejob_estimated_cost",
        "up",
    }
)
"""Metric names of the contract (contracts.md) that dashboards and alerts may use; histograms by base name."""

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_METRIC = re.compile(r"\b(kubetune_[a-z0-9_]+|up)\b")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads, with histogram series mapped to their base name."""
    names: set[str] = set()
    for name in _METRIC.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            base = name.removesuffix(suffix)
            if base != name and base in CONTRACT_METRICS:
                name = base
                break
        names.add(name)
    return names


DEFAULT_INTERVALS = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h"}
"""Values for Grafana's built-in interval variables: a rate window that spans several 15 s scrapes."""

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


class DashboardQuery(NamedTuple):
    """One PromQL query of one panel, with the Grafana variables already substituted."""

    dashboard: str
    panel: str
    expr: str

    @property
    def needs_gpu(self) -> bool:
        """True when the query reads GPU series, which CPU-only trainers do not export."""
        return GPU_METRIC_PREFIX in self.expr


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Dashboard file stem -> parsed dashboard JSON."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Panels in order, descending into collapsed rows (which keep their panels inside)."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace $name and ${name} (also ${name:format}) by their values; unknown names raise KeyError."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(replace, expr)


def dashboard_queries(
    namespace: str,
    finetunejob: str,
    *,
    directory: Path = DASHBOARD_DIR,
    intervals: Mapping[str, str] = DEFAULT_INTERVALS,
) -> list[DashboardQuery]:
    """(dashboard, panel, expr) for every target of every panel, for one namespace and FinetuneJob."""
    # A namespace name (a DNS label: [a-z0-9-]) has no regex metacharacters, so the same value
    # serves the per-job dashboard's `=` matchers and the overview's `=~` matchers.
    variables = {**intervals, "namespace": namespace, "finetunejob": finetunejob}
    queries: list[DashboardQuery] = []
    for stem, board in load_dashboards(directory).items():
        for panel in iter_panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if expr:
                    queries.append(DashboardQuery(stem, str(panel.get("title", "")), substitute(expr, variables)))
    return queries


def variable_queries(directory: Path = DASHBOARD_DIR) -> list[tuple[str, str, str]]:
    """(dashboard, variable, label_values query) for every query variable, for checks of the dropdowns."""
    found: list[tuple[str, str, str]] = []
    for stem, board in load_dashboards(directory).items():
        for variable in board.get("templating", {}).get("list", []):
            if variable.get("type") == "query":
                query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
                found.append((stem, variable["name"], query))
    return found
