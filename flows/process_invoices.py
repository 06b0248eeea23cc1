"""The `process-invoices` flow: every invoice under a source, concurrently, each outcome recorded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Collection, Coroutine
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.blocks.system import Secret
from prefect.runtime import flow_run
from prefect.states import Cancelled, Completed, Failed, State
from prefect.utilities.annotations import quote
from pydantic import AfterValidator, Field

from flows.blocks import AwsCredentialsBlock, secret_value
from flows.extractors import ExtractorChoice, build_extractor
from tasks.manifest.claims import ClaimHolder, Claims, claim_holders
from tasks.errors import ConfigurationError
from tasks.orchestration.limits import ensure_manifest_lock, report_manifest_lock_wait
from tasks.manifest.model import ManifestTarget, ManifestWriteError, ManifestWriter, run_locked_session
from tasks.pdf.parse import PdfParser
from tasks.pipeline import (
    BatchPlan,
    InvoiceContext,
    ProcessedInvoice,
    in_shard,
    parse_shard,
    plan_batch,
    process_all,
    valid_shard,
)
from tasks.report import (
    LoopStallProbe, RunProgress, RunRefused, RunSummary, gc_frozen, publish_summary, summarize,
)
from tasks.stopping import StopRequest
from tasks.storage import open_store

BUNDLED_SAMPLES = str(Path(__file__).resolve().parents[1] / "samples" / "invoices")

# s3://bucket/prefix or a folder path.
Location = Annotated[str, Field(min_length=1)]


@flow(name="process-invoices", description=__doc__, validate_parameters=True)
async def process_invoices(
    source: Location = BUNDLED_SAMPLES,
    output: Location = "out",
    extractor: ExtractorChoice = "auto",
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 100,
    chunk_size: Annotated[int, Field(ge=1)] = 50,
    shard: Annotated[str | None, Field(pattern=r"^\d+/\d+$"), AfterValidator(valid_shard)] = None,
    invoice_timeout: Annotated[float, Field(ge=1)] = 300.0,
    max_pages: Annotated[int, Field(ge=1)] = 500,
    max_bytes: Annotated[int, Field(ge=1)] = 50 * 1024 * 1024,
    max_attempts: Annotated[int, Field(ge=1)] = 3,
    lease_seconds: Annotated[float, Field(ge=1)] = 60.0,
    stop_grace_seconds: Annotated[float, Field(ge=0)] = 30.0,
    reprocess_needs_review: bool = False,
    parse_executor: Literal["process", "thread"] = "process",
    fail_on_invoice_errors: bool = True,
    aws_credentials: AwsCredentialsBlock | None = None,
    openai_api_key: Secret | None = None,
) -> State:
    """Process invoices (PDF) under `source` (s3://bucket/prefix or a folder) into `output`.

    Args:
        source: where the invoices are: `s3://bucket/prefix` or a local folder. It must
            exist: a missing folder or an S3 prefix with nothing under it stops the run.
        output: where results (`results/<key>.json`) and `manifest.json` go. One output
            records one source.
        extractor: `offline` rules, `openai` (any OpenAI-compatible endpoint), or `auto`
            (openai when an API key is configured, else offline).
        max_concurrency: invoices in flight at once.
        chunk_size: invoices per task run (`process-invoices-chunk`); each invoice's outcome
            is in the manifest, its log lines and the run report.
        shard: "i/n" to process only the i-th of n disjoint parts of the listing (by a
            stable hash of the key), so n runs on n workers split one batch; none: all.
        invoice_timeout: seconds one invoice may take, all stages together.
        max_pages: a PDF with more pages fails `too_many_pages` before its text is read.
        max_bytes: a larger object fails `too_large` before it is downloaded.
        max_attempts: attempts per invoice (same content) before a failure is final.
        lease_seconds: how long a run that died keeps its claims on invoices (`processing`
            in the manifest) and its LLM slots; a live run renews both, so only a dead run's
            run out, and the next run takes its invoices over. (Prefect leases slots for at
            least 60 s, and fixes the manifest lock's slot lease at 60 s.)
        stop_grace_seconds: on SIGINT or SIGTERM no new invoice starts, and those in flight
            get this long to finish and be recorded; the rest are given back unfinished.
        reprocess_needs_review: also redo invoices the manifest marks `needs_review`.
        parse_executor: PyMuPDF runs in a `process` pool (default) or a `thread` pool.
        fail_on_invoice_errors: end the run Failed when any invoice failed (after recording).
        aws_credentials: a prefect-aws `AwsCredentials` block for S3; none: the default AWS
            credential chain.
        openai_api_key: a Prefect `Secret` block holding the OpenAI API key; none:
            `OPENAI_API_KEY` from the environment.
    """
    try:
        return await _process(**locals())
    except ManifestWriteError as exc:
        if not isinstance(exc.cause, ConfigurationError):
            raise
        # Found only when writing (another run bound the output first, say): still refused.
        reason = f"{exc.cause} ({len(exc.unrecorded)} outcomes of this run not recorded)"
    except ConfigurationError as exc:  # a user mistake: one line, no traceback
        reason = str(exc)
    get_run_logger().error("%s", reason)
    return Failed(message=reason, data=RunRefused(reason=reason))


async def _process(
    *, source: str, output: str, extractor: ExtractorChoice, max_concurrency: int,
    chunk_size: int, shard: str | None, invoice_timeout: float, max_pages: int, max_bytes: int,
    max_attempts: int, lease_seconds: float, stop_grace_seconds: float,
    reprocess_needs_review: bool, parse_executor: Literal["process", "thread"],
    fail_on_invoice_errors: bool, aws_credentials: AwsCredentialsBlock | None,
    openai_api_key: Secret | None,
) -> State:
    started = time.perf_counter()
    part = parse_shard(shard)  # a malformed shard fails before any work
    api_key = secret_value(openai_api_key)
    stop = StopRequest(stop_grace_seconds)
    async with AsyncExitStack() as stack:
        loop_probe = await stack.enter_async_context(LoopStallProbe())
        freeze_setup = stack.enter_context(gc_frozen())
        src, out = await all_or_nothing(
            stack.enter_async_context(
                open_store(source, credentials=aws_credentials, create=False, role="source")),
            stack.enter_async_context(
                open_store(output, credentials=aws_credentials, role="output")),
        )
        target = ManifestTarget(out, source=src.url)
        holders: dict[str, ClaimHolder] = {}

        async def make_plan(only: Collection[str] | None = None) -> BatchPlan:
            manifest, listing = await all_or_nothing(target.read(), src.list(suffix=".pdf"))
            if not listing and only is None and not await src.exists():
                raise ConfigurationError(
                    f"nothing is stored under the source {src.url}: check it (a typo?)")
            holders.update(await claim_holders(manifest, own_run=flow_run.id))
            return plan_batch(
                [o for o in listing if in_shard(o.key, part) and (only is None or o.key in only)],
                manifest, max_attempts=max_attempts, reprocess_needs_review=reprocess_needs_review,
                flow_run_id=flow_run.id, ended_runs={h for h, run in holders.items() if run.ended},
            )

        # The other set-up steps and the plan are independent and each mostly waits (on the
        # Prefect server, S3, starting processes), so they overlap; the first failure stops
        # them all. (Reading the manifest needs no lock: writes are compare-and-swap.)
        parser = PdfParser(parse_executor, max_pages=max_pages)  # also runs the CPU-bound extraction
        _, chosen, _, plan = await all_or_nothing(
            ensure_manifest_lock(target.lock_tag),
            stack.enter_async_context(
                build_extractor(extractor, parser=parser, api_key=api_key,
                                max_in_flight=max_concurrency, slot_lease_seconds=lease_seconds)
            ),
            stack.enter_async_context(parser),
            make_plan(),
        )
        freeze_setup()  # the set-up's objects live as long as the run, like those before it
        ctx = InvoiceContext(src, out, parser, chosen, flow_run.id, invoice_timeout,
                             max_bytes=max_bytes, max_concurrency=max_concurrency, stop=stop)
        report_plan(plan, src.url, holders)
        progress = await RunProgress.start(len(plan.todo))
        writer = ManifestWriter(partial(run_locked_session, target), on_commit=progress.advance,
                                on_lock_wait=partial(report_manifest_lock_wait, target.lock_tag))
        with stop.on_signals():
            if plan.todo:  # ask for the lock now, before this run's own task runs load the server
                await writer.open()
            async with writer, Claims(writer, ctx, target, lease_seconds=lease_seconds) as claims:

                def record(done: ProcessedInvoice) -> None:
                    claims.release(done.outcome.key)
                    writer.submit(done.outcome)
                    progress.processed(done.outcome.status)

                plan.todo, claimed_first = await claims.take(plan.todo)
                plan.in_flight_elsewhere += claimed_first
                plan.taken_over = [key for key in plan.taken_over if key not in claimed_first]
                processed = await process_all(ctx, plan.todo, record, chunk_size=chunk_size)
                # Claimed by another run: a live run keeps renewing its claims; claims left
                # unrenewed are a dead run's, so wait for them to run out and take those over.
                if not stop.requested and await claims.outlast_stale(plan.in_flight_elsewhere):
                    late = await make_plan(only=set(plan.in_flight_elsewhere))
                    late.todo, claimed_first = await claims.take(late.todo)
                    late.in_flight_elsewhere += claimed_first
                    plan.fold_in(late)
                    progress.total = len(plan.todo)
                    processed += await process_all(ctx, late.todo, record, chunk_size=chunk_size)
                if stop.requested:  # record what finished, but do not wait for the lock forever
                    writer.give_up_after = max(stop.grace_seconds, 5.0)
        await progress.finish()

    summary = summarize(
        source=src.url, output=out.url, plan=plan, processed=processed,
        manifest_writes=len(writer.batches), seconds=time.perf_counter() - started,
        max_loop_stall_s=loop_probe.max_stall, flow_run_id=str(flow_run.id),
        claim_holders=sorted({str(holders[run]) for run in plan.holders.values()
                              if run in holders}),
        stopped_by=stop.signal.name if stop.signal else None,
    )
    await publish_summary(quote(summary))  # quote: no futures in it for Prefect to look for
    # The last line of the run's log, so `--watch` (which streams the logs) ends with it.
    get_run_logger().log(logging.WARNING if summary.failed or summary.counts.get("needs_review")
                         else logging.INFO, "%s", summary.headline)
    return outcome_state(summary, fail_on_invoice_errors)


async def all_or_nothing(*steps: Coroutine[Any, Any, Any]) -> list[Any]:
    """Like `asyncio.gather`, but the first failure cancels the other steps (so none is left
    running past the flow's exit stack) and is raised as itself, not as an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(step) for step in steps]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


def report_plan(plan: BatchPlan, source: str, holders: dict[str, ClaimHolder]) -> None:
    logger = get_run_logger()
    logger.info("%d invoices to process under %s; skipped: %d done, %d needs_review, %d out of "
                "attempts, %d claimed by another run", len(plan.todo), source,
                len(plan.skipped_done), len(plan.skipped_review), len(plan.skipped_exhausted),
                len(plan.in_flight_elsewhere))
    if plan.taken_over:
        logger.warning("taking over %d invoices claimed by a run that ended or stopped "
                       "renewing its claims: %s",
                       len(plan.taken_over), ", ".join(plan.taken_over[:10]))
    for run_id, count in Counter(plan.holders.values()).items():
        holder = holders.get(run_id or "") or run_id
        logger.warning("leaving %d invoices to the run that claimed them and is still running: "
                       "%s", count, holder)


def outcome_state(summary: RunSummary, fail_on_invoice_errors: bool) -> State:
    """Completed, or Failed when invoices failed and that is asked for, or Cancelled when a
    signal stopped the run; the summary is the data. The message says what the run came to
    (`3 of 6 failed: not_a_pdf 1, empty_file 1, pdf_damaged 1`): the runs list, the flow run
    page and `prefect deployment run --watch` all show it."""
    if summary.stopped_by:
        return Cancelled(
            message=f"stopped by {summary.stopped_by}: {summary.processed} invoices recorded, "
            f"{summary.unfinished} given back unfinished", data=summary,
        )
    if summary.failed and fail_on_invoice_errors:
        return Failed(message=summary.headline, data=summary)
    return Completed(message=summary.headline, data=summary)
