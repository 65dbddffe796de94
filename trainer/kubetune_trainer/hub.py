"""Hugging Face Hub failures told apart: the hub did not answer (retried) or it answered no (the spec is wrong).

transformers turns every hub failure into an ``OSError``; the cause it wraps says which kind it was.
"""

from __future__ import annotations

from kubetune_api.exitcodes import ExitCode
from kubetune_trainer.errors import ModelError, TrainerError, causes


class HubUnavailableError(TrainerError):
    """The hub answered 5xx or 429, or did not answer at all: a later attempt may succeed."""

    exit_code = ExitCode.HUB_UNAVAILABLE


def is_transient(error: BaseException) -> bool:
    """True when ``error`` comes from a hub outage (5xx, 429, connection refused or reset, timeout)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx  # type: ignore[attr-defined]  # the HTTP client the hub library itself uses

    for cause in causes(error):
        if isinstance(cause, OfflineModeIsEnabled):
            # HF_HUB_OFFLINE is a setting, not an outage (it subclasses ConnectionError).
            return False
        if isinstance(cause, HfHubHTTPError):
            status = int(getattr(getattr(cause, "response", None), "status_code", 0) or 0)
            if status:
                return status >= 500 or status == 429
        if isinstance(cause, httpx.NetworkError | httpx.TimeoutException | httpx.RemoteProtocolError | ConnectionError | TimeoutError):
            return True
    return False


def load_error(what: str, error: BaseException, hint: str) -> TrainerError:
    """The error for a failed ``from_pretrained``: retried when the hub was out, a ModelError naming spec.model.source otherwise."""
    short = _short(error)
    if is_transient(error):
        return HubUnavailableError(
            f"spec.model.source: the Hugging Face Hub did not answer while loading {what} ({short}). "
            "The job is retried; if it keeps failing, check the pod's egress to the hub (or HF_ENDPOINT's mirror)."
        )
    return ModelError(f"spec.model.source: cannot load {what} ({short}). {hint}")


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
