"""The manifest's model and its merge rules: pure functions of manifests and outcomes (no I/O).

Merging is idempotent and keyed by invoice key: applying a batch twice changes nothing, and
a `done` entry for the same content is never downgraded.

The manifest never drops what it holds: it names its format (`format`, `format_version`) and
anything else is refused rather than overwritten; fields this version does not know are kept;
an output records one source (`source`), so two sources with the same file names never
overwrite each other's entries; and a writer that finds the manifest deleted or rolled back to
an older copy (its `version` went backwards) puts back everything it knew before writing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import ConfigurationError

MANIFEST_KEY = "manifest.json"
MANIFEST_FORMAT: Final = "invoice-pipeline/manifest"
MANIFEST_FORMAT_VERSION = 1

# `released`: a run claimed the invoice and gave the claim back unfinished (it was stopped);
# the next run processes it like a new one.
Status = Literal["processing", "released", "done", "needs_review", "failed"]
FINAL_STATUSES = ("done", "needs_review", "failed")

logger = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


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
    keep_out = (
        f"use another output, or move {where} away (the next run then starts a new "
        "manifest and processes every invoice again)"
    )
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestUnreadable(f"{where} is not JSON ({exc}): {keep_out}") from None
    if not isinstance(raw, dict):
        raise ManifestUnreadable(
            f"{where} is JSON but not an invoice-pipeline manifest (a {type(raw).__name__}, "
            f"not an object): {keep_out}"
        )
    marked = raw.get("format")
    if marked is None:
        if not ({"version", "entries"} <= raw.keys() <= _UNMARKED_FIELDS):
            raise ManifestUnreadable(
                f'{where} is not an invoice-pipeline manifest (no "format": '
                f'"{MANIFEST_FORMAT}" in it; it has {_field_list(raw)}): {keep_out}'
            )
    elif marked != MANIFEST_FORMAT:
        raise ManifestUnreadable(
            f"{where} is a {marked!r} document, not an invoice-pipeline manifest: {keep_out}"
        )
    elif (
        not isinstance(raw.get("format_version"), int)
        or raw["format_version"] > MANIFEST_FORMAT_VERSION
    ):
        raise ManifestUnreadable(
            f"{where} has manifest format version {raw.get('format_version')!r}; this version "
            f"of invoice-pipeline reads up to {MANIFEST_FORMAT_VERSION}: upgrade it"
        )
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
            f"from a backup or an earlier object version, or {keep_out}"
        ) from None


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
        existing.status == "processing"
        and existing.etag == release.etag
        and existing.flow_run_id == release.flow_run_id
    )


def lease_is_live(entry: ManifestEntry, now: datetime) -> bool:
    return (
        entry.status == "processing" and entry.lease_until is not None and entry.lease_until > now
    )


def merge_entry(existing: ManifestEntry | None, outcome: InvoiceOutcome) -> ManifestEntry:
    """The entry after recording `outcome`; applying the same outcome twice changes nothing."""
    fields = outcome.model_dump(exclude={"key", "attempt", "finished_at", "takes_over"})
    if existing is None:
        return ManifestEntry(
            **fields,
            attempts=outcome.attempt,
            first_seen_at=outcome.finished_at,
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
        **(existing.model_extra or {}),
        **fields,
        attempts=attempts,
        first_seen_at=first_seen,
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
        what = (
            f"went back from version {known.version} to {current.version} (replaced by an "
            "older copy?)"
        )
    else:
        what = f"lacks {restored} entries it had (rewritten by a writer that dropped them?)"
    logger.warning("%s %s; putting back the %d entries this run knew of", where, what, restored)
    return current.model_copy(
        update={
            "entries": entries,
            "source": current.source or known.source,
            "version": max(current.version, known.version),
        }
    )


def went_back(manifest: Manifest, etag: str | None, known: Manifest) -> bool:
    """Whether `manifest` (read with `etag`) is behind `known`: deleted, or an older copy."""
    if etag is None:
        return known.version > 0
    return manifest.version < known.version
