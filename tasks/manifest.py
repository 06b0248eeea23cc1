"""The shared manifest: one JSON object recording every invoice's outcome.

Three layers keep updates from being lost (DESIGN.md, "The manifest protocol"):

1. every write runs inside the `update_manifest` task, tag `manifest`, limit 1 (tasks/limits.py
   makes sure the limit exists before the first write);
2. each write is a compare-and-swap on the object's ETag, re-read and re-applied on 412/409,
   so a writer that bypasses Prefect cannot make us lose its update or ours;
3. `ManifestWriter` group-commits: outcomes that arrive while a write is in flight go out
   together in the next one, so lock acquisitions grow with batches, not invoices.

Merging is idempotent and keyed by invoice key: applying a batch twice changes nothing, and
a `done` entry for the same content is never downgraded.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.storage import ObjectNotFound, PreconditionFailed, Store

MANIFEST_KEY = "manifest.json"
MANIFEST_TAG = "manifest"

Status = Literal["processing", "done", "needs_review", "failed"]
FINAL_STATUSES = ("done", "needs_review", "failed")

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class InvoiceOutcome(BaseModel):
    """What one attempt at one invoice ended in; the unit the manifest records."""

    key: str
    etag: str
    status: Status
    sha256: str | None = None
    result_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    reasons: list[str] = Field(default_factory=list)
    attempt: int = 1
    flow_run_id: str | None = None
    extractor: str | None = None
    finished_at: datetime = Field(default_factory=utcnow)
    lease_until: datetime | None = None


class ManifestEntry(BaseModel):
    status: Status
    etag: str
    sha256: str | None = None
    result_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    reasons: list[str] = Field(default_factory=list)
    attempts: int = 1
    flow_run_id: str | None = None
    extractor: str | None = None
    first_seen_at: datetime
    updated_at: datetime
    lease_until: datetime | None = None


class Manifest(BaseModel):
    # Bumped on every write: identical entries must still produce new bytes (and a new ETag).
    version: int = 0
    updated_at: datetime | None = None
    entries: dict[str, ManifestEntry] = Field(default_factory=dict)

    def is_done(self, key: str, etag: str) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.status == "done" and entry.etag == etag


def supersedes(outcome: InvoiceOutcome, existing: ManifestEntry) -> bool:
    """Whether `outcome` replaces `existing`: newer wins, except that for the same content
    `done` is never downgraded, and a late `done` still beats a newer non-`done` report."""
    if outcome.etag == existing.etag:
        if existing.status == "done":
            return outcome.status == "done" and outcome.finished_at >= existing.updated_at
        if outcome.status == "done":
            return True
    return outcome.finished_at >= existing.updated_at


def merge_entry(existing: ManifestEntry | None, outcome: InvoiceOutcome) -> ManifestEntry:
    """The entry after recording `outcome`; applying the same outcome twice changes nothing."""
    fields = outcome.model_dump(exclude={"key", "attempt", "finished_at"})
    if existing is None:
        return ManifestEntry(
            **fields, attempts=outcome.attempt, first_seen_at=outcome.finished_at,
            updated_at=outcome.finished_at,
        )
    same_content = existing.etag == outcome.etag
    attempts = max(existing.attempts, outcome.attempt) if same_content else outcome.attempt
    if not supersedes(outcome, existing):
        return existing.model_copy(update={"attempts": attempts}) if same_content else existing
    first_seen = existing.first_seen_at if same_content else outcome.finished_at
    return ManifestEntry(
        **fields, attempts=attempts, first_seen_at=first_seen, updated_at=outcome.finished_at
    )


def apply_outcomes(manifest: Manifest, outcomes: Iterable[InvoiceOutcome]) -> Manifest:
    """A new manifest with every outcome merged in (the input is left untouched)."""
    entries = dict(manifest.entries)
    for outcome in outcomes:
        entries[outcome.key] = merge_entry(entries.get(outcome.key), outcome)
    return Manifest(version=manifest.version, updated_at=manifest.updated_at, entries=entries)


async def read_manifest(store: Store, key: str = MANIFEST_KEY) -> tuple[Manifest, str | None]:
    """The manifest and its ETag; an empty manifest and None when it does not exist yet."""
    try:
        stored = await store.get(key)
    except ObjectNotFound:
        return Manifest(), None
    return Manifest.model_validate_json(stored.data), stored.etag


class ManifestConflictError(RuntimeError):
    """Compare-and-swap kept losing to other writers past the retry bound."""


@dataclass
class CommitResult:
    version: int
    entries: int
    attempts: int
    written: bool


async def commit_outcomes(
    store: Store,
    outcomes: list[InvoiceOutcome],
    *,
    key: str = MANIFEST_KEY,
    max_attempts: int = 10,
    backoff_base: float = 0.05,
    backoff_max: float = 2.0,
) -> CommitResult:
    """Record `outcomes` with read, merge, conditional write; re-read and retry on conflicts."""
    for attempt in range(1, max_attempts + 1):
        manifest, etag = await read_manifest(store, key)
        merged = apply_outcomes(manifest, outcomes)
        if etag is not None and merged.entries == manifest.entries:
            return CommitResult(manifest.version, len(manifest.entries), attempt, written=False)
        merged.version = manifest.version + 1
        merged.updated_at = utcnow()
        data = merged.model_dump_json().encode()
        try:
            if etag is None:
                await store.put(key, data, if_none_match=True, content_type="application/json")
            else:
                await store.put(key, data, if_match=etag, content_type="application/json")
        except PreconditionFailed as exc:
            delay = random.uniform(0, min(backoff_max, backoff_base * 2**attempt))
            logger.info(
                "manifest changed under us (HTTP %s), retry %d/%d in %.2fs",
                exc.status, attempt, max_attempts, delay,
            )
            await asyncio.sleep(delay)
            continue
        return CommitResult(merged.version, len(merged.entries), attempt, written=True)
    raise ManifestConflictError(
        f"manifest {key} was changed by other writers on each of {max_attempts} attempts; "
        f"{len(outcomes)} outcomes not recorded in this write"
    )


@task(
    name="update-manifest",
    tags=[MANIFEST_TAG],
    retries=2,
    retry_delay_seconds=[1, 5],
    timeout_seconds=300,
    cache_policy=NO_CACHE,
)
async def update_manifest(store: Store, outcomes: list[InvoiceOutcome]) -> CommitResult:
    """The only place the manifest is written: under the `manifest` lock, by compare-and-swap."""
    return await commit_outcomes(store, outcomes)


class ManifestWriteError(RuntimeError):
    def __init__(self, unrecorded: list[InvoiceOutcome], cause: BaseException) -> None:
        super().__init__(
            f"the manifest could not be written: {len(unrecorded)} outcomes are not recorded "
            f"({cause!r})"
        )
        self.unrecorded = unrecorded


class ManifestWriter:
    """Group commit: one writer per flow run, each write carries everything that queued up.

    `submit` never blocks the invoice that reports. The writer keeps at most one write in
    flight; what arrives meanwhile becomes the next batch. A failed write puts its batch back
    and is retried with backoff; after `max_failures` consecutive failures the writer stops
    and `close()` raises `ManifestWriteError` naming what was not recorded.
    """

    def __init__(
        self,
        commit: Callable[[list[InvoiceOutcome]], Awaitable[object]],
        *,
        max_failures: int = 3,
        retry_delay: float = 1.0,
    ) -> None:
        self._commit = commit
        self._pending: list[InvoiceOutcome] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self.max_failures = max_failures
        self.retry_delay = retry_delay
        self.batches: list[int] = []
        self.recorded = 0

    def submit(self, outcome: InvoiceOutcome) -> None:
        if self._error is not None:
            raise ManifestWriteError([outcome], self._error)
        self._pending.append(outcome)
        self._wakeup.set()

    async def __aenter__(self) -> ManifestWriter:
        self._task = asyncio.create_task(self._run(), name="manifest-writer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Flush everything submitted so far, then stop; raises if anything is unrecorded."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._error is not None:
            raise ManifestWriteError(self._pending, self._error)

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch, self._pending = self._pending, []
            try:
                await self._commit(batch)
            except Exception as exc:  # recorded below and re-raised by close(): never silent
                failures += 1
                self._pending = batch + self._pending
                logger.warning(
                    "manifest write of %d outcomes failed (%d/%d): %r",
                    len(batch), failures, self.max_failures, exc,
                )
                if failures >= self.max_failures:
                    self._error = exc
                    return
                await asyncio.sleep(self.retry_delay * failures)
                continue
            failures = 0
            self.batches.append(len(batch))
            self.recorded += len(batch)
