"""The manifest lock: every manifest write runs in a run of the `update-manifest` task tagged
`manifest:<output>`, whose tag limit of one slot (`ensure_manifest_lock` in limits.py) is that
output's lock. Runs writing to different outputs never wait for each other.

The lock serialises the writers of one output, so that they rarely conflict; updates are not
lost without it either, since each write is a compare-and-swap (tasks/manifest/store.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from tasks.manifest import InvoiceOutcome, ManifestTarget

MANIFEST_TAG = "manifest"


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
    """One lock session (the `session` of a `ManifestWriter`): a run of `update-manifest`
    tagged with the output's lock, in the current flow run. The task engine takes the tag's
    slot before the task starts and gives it back when the run ends, so the lock is held for
    exactly the session; a failure is raised here, for the writer to put the batch back.

    On a server backed by SQLite the slot request is a write that can collide with the
    server's other writes, above all its recording of this task run's Pending event, which
    the engine emits just before it asks for the slot; the server then answers 503 and the
    client retries after its back-off (2 s, then 4 s, ...). A collision delays that
    session's writes (in the first session, the run's claims, so the start of its
    processing); it is a cost of taking the lock, so of sessions, not of writes. No public
    API lets the server record the run before the engine asks for the slot.

    `target` is quoted: the task engine would otherwise walk the whole manifest it holds,
    looking for futures in the parameters."""
    locked = update_manifest.with_options(tags=[manifest_lock_tag(target.location)])
    await locked(quote(target), batches)  # type: ignore[call-overload]  # quote() is not in Task.__call__'s types
