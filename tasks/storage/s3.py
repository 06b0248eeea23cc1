"""Objects under an s3:// prefix as a `Store`, through aioboto3 (aiobotocore)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

import aioboto3
import aioboto3.s3.inject  # imported now, else by the first client, on the event loop
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tasks.errors import ConfigurationError
from tasks.storage.base import (
    BucketNotFound,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StoredObject,
    check_put_args,
    not_open,
)

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials


def _is_plain_http(url: str | None) -> bool:
    return url is not None and url.lower().startswith("http://")


def _endpoint_from_environment() -> str | None:
    """The S3 endpoint botocore will take from the environment when none is given (the AWS
    SDKs' `AWS_ENDPOINT_URL_S3`, then `AWS_ENDPOINT_URL`), the usual way to point a client
    at MinIO, SeaweedFS or moto."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").strip().lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class S3Store:
    """Objects under `s3://bucket/prefix/` through one aioboto3 client per `async with`.

    botocore's "standard" retry mode retries throttling (503 SlowDown, ...), 5xx and
    connection errors with backoff, up to `max_attempts` attempts in all; it does not retry
    409/412, which surface as `PreconditionFailed` for the caller's compare-and-swap loop.
    `page_size` is keys per ListObjectsV2 call (S3's maximum is 1000). botocore parses a
    whole page, timestamps included, in one uninterrupted step on the event loop, so a page
    smaller than the maximum keeps other coroutines' waits short.

    `max_pool_connections` bounds the requests in flight (more wait their turn): each request
    costs the event loop some botocore CPU, and a burst of them started at once (a batch's
    first downloads) would hold the loop for that long in one go. A modest bound still keeps
    up with the LLM stage, the pipeline's bottleneck.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        credentials: AwsCredentials | None = None,
        max_pool_connections: int = 16,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 5,
        page_size: int = 500,
    ) -> None:
        if not bucket:
            raise ConfigurationError("an s3:// location needs a bucket: s3://bucket/prefix")
        prefix = prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self.page_size = page_size
        self._credentials = credentials
        self._endpoint_url = endpoint_url or (
            credentials.aws_client_parameters.endpoint_url if credentials is not None else None
        )
        self._region_name = region_name or (credentials.region_name if credentials else None)
        self._max_pool_connections = max_pool_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self._endpoint_url!r})"

    async def __aenter__(self) -> S3Store:
        if self._client is not None:
            raise RuntimeError(f"{self!r} is already open")
        # A session per store, so credentials are resolved afresh for each. Making one reads
        # the AWS config and credentials files: blocking I/O, so in a thread.
        session_kwargs = await self._session_kwargs()
        session = await asyncio.to_thread(aioboto3.Session, **session_kwargs)
        config = Config(
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            # botocore's retries["max_attempts"] counts retries only; total_max_attempts
            # counts the first try too, which is what max_attempts means here.
            retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
            max_pool_connections=self._max_pool_connections,
        )
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=self._endpoint_url,
                region_name=self._region_name,
                config=config,
                # Plain HTTP (a local MinIO, SeaweedFS or moto) has no certificate to verify,
                # yet botocore would load the CA bundle for it, in CPU on the event loop at
                # each client's first request. The endpoint may be given here or, as usual,
                # in the environment.
                verify=False
                if _is_plain_http(self._endpoint_url or _endpoint_from_environment())
                else None,
            )
        )
        self._stack = stack
        # aiohttp counts time spent waiting for a pooled connection against the connect
        # timeout, so with more requests than connections the queued ones would fail as
        # timeouts. They queue here instead, where waiting has no deadline.
        self._requests = asyncio.Semaphore(self._max_pool_connections)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _session_kwargs(self) -> dict[str, Any]:
        creds = self._credentials
        if creds is None:
            return {}  # default chain: env vars, profile, instance role, ...
        if creds.assume_role_arn:
            # prefect-aws does the STS call (blocking); the temporary credentials it returns
            # are frozen here and not refreshed, so keep store sessions shorter than the role's
            # session duration.
            boto_session = await asyncio.to_thread(creds.get_boto3_session)
            frozen = boto_session.get_credentials().get_frozen_credentials()
            return {
                "aws_access_key_id": frozen.access_key,
                "aws_secret_access_key": frozen.secret_key,
                "aws_session_token": frozen.token,
                "region_name": boto_session.region_name,
            }
        secret = creds.aws_secret_access_key
        return {
            "aws_access_key_id": creds.aws_access_key_id,
            "aws_secret_access_key": secret.get_secret_value() if secret else None,
            "aws_session_token": creds.aws_session_token,
            "profile_name": creds.profile_name,
            "region_name": creds.region_name,
        }

    def _require_client(self) -> Any:
        if self._client is None:
            raise not_open(self)
        return self._client

    def _full_key(self, key: str) -> str:
        if not isinstance(key, str) or not key or "\0" in key:
            raise InvalidKey(f"invalid key {key!r}", key=key)
        return self.prefix + key

    async def exists(self) -> bool:
        """Whether anything is stored under the prefix (S3 has no folders: an empty prefix
        and a misspelt one look the same); the whole bucket counts when there is no prefix.
        `BucketNotFound` when the bucket does not exist."""
        client = self._require_client()
        try:
            async with self._requests:
                page = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1
                )
        except Exception as e:
            if (err := self._error(e, "list", "")) is None:
                raise
            raise err from e
        return not self.prefix or page.get("KeyCount", 0) > 0

    async def list(self, prefix: str = "", *, suffix: str | None = None) -> list[ObjectInfo]:
        client = self._require_client()
        suffix_lower = suffix.lower() if suffix else None
        found: list[ObjectInfo] = []
        paginator = client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix + prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        try:
            async for page in pages:
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    # "folder/" placeholder objects (console-made) are not objects to process.
                    if not key or key.endswith("/"):
                        continue
                    if suffix_lower and not key.lower().endswith(suffix_lower):
                        continue
                    found.append(ObjectInfo(key=key, etag=obj["ETag"], size=obj["Size"]))
        except Exception as e:
            if (err := self._error(e, "list", prefix)) is None:
                raise
            raise err from e
        found.sort(key=lambda info: info.key)
        return found

    async def get(self, key: str) -> StoredObject:
        client = self._require_client()
        full_key = self._full_key(key)
        try:
            async with self._requests:
                response = await client.get_object(Bucket=self.bucket, Key=full_key)
                async with response["Body"] as body:
                    data = await body.read()
        except Exception as e:
            if (err := self._error(e, "get", key)) is None:
                raise
            raise err from e
        return StoredObject(data=data, etag=response["ETag"])

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/octet-stream",
    ) -> str:
        client = self._require_client()
        check_put_args(key, if_match, if_none_match)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._full_key(key),
            "Body": bytes(data),
            "ContentType": content_type,
        }
        if if_match is not None:
            params["IfMatch"] = if_match
        if if_none_match:
            params["IfNoneMatch"] = "*"
        try:
            async with self._requests:
                response = await client.put_object(**params)
        except Exception as e:
            if (err := self._error(e, "put", key, conditional=if_match is not None)) is None:
                raise
            raise err from e
        return response["ETag"]

    def _error(
        self, e: Exception, op: str, key: str, *, conditional: bool = False
    ) -> StorageError | None:
        """Map a botocore/aiohttp/OS error to a StorageError; None for anything else."""
        where = f"{op} {key!r} in {self.url}"
        if isinstance(e, ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = e.response.get("Error", {}).get("Code", "")
            detail = f"{where}: HTTP {status} {code}"
            if status == 412 or code == "PreconditionFailed":
                return PreconditionFailed(detail, key=key, status=412)
            if status == 409 or code == "ConditionalRequestConflict":
                return PreconditionFailed(detail, key=key, status=409)
            if code == "NoSuchBucket":
                return BucketNotFound(
                    f"the bucket {self.bucket!r} does not exist (at "
                    f"{self._endpoint_url or 'AWS'}): check the name, or create it",
                    key=key,
                )
            if code == "NoSuchKey" or (status == 404 and code != "NoSuchBucket"):
                if conditional:
                    # S3 answers IfMatch on a missing key with 404; for a CAS loop that is the
                    # same situation as a changed ETag (LocalStore answers it the same way).
                    return PreconditionFailed(detail, key=key, status=412)
                return ObjectNotFound(detail, key=key)
            return StorageError(detail, key=key)
        if isinstance(e, (BotoCoreError, aiohttp.ClientError, OSError)):
            # OSError covers TimeoutError and connection errors raised while reading a body.
            return StorageError(f"{where}: {type(e).__name__}: {e}", key=key)
        return None
