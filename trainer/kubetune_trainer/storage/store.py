"""S3 access for the trainer: verified uploads and downloads, retried through outages.

Every remote call goes through one retry loop (``retry.Retrier``) with exponential backoff and
jitter, bounded by a total time budget. What cannot succeed by waiting (access refused, bucket
missing, bad key pair) raises ``StorageAccessError`` at once; a store that stays unreachable past
the budget raises ``StorageUnavailableError``. Both carry the trainer exit code the operator acts
on. Credentials come from the environment and never appear in messages.

Uploads hash the file locally, send it with an S3 SHA-256 checksum (the server rejects a body
that does not match) and record the hex digest as object metadata. A single-part upload is done
when S3 confirms the checksum in its answer; a multipart upload, or a store that does not confirm
it, is read back (size and checksum) before reporting success. That metadata is what publication
and checkpoint manifests are checked against without downloading the data again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from kubetune_api import layout
from kubetune_api.output import OutputSpec
from kubetune_api.runtime import TrainerEnvironment
from kubetune_trainer.storage.credentials import check_secret_credentials
from kubetune_trainer.storage.errors import PreconditionFailed, StorageError, StorageIntegrityError, error_code, http_status
from kubetune_trainer.storage.paths import iter_files, json_bytes, object_sha256, safe_relative_path, sha256_file
from kubetune_trainer.storage.retry import Retrier
from kubetune_trainer.storage.settings import NullObserver, RetryPolicy, StorageObserver, StoreSettings

SHA256_METADATA_KEY = "sha256"
"""User metadata key (x-amz-meta-sha256) holding the hex SHA-256 of the whole object."""


@dataclass(frozen=True)
class ObjectInfo:
    """An object's key, size and (when recorded at upload) hex SHA-256."""

    key: str
    size: int
    sha256: str | None = None
    etag: str | None = None


