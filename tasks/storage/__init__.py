"""One storage interface with conditional writes: a local folder and S3 (aioboto3).

Both backends offer the same compare-and-swap contract: `put(..., if_match=etag)` writes only
if the object still has that ETag, `put(..., if_none_match=True)` only if it does not exist;
otherwise `PreconditionFailed`. ETags are the S3 single-part form, the quoted hex md5 of the
bytes, on both backends, so the same bytes give the same ETag everywhere.

Stores are async context managers and must be opened before use:

    async with open_store("s3://bucket/invoices/") as store:
        for info in await store.list(suffix=".pdf"):
            obj = await store.get(info.key)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import aioboto3
import aioboto3.s3.inject  # noqa: F401  (else imported by the first client, on the event loop)
import aiohttp
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tasks.errors import ConfigurationError

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    etag: str


class StorageError(Exception):
    """A storage operation failed; `key` is the store-relative key, when there is one."""

    # Keyword arguments have defaults so the default Exception pickling (cls(*args) plus
    # __dict__) round-trips these errors through process pools.
    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ObjectNotFound(StorageError):
    pass


class PreconditionFailed(StorageError):
    """A conditional put lost: 412 (ETag changed / object exists / object missing) or 409
    (S3 ConditionalRequestConflict, a concurrent conditional write). Re-read and retry."""

    def __init__(self, message: str, *, key: str | None = None, status: int = 412) -> None:
        super().__init__(message, key=key)
        self.status = status


class InvalidKey(StorageError, ValueError):
    pass


class BucketNotFound(StorageError, ConfigurationError):
    """The bucket named by an s3:// location does not exist."""


@runtime_checkable
class Store(Protocol):
    url: str

    async def exists(self) -> bool: ...

    async def list(self, prefix: str = "", *, suffix: str | None = None) -> list[ObjectInfo]: ...

    async def get(self, key: str) -> StoredObject: ...

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/octet-stream",
    ) -> str: ...

    async def __aenter__(self) -> Store: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def etag_of(data: bytes) -> str:
    """The S3 ETag of a single-part object: the quoted hex md5 of its bytes."""
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _check_put_args(key: str, if_match: str | None, if_none_match: bool) -> None:
    if if_match is not None and if_none_match:
        raise ValueError(f"put({key!r}): if_match and if_none_match exclude each other")


def _not_open(store: object) -> RuntimeError:
    return RuntimeError(
        f"{type(store).__name__} is not open: use it inside `async with store:` "
        "(or `async with open_store(...) as store:`)"
    )


# --------------------------------------------------------------------------- local folder

# Names starting with this are the store's own (lock folder, temp files): keys may not use
# them and list() never returns them.
_RESERVED = ".~"
_LOCK_DIR = ".~locks"


