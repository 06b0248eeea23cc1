"""Claims: a run marks the invoices it is about to process `processing`, under a lease.

Another run that starts meanwhile leaves them alone (no double LLM spend), and when a run
dies (SIGKILL, lost machine) its claims run out and the next run takes the invoices over.
A live run renews the leases of what it still works on, so a long batch keeps its claims.
Claims are written like every outcome: through the `ManifestWriter`, under the `manifest`
lock, by compare-and-swap; the manifest merge refuses a claim over another run's live one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta

from tasks.manifest import Manifest, ManifestTarget, ManifestWriter, lease_is_live, utcnow
from tasks.pipeline import InvoiceContext, InvoiceJob, claim_outcome, release_outcome

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClaimHolder:
    """A flow run that holds claims in the manifest, as the Prefect server knows it."""

    flow_run_id: str
    name: str | None  # None: this Prefect server does not know the run
    ended: bool  # in a final state (completed, failed, cancelled, crashed)

    def __str__(self) -> str:
        return f"{self.name} ({self.flow_run_id})" if self.name else self.flow_run_id


async def claim_holders(manifest: Manifest, *, own_run: str | None) -> dict[str, ClaimHolder]:
    """The other flow runs holding live claims in `manifest`, looked up in Prefect.

    A run that ended cannot renew or finish its claims, so the caller takes them over at once
    instead of waiting out the lease; a run the server does not know (another server, or
    ids that are not Prefect's) counts as live: only its lease running out frees its claims."""
    now = utcnow()
    ids = {
        entry.flow_run_id
        for entry in manifest.entries.values()
        if lease_is_live(entry, now) and entry.flow_run_id and entry.flow_run_id != own_run
    }
    found = await _read_flow_runs(ids) if ids else {}
    return {run_id: found.get(run_id, ClaimHolder(run_id, None, ended=False)) for run_id in ids}


async def _read_flow_runs(ids: Collection[str]) -> dict[str, ClaimHolder]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    uuids = []
    for run_id in ids:
        try:
            uuids.append(uuid.UUID(run_id))
        except ValueError:
            continue
    if not uuids:
        return {}
    try:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=uuids))
            )
    except Exception as exc:  # the lease still protects: go on without the lookup
        logger.warning("could not look up the runs holding claims in Prefect: %r", exc)
        return {}
    return {
        str(run.id): ClaimHolder(
            str(run.id), run.name, ended=run.state is not None and run.state.is_final()
        )
        for run in runs
    }


class Claims:
    """This run's claims: taken before work starts, renewed while it runs, and given back
    (`released`) for every invoice still unfinished when the run stops, on every exit path
    that runs code (a failure, a cancellation, SIGINT or SIGTERM)."""

    def __init__(
        self,
        writer: ManifestWriter,
        ctx: InvoiceContext,
        target: ManifestTarget,
        *,
        lease_seconds: float = 60.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.writer = writer
        self.ctx = ctx
        self.target = target
        self.lease = timedelta(seconds=lease_seconds)
        self._held: dict[str, InvoiceJob] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def take(self, jobs: list[InvoiceJob]) -> tuple[list[InvoiceJob], list[str]]:
        """Claim `jobs`; returns the jobs this run now holds, and the keys another run
        claimed first (between this run's planning and its claim)."""
        if not jobs:
            return [], []
        until = utcnow() + self.lease
        for job in jobs:
            self.writer.submit(claim_outcome(self.ctx, job, until))
        flushed, _ = await self.ctx.stop.unless_stopped(self.writer.flush())
        if not flushed:  # stopped while waiting for the lock: none starts, all are given back
            self._held.update((job.key, job) for job in jobs)
            return jobs, []
        manifest = await self.target.read()
        held: list[InvoiceJob] = []
        refused: list[InvoiceJob] = []
        for job in jobs:
            entry = manifest.entries.get(job.key)
            mine = (
                entry is not None
                and entry.status == "processing"
                and entry.etag == job.etag
                and entry.flow_run_id == self.ctx.flow_run_id
            )
            (held if mine else refused).append(job)
        self._held.update((job.key, job) for job in held)
        if refused:
            logger.warning(
                "%d invoices were claimed by another run first; left to it: %s",
                len(refused),
                ", ".join(job.key for job in refused[:10]),
            )
        return held, [job.key for job in refused]

    async def outlast_stale(self, keys: list[str]) -> bool:
        """Wait until those claims on `keys` that look abandoned have run out; True if any.

        A live run renews its claims every third of their lease, so a claim not renewed for
        half its lease is probably a dead run's. Only the lease running out makes it certain
        (a live run may still renew meanwhile), so this waits for that: at most one lease.
        """
        if not keys:
            return False
        manifest = await self.target.read()
        now = utcnow()
        ends = []
        for key in keys:
            entry = manifest.entries.get(key)
            if entry is None or not lease_is_live(entry, now) or entry.lease_until is None:
                continue
            if now - entry.updated_at > (entry.lease_until - entry.updated_at) / 2:
                ends.append(entry.lease_until)
        if not ends:
            return False
        wait = (max(ends) - now).total_seconds() + 0.5
        logger.warning(
            "%d invoices are claimed by a run that stopped renewing its claims (killed?); "
            "waiting %.0f s for the claims to run out, then taking them over",
            len(ends),
            wait,
        )
        await asyncio.sleep(wait)
        return True

    def release(self, key: str) -> None:
        """The invoice has its final outcome: its claim needs no renewal any more."""
        self._held.pop(key, None)

    async def __aenter__(self) -> Claims:
        self._renewer = asyncio.create_task(self._renew(), name="claim-renewal")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        self.release_unfinished()

    def release_unfinished(self) -> list[str]:
        """Give back the claims of every invoice this run has not finished; their keys."""
        unfinished, self._held = list(self._held.values()), {}
        for job in unfinished:
            self.writer.submit(release_outcome(self.ctx, job))
        if unfinished:
            logger.warning(
                "giving back the claims of %d unfinished invoices: the next run "
                "processes them at once",
                len(unfinished),
            )
        return [job.key for job in unfinished]

    async def _renew(self) -> None:
        # A third of the lease: two renewals may fail (or be slow) before a claim lapses.
        period = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            if not self._held:
                continue
            until = utcnow() + self.lease
            for job in list(self._held.values()):
                self.writer.submit(claim_outcome(self.ctx, job, until))
            logger.debug("renewed %d claims until %s", len(self._held), until.isoformat())