class S3Store:
    """One bucket on one S3 endpoint, with retried and verified transfers."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        settings: StoreSettings | None = None,
        observer: StorageObserver | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.settings = settings or StoreSettings()
        self.observer: StorageObserver = observer or NullObserver()
        self._retrying = Retrier(bucket, endpoint_url, self.settings.retry, self.observer, sleep)
        # Cleared when the store answers a conditional write with NotImplemented; the attempt lease is then the only fence.
        self.conditional_writes = True
        self._transfer = TransferConfig(
            multipart_threshold=self.settings.multipart_threshold_bytes,
            multipart_chunksize=self.settings.multipart_chunk_bytes,
            max_concurrency=self.settings.max_concurrency,
        )

    @classmethod
    def from_output(
        cls,
        output: OutputSpec,
        *,
        environment: TrainerEnvironment | None = None,
        settings: StoreSettings | None = None,
        observer: StorageObserver | None = None,
    ) -> S3Store:
        """A store for ``spec.output``: its endpoint and region, credentials from the environment.

        Without ``spec.output.credentialsSecret`` boto3's default chain applies (instance profile,
        web identity). With it, both values must be there: an empty value in the Secret would
        otherwise fall back to that chain and run with the node's identity instead of the Secret's.
        """
        environment = environment or TrainerEnvironment()
        check_secret_credentials(output, environment)
        settings = settings or StoreSettings(retry=RetryPolicy(max_total_seconds=output.retry_timeout_seconds))
        endpoint = output.endpoint_url or environment.aws_endpoint_url or None
        region = output.region or environment.aws_region or "us-east-1"
        config = Config(
            region_name=region,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            # A couple of quick attempts inside botocore absorb single dropped requests (one
            # part of a multipart upload); outages are ridden out by the store's own loop.
            retries={"mode": "standard", "total_max_attempts": 3},
            # S3-compatible stores (MinIO, Ceph) rarely serve virtual-hosted bucket names.
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        session = boto3.session.Session(
            aws_access_key_id=environment.aws_access_key_id or None,
            aws_secret_access_key=environment.aws_secret_access_key or None,
            aws_session_token=environment.aws_session_token or None,
        )
        client = session.client("s3", endpoint_url=endpoint, config=config)
        return cls(client, output.bucket, endpoint_url=endpoint, settings=settings, observer=observer)

    # ---- objects ------------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        return layout.uri(self.bucket, key)

    def head(self, key: str) -> ObjectInfo | None:
        """Size and recorded SHA-256 of an object, or None when it does not exist."""
        return self._retrying("HEAD", key, lambda: self._head_once(key))

    def _head_once(self, key: str) -> ObjectInfo | None:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as error:
            if error_code(error) in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        metadata = response.get("Metadata") or {}
        sha = metadata.get(SHA256_METADATA_KEY) or object_sha256(response)
        return ObjectInfo(key=key, size=int(response["ContentLength"]), sha256=sha)

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def upload_file(self, local_path: Path, key: str, *, skip_if_identical: bool = True) -> ObjectInfo:
        """Upload one file and confirm S3 holds exactly it (size and SHA-256) before returning.

        With ``skip_if_identical`` an object already there with the same size and SHA-256 is kept,
        which makes a repeated publication cheap after a partial earlier attempt.
        """
        size = local_path.stat().st_size
        digest = sha256_file(local_path)
        if skip_if_identical:
            present = self.head(key)
            if present is not None and present.size == size and present.sha256 == digest:
                return ObjectInfo(key=key, size=size, sha256=digest)

        def call() -> ObjectInfo:
            if size < self.settings.multipart_threshold_bytes:
                if self._put_verified(local_path, key, digest):
                    return ObjectInfo(key=key, size=size, sha256=digest)
            else:
                self.client.upload_file(
                    str(local_path),
                    self.bucket,
                    key,
                    ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {SHA256_METADATA_KEY: digest}},
                    Config=self._transfer,
                )
            response = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
            self._check_uploaded(key, response, size, digest)
            return ObjectInfo(key=key, size=size, sha256=digest)

        info = self._retrying("upload", key, call)
        self.observer.on_bytes("upload", size)
        return info

    def _put_verified(self, local_path: Path, key: str, digest: str) -> bool:
        """One PUT carrying the SHA-256: True when S3 confirms it checked the body against it.

        A store that ignores the checksum header (some S3-compatible servers) answers without it;
        the caller then reads the object back instead.
        """
        checksum = base64.b64encode(bytes.fromhex(digest)).decode("ascii")
        with local_path.open("rb") as body:
            response = self.client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum, Metadata={SHA256_METADATA_KEY: digest}
            )
        return bool(response.get("ChecksumSHA256") == checksum)

    def _check_uploaded(self, key: str, response: Mapping[str, Any], size: int, digest: str) -> None:
        stored_size = int(response["ContentLength"])
        server_sha = object_sha256(response)
        recorded = (response.get("Metadata") or {}).get(SHA256_METADATA_KEY)
        if stored_size != size or (server_sha is not None and server_sha != digest) or recorded != digest:
            raise StorageIntegrityError(
                f"{self.uri(key)} does not match the uploaded file (size {stored_size} vs {size}, sha256 {server_sha or recorded} vs {digest})"
            )

    def upload_dir(self, local_dir: Path, prefix: str, *, skip_if_identical: bool = True) -> list[ObjectInfo]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``, in path order."""
        uploaded: list[ObjectInfo] = []
        for path in iter_files(local_dir):
            relative = path.relative_to(local_dir).as_posix()
            uploaded.append(self.upload_file(path, layout.join_key(prefix, relative), skip_if_identical=skip_if_identical))
        return uploaded

    def download_file(self, key: str, local_path: Path) -> ObjectInfo:
        """Download an object atomically (temp file, then rename) and check its size and SHA-256."""
        local_path.parent.mkdir(parents=True, exist_ok=True)
        partial = local_path.with_name(local_path.name + ".partial")

        def call() -> ObjectInfo:
            info = self._head_once(key)
            if info is None:
                raise StorageError(f"{self.uri(key)} does not exist")
            self.client.download_file(self.bucket, key, str(partial), Config=self._transfer)
            size = partial.stat().st_size
            if size != info.size or (info.sha256 is not None and sha256_file(partial) != info.sha256):
                partial.unlink(missing_ok=True)
                raise StorageIntegrityError(f"download of {self.uri(key)} does not match the stored object's size or sha256")
            os.replace(partial, local_path)
            return info

        try:
            info = self._retrying("download", key, call)
        finally:
            partial.unlink(missing_ok=True)
        self.observer.on_bytes("download", info.size)
        return info

    def download_prefix(self, prefix: str, local_dir: Path) -> list[Path]:
        """Mirror every object under ``prefix`` into ``local_dir``; files already there with the same size are kept."""
        base = prefix.rstrip("/") + "/" if prefix else ""
        paths: list[Path] = []
        for info in self.list_objects(base):
            if info.key.endswith("/"):
                # Zero-byte "folder" markers that consoles and some tools create.
                continue
            relative = safe_relative_path(info.key[len(base) :])
            target = local_dir / relative
            if not (target.is_file() and target.stat().st_size == info.size):
                self.download_file(info.key, target)
            paths.append(target)
        return paths

    def put_bytes(
        self, key: str, data: bytes, *, content_type: str = "application/octet-stream", create: bool = False, replacing: str | None = None
    ) -> ObjectInfo:
        """Write a small object in one request, checked by S3 against its SHA-256.

        ``create`` writes only if no object has the key; ``replacing`` (an ETag from ``get_versioned``) only
        over that version. Either way ``PreconditionFailed`` means someone else wrote it first; a retried
        request whose first try landed is recognised by the object holding these bytes.
        """
        raw = hashlib.sha256(data).digest()
        condition = {"IfNoneMatch": "*"} if create else {"IfMatch": replacing} if replacing is not None else {}

        def put(condition: Mapping[str, str]) -> None:
            self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=base64.b64encode(raw).decode("ascii"),
                Metadata={SHA256_METADATA_KEY: raw.hex()},
                **condition,
            )

        def call() -> ObjectInfo:
            try:
                put(condition if self.conditional_writes else {})
            except ClientError as error:
                if not condition or not self.conditional_writes:
                    raise
                if error_code(error) == "NotImplemented" or http_status(error) == 501:
                    self.conditional_writes = False
                    put({})
                elif error_code(error) in {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"} or http_status(error) in {409, 412}:
                    current = self._get_object_once(key)
                    if current is None or current["Body"].read() != data:
                        raise PreconditionFailed(f"{self.uri(key)} was written by someone else since it was read") from error
                else:
                    raise
            return ObjectInfo(key=key, size=len(data), sha256=raw.hex())

        info = self._retrying("upload", key, call)
        self.observer.on_bytes("upload", len(data))
        return info

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """An object's content and ETag (what ``put_bytes(replacing=...)`` names), or None when it does not exist."""

        def call() -> tuple[bytes, str] | None:
            response = self._get_object_once(key)
            if response is None:
                return None
            body: bytes = response["Body"].read()
            if len(body) != int(response["ContentLength"]):
                raise StorageIntegrityError(f"short read of {self.uri(key)}")
            return body, str(response["ETag"])

        found = self._retrying("download", key, call)
        if found is not None:
            self.observer.on_bytes("download", len(found[0]))
        return found

    def get_bytes(self, key: str) -> bytes | None:
        """An object's content, or None when it does not exist."""
        found = self.get_versioned(key)
        return None if found is None else found[0]

    def sha256_object(self, key: str) -> str | None:
        """Hex SHA-256 of an object's content, streamed (not held in memory); None when it does not exist."""

        def call() -> tuple[str, int] | None:
            response = self._get_object_once(key)
            if response is None:
                return None
            digest = hashlib.sha256()
            read = 0
            for chunk in response["Body"].iter_chunks(1 << 20):
                digest.update(chunk)
                read += len(chunk)
            if read != int(response["ContentLength"]):
                raise StorageIntegrityError(f"short read of {self.uri(key)}")
            return digest.hexdigest(), read

        result = self._retrying("download", key, call)
        if result is None:
            return None
        self.observer.on_bytes("download", result[1])
        return result[0]

    def _get_object_once(self, key: str) -> Any:
        """The GET response of an object (its body still to read), or None when it does not exist."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as error:
            if error_code(error) in {"NoSuchKey", "404"}:
                return None
            raise

    def put_json(self, key: str, document: Any, *, create: bool = False, replacing: str | None = None) -> ObjectInfo:
        return self.put_bytes(key, json_bytes(document), content_type="application/json", create=create, replacing=replacing)

    def get_json(self, key: str) -> Any | None:
        """A parsed JSON object, or None when the key does not exist."""
        data = self.get_bytes(key)
        return None if data is None else json.loads(data)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursively), sorted by key; sizes only, no checksums."""

        def call() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                found.extend(ObjectInfo(key=item["Key"], size=int(item["Size"]), etag=item.get("ETag")) for item in page.get("Contents", []))
            return sorted(found, key=lambda info: info.key)

        return self._retrying("LIST", prefix, call)

    def list_keys(self, prefix: str) -> list[str]:
        return [info.key for info in self.list_objects(prefix)]

    def list_prefixes(self, prefix: str) -> list[str]:
        """The "folders" directly under ``prefix`` (which should end in '/'), each ending in '/'."""

        def call() -> list[str]:
            found: list[str] = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                found.extend(item["Prefix"] for item in page.get("CommonPrefixes", []))
            return sorted(found)

        return self._retrying("LIST", prefix, call)

    def delete_keys(self, keys: list[str]) -> None:
        """Delete objects, in batches of the 1,000 that one S3 request allows."""
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]

            def call(batch: list[str] = batch) -> None:
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
                errors = response.get("Errors") or []
                if errors:
                    raise ClientError({"Error": errors[0], "ResponseMetadata": {"HTTPStatusCode": 500}}, "DeleteObjects")

            self._retrying("DELETE", batch[0], call)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list_keys(prefix)
        self.delete_keys(keys)
        return len(keys)

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload under ``prefix`` (their parts are billed until then); returns how many."""

        def call() -> int:
            aborted = 0
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
            return aborted

        return self._retrying("abort", prefix, call)
