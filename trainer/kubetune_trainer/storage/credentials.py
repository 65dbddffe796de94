"""S3 credentials as the pod received them: a Secret named in the spec must have delivered both values.

Credential values are only tested for presence here; they never appear in a message.
"""

from __future__ import annotations

from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.errors import StorageCredentialsError

CREDENTIALS_ADVICE = (
    "Set spec.output.credentialsSecret to a Secret holding a non-empty access key id and secret access key, "
    "or leave it unset on a cluster where pods get an S3 identity (instance profile, workload identity)."
)


def check_secret_credentials(output: OutputSpec, environment: TrainerEnvironment) -> None:
    """Fail when ``spec.output.credentialsSecret`` is set but its values did not reach the pod (missing or empty keys)."""
    secret = output.credentials_secret
    if secret is None:
        return
    values = {
        secret.access_key_id_key: environment.aws_access_key_id,
        secret.secret_access_key_key: environment.aws_secret_access_key,
    }
    empty = [key for key, value in values.items() if not (value or "").strip()]
    if empty:
        raise StorageCredentialsError(
            f"spec.output.credentialsSecret: Secret '{secret.name}' has an empty value for {', '.join(repr(key) for key in empty)}. {CREDENTIALS_ADVICE}"
        )
