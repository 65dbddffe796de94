"""Fencing: only the newest attempt of a run may commit anything to the run's folder in S3.

Two trainer pods can write the same run: a pod on a lost node that is force-deleted keeps running
while its replacement starts, a pod in its SIGTERM grace period overlaps the next one, a paused
process wakes up after the run succeeded. Each attempt is named by its token, the pod's
metadata.uid. When an attempt starts it takes over ``layout.ATTEMPT_LEASE`` (replacing the version
it read, so two starting at once cannot both win); before every commit (a checkpoint marker, a
manifest, the latest pointer, a deletion) it checks that the lease still names it, and those commits
are themselves conditional writes. An attempt that finds the lease taken stops with
``Superseded`` before writing: a stale attempt never publishes over a newer one, and checkpoint files
go to a folder of the attempt's own (``layout.step_files_prefix``), which nobody else writes.

Stores that ignore conditional headers (moto 5.2.5 honours them) still get the lease check.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune_api import layout
from kubetune_api.runtime import TrainerConfig, TrainerEnvironment
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.storage.errors import PreconditionFailed, StorageError
from kubetune_trainer.storage.paths import ListedFile
from kubetune_trainer.storage.store import S3Store

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
CLAIM_TRIES = 5


class Superseded(StorageError):
    """A newer attempt of the run has taken it over: this one must not write anything more."""


def attempt_token(environment: TrainerEnvironment) -> str:
    """This attempt's token: the pod's UID, or a fresh random one for a trainer started outside Kubernetes."""
    token = environment.pod_uid or uuid.uuid4().hex
    if not TOKEN_PATTERN.match(token):
        raise ConfigError(f"KUBETUNE_POD_UID={token!r} is not a pod UID; the operator sets it from the downward API (metadata.uid).")
    return token


@dataclass(frozen=True)
class Attempt:
    """One attempt (trainer pod) of one run, and its claim on the run's folder."""

    store: S3Store
    run_prefix: str
    run_uid: str
    token: str
    pod: str = ""

    @classmethod
    def of(cls, store: S3Store, config: TrainerConfig, environment: TrainerEnvironment) -> Attempt:
        return cls(store, config.run_prefix, config.run_id, attempt_token(environment), environment.pod_name)

    @property
    def lease_key(self) -> str:
        return layout.attempt_key(self.run_prefix)

    def claim(self) -> None:
        """Take the run over: from now on an older attempt's commits are refused."""
        document = {"runUid": self.run_uid, "attempt": self.token, "pod": self.pod, "claimed": datetime.now(UTC).isoformat()}
        for _ in range(CLAIM_TRIES):
            current = self.store.get_versioned(self.lease_key)
            try:
                if current is None:
                    self.store.put_json(self.lease_key, document, create=True)
                else:
                    self.store.put_json(self.lease_key, document, replacing=current[1])
                return
            except PreconditionFailed:
                continue  # another attempt claimed it in between: read again and take it over from that one
        raise StorageError(f"could not claim {self.store.uri(self.lease_key)}: it changed on each of {CLAIM_TRIES} tries")

    def check(self) -> None:
        """Raise ``Superseded`` unless the lease still names this attempt."""
        try:
            lease = self.store.get_json(self.lease_key)
        except ValueError:
            lease = None
        holder = lease.get("attempt") if isinstance(lease, dict) else None
        if holder != self.token:
            pod = lease.get("pod") if isinstance(lease, dict) else None
            raise Superseded(
                f"Another attempt ({pod or holder or 'unknown'}) has taken over run {self.run_uid} in "
                f"{self.store.uri(self.run_prefix + '/')}; this attempt ({self.pod or self.token}) stops without writing more."
            )

    def stamp(self) -> dict[str, str]:
        """What markers and manifests record about who wrote them."""
        return {"runUid": self.run_uid, "attempt": self.token, "pod": self.pod}

    def listing(self, schema_version: int, files: list[ListedFile], **fields: Any) -> dict[str, Any]:
        """A marker or manifest: the files it vouches for, when, and who wrote them."""
        return {
            "schemaVersion": schema_version,
            "created": datetime.now(UTC).isoformat(),
            "files": [item.to_json() for item in files],
            **fields,
            **self.stamp(),
        }
