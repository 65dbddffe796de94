"""Hugging Face Hub failures through transformers' own download path: an outage is retried, a refusal is a spec error.

The hub is a local HTTP server standing in for huggingface.co (no hub is reachable from tests); it
answers every request with one status, the way an overloaded or a missing repository answers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kubetune_api.exitcodes import NON_RETRIABLE, ExitCode
from kubetune_api.output import OutputSpec, SecretKeyRef
from kubetune_api.recipe import ModelSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.errors import ConfigError, ModelError
from kubetune_trainer.hub import HubUnavailableError
from kubetune_trainer.storage.store import S3Store
from tests.support.s3 import free_port

pytestmark = pytest.mark.trainer

REPO = "kubetune-test/tiny"


class FixedAnswerHub(ThreadingHTTPServer):
    """Answers every request with ``status`` (and the hub's error-code header for 404s)."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FixedAnswerHub

    def _answer(self) -> None:
        self.send_response(self.server.status)
        if self.server.status == 404:
            self.send_header("X-Error-Code", "RepositoryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def hub(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The hub endpoint for this test: a server answering ``request.param``, or a closed port when it is 0."""
    import huggingface_hub.constants

    status = int(request.param)
    server = FixedAnswerHub(status) if status else None
    endpoint = server.endpoint if server else f"http://127.0.0.1:{free_port()}"
    if server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    # Read when huggingface_hub is imported, so the module attributes are what count.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    try:
        yield endpoint
    finally:
        if server:
            server.shutdown()
            server.server_close()


def _load(tmp_path: Path) -> None:
    from kubetune_trainer import model

    files = model.fetch_model(ModelSpec(source=REPO), OutputSpec(bucket="unused"), tmp_path, S3Store.from_output, environment=TrainerEnvironment())
    model.load_tokenizer(model.ModelFiles(files.path, files.revision, files.token, str(tmp_path / "hub-cache")), trust_remote_code=False)


@pytest.mark.parametrize("hub", [503, 429, 0], indirect=True, ids=["503", "429", "connection-refused"])
def test_hub_outage_is_retried(hub: str, tmp_path: Path) -> None:
    with pytest.raises(HubUnavailableError) as caught:
        _load(tmp_path)
    assert caught.value.exit_code is ExitCode.HUB_UNAVAILABLE and caught.value.exit_code not in NON_RETRIABLE
    assert caught.value.reason == "ModelHubUnavailable"
    assert caught.value.message.startswith("spec.model.source: the Hugging Face Hub did not answer") and REPO in caught.value.message


@pytest.mark.parametrize("hub", [404, 401], indirect=True, ids=["not-found", "unauthorized"])
def test_hub_refusal_is_a_model_error(hub: str, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as caught:
        _load(tmp_path)
    assert not isinstance(caught.value, HubUnavailableError)
    assert caught.value.exit_code in NON_RETRIABLE and "tokenSecretRef" in caught.value.message


def test_empty_token_secret_value_is_a_config_error(tmp_path: Path) -> None:
    from kubetune_trainer import model

    spec = ModelSpec(source=REPO, token_secret_ref=SecretKeyRef(name="hf", key="token"))
    with pytest.raises(ConfigError) as caught:
        model.fetch_model(spec, OutputSpec(bucket="unused"), tmp_path, S3Store.from_output, environment=TrainerEnvironment.model_validate({"HF_TOKEN": ""}))
    assert caught.value.message.startswith("spec.model.tokenSecretRef: Secret 'hf' has an empty value for 'token'")
