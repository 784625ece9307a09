"""Storage on an S3-compatible bucket (AWS, MinIO, R2, ...), through boto3.

Paths are relative to ``prefix`` inside the bucket. A single ``put_object``
replaces an object atomically for readers, so ``write_bytes`` needs no temp
object. Listing remembers each object's size and ETag so ``stamp`` costs no
extra request for listed files. The client is created lazily and dropped when
pickled, so a storage can be handed to data-loader worker processes.
"""

from __future__ import annotations

import threading
from typing import Iterable

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


class S3Storage:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_pool_connections: int = 128,
    ):
        self.bucket = bucket
        self.prefix = (prefix or "").strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.access_key = access_key or None
        self.secret_key = secret_key or None
        self.max_pool_connections = max_pool_connections
        self.root = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = None
        self._lock = threading.Lock()
        self._listed_stamps: dict[str, str] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                config = Config(max_pool_connections=self.max_pool_connections,
                                retries={"max_attempts": 5, "mode": "standard"})
                self._client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    region_name=self.region,
                    aws_access_key_id=self.access_key,
                    aws_secret_access_key=self.secret_key,
                    config=config,
                )
            return self._client

    def _key(self, path: str) -> str:
        path = path.lstrip("/")
        if not self.prefix:
            return path
        return f"{self.prefix}/{path}" if path else self.prefix

    def _relative(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def list_files(self, prefix: str = "", extensions: Iterable[str] | None = None) -> list[str]:
        wanted = {e.lower().lstrip(".") for e in extensions} if extensions else None
        search = self._key(prefix)
        if search and not search.endswith("/"):
            search += "/"
        found: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=search):
            for item in page.get("Contents", []):
                path = self._relative(item["Key"])
                if not path or path.endswith("/") or any(part.startswith(".") for part in path.split("/")):
                    continue
                if wanted is not None and path.rsplit(".", 1)[-1].lower() not in wanted:
                    continue
                self._listed_stamps[path] = _stamp_text(item["Size"], item.get("ETag", ""))
                found.append(path)
        return sorted(found)

    def exists(self, path: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(path))
            return True
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise

    def read_bytes(self, path: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"{self.describe(path)} does not exist") from exc
            raise
        with response["Body"] as body:
            return body.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        response = self.client.put_object(Bucket=self.bucket, Key=self._key(path), Body=data)
        self._listed_stamps[path] = _stamp_text(len(data), response.get("ETag", ""))

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(path))
        self._listed_stamps.pop(path, None)

    def stamp(self, path: str) -> str:
        known = self._listed_stamps.get(path)
        if known is not None:
            return known
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(path))
        except ClientError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"{self.describe(path)} does not exist") from exc
            raise
        return _stamp_text(head["ContentLength"], head.get("ETag", ""))

    def describe(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}"


def _stamp_text(size: int, etag: str) -> str:
    return f"{size}-{etag.strip(chr(34))}"


def _is_missing(exc) -> bool:
    error = getattr(exc, "response", {}).get("Error", {})
    return str(error.get("Code", "")) in _MISSING_CODES
