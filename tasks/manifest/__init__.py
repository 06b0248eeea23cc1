"""The shared manifest: one JSON object per output recording every invoice's outcome.

Three layers keep updates from being lost (DESIGN.md, "The manifest protocol"):

1. every write runs inside a lock session, the `update-manifest` task tagged with the output's
   manifest lock (`manifest:<output>`, one slot): tasks/orchestration/manifest_lock.py, the
   limit made sure of by tasks/orchestration/limits.py before the first write;
2. each write is a compare-and-swap on the object's ETag, re-read and re-applied on 412/409
   (`store`), so a writer that bypasses Prefect cannot make us lose its update or ours;
3. `ManifestWriter` group-commits (`writer`): outcomes that arrive while a write is in flight
   go out together in the next one, so lock acquisitions grow with batches, not invoices.

`model` holds the manifest and its merge rules (pure), `store` the read and the commit against
a `Store`, `writer` the group commit; `claims` (not re-exported here: it builds on
tasks.pipeline) the `processing` claims and their leases.
"""

from tasks.manifest.model import (
    FINAL_STATUSES,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_KEY,
    InvoiceOutcome,
    Manifest,
    ManifestEntry,
    ManifestUnreadable,
    SourceMismatch,
    Status,
    apply_outcomes,
    bind_source,
    claim_granted,
    lease_is_live,
    merge_entry,
    parse_manifest,
    release_granted,
    restore_known,
    supersedes,
    utcnow,
    went_back,
)
from tasks.manifest.store import (
    CommitResult,
    ManifestConflictError,
    ManifestTarget,
    commit_outcomes,
    manifest_location,
    read_manifest,
)
from tasks.manifest.writer import ManifestWriteError, ManifestWriter, Session

__all__ = [
    "FINAL_STATUSES",
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_KEY",
    "CommitResult",
    "InvoiceOutcome",
    "Manifest",
    "ManifestConflictError",
    "ManifestEntry",
    "ManifestTarget",
    "ManifestUnreadable",
    "ManifestWriteError",
    "ManifestWriter",
    "Session",
    "SourceMismatch",
    "Status",
    "apply_outcomes",
    "bind_source",
    "claim_granted",
    "commit_outcomes",
    "lease_is_live",
    "manifest_location",
    "merge_entry",
    "parse_manifest",
    "read_manifest",
    "release_granted",
    "restore_known",
    "supersedes",
    "utcnow",
    "went_back",
]
