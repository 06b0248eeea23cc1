"""One storage interface with conditional writes: a local folder and S3 (aioboto3).

Both backends offer the same compare-and-swap contract: `put(..., if_match=etag)` writes only
if the object still has that ETag, `put(..., if_none_match=True)` only if it does not exist;
otherwise `PreconditionFailed`. ETags are the S3 single-part form, the quoted hex md5 of the
bytes, on both backends, so the same bytes give the same ETag everywhere.

Stores are async context managers and must be opened before use:

    async with open_store("s3://bucket/invoices/") as store:
        for info in await store.list(suffix=".pdf"):
            obj = await store.get(info.key)

The interface (the `Store` protocol, the objects and errors it deals in) is in
`tasks.storage.base`, the backends in `tasks.storage.local` and `tasks.storage.s3`; every
public name is importable from `tasks.storage` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tasks.errors import ConfigurationError
from tasks.storage.base import (
    BucketNotFound,
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    Store,
    StoredObject,
    etag_of,
)
from tasks.storage.local import LocalStore
from tasks.storage.s3 import S3Store

if TYPE_CHECKING:
    from prefect_aws import AwsCredentials

__all__ = [
    "BucketNotFound",
    "InvalidKey",
    "LocalStore",
    "ObjectInfo",
    "ObjectNotFound",
    "PreconditionFailed",
    "S3Store",
    "StorageError",
    "Store",
    "StoredObject",
    "etag_of",
    "open_store",
]


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
            bucket,
            prefix,
            endpoint_url=endpoint_url,
            region_name=region_name,
            credentials=credentials,
        )
    if "://" in location:
        raise ConfigurationError(
            f"unsupported {role} location {location!r}: use s3://bucket/prefix or a folder path"
        )
    if not location.strip():
        raise ConfigurationError(f"an empty {role} location: use s3://bucket/prefix or a folder")
    return LocalStore(location, create=create, role=role)
