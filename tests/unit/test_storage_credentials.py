"""Missing or empty S3 credentials end as a configuration error naming spec.output.credentialsSecret, never retried.

Against a real S3 endpoint (moto's server over HTTP); boto3's default credential chain is pointed at
nothing (no files, no instance metadata), as on a pod without a workload identity.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_api.exitcodes import NON_RETRIABLE, ExitCode
from kubetune_api.output import OutputSpec, S3CredentialsRef
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.errors import classify
from kubetune_trainer.storage.errors import StorageCredentialsError
from kubetune_trainer.storage.store import S3Store
from tests.support import s3 as s3_support
from tests.support.s3 import MotoS3Server
from tests.support.storage import CountingObserver

s3_server = s3_support.s3_server
s3_bucket = s3_support.s3_bucket

pytestmark = pytest.mark.unit


@pytest.fixture
def no_default_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """boto3's default chain finds nothing: no environment keys, no shared files, no instance metadata."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_no_credentials_at_all_is_a_config_error_without_retries(no_default_credentials: None, s3_server: MotoS3Server, s3_bucket: str) -> None:
    observer = CountingObserver()
    store = S3Store.from_output(OutputSpec(bucket=s3_bucket, endpoint_url=s3_server.endpoint_url), environment=TrainerEnvironment(), observer=observer)
    with pytest.raises(StorageCredentialsError) as caught:
        store.put_json("a.json", {})
    failure = classify(caught.value)
    assert failure.exit_code is ExitCode.CONFIG_ERROR and failure.exit_code in NON_RETRIABLE
    assert failure.reason == "ConfigError"
    assert "spec.output.credentialsSecret" in failure.message and f"s3://{s3_bucket}/a.json" in failure.message
    assert observer.retries == 0


def test_empty_secret_value_is_a_config_error_not_the_default_chain(s3_server: MotoS3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Valid credentials in the default chain: an empty Secret value must not quietly run with them.
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    secret = S3CredentialsRef(name="s3-credentials", access_key_id_key="id")
    output = OutputSpec(bucket=s3_bucket, endpoint_url=s3_server.endpoint_url, credentials_secret=secret)
    pod_environment = TrainerEnvironment.model_validate({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "a-real-secret-value"})
    with pytest.raises(StorageCredentialsError) as caught:
        S3Store.from_output(output, environment=pod_environment)
    assert caught.value.exit_code is ExitCode.CONFIG_ERROR
    message = caught.value.message
    assert message.startswith("spec.output.credentialsSecret: Secret 's3-credentials' has an empty value for 'id'")
    assert "a-real-secret-value" not in message


def test_blank_values_count_as_empty() -> None:
    output = OutputSpec(bucket="bucket", credentials_secret=S3CredentialsRef(name="s3"))
    blank = TrainerEnvironment.model_validate({"AWS_ACCESS_KEY_ID": " \n", "AWS_SECRET_ACCESS_KEY": ""})
    with pytest.raises(StorageCredentialsError, match="'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'"):
        S3Store.from_output(output, environment=blank)
