"""Operator settings come from KUBETUNE_* environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubetune_operator.settings import DEFAULT_TRAINER_IMAGE, OperatorSettings
from kubetune_trainer import __version__

pytestmark = pytest.mark.unit

ENV_NAMES = [
    "KUBETUNE_WATCH_NAMESPACES",
    "KUBETUNE_TRAINER_IMAGE",
    "KUBETUNE_TRAINER_PULL_POLICY",
    "KUBETUNE_OPERATOR_PORT",
    "KUBETUNE_TRAINER_METRICS_PORT",
    "KUBETUNE_PEERING",
    "KUBETUNE_LOG_FORMAT",
    "KUBETUNE_PROGRESS_INTERVAL_SECONDS",
    "KUBETUNE_TRAINER_CPU_COMMAND",
    "POD_NAMESPACE",
    "KUBETUNE_TRAINER_DEFAULT_CPU",
    "KUBETUNE_TRAINER_DEFAULT_MEMORY",
    "KUBETUNE_TRAINER_IMAGE_PULL_SECRETS",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)


def test_defaults_follow_the_contract() -> None:
    settings = OperatorSettings()
    assert settings.watch_namespaces == [] and settings.clusterwide
    assert settings.trainer_image == DEFAULT_TRAINER_IMAGE == f"ghcr.io/kubetune/trainer:{__version__}"
    assert settings.operator_port == 8080
    assert settings.trainer_metrics_port == 9184
    assert settings.peering == ""
    assert settings.log_format == "text"
    assert settings.progress_interval_seconds == 5
    assert settings.trainer_command == ["python", "-m", "kubetune_trainer"]


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_WATCH_NAMESPACES", "team-a, team-b,,")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE", "registry.local/trainer:dev")
    monkeypatch.setenv("KUBETUNE_TRAINER_PULL_POLICY", "Never")
    monkeypatch.setenv("KUBETUNE_OPERATOR_PORT", "18080")
    monkeypatch.setenv("KUBETUNE_TRAINER_METRICS_PORT", "19184")
    monkeypatch.setenv("KUBETUNE_PEERING", "kubetune")
    monkeypatch.setenv("KUBETUNE_LOG_FORMAT", "json")
    monkeypatch.setenv("KUBETUNE_PROGRESS_INTERVAL_SECONDS", "2.5")
    monkeypatch.setenv("KUBETUNE_TRAINER_CPU_COMMAND", "'/opt/my venv/bin/python' -m kubetune_trainer")
    monkeypatch.setenv("KUBETUNE_TRAINER_DEFAULT_CPU", "2")
    monkeypatch.setenv("KUBETUNE_TRAINER_DEFAULT_MEMORY", "4Gi")
    monkeypatch.setenv("KUBETUNE_TRAINER_IMAGE_PULL_SECRETS", "regcred,other")
    monkeypatch.setenv("POD_NAMESPACE", "kubetune-system")
    settings = OperatorSettings()
    assert settings.watch_namespaces == ["team-a", "team-b"] and not settings.clusterwide
    assert settings.trainer_image == "registry.local/trainer:dev"
    assert settings.trainer_pull_policy == "Never"
    assert settings.operator_port == 18080
    assert settings.trainer_metrics_port == 19184
    assert settings.peering == "kubetune"
    assert settings.log_format == "json"
    assert settings.progress_interval_seconds == 2.5
    assert settings.trainer_command == ["/opt/my venv/bin/python", "-m", "kubetune_trainer"]
    assert (settings.trainer_default_cpu, settings.trainer_default_memory) == ("2", "4Gi")
    assert settings.trainer_image_pull_secrets == ["regcred", "other"]
    assert settings.pod_namespace == "kubetune-system"


@pytest.mark.parametrize(("name", "value"), [("KUBETUNE_LOG_FORMAT", "xml"), ("KUBETUNE_OPERATOR_PORT", "0"), ("KUBETUNE_TRAINER_PULL_POLICY", "Sometimes")])
def test_invalid_values_are_rejected(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        OperatorSettings()
