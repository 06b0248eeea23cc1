"""The manifest in a `Store`: read it, and commit outcomes to it by compare-and-swap.

Each write is conditional on the ETag that was read; on 412/409 the manifest is re-read and
the outcomes merged again, so a writer that bypasses the manifest lock cannot make us lose
its update or ours.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from tasks.manifest.model import (
    MANIFEST_KEY,
    InvoiceOutcome,
    Manifest,
    apply_outcomes,
    bind_source,
    parse_manifest,
    restore_known,
    utcnow,
    went_back,
)
from tasks.storage import ObjectNotFound, PreconditionFailed, Store

logger = logging.getLogger(__name__)


async def read_manifest(store: Store, key: str = MANIFEST_KEY) -> tuple[Manifest, str | None]:
    """The manifest and its ETag; an empty manifest and None when it does not exist yet.
    Raises `ManifestUnreadable` when the object there is not a manifest this version reads."""
    try:
        stored = await store.get(key)
    except ObjectNotFound:
        return Manifest(), None
    return parse_manifest(stored.data, manifest_location(store, key)), stored.etag


def manifest_location(store: Store, key: str = MANIFEST_KEY) -> str:
    return f"{store.url.rstrip('/')}/{key}"


class ManifestConflictError(RuntimeError):
    """Compare-and-swap kept losing to other writers past the retry bound."""


@dataclass
class CommitResult:
    version: int
    entries: int
    attempts: int
    written: bool
    # The manifest as this commit left it and its ETag: the next commit's starting point.
    snapshot: tuple[Manifest, str | None] | None = None


async def commit_outcomes(
    store: Store,
    outcomes: list[InvoiceOutcome],
    *,
    key: str = MANIFEST_KEY,
    base: tuple[Manifest, str | None] | None = None,
    source: str | None = None,
    max_attempts: int = 10,
    backoff_base: float = 0.05,
    backoff_max: float = 2.0,
) -> CommitResult:
    """Record `outcomes` with read, merge, conditional write; re-read and retry on conflicts.

    `base` is the newest manifest this writer knows (a previous commit's `snapshot`, or what
    the run read): it stands in for the first read, since a writer holding the manifest lock
    is usually the only one writing (the write is still conditional on its ETag). It is also
    what the writer must not lose: when a re-read finds the manifest gone, at a lower
    `version` (replaced by an older copy), or lacking entries of `base`, every entry of
    `base` it lacks or has older is put back, with a warning (`restore_known`). `source`
    binds the output to that source (`SourceMismatch` when it records another)."""
    where = manifest_location(store, key)
    for attempt in range(1, max_attempts + 1):
        if attempt == 1 and base is not None:
            manifest, etag = base
        else:
            manifest, etag = await read_manifest(store, key)
            if base is not None:
                manifest = restore_known(manifest, etag, base[0], where)
        stored = manifest
        manifest = bind_source(manifest, source, where)
        merged = apply_outcomes(manifest, outcomes)
        if etag is not None and merged == stored:
            return CommitResult(
                manifest.version,
                len(manifest.entries),
                attempt,
                written=False,
                snapshot=(manifest, etag),
            )
        merged.version = manifest.version + 1
        merged.updated_at = utcnow()
        data = merged.model_dump_json().encode()
        try:
            # Created only if still absent, or replaced only if still what was read.
            new_etag = await store.put(
                key,
                data,
                if_match=etag,
                if_none_match=etag is None,
                content_type="application/json",
            )
        except PreconditionFailed as exc:
            delay = random.uniform(0, min(backoff_max, backoff_base * 2**attempt))
            logger.info(
                "manifest changed under us (HTTP %s), retry %d/%d in %.2fs",
                exc.status,
                attempt,
                max_attempts,
                delay,
            )
            await asyncio.sleep(delay)
            continue
        return CommitResult(
            merged.version, len(merged.entries), attempt, written=True, snapshot=(merged, new_etag)
        )
    raise ManifestConflictError(
        f"manifest {key} was changed by other writers on each of {max_attempts} attempts; "
        f"{len(outcomes)} outcomes not recorded in this write"
    )


@dataclass
class ManifestTarget:
    """Where one run records its outcomes, and the newest manifest it has seen there.

    Shared by the run's reads (planning, claims) and every lock session of its writer, so
    that a manifest deleted or rolled back between two sessions is still recognised."""

    store: Store
    source: str | None = None
    key: str = MANIFEST_KEY
    newest: tuple[Manifest, str | None] | None = None

    @property
    def location(self) -> str:
        return manifest_location(self.store, self.key)

    async def read(self) -> Manifest:
        """The manifest as stored now; `SourceMismatch` if it records another source."""
        manifest, etag = await read_manifest(self.store, self.key)
        bind_source(manifest, self.source, self.location)
        if self.newest is None or not went_back(manifest, etag, self.newest[0]):
            self.newest = (manifest, etag)
        return manifest

    async def commit(self, outcomes: list[InvoiceOutcome]) -> CommitResult:
        result = await commit_outcomes(
            self.store, outcomes, key=self.key, base=self.newest, source=self.source
        )
        self.newest = result.snapshot
        return result
