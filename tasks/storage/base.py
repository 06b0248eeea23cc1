"""The storage interface every backend implements: the `Store` protocol, the objects it
returns, its exception tree and the ETag both backends compute."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tasks.errors import ConfigurationError


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

    async def __aexit__(self, *exc_info: object) -> None: ...


def etag_of(data: bytes) -> str:
    """The S3 ETag of a single-part object: the quoted hex md5 of its bytes."""
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


# Helpers shared by the backends (not part of the package's public names).


def check_put_args(key: str, if_match: str | None, if_none_match: bool) -> None:
    if if_match is not None and if_none_match:
        raise ValueError(f"put({key!r}): if_match and if_none_match exclude each other")


def not_open(store: object) -> RuntimeError:
    """The error for using a store outside its `async with`."""
    return RuntimeError(
        f"{type(store).__name__} is not open: use it inside `async with store:` "
        "(or `async with open_store(...) as store:`)"
    )
