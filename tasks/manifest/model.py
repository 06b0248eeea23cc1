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

The manifest never drops what it holds: it names its format (`format`, `format_version`) and
anything else is refused rather than overwritten; fields this version does not know are kept;
an output records one source (`source`), so two sources with the same file names never
overwrite each other's entries; and a writer that finds the manifest deleted or rolled back to
an older copy (its `version` went backwards) puts back everything it knew before writing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import ConfigurationError
from tasks.storage import ObjectNotFound, PreconditionFailed, Store

MANIFEST_KEY = "manifest.json"
# Every manifest write runs in a task run tagged `manifest:<output>`, whose tag limit of one
# slot is that output's lock: runs on different outputs never wait for each other.
MANIFEST_TAG = "manifest"
MANIFEST_FORMAT = "invoice-pipeline/manifest"
MANIFEST_FORMAT_VERSION = 1

# `released`: a run claimed the invoice and gave the claim back unfinished (it was stopped);
# the next run processes it like a new one.
Status = Literal["processing", "released", "done", "needs_review", "failed"]
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
    # A claim only: the flow run, ended in Prefect, whose live-looking claim it replaces.
    takes_over: str | None = None


class ManifestEntry(BaseModel):
    # Fields a newer version (or a person) added are kept through every rewrite.
    model_config = ConfigDict(extra="allow")

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
    model_config = ConfigDict(extra="allow")

    format: Literal["invoice-pipeline/manifest"] = MANIFEST_FORMAT
    format_version: int = MANIFEST_FORMAT_VERSION
    # The source whose invoices this output records; set by the first write.
    source: str | None = None
    # Bumped on every write: identical entries must still produce new bytes (and a new ETag);
    # it never goes back, so a manifest replaced by an older copy is recognised.
    version: int = 0
    updated_at: datetime | None = None
    entries: dict[str, ManifestEntry] = Field(default_factory=dict)


class ManifestUnreadable(ConfigurationError):
    """The object at the manifest's place is not a manifest this version can use."""


class SourceMismatch(ConfigurationError):
    """The output already records another source's invoices."""


