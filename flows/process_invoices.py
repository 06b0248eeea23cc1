"""The `process-invoices` flow: every invoice under a source, concurrently, each outcome recorded."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Literal

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
    failed_outcome,
    plan_batch,
    process_invoice_task,
)
from tasks.report import RunProgress, RunSummary, publish_summary, summarize
from tasks.storage import open_store

BUNDLED_SAMPLES = str(Path(__file__).resolve().parents[1] / "samples" / "invoices")


@flow(name="process-invoices", description=__doc__)
async def process_invoices(
    source: str = BUNDLED_SAMPLES,
    output: str = "out",
    extractor: ExtractorChoice = "auto",
    max_concurrency: int = 100,
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
    await ensure_manifest_lock()
    credentials = await load_aws_credentials(aws_credentials_block)
    async with AsyncExitStack() as stack:
        src = await stack.enter_async_context(open_store(source, credentials=credentials))
        out = await stack.enter_async_context(open_store(output, credentials=credentials))
        parser = await stack.enter_async_context(PdfParser(parse_executor))
        chosen = await stack.enter_async_context(
            build_extractor(extractor, api_key=await load_secret(openai_api_key_secret),
                            max_in_flight=max_concurrency)
        )
        ctx = InvoiceContext(src, out, parser, chosen, flow_run.id, invoice_timeout)

        manifest, _ = await read_manifest(out)
        plan = plan_batch(
            await src.list(suffix=".pdf"), manifest,
            max_attempts=max_attempts, reprocess_needs_review=reprocess_needs_review,
        )
        logger.info("%d invoices to process under %s (%d already done)",
                    len(plan.todo), src.url, len(plan.skipped_done))

        slots = asyncio.Semaphore(max_concurrency)
        progress = await RunProgress.start(len(plan.todo))
        writer = ManifestWriter(partial(run_locked_session, out), on_commit=progress.advance)
        if plan.todo:  # take the lock before this run's own task runs load the server
            await writer.open(wait_for_lock=2.0)

        async def run_one(job: InvoiceJob) -> ProcessedInvoice:
            async with slots:
                try:
                    processed = await process_invoice_task(ctx, job)
                except Exception as exc:
                    processed = failed_outcome(ctx, job, exc)
            writer.submit(processed.outcome)
            return processed

        async with writer:
            processed = await asyncio.gather(*(run_one(job) for job in plan.todo))
        await progress.finish()

    summary = summarize(
        source=src.url, output=out.url, plan=plan, processed=list(processed),
        manifest_writes=len(writer.batches), seconds=time.perf_counter() - started,
    )
    await publish_summary(summary)
    return outcome_state(summary, fail_on_invoice_errors)


def outcome_state(summary: RunSummary, fail_on_invoice_errors: bool) -> State:
    """Completed, or Failed when invoices failed and that is asked for; the summary is the data."""
    failed = summary.failed
    if failed and fail_on_invoice_errors:
        return Failed(message=f"{failed} of {summary.processed} invoices failed", data=summary)
    return Completed(message=f"{summary.processed} invoices processed", data=summary)
