"""A local folder as a `Store`: conditional writes under a per-key flock, atomic renames."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import hashlib
import os
import secrets
from pathlib import Path

from tasks.errors import ConfigurationError
from tasks.storage.base import (
    InvalidKey,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    StoredObject,
    check_put_args,
    etag_of,
    not_open,
)

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
            f"cannot create the {role} folder {folder}: {parent} is a file, not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"cannot create the {role} folder {folder}: no permission to write in {parent}"
        )


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
            raise ConfigurationError(
                f"the {role} {self.url} is a file, not a folder: name a folder"
            )
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

    async def __aexit__(self, *exc_info: object) -> None:
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
                raise InvalidKey(
                    f"invalid key {key!r}: names starting {_RESERVED!r} are reserved", key=key
                )
        return self.root.joinpath(*parts)

    def _check_inside(self, key: str, path: Path) -> None:
        """Catches symlinks inside the root that point out of it. Blocking (an lstat per path
        component), so it runs in the worker thread, never on the event loop."""
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
            raise not_open(self)
        return await asyncio.to_thread(self._list_sync, prefix, suffix)

    async def get(self, key: str) -> StoredObject:
        if not self._open:
            raise not_open(self)
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
            raise not_open(self)
        check_put_args(key, if_match, if_none_match)
        path = self._path(key)
        return await asyncio.to_thread(
            self._put_sync, key, path, bytes(data), if_match, if_none_match
        )

    # -- blocking parts, run in worker threads

    def _list_sync(self, prefix: str, suffix: str | None) -> builtins.list[ObjectInfo]:
        # Walk only the deepest folder the prefix fixes, then filter by plain string prefix
        # (S3 semantics: "inv" matches "invoices/a.pdf" and "inv.pdf").
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(folder) if folder else self.root
        self._check_inside(folder, start)
        suffix_lower = suffix.lower() if suffix else None
        found: builtins.list[ObjectInfo] = []
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