# What a manifest written before the format was marked has: nothing else.
_UNMARKED_FIELDS = {"version", "updated_at", "entries"}


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The manifest in `data`, or `ManifestUnreadable` saying what is wrong and what to do.

    An object that does not name this format is refused, not read as empty, so another
    tool's `manifest.json` is never overwritten. One written by this project before the
    format was marked (exactly `version`, `updated_at`, `entries`) is read and marked on
    the next write."""
    keep_out = (f"use another output, or move {where} away (the next run then starts a new "
                "manifest and processes every invoice again)")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestUnreadable(f"{where} is not JSON ({exc}): {keep_out}") from None
    if not isinstance(raw, dict):
        raise ManifestUnreadable(
            f"{where} is JSON but not an invoice-pipeline manifest (a {type(raw).__name__}, "
            f"not an object): {keep_out}")
    marked = raw.get("format")
    if marked is None:
        if not ({"version", "entries"} <= raw.keys() <= _UNMARKED_FIELDS):
            raise ManifestUnreadable(
                f"{where} is not an invoice-pipeline manifest (no \"format\": "
                f"\"{MANIFEST_FORMAT}\" in it; it has {_field_list(raw)}): {keep_out}")
    elif marked != MANIFEST_FORMAT:
        raise ManifestUnreadable(
            f"{where} is a {marked!r} document, not an invoice-pipeline manifest: {keep_out}")
    elif not isinstance(raw.get("format_version"), int) or raw["format_version"] > MANIFEST_FORMAT_VERSION:
        raise ManifestUnreadable(
            f"{where} has manifest format version {raw.get('format_version')!r}; this version "
            f"of invoice-pipeline reads up to {MANIFEST_FORMAT_VERSION}: upgrade it")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()[:3]
        )
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        raise ManifestUnreadable(
            f"{where} is a damaged invoice-pipeline manifest ({problems}{more}): restore it "
            f"from a backup or an earlier object version, or {keep_out}") from None


def _field_list(raw: dict[str, Any]) -> str:
    names = sorted(raw)
    shown = ", ".join(repr(name) for name in names[:5])
    return (f"fields {shown}" + (", ..." if len(names) > 5 else "")) if names else "no fields"


def supersedes(outcome: InvoiceOutcome, existing: ManifestEntry) -> bool:
    """Whether `outcome` replaces `existing`: newer wins, except that for the same content
    `done` is never downgraded, and a late `done` still beats a newer non-`done` report."""
    if outcome.status == "processing":
        return claim_granted(outcome, existing)
    if outcome.status == "released":
        return release_granted(outcome, existing)
    if outcome.etag == existing.etag:
        if existing.status == "done":
            return outcome.status == "done" and outcome.finished_at >= existing.updated_at
        if outcome.status == "done":
            return True
    return outcome.finished_at >= existing.updated_at


def claim_granted(claim: InvoiceOutcome, existing: ManifestEntry) -> bool:
    """Whether a run may mark an invoice `processing` (claim it, or renew its claim).

    Not over `done` for the same content, not over another run's claim whose lease is still
    running, and not over the claiming run's own final outcome (a renewal that arrives late).
    """
    if claim.etag != existing.etag:
        return True
    if existing.status == "done":
        return False
    same_run = existing.flow_run_id == claim.flow_run_id
    if existing.status == "processing":
        if same_run:
            return claim.finished_at >= existing.updated_at
        if claim.takes_over is not None and claim.takes_over == existing.flow_run_id:
            return True  # its holder has ended: its lease no longer means anything
        return existing.lease_until is None or existing.lease_until <= claim.finished_at
    if existing.status == "released":
        return claim.finished_at >= existing.updated_at
    return not same_run and claim.finished_at >= existing.updated_at


def release_granted(release: InvoiceOutcome, existing: ManifestEntry) -> bool:
    """A run gives back only its own claim, and only while it is still a claim."""
    return (
        existing.status == "processing" and existing.etag == release.etag
        and existing.flow_run_id == release.flow_run_id
    )


def lease_is_live(entry: ManifestEntry, now: datetime) -> bool:
    return entry.status == "processing" and entry.lease_until is not None and entry.lease_until > now


def merge_entry(existing: ManifestEntry | None, outcome: InvoiceOutcome) -> ManifestEntry:
    """The entry after recording `outcome`; applying the same outcome twice changes nothing."""
    fields = outcome.model_dump(exclude={"key", "attempt", "finished_at", "takes_over"})
    if existing is None:
        return ManifestEntry(
            **fields, attempts=outcome.attempt, first_seen_at=outcome.finished_at,
            updated_at=outcome.finished_at,
        )
    same_content = existing.etag == outcome.etag
    attempts = max(existing.attempts, outcome.attempt) if same_content else outcome.attempt
    if not supersedes(outcome, existing):
        if outcome.status in ("processing", "released"):  # refused: leaves no trace
            return existing
        return existing.model_copy(update={"attempts": attempts}) if same_content else existing
    if outcome.status == "released":  # the claim's attempt did not happen
        attempts = outcome.attempt
    first_seen = existing.first_seen_at if same_content else outcome.finished_at
    return ManifestEntry(
        **(existing.model_extra or {}), **fields, attempts=attempts, first_seen_at=first_seen,
        updated_at=outcome.finished_at,
    )


def apply_outcomes(manifest: Manifest, outcomes: Iterable[InvoiceOutcome]) -> Manifest:
    """A new manifest with every outcome merged in (the input is left untouched)."""
    entries = dict(manifest.entries)
    for outcome in outcomes:
        entries[outcome.key] = merge_entry(entries.get(outcome.key), outcome)
    return manifest.model_copy(update={"entries": entries})


def bind_source(manifest: Manifest, source: str | None, where: str) -> Manifest:
    """`manifest` recording `source`; `SourceMismatch` if it records another one already."""
    if source is None or manifest.source == source:
        return manifest
    if manifest.source is None:
        return manifest.model_copy(update={"source": source})
    raise SourceMismatch(
        f"{where} records the invoices of {manifest.source}, not {source}: one output holds "
        "one source, so that invoices with the same names never overwrite each other. Use "
        "another output for this source, or name a folder or prefix that holds both as the "
        "source (invoices already done are skipped)"
    )


def restore_known(current: Manifest, etag: str | None, known: Manifest, where: str) -> Manifest:
    """`current` (read with `etag`) with every entry of `known` put back where it has none or
    an older one, and a warning naming what happened: for a manifest that was deleted,
    replaced by an older copy, or rewritten by someone who dropped entries. Nothing in the
    protocol removes an entry, so what a writer knew is never lost by its next write."""
    entries = dict(current.entries)
    restored = 0
    for key, entry in known.entries.items():
        there = entries.get(key)
        if there is None or there.updated_at < entry.updated_at:
            entries[key] = entry
            restored += 1
    if not restored and not went_back(current, etag, known):
        return current
    if etag is None:
        what = "disappeared (deleted?)"
    elif current.version < known.version:
        what = (f"went back from version {known.version} to {current.version} (replaced by an "
                "older copy?)")
    else:
        what = f"lacks {restored} entries it had (rewritten by a writer that dropped them?)"
    logger.warning("%s %s; putting back the %d entries this run knew of", where, what, restored)
    return current.model_copy(update={
        "entries": entries, "source": current.source or known.source,
        "version": max(current.version, known.version),
    })


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
    `base` it lacks or has older is put back, with a warning (`restore_known`). `source` binds the output to that source (`SourceMismatch`
    when it records another)."""
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
            return CommitResult(manifest.version, len(manifest.entries), attempt, written=False,
                                snapshot=(manifest, etag))
        merged.version = manifest.version + 1
        merged.updated_at = utcnow()
        data = merged.model_dump_json().encode()
        try:
            # Created only if still absent, or replaced only if still what was read.
            new_etag = await store.put(key, data, if_match=etag, if_none_match=etag is None,
                                       content_type="application/json")
        except PreconditionFailed as exc:
            delay = random.uniform(0, min(backoff_max, backoff_base * 2**attempt))
            logger.info(
                "manifest changed under us (HTTP %s), retry %d/%d in %.2fs",
                exc.status, attempt, max_attempts, delay,
            )
            await asyncio.sleep(delay)
            continue
        return CommitResult(merged.version, len(merged.entries), attempt, written=True,
                            snapshot=(merged, new_etag))
    raise ManifestConflictError(
        f"manifest {key} was changed by other writers on each of {max_attempts} attempts; "
        f"{len(outcomes)} outcomes not recorded in this write"
    )


