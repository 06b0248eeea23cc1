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
from datetime import timedelta

from tasks.manifest import ManifestWriter, lease_is_live, read_manifest, utcnow
from tasks.pipeline import InvoiceContext, InvoiceJob, claim_outcome

logger = logging.getLogger(__name__)


class Claims:
    def __init__(
        self, writer: ManifestWriter, ctx: InvoiceContext, *, lease_seconds: float = 60.0
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.writer = writer
        self.ctx = ctx
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
        await self.writer.flush()
        manifest, _ = await read_manifest(self.ctx.output)
        held, refused = [], []
        for job in jobs:
            entry = manifest.entries.get(job.key)
            mine = (
                entry is not None and entry.status == "processing" and entry.etag == job.etag
                and entry.flow_run_id == self.ctx.flow_run_id
            )
            (held if mine else refused).append(job)
        self._held = {job.key: job for job in held}
        if refused:
            logger.warning("%d invoices were claimed by another run first; left to it: %s",
                           len(refused), ", ".join(job.key for job in refused[:10]))
        return held, [job.key for job in refused]

    async def outlast_stale(self, keys: list[str]) -> bool:
        """Wait until those claims on `keys` that look abandoned have run out; True if any.

        A live run renews its claims every third of their lease, so a claim not renewed for
        half its lease is probably a dead run's. Only the lease running out makes it certain
        (a live run may still renew meanwhile), so this waits for that: at most one lease.
        """
        if not keys:
            return False
        manifest, _ = await read_manifest(self.ctx.output)
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
            "waiting %.0f s for the claims to run out, then taking them over", len(ends), wait,
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
