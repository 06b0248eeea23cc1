"""What one run of `process-invoices` holds while it works: its stores, the PDF pool, the
extractor, the manifest writer, the claims and the progress; and the steps the flow is
told in (flows/process_invoices.py): plan, claim, process, take over, summarize."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Collection, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prefect.runtime import flow_run
from pydantic import SecretStr

from flows.blocks import AwsCredentialsBlock
from flows.extractors import build_extractor
from flows.settings import RunSettings
from tasks.errors import ConfigurationError
from tasks.manifest import ManifestTarget, ManifestWriter
from tasks.manifest.claims import ClaimHolder, Claims, claim_holders
from tasks.orchestration.limits import ensure_manifest_lock, report_manifest_lock_wait
from tasks.orchestration.manifest_lock import manifest_lock_tag, run_locked_session
from tasks.pdf.pool import PdfParser
from tasks.pipeline import (
    BatchPlan,
    InvoiceContext,
    ProcessedInvoice,
    in_shard,
    parse_shard,
    plan_batch,
    process_all,
)
from tasks.report import RunProgress, RunSummary, summarize
from tasks.runtime import LoopStallProbe, gc_frozen
from tasks.stopping import StopRequest
from tasks.storage import Store, open_store


@dataclass(eq=False)
class InvoiceRun:
    settings: RunSettings
    source: Store
    output: Store
    target: ManifestTarget
    stop: StopRequest
    loop_probe: LoopStallProbe
    started: float
    holders: dict[str, ClaimHolder] = field(default_factory=dict)
    processed: list[ProcessedInvoice] = field(default_factory=list)
    # Set up in `open` and `recording`:
    first_plan: BatchPlan = field(init=False)
    ctx: InvoiceContext = field(init=False)
    progress: RunProgress = field(init=False)
    writer: ManifestWriter = field(init=False)
    claims: Claims = field(init=False)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        settings: RunSettings,
        credentials: AwsCredentialsBlock | None,
        api_key: SecretStr | None,
    ) -> AsyncIterator[InvoiceRun]:
        """Set the run up and make its first plan; everything is closed on the way out."""
        started = time.perf_counter()
        async with AsyncExitStack() as stack:
            loop_probe = await stack.enter_async_context(LoopStallProbe())
            freeze_setup = stack.enter_context(gc_frozen())
            source, output = await all_or_nothing(
                stack.enter_async_context(
                    open_store(
                        settings.source, credentials=credentials, create=False, role="source"
                    )
                ),
                stack.enter_async_context(
                    open_store(settings.output, credentials=credentials, role="output")
                ),
            )
            target = ManifestTarget(output, source=source.url)
            # The PDF pool also runs the CPU-bound extraction.
            parser = PdfParser(settings.parse_executor, max_pages=settings.max_pages)
            run = cls(
                settings,
                source,
                output,
                target,
                StopRequest(settings.stop_grace_seconds),
                loop_probe,
                started,
            )
            # These steps are independent and mostly wait (on the Prefect server, S3,
            # starting processes), so they overlap; the first failure stops them all.
            # (Reading the manifest needs no lock: writes are compare-and-swap.)
            _, extractor, _, plan = await all_or_nothing(
                ensure_manifest_lock(manifest_lock_tag(target.location)),
                stack.enter_async_context(
                    build_extractor(
                        settings.extractor,
                        parser=parser,
                        api_key=api_key,
                        max_in_flight=settings.max_concurrency,
                        slot_lease_seconds=settings.lease_seconds,
                    )
                ),
                stack.enter_async_context(parser),
                run.plan(),
            )
            run.ctx = InvoiceContext(
                source,
                output,
                parser,
                extractor,
                flow_run.id,
                invoice_timeout=settings.invoice_timeout,
                max_bytes=settings.max_bytes,
                max_concurrency=settings.max_concurrency,
                stop=run.stop,
            )
            run.first_plan = plan
            freeze_setup()  # the set-up's objects live as long as the run
            yield run

    async def plan(self, only: Collection[str] | None = None) -> BatchPlan:
        """What to process: the listing (of this shard; of `only`, if given) against the
        manifest. A source with nothing under it is refused, not an empty success."""
        manifest, listing = await all_or_nothing(
            self.target.read(), self.source.list(suffix=".pdf")
        )
        if not listing and only is None and not await self.source.exists():
            raise ConfigurationError(
                f"nothing is stored under the source {self.source.url}: check it (a typo?)"
            )
        self.holders.update(await claim_holders(manifest, own_run=flow_run.id))
        shard = parse_shard(self.settings.shard)
        return plan_batch(
            [o for o in listing if in_shard(o.key, shard) and (only is None or o.key in only)],
            manifest,
            max_attempts=self.settings.max_attempts,
            reprocess_needs_review=self.settings.reprocess_needs_review,
            flow_run_id=flow_run.id,
            ended_runs={run for run, holder in self.holders.items() if holder.ended},
        )

    @asynccontextmanager
    async def recording(self, plan: BatchPlan) -> AsyncIterator[Claims]:
        """The manifest writer (sessions of the locked `update-manifest` task) and this
        run's claims, open while invoices are processed; leaving flushes every outcome."""
        self.progress = await RunProgress.start(len(plan.todo))
        self.writer = ManifestWriter(
            partial(run_locked_session, self.target),
            on_commit=self.progress.advance,
            on_lock_wait=partial(
                report_manifest_lock_wait, manifest_lock_tag(self.target.location)
            ),
        )
        with self.stop.on_signals():
            if plan.todo:  # ask for the lock now, before this run's task runs load the server
                await self.writer.open()
            async with (
                self.writer,
                Claims(
                    self.writer, self.ctx, self.target, lease_seconds=self.settings.lease_seconds
                ) as claims,
            ):
                self.claims = claims
                yield claims
                if self.stop.requested:  # record what finished, but do not wait forever
                    self.writer.give_up_after = max(self.stop.grace_seconds, 5.0)
        await self.progress.finish()

    async def claim(self, plan: BatchPlan) -> None:
        """Claim the plan's invoices; those another run claimed first are left to it."""
        plan.todo, claimed_first = await self.claims.take(plan.todo)
        plan.in_flight_elsewhere += claimed_first
        plan.taken_over = [key for key in plan.taken_over if key not in claimed_first]

    async def process(self, plan: BatchPlan) -> None:
        self.processed += await process_all(
            self.ctx, plan.todo, self.record, chunk_size=self.settings.chunk_size
        )

    def record(self, done: ProcessedInvoice) -> None:
        """An invoice's final outcome: its claim needs no renewal, the manifest gets it."""
        self.claims.release(done.outcome.key)
        self.writer.submit(done.outcome)
        self.progress.processed(done.outcome.status)

    async def take_over(self, plan: BatchPlan) -> None:
        """Invoices claimed by another run: a live run keeps renewing its claims, so claims
        left unrenewed are a dead run's; wait for them to run out, then process those."""
        if self.stop.requested or not await self.claims.outlast_stale(plan.in_flight_elsewhere):
            return
        late = await self.plan(only=set(plan.in_flight_elsewhere))
        late.todo, claimed_first = await self.claims.take(late.todo)
        late.in_flight_elsewhere += claimed_first
        plan.fold_in(late)
        self.progress.total = len(plan.todo)
        self.processed += await process_all(
            self.ctx, late.todo, self.record, chunk_size=self.settings.chunk_size
        )

    def summary(self, plan: BatchPlan) -> RunSummary:
        return summarize(
            source=self.source.url,
            output=self.output.url,
            plan=plan,
            processed=self.processed,
            manifest_writes=len(self.writer.batches),
            seconds=time.perf_counter() - self.started,
            max_loop_stall_s=self.loop_probe.max_stall,
            flow_run_id=str(flow_run.id),
            claim_holders=sorted(
                {str(self.holders[run]) for run in plan.holders.values() if run in self.holders}
            ),
            stopped_by=self.stop.signal.name if self.stop.signal else None,
        )


async def all_or_nothing(*steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """Like `asyncio.gather`, but the first failure cancels the other steps (so none is left
    running past the flow's exit stack) and is raised as itself, not as an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(step) for step in steps]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]