def went_back(manifest: Manifest, etag: str | None, known: Manifest) -> bool:
    """Whether `manifest` (read with `etag`) is behind `known`: deleted, or an older copy."""
    if etag is None:
        return known.version > 0
    return manifest.version < known.version


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

    @property
    def lock_tag(self) -> str:
        return manifest_lock_tag(self.location)

    async def read(self) -> Manifest:
        """The manifest as stored now; `SourceMismatch` if it records another source."""
        manifest, etag = await read_manifest(self.store, self.key)
        bind_source(manifest, self.source, self.location)
        if self.newest is None or not went_back(manifest, etag, self.newest[0]):
            self.newest = (manifest, etag)
        return manifest

    async def commit(self, outcomes: list[InvoiceOutcome]) -> CommitResult:
        result = await commit_outcomes(self.store, outcomes, key=self.key, base=self.newest,
                                       source=self.source)
        self.newest = result.snapshot
        return result


def manifest_lock_tag(location: str) -> str:
    """The tag of the manifest lock for the manifest at `location`: `manifest:` and the
    location made tag-safe (Prefect limit names cannot hold `/`), then a hash of the whole
    location so two outputs never share a lock, e.g. `manifest:s3-bucket-out-manifest.json-3f1a2b`."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", location.split("://")[-1]).strip("-")
    digest = hashlib.blake2b(location.encode(), digest_size=4).hexdigest()
    return f"{MANIFEST_TAG}:{readable[-60:]}-{digest}"


@task(
    name="update-manifest",
    # No task-level retries: a failed session's batch goes back to the ManifestWriter,
    # which opens a new session (a new task run, a new acquisition of the lock).
    retries=0,
    cache_policy=NO_CACHE,
)
async def update_manifest(
    target: ManifestTarget, batches: AsyncIterator[list[InvoiceOutcome]]
) -> int:
    """The only place the manifest is written: each batch under the output's manifest lock
    (tag `manifest:<output>`, one slot), by compare-and-swap. One task run is one lock
    session; it commits batches until the writer ends the session. Returns the number of
    outcomes committed."""
    committed = 0
    async for batch in batches:
        await target.commit(batch)
        committed += len(batch)
    return committed


async def run_locked_session(
    target: ManifestTarget, batches: AsyncIterator[list[InvoiceOutcome]]
) -> None:
    """Run one `update-manifest` session, letting the server record the task run before the
    task engine asks for the lock.

    Prefect 3.8.8 on SQLite answers a slot request 503 ("database is locked") when the
    server is still recording the same task run from its Pending event, and the client
    then backs off 2, 4, 8 s; measured here, half of all acquisitions paid that. Emitting
    the Pending event ourselves and waiting (bounded) until the run is recorded avoids it.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound as RunNotRecorded
    from prefect.task_engine import run_task_async
    from prefect.utilities.engine import emit_task_run_state_change_event

    parameters = {"target": target, "batches": batches}
    locked = update_manifest.with_options(tags=[target.lock_tag])
    task_run = await locked.create_local_run(parameters=parameters)
    emit_task_run_state_change_event(
        task_run=task_run, initial_state=None, validated_state=task_run.state
    )
    async with get_client() as client:
        for _ in range(100):  # at most ~1 s; past that the engine just goes ahead
            try:
                await client.read_task_run(task_run.id)
                break
            except RunNotRecorded:
                await asyncio.sleep(0.01)
    await run_task_async(locked, task_run=task_run, parameters=parameters)


