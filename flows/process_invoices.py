"""The `process-invoices` flow: every invoice under a source, concurrently, each outcome recorded."""

from __future__ import annotations

import logging
from collections import Counter

from prefect import flow, get_run_logger
from prefect.blocks.system import Secret
from prefect.states import Cancelled, Completed, Failed, State
from prefect.utilities.annotations import quote

from flows.blocks import AwsCredentialsBlock, secret_value
from flows.run import InvoiceRun
from flows.settings import (
    DEFAULTS,
    Concurrency,
    Count,
    ExtractorChoice,
    GraceSeconds,
    Location,
    ParseExecutor,
    RunSettings,
    Seconds,
    Shard,
)
from tasks.errors import ConfigurationError
from tasks.manifest import ManifestWriteError
from tasks.manifest.claims import ClaimHolder
from tasks.pipeline import BatchPlan
from tasks.report import RunRefused, RunSummary, publish_summary


@flow(name="process-invoices", description=__doc__, validate_parameters=True)
async def process_invoices(
    source: Location = DEFAULTS.source,
    output: Location = DEFAULTS.output,
    extractor: ExtractorChoice = DEFAULTS.extractor,
    max_concurrency: Concurrency = DEFAULTS.max_concurrency,
    chunk_size: Count = DEFAULTS.chunk_size,
    shard: Shard = DEFAULTS.shard,
    invoice_timeout: Seconds = DEFAULTS.invoice_timeout,
    max_pages: Count = DEFAULTS.max_pages,
    max_bytes: Count = DEFAULTS.max_bytes,
    max_attempts: Count = DEFAULTS.max_attempts,
    lease_seconds: Seconds = DEFAULTS.lease_seconds,
    stop_grace_seconds: GraceSeconds = DEFAULTS.stop_grace_seconds,
    reprocess_needs_review: bool = DEFAULTS.reprocess_needs_review,
    parse_executor: ParseExecutor = DEFAULTS.parse_executor,
    fail_on_invoice_errors: bool = DEFAULTS.fail_on_invoice_errors,
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
    parameters = locals()
    settings = RunSettings(**{name: parameters[name] for name in RunSettings.model_fields})
    try:
        async with InvoiceRun.open(settings, aws_credentials, secret_value(openai_api_key)) as run:
            plan = run.first_plan
            report_plan(plan, run.source.url, run.holders)
            async with run.recording(plan):
                await run.claim(plan)
                await run.process(plan)
                await run.take_over(plan)
        summary = run.summary(plan)
    except ManifestWriteError as exc:
        if not isinstance(exc.cause, ConfigurationError):
            raise
        # Found only when writing (another run bound the output first, say): still refused.
        return refused(f"{exc.cause} ({len(exc.unrecorded)} outcomes of this run not recorded)")
    except ConfigurationError as exc:  # a user mistake: one line, no traceback
        return refused(str(exc))
    # quote: no futures in it for Prefect to look for (Task.__call__'s types do not know quote)
    await publish_summary(quote(summary))  # type: ignore[call-overload]
    # The last line of the run's log, so `--watch` (which streams the logs) ends with it.
    get_run_logger().log(
        logging.WARNING if summary.failed or summary.counts.get("needs_review") else logging.INFO,
        "%s",
        summary.headline,
    )
    return outcome_state(summary, fail_on_invoice_errors)


def refused(reason: str) -> State:
    get_run_logger().error("%s", reason)
    return Failed(message=reason, data=RunRefused(reason=reason))


def report_plan(plan: BatchPlan, source: str, holders: dict[str, ClaimHolder]) -> None:
    logger = get_run_logger()
    logger.info(
        "%d invoices to process under %s; skipped: %d done, %d needs_review, %d out of "
        "attempts, %d claimed by another run",
        len(plan.todo),
        source,
        len(plan.skipped_done),
        len(plan.skipped_review),
        len(plan.skipped_exhausted),
        len(plan.in_flight_elsewhere),
    )
    if plan.taken_over:
        logger.warning(
            "taking over %d invoices claimed by a run that ended or stopped "
            "renewing its claims: %s",
            len(plan.taken_over),
            ", ".join(plan.taken_over[:10]),
        )
    for run_id, count in Counter(plan.holders.values()).items():
        holder = holders.get(run_id or "") or run_id
        logger.warning(
            "leaving %d invoices to the run that claimed them and is still running: %s",
            count,
            holder,
        )


def outcome_state(summary: RunSummary, fail_on_invoice_errors: bool) -> State:
    """Completed, or Failed when invoices failed and that is asked for, or Cancelled when a
    signal stopped the run; the summary is the data. The message says what the run came to
    (`3 of 6 failed: not_a_pdf 1, empty_file 1, pdf_damaged 1`): the runs list, the flow run
    page and `prefect deployment run --watch` all show it."""
    if summary.stopped_by:
        return Cancelled(
            message=f"stopped by {summary.stopped_by}: {summary.processed} invoices recorded, "
            f"{summary.unfinished} given back unfinished",
            data=summary,
        )
    if summary.failed and fail_on_invoice_errors:
        return Failed(message=summary.headline, data=summary)
    return Completed(message=summary.headline, data=summary)
