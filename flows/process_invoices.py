"""The `process-invoices` flow: every invoice under a source, concurrently, each outcome recorded."""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from collections.abc import Coroutine
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.blocks import load_aws_credentials, load_secret
from flows.extractors import ExtractorChoice, build_extractor
from tasks.limits import ensure_manifest_lock
from tasks.manifest import ManifestWriter, read_manifest, run_locked_session
from tasks.parse import PdfParser
from tasks.pipeline import (
    InvoiceContext,
    InvoiceJob,
    ProcessedInvoice,
    chunked,
    failed_outcome,
    plan_batch,
    process_chunk_task,
)
from tasks.report import LoopStallProbe, RunProgress, RunSummary, publish_summary, summarize
from tasks.storage import open_store

BUNDLED_SAMPLES = str(Path(__file__).resolve().parents[1] / "samples" / "invoices")


@flow(name="process-invoices", description=__doc__)
async def process_invoices(
    source: str = BUNDLED_SAMPLES,
    output: str = "out",
    extractor: ExtractorChoice = "auto",
    max_concurrency: int = 100,
    chunk_size: int = 50,
    invoice_timeout: float = 300.0,
    max_attempts: int = 3,
    reprocess_needs_review: bool = False,
    parse_executor: Literal["process", "thread"] = "process",
    fail_on_invoice_errors: bool = True,
    aws_credentials_block: str | None = None,
    openai_api_key_secret: str | None = None,
) -> State:
    """Process invoices (PDF) under `source` (s3://bucket/prefix or a folder) into `output`.

    Args:
        source: where the invoices are: `s3://bucket/prefix` or a local folder.
        output: where results (`results/<key>.json`) and `manifest.json` go.
        extractor: `offline` rules, `openai` (any OpenAI-compatible endpoint), or `auto`
            (openai when an API key is configured, else offline).
        max_concurrency: invoices in flight at once.
        chunk_size: invoices per task run (`process-invoices-chunk`); each invoice's outcome
            is in the manifest, its log lines and the run report.
        invoice_timeout: seconds one invoice may take, all stages together.
        max_attempts: attempts per invoice (same content) before a failure is final.
        reprocess_needs_review: also redo invoices the manifest marks `needs_review`.
        parse_executor: PyMuPDF runs in a `process` pool (default) or a `thread` pool.
        fail_on_invoice_errors: end the run Failed when any invoice failed (after recording).
        aws_credentials_block: name of a prefect-aws `AwsCredentials` block for S3; none:
            the default AWS credential chain.
        openai_api_key_secret: name of a Prefect `Secret` block holding the OpenAI API key;
            none: `OPENAI_API_KEY` from the environment.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    credentials = await load_aws_credentials(aws_credentials_block)
    api_key = await load_secret(openai_api_key_secret)
    async with AsyncExitStack() as stack:
        loop_probe = await stack.enter_async_context(LoopStallProbe())
        # The set-up steps are independent and each mostly waits (on the Prefect server, S3,
        # a starting process pool), so they overlap; the first failure stops them all.
        _, src, out, parser, chosen = await all_or_nothing(
            ensure_manifest_lock(),
            stack.enter_async_context(open_store(source, credentials=credentials)),
            stack.enter_async_context(open_store(output, credentials=credentials)),
            stack.enter_async_context(PdfParser(parse_executor)),
            stack.enter_async_context(
                build_extractor(extractor, api_key=api_key, max_in_flight=max_concurrency)
            ),
        )
        ctx = InvoiceContext(src, out, parser, chosen, flow_run.id, invoice_timeout,
                             in_flight=asyncio.Semaphore(max_concurrency))

        (manifest, _), listing = await all_or_nothing(read_manifest(out), src.list(suffix=".pdf"))
        plan = plan_batch(
            listing, manifest,
            max_attempts=max_attempts, reprocess_needs_review=reprocess_needs_review,
        )
        logger.info("%d invoices to process under %s (%d already done)",
                    len(plan.todo), src.url, len(plan.skipped_done))

        progress = await RunProgress.start(len(plan.todo))
        writer = ManifestWriter(partial(run_locked_session, out), on_commit=progress.advance)
        if plan.todo:  # take the lock before this run's own task runs load the server
            await writer.open(wait_for_lock=2.0)

        processed: list[ProcessedInvoice] = []

        def record(done: ProcessedInvoice) -> None:
            processed.append(done)
            writer.submit(done.outcome)

        # Backstop only: an invoice bounds itself by invoice_timeout once it has a slot, so
        # a chunk cannot legitimately outlast the waves of invoices queued ahead of it.
        waves = math.ceil(len(plan.todo) / max_concurrency) + 1
        chunk_task = process_chunk_task.with_options(timeout_seconds=waves * invoice_timeout + 60)

        async def run_chunk(jobs: list[InvoiceJob]) -> None:
            try:
                await chunk_task(ctx, jobs, record)
            except Exception as exc:  # the task run itself crashed: its rest is recorded too
                recorded = {done.outcome.key for done in processed}
                for job in jobs:
                    if job.key not in recorded:
                        record(failed_outcome(ctx, job, exc))

        async with writer:
            await asyncio.gather(*(run_chunk(jobs) for jobs in chunked(plan.todo, chunk_size)))
        await progress.finish()

    summary = summarize(
        source=src.url, output=out.url, plan=plan, processed=processed,
        manifest_writes=len(writer.batches), seconds=time.perf_counter() - started,
        max_loop_stall_s=loop_probe.max_stall, flow_run_id=str(flow_run.id),
    )
    await publish_summary(summary)
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


def outcome_state(summary: RunSummary, fail_on_invoice_errors: bool) -> State:
    """Completed, or Failed when invoices failed and that is asked for; the summary is the data."""
    failed = summary.failed
    if failed and fail_on_invoice_errors:
        return Failed(message=f"{failed} of {summary.processed} invoices failed", data=summary)
    return Completed(message=f"{summary.processed} invoices processed", data=summary)