class ManifestWriteError(RuntimeError):
    def __init__(self, unrecorded: list[InvoiceOutcome], cause: BaseException) -> None:
        super().__init__(
            f"the manifest could not be written: {len(unrecorded)} outcomes are not recorded "
            f"({cause!r})"
        )
        self.unrecorded = unrecorded
        self.cause = cause


Session = Callable[[AsyncIterator[list[InvoiceOutcome]]], Awaitable[object]]


class ManifestWriter:
    """Group commit: one writer per flow run; each write carries everything that queued up.

    Writes are at least `min_interval` seconds apart (the manifest is rewritten whole, so
    fewer, larger batches are cheaper); closing flushes at once.

    The writer runs lock sessions (`session(batches)`: in the flow, one `update-manifest`
    task run holding the `manifest` slot). A session commits batch after batch: each batch
    is what arrived while the previous write was in flight. Lock acquisitions therefore
    grow with sessions, not with batches or invoices: a session ends when the writer closes
    or, to let other runs' writers in, when it has held the lock for `max_hold` seconds and
    has nothing to write. `open()` starts the first session at once, so the lock is taken
    before the run's own task runs load the server.

    `submit` never blocks the invoice that reports. A failed session puts its batch back and
    a new session is tried with backoff; after `max_failures` consecutive failures the writer
    stops and `close()` raises `ManifestWriteError` naming what was not recorded.
    """

    def __init__(
        self,
        session: Session,
        *,
        max_hold: float = 10.0,
        min_interval: float = 1.0,
        max_failures: int = 3,
        retry_delay: float = 1.0,
        on_commit: Callable[[int], Awaitable[object]] | None = None,
        on_lock_wait: Callable[[float], Awaitable[object]] | None = None,
        lock_wait_report_every: float = 10.0,
    ) -> None:
        self._session = session
        self._on_commit = on_commit
        self._on_lock_wait = on_lock_wait
        self.lock_wait_report_every = lock_wait_report_every
        self._pending: list[InvoiceOutcome] = []
        self._in_flight: list[InvoiceOutcome] = []
        self._wakeup = asyncio.Event()
        self._held = asyncio.Event()
        self._closing = False
        self._no_linger = asyncio.Event()  # set while closing or flushing
        self._drained = asyncio.Event()
        self._last_write = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self.max_hold = max_hold
        self.min_interval = min_interval
        self.max_failures = max_failures
        self.retry_delay = retry_delay
        self.batches: list[int] = []
        self.sessions = 0
        self.recorded = 0
        # How long leaving `async with` may wait for the lock and the last writes; None: as
        # long as it takes (a run that is stopping sets a bound).
        self.give_up_after: float | None = None

    def submit(self, outcome: InvoiceOutcome) -> None:
        # Never raises, even after the writer gave up: the outcome joins the unrecorded ones
        # that close() names, and the invoice that reported it is not torn down with it.
        self._pending.append(outcome)
        self._drained.clear()
        self._wakeup.set()

    async def flush(self) -> None:
        """Wait until everything submitted so far is committed (without the linger)."""
        self._no_linger.set()
        self._wakeup.set()
        try:
            while self._pending or self._in_flight:
                if self._error is not None or self._task is None or self._task.done():
                    raise ManifestWriteError(
                        self.unrecorded,
                        self._error or RuntimeError("the manifest writer is not running"),
                    )
                drained = asyncio.ensure_future(self._drained.wait())
                try:
                    await asyncio.wait([drained, self._task], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    drained.cancel()
        finally:
            if not self._closing:
                self._no_linger.clear()

    async def open(self, wait_for_lock: float = 0.0) -> ManifestWriter:
        """Start the first session now; wait up to `wait_for_lock` s for it to hold the lock."""
        self._task = asyncio.create_task(self._run(eager=True), name="manifest-writer")
        if wait_for_lock > 0:
            try:
                await asyncio.wait_for(asyncio.shield(self._held.wait()), wait_for_lock)
            except TimeoutError:
                logger.info("manifest lock not held after %.1fs; processing goes on", wait_for_lock)
        return self

    async def __aenter__(self) -> ManifestWriter:
        if self._task is None:
            self._task = asyncio.create_task(self._run(eager=False), name="manifest-writer")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(self.give_up_after)

    async def close(self, give_up_after: float | None = None) -> None:
        """Flush everything submitted so far, then stop; raises if anything is unrecorded.

        `give_up_after` bounds the wait (a stopping run must end): past it the session is
        cancelled; claims and releases not written are dropped (a claim that never reached
        the manifest holds nothing), and any outcome not written makes close() raise."""
        self._closing = True
        self._no_linger.set()
        self._wakeup.set()
        task = self._task
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), give_up_after)
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                lost = [o for o in self.unrecorded if o.status in FINAL_STATUSES]
                self._pending, self._in_flight = lost, []
                if lost and self._error is None:
                    self._error = TimeoutError(
                        f"the manifest was not written within {give_up_after:g} s of stopping")
        if self._error is not None:
            raise ManifestWriteError(self.unrecorded, self._error)

    @property
    def unrecorded(self) -> list[InvoiceOutcome]:
        """Per invoice, the last outcome submitted but not (yet) committed: its final outcome,
        or its claim when it never got further (a claim renewal does not hide an outcome)."""
        last: dict[str, InvoiceOutcome] = {}
        for outcome in self._in_flight + self._pending:
            if outcome.status != "processing" or last.get(outcome.key) is None:
                last[outcome.key] = outcome
            elif last[outcome.key].status == "processing":
                last[outcome.key] = outcome
        return list(last.values())

    async def _batches(self) -> AsyncIterator[list[InvoiceOutcome]]:
        held_since = time.monotonic()
        self._held.set()
        while True:
            if self._in_flight:  # the consumer asked for more: the previous batch is committed
                committed, self._in_flight = self._in_flight, []
                self.batches.append(len(committed))
                final = sum(o.status in FINAL_STATUSES for o in committed)  # not claims
                self.recorded += final
                if not self._pending:
                    self._drained.set()
                if self._on_commit is not None and final:
                    await self._on_commit(final)
            if not self._pending:
                if self._closing or time.monotonic() - held_since >= self.max_hold:
                    return
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(
                        self._wakeup.wait(), max(0.0, self.max_hold - (time.monotonic() - held_since))
                    )
                except TimeoutError:
                    pass
                continue
            # Linger: a rewrite costs O(manifest), so writes are spaced by at least
            # min_interval and each carries everything that arrived meanwhile.
            linger = self.min_interval - (time.monotonic() - self._last_write)
            if linger > 0 and not self._no_linger.is_set():
                try:
                    await asyncio.wait_for(self._no_linger.wait(), linger)
                except TimeoutError:
                    pass
            self._last_write = time.monotonic()
            self._in_flight, self._pending = self._pending, []
            yield self._in_flight

    async def _report_lock_wait(self) -> None:
        """While a session waits for the lock, say so every `lock_wait_report_every` s: a
        wait on a lock held by a dead run lasts until Prefect's slot lease runs out."""
        started = time.monotonic()
        while not self._held.is_set():
            try:
                await asyncio.wait_for(self._held.wait(), self.lock_wait_report_every)
            except TimeoutError:
                waited = time.monotonic() - started
                if self._on_lock_wait is not None:
                    await self._on_lock_wait(waited)
                else:
                    logger.warning("waiting %.0f s for the manifest lock", waited)

    async def _run(self, *, eager: bool) -> None:
        failures = 0
        while True:
            if not self._pending and not eager:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            eager = False
            self.sessions += 1
            reporter = asyncio.create_task(self._report_lock_wait(), name="manifest-lock-wait")
            try:
                await self._session(self._batches())
            except ConfigurationError as exc:  # retrying cannot help: close() says why
                self._pending = self._in_flight + self._pending
                self._in_flight = []
                self._error = exc
                return
            except Exception as exc:  # recorded below and re-raised by close(): never silent
                failures += 1
                self._pending = self._in_flight + self._pending
                self._in_flight = []
                logger.warning(
                    "manifest session failed (%d/%d), %d outcomes waiting: %r",
                    failures, self.max_failures, len(self._pending), exc,
                )
                if failures >= self.max_failures:
                    self._error = exc
                    return
                await asyncio.sleep(self.retry_delay * failures)
                continue
            finally:
                reporter.cancel()
                self._held.clear()
            failures = 0