def _check_creatable(folder: Path, role: str) -> None:
    """A folder that does not exist yet can be made: its nearest existing parent is a folder
    this process may write to."""
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigurationError(
            f"cannot create the {role} folder {folder}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"cannot create the {role} folder {folder}: no permission to write in {parent}")


class LocalStore:
    """A folder as an object store. Keys are '/'-separated paths relative to the root.

    Every put takes an exclusive flock on a per-key lock file (under `<root>/.~locks/`), so
    conditional puts are atomic across coroutines, threads and processes on this machine;
    data goes to a temp file in the target's folder and is renamed into place, so readers
    never see a partial object. flock is advisory and only as reliable as the filesystem
    (fine on local disks; do not rely on it over NFS).
    """

    def __init__(self, root: str | Path, *, create: bool = True, role: str = "store") -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise ConfigurationError(f"the {role} {self.url} is a file, not a folder: name a folder")
        if not self.root.is_dir():
            if not create:
                raise ConfigurationError(
                    f"the {role} folder {self.url} does not exist: check the path (a typo?)"
                )
            _check_creatable(self.root, role)  # created by the first write, not before
        self._open = False

    async def __aenter__(self) -> LocalStore:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False

    def __repr__(self) -> str:
        return f"LocalStore({self.url!r})"

    # -- keys

    def _path(self, key: str) -> Path:
        if not isinstance(key, str) or not key:
            raise InvalidKey(f"invalid key {key!r}: empty", key=key)
        if "\\" in key or "\0" in key:
            raise InvalidKey(f"invalid key {key!r}: backslash or NUL", key=key)
        if key.startswith("/"):
            raise InvalidKey(f"invalid key {key!r}: absolute", key=key)
        parts = key.split("/")
        for part in parts:
            if part in ("", ".", ".."):
                raise InvalidKey(f"invalid key {key!r}: empty, '.' or '..' component", key=key)
            if part.startswith(_RESERVED):
                raise InvalidKey(f"invalid key {key!r}: names starting {_RESERVED!r} are reserved", key=key)
        return self.root.joinpath(*parts)

    def _check_inside(self, key: str, path: Path) -> None:
        """Catches symlinks inside the root that point out of it. Blocking (an lstat per path
        component: ~1 ms a key on the event loop, measured), so it runs in the worker thread."""
        if not path.resolve().is_relative_to(self.root):
            raise InvalidKey(f"invalid key {key!r}: resolves outside the store root", key=key)

    def _lock_path(self, key: str) -> Path:
        # One lock file per key, named by hash: flat, bounded name length, no folder races.
        return self.root / _LOCK_DIR / (hashlib.sha256(key.encode()).hexdigest() + ".lock")

    # -- operations

    async def exists(self) -> bool:
        """Whether the folder is there."""
        return await asyncio.to_thread(self.root.is_dir)

    async def list(self, prefix: str = "", *, suffix: str | None = None) -> list[ObjectInfo]:
        if not self._open:
            raise _not_open(self)
        return await asyncio.to_thread(self._list_sync, prefix, suffix)

    async def get(self, key: str) -> StoredObject:
        if not self._open:
            raise _not_open(self)
        path = self._path(key)
        return await asyncio.to_thread(self._get_sync, key, path)

    async def put(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str = "application/octet-stream",  # not stored locally
    ) -> str:
        if not self._open:
            raise _not_open(self)
        _check_put_args(key, if_match, if_none_match)
        path = self._path(key)
        return await asyncio.to_thread(self._put_sync, key, path, bytes(data), if_match, if_none_match)

    # -- blocking parts, run in worker threads

    def _list_sync(self, prefix: str, suffix: str | None) -> list[ObjectInfo]:
        # Walk only the deepest folder the prefix fixes, then filter by plain string prefix
        # (S3 semantics: "inv" matches "invoices/a.pdf" and "inv.pdf").
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(folder) if folder else self.root
        self._check_inside(folder, start)
        suffix_lower = suffix.lower() if suffix else None
        found: list[ObjectInfo] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(_RESERVED)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_RESERVED):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not key.startswith(prefix):
                    continue
                if suffix_lower and not key.lower().endswith(suffix_lower):
                    continue
                path = Path(dirpath, name)
                if not path.resolve().is_relative_to(self.root) or not path.is_file():
                    continue
                try:
                    data = path.read_bytes()
                except FileNotFoundError:  # removed while listing
                    continue
                found.append(ObjectInfo(key=key, etag=etag_of(data), size=len(data)))
        found.sort(key=lambda info: info.key)
        return found

    def _get_sync(self, key: str, path: Path) -> StoredObject:
        self._check_inside(key, path)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"no such object: {key!r} in {self.url}", key=key) from None
        except OSError as e:
            raise StorageError(f"cannot read {key!r} in {self.url}: {e}", key=key) from e
        return StoredObject(data=data, etag=etag_of(data))

    def _put_sync(
        self, key: str, path: Path, data: bytes, if_match: str | None, if_none_match: bool
    ) -> str:
        self._check_inside(key, path)
        lock_path = self._lock_path(key)
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "a+b") as lock_file:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)  # released when the file closes
                if if_match is not None or if_none_match:
                    current = self._current_etag(path)
                    if if_none_match and current is not None:
                        raise PreconditionFailed(
                            f"{key!r} already exists in {self.url}", key=key, status=412
                        )
                    if if_match is not None and current != if_match:
                        state = "missing" if current is None else f"at ETag {current}"
                        raise PreconditionFailed(
                            f"{key!r} is {state}, not {if_match}", key=key, status=412
                        )
                self._write_atomically(path, data)
        except StorageError:
            raise
        except OSError as e:
            raise StorageError(f"cannot write {key!r} in {self.url}: {e}", key=key) from e
        return etag_of(data)

    @staticmethod
    def _current_etag(path: Path) -> str | None:
        try:
            return etag_of(path.read_bytes())
        except FileNotFoundError:
            return None

    @staticmethod
    def _write_atomically(path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{_RESERVED}tmp.{path.name}.{secrets.token_hex(6)}")
        # os.open with 0o666 (not mkstemp's 0o600) so the object gets the usual umask mode.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


# --------------------------------------------------------------------------- S3


_DATA_LOADER: Any = None
_DATA_LOADER_LOCK = threading.Lock()


def _s3_data_loader() -> Any:
    """botocore's data loader, shared by every client made here, with everything an S3
    client needs loaded (service model, endpoint rules, partitions). Loading them is 0.1-0.2
    s of CPU (mostly JSON), which is why callers run this in a thread: done on the event loop
    it was the run's longest stall. The loader caches what it loaded, so this happens once
    per process."""
    global _DATA_LOADER
    with _DATA_LOADER_LOCK:
        if _DATA_LOADER is None:
            import botocore.session

            session = botocore.session.Session()
            # A throwaway client loads exactly what a real one needs; it makes no request.
            # Should it fail (a broken ~/.aws/config, say), the real client reports why.
            loader = session.get_component("data_loader")
            with contextlib.suppress(Exception):
                client = session.create_client("s3", region_name="us-east-1",
                                               aws_access_key_id="load-models",
                                               aws_secret_access_key="load-models")
                _drop_unread_endpoint_params(loader)
                # The paginator model too: a client loads it at its first listing, and the
                # lookup scans botocore's data folders: 10-16 ms of CPU on the event loop, once.
                client.can_paginate("list_objects_v2")
            _DATA_LOADER = loader
    return _DATA_LOADER


def _drop_unread_endpoint_params(loader: Any) -> None:
    """Keep `Key`, `Prefix` and `CopySource` out of S3's endpoint resolution: botocore feeds
    them to its endpoint rules (a parameter of each request, marked `contextParam` in the
    service model) although no rule reads them, and so its cache of resolved endpoints,
    keyed by those parameters, missed for every new key: the rules were evaluated afresh,
    1-1.5 ms of CPU on the event loop, for every request (9% of the flow's loop, measured).
    Any parameter a rule does read (`ref`) is left alone, so a botocore whose rules start
    reading one keeps it. Edits the loader's cached copy of the model, used by every client
    made here."""
    rules = json.dumps(loader.load_service_model("s3", "endpoint-rule-set-1")["rules"])
    read = set(re.findall(r'"ref": "([^"]+)"', rules))
    for shape in loader.load_service_model("s3", "service-2")["shapes"].values():
        for member in shape.get("members", {}).values():
            name = member.get("contextParam", {}).get("name")
            if name is not None and name not in read:
                del member["contextParam"]


def _botocore_session(data_loader: Any) -> Any:
    """A new botocore session (credentials resolved afresh) on the shared data loader."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.register_component("data_loader", data_loader)
    # Timestamps in responses stay strings: nothing here reads them, and parsing them with
    # dateutil was 60% of the CPU of listing 1000 keys (one page, one uninterrupted step on
    # the event loop: 120-200 ms, 45-70 ms without).
    session.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=str
    )
    return session


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
    `page_size` is keys per ListObjectsV2 call (S3's maximum is 1000): botocore parses a
    page in one step on the event loop, 50-70 ms for 1000 keys here, so pages are half that.

    `max_pool_connections` bounds the requests in flight (more wait their turn). Each request
    costs the event loop 2-4 ms of botocore CPU; 100 started at once (a batch's first
    downloads) held the loop for ~0.4 s, while 16 at a time keep up with far more invoices
    per second than the LLM stage does.
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
        loader = await asyncio.to_thread(_s3_data_loader)
        session = aioboto3.Session(botocore_session=_botocore_session(loader),
                                   **await self._session_kwargs())
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
                "s3", endpoint_url=self._endpoint_url, region_name=self._region_name,
                config=config,
                # Plain HTTP (a local MinIO, SeaweedFS or moto) has no certificate to verify,
                # yet botocore would load the CA bundle for it: 30-100 ms of CPU on the event
                # loop at each client's first request. The endpoint may be given here or, as
                # usual, in the environment.
                verify=False if _is_plain_http(self._endpoint_url or _endpoint_from_environment())
                else None,
            )
        )
        self._stack = stack
        # aiohttp counts time spent waiting for a pooled connection against the connect
        # timeout: with more requests than connections (1000 invoices in flight, 100
        # connections) queued requests failed as timeouts. They queue here instead.
        self._requests = asyncio.Semaphore(self._max_pool_connections)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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
            raise _not_open(self)
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
        _check_put_args(key, if_match, if_none_match)
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
                    f"{self._endpoint_url or 'AWS'}): check the name, or create it", key=key,
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


# --------------------------------------------------------------------------- routing


def open_store(
    location: str,
    *,
    endpoint_url: str | None = None,
    region_name: str | None = None,
    credentials: AwsCredentials | None = None,
    create: bool = True,
    role: str = "store",
) -> Store:
    """`s3://bucket/some/prefix` -> S3Store; anything else is a local folder path, created
    unless `create` is False (a source), when a missing folder is a `ConfigurationError`.
    `role` names the location in error messages ("source", "output")."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://") :].partition("/")
        return S3Store(
            bucket, prefix, endpoint_url=endpoint_url, region_name=region_name, credentials=credentials
        )
    if "://" in location:
        raise ConfigurationError(
            f"unsupported {role} location {location!r}: use s3://bucket/prefix or a folder path"
        )
    if not location.strip():
        raise ConfigurationError(f"an empty {role} location: use s3://bucket/prefix or a folder")
    return LocalStore(location, create=create, role=role)
