"""One invoice, start to finish: download, parse, extract, check, write the result.

`process_invoice` is a plain async function that always returns an outcome: every failure,
expected (`InvoiceFailure`) or not, ends as a `failed` outcome with a code and a message,
so the batch goes on and nothing is silent. `plan_batch` decides what a run has to do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.utilities.annotations import quote
from pydantic import BaseModel

from tasks.checks import check_invoice
from tasks.errors import InvoiceFailure
from tasks.extract.base import Extraction, Extractor
from tasks.invoice import Invoice
from tasks.logs import run_logger
from tasks.manifest.model import InvoiceOutcome, Manifest, lease_is_live, utcnow
from tasks.pdf.pool import PdfParser
from tasks.stopping import StopRequest
from tasks.storage import ObjectInfo, StorageError, Store

logger = logging.getLogger(__name__)

RESULTS_PREFIX = "results/"


@dataclass(frozen=True)
class InvoiceJob:
    key: str
    etag: str
    size: int
    attempt: int = 1
    # The ended flow run whose claim on this invoice this run replaces, if any.
    takes_over: str | None = None


@dataclass
class BatchPlan:
    todo: list[InvoiceJob] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    skipped_review: list[str] = field(default_factory=list)
    skipped_exhausted: list[str] = field(default_factory=list)
    # Claimed by another run whose lease is still running (it may be working on them now).
    in_flight_elsewhere: list[str] = field(default_factory=list)
    # Claimed by a run whose lease ran out (killed or stuck) or that has ended: taken over.
    taken_over: list[str] = field(default_factory=list)
    # For each invoice in flight elsewhere, the flow run id that holds its claim.
    holders: dict[str, str | None] = field(default_factory=dict)

    def fold_in(self, late: BatchPlan) -> None:
        """Add a second look at the invoices that were in flight elsewhere (`late`, planned
        later over just those keys, its todo already claimed)."""
        self.todo += late.todo
        taken = {job.key for job in late.todo}
        self.taken_over += [key for key in late.taken_over if key in taken]
        self.skipped_done += late.skipped_done
        self.skipped_review += late.skipped_review
        self.skipped_exhausted += late.skipped_exhausted
        self.in_flight_elsewhere = late.in_flight_elsewhere
        self.holders = late.holders


def plan_batch(
    listing: list[ObjectInfo],
    manifest: Manifest,
    *,
    max_attempts: int = 3,
    reprocess_needs_review: bool = False,
    now: datetime | None = None,
    flow_run_id: str | None = None,
    ended_runs: Collection[str] = (),
) -> BatchPlan:
    """Which invoices this run processes, given what the manifest already records.

    Same content (ETag) already `done` is skipped; `needs_review` too unless asked; `failed`
    is retried until it has had `max_attempts` attempts; `processing` under another run's
    live lease is left to that run, and taken over once the lease has run out, or at once
    when the claiming run has ended (`ended_runs`) or is this very run (`flow_run_id`, a
    retry of the flow run).
    """
    now = now or utcnow()
    plan = BatchPlan()
    for obj in listing:
        entry = manifest.entries.get(obj.key)
        if entry is None or entry.etag != obj.etag:  # new, or new content: a first attempt
            plan.todo.append(InvoiceJob(obj.key, obj.etag, obj.size, 1))
            continue
        attempt = entry.attempts + 1
        if entry.status == "processing":
            holder = entry.flow_run_id
            ended = holder is not None and (holder == flow_run_id or holder in ended_runs)
            if lease_is_live(entry, now) and not ended:
                plan.in_flight_elsewhere.append(obj.key)
                plan.holders[obj.key] = holder
                continue
            plan.taken_over.append(obj.key)
            plan.todo.append(
                InvoiceJob(
                    obj.key, obj.etag, obj.size, attempt, takes_over=holder if ended else None
                )
            )
        elif entry.status == "done":
            plan.skipped_done.append(obj.key)
        elif entry.status == "needs_review" and not reprocess_needs_review:
            plan.skipped_review.append(obj.key)
        elif entry.status == "failed" and entry.attempts >= max_attempts:
            plan.skipped_exhausted.append(obj.key)
        else:
            plan.todo.append(InvoiceJob(obj.key, obj.etag, obj.size, attempt))
    return plan


def parse_shard(shard: str | None) -> tuple[int, int] | None:
    """ "i/n" (0 <= i < n) -> (i, n); None or "" -> None (all keys)."""
    if not shard:
        return None
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), not {shard!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return index, count


def valid_shard(shard: str | None) -> str | None:
    """For a parameter's validation: `shard` as given, if `parse_shard` takes it."""
    parse_shard(shard)
    return shard


def in_shard(key: str, shard: tuple[int, int] | None) -> bool:
    """Whether `key` belongs to shard (i, n): a stable hash of the key, so every run and
    machine splits a listing the same way and the shards cover it exactly once."""
    if shard is None:
        return True
    index, count = shard
    return (
        int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % count
        == index
    )


def result_key_for(key: str) -> str:
    """Where the result of the invoice at `key` goes: `results/<key>.json`, the key kept
    whole (`a.pdf` and `a.PDF` are two invoices) and readable; only what a folder cannot
    hold is escaped: `%`, `\\` and control characters as `%XX`, and a segment that is empty,
    `.` or `..`, or starts with the local store's reserved `.~`. So different keys never
    share a result, and every result key is valid on both stores."""
    return RESULTS_PREFIX + "/".join(_segment(part) for part in key.split("/")) + ".json"


_ESCAPED = re.compile(r"[%\\\x00-\x1f\x7f]")


def _segment(part: str) -> str:
    # "/" and "." are never escaped, so "%2F" and "%2E" cannot come from a real segment.
    if part == "":
        return "%2F"
    if part in (".", ".."):
        return "%2E" * len(part)
    escaped = _ESCAPED.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), part)
    return "%2E" + escaped[1:] if escaped.startswith(".~") else escaped


class InvoiceResult(BaseModel):
    """The result object written per extracted invoice (results/<key>.json)."""

    key: str
    etag: str
    sha256: str
    status: str
    reasons: list[str]
    invoice: Invoice
    extractor: str
    source: str
    # Where each field that has a value came from: "text" (offline rules on the page),
    # "llm", or "embedded_xml" (the invoice's own Factur-X / UBL attachment).
    field_sources: dict[str, str]
    notes: list[str]
    pages: int
    prompt_tokens: int
    completion_tokens: int
    truncated: bool
    processed_at: datetime
    flow_run_id: str | None


@dataclass
class InvoiceContext:
    """What every invoice of a run shares: stores, the parser pool, the extractor."""

    source: Store
    output: Store
    parser: PdfParser
    extractor: Extractor
    flow_run_id: str | None = None
    invoice_timeout: float = 300.0
    max_bytes: int = 50 * 1024 * 1024
    max_concurrency: int = 100
    # SIGINT/SIGTERM: which invoices may still start, and how long those in flight may run.
    stop: StopRequest = field(default_factory=StopRequest)
    # Invoices in flight across the whole run, whatever chunk they belong to.
    in_flight: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self.in_flight = asyncio.Semaphore(self.max_concurrency)


@dataclass
class ProcessedInvoice:
    outcome: InvoiceOutcome
    vendor_name: str | None = None
    total: Decimal | None = None
    currency: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


async def process_invoice(ctx: InvoiceContext, job: InvoiceJob) -> ProcessedInvoice:
    """Run one invoice through every stage; always returns, never raises (but cancellation)."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(ctx.invoice_timeout):
            processed = await _run_stages(ctx, job)
    except InvoiceFailure as exc:
        processed = _failed(ctx, job, exc.code, exc.message)
    except TimeoutError:
        processed = _failed(
            ctx, job, "invoice_timeout", f"not finished within {ctx.invoice_timeout:g} s"
        )
    except StorageError as exc:
        processed = _failed(ctx, job, "storage_error", f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        logger.exception("unexpected error on %s", job.key)
        processed = _failed(ctx, job, "internal_error", f"{type(exc).__name__}: {exc}")
    processed.seconds = time.perf_counter() - started
    log_outcome(processed)
    return processed


def log_outcome(processed: ProcessedInvoice) -> None:
    """One line per invoice in the run's log: INFO when done, WARNING with the reasons when
    it needs review, WARNING with code and message when it failed (ERROR for a fault of
    ours), so a failure shows on the flow run page under any logging configuration."""
    outcome = processed.outcome
    if outcome.status == "failed":
        level = logging.ERROR if outcome.error_code in INTERNAL_ERRORS else logging.WARNING
        detail = f": {outcome.error_code}: {outcome.error_message}"
    elif outcome.status == "needs_review":
        level, detail = logging.WARNING, ": " + "; ".join(outcome.reasons)
    else:
        level, detail = logging.INFO, ""
    run_logger(logger).log(
        level,
        "%s %s in %.2f s%s",
        outcome.key,
        outcome.status,
        processed.seconds,
        detail,
        extra={
            "invoice_key": outcome.key,
            "stage": outcome.status,
            "duration_s": round(processed.seconds, 4),
            "error_code": outcome.error_code,
        },
    )


# Failure codes that mean a fault in the pipeline, not in the invoice.
INTERNAL_ERRORS = frozenset({"internal_error", "task_crashed"})


def describe_outcomes(outcomes: Collection[InvoiceOutcome]) -> str:
    """What a batch came to, in one line for a state message: `3 of 6 failed: not_a_pdf 1,
    empty_file 1, pdf_damaged 1` when some failed, else `6 processed: 5 done, 1 needs_review`."""
    counts = Counter(outcome.status for outcome in outcomes)
    if counts["failed"]:
        codes = Counter(o.error_code or "unknown" for o in outcomes if o.status == "failed")
        return f"{counts['failed']} of {len(outcomes)} failed: " + ", ".join(
            f"{code} {n}" for code, n in sorted(codes.items(), key=lambda item: (-item[1], item[0]))
        )
    return f"{len(outcomes)} processed" + (
        ": " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        if outcomes
        else ""
    )


@contextmanager
def _stage(job: InvoiceJob, stage: str, timings: dict[str, float]) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - started, 4)
        logger.debug(
            "%s %s in %.3fs",
            job.key,
            stage,
            timings[stage],
            extra={"invoice_key": job.key, "stage": stage, "duration_s": timings[stage]},
        )


async def _run_stages(ctx: InvoiceContext, job: InvoiceJob) -> ProcessedInvoice:
    _check_size(ctx, job)
    timings: dict[str, float] = {}
    with _stage(job, "download", timings):
        stored = await ctx.source.get(job.key)
        sha256 = hashlib.sha256(stored.data).hexdigest()
    if stored.etag != job.etag:
        # Replaced since it was listed: what is recorded is what was read, never the listed
        # ETag with other bytes.
        logger.info(
            "%s changed since it was listed (ETag %s, now %s); processing what was read",
            job.key,
            job.etag,
            stored.etag,
            extra={"invoice_key": job.key},
        )
        job = dataclasses.replace(job, etag=stored.etag, size=len(stored.data), attempt=1)
        _check_size(ctx, job)
    with _stage(job, "parse", timings):
        document = await ctx.parser.parse(stored.data)
    with _stage(job, "extract", timings):
        extraction = await ctx.extractor.extract(document)
    reasons = extraction.problems + check_invoice(extraction.invoice)
    status = "needs_review" if reasons else "done"
    result = InvoiceResult(
        key=job.key,
        etag=job.etag,
        sha256=sha256,
        status=status,
        reasons=reasons,
        invoice=extraction.invoice,
        extractor=ctx.extractor.name,
        source=extraction.source,
        field_sources=field_sources(extraction),
        notes=extraction.notes,
        pages=document.page_count,
        prompt_tokens=extraction.prompt_tokens,
        completion_tokens=extraction.completion_tokens,
        truncated=extraction.truncated,
        processed_at=utcnow(),
        flow_run_id=ctx.flow_run_id,
    )
    result_key = result_key_for(job.key)
    # The result is written before the manifest can say `done`: `done` always has a result.
    with _stage(job, "write", timings):
        await ctx.output.put(
            result_key, result.model_dump_json(indent=2).encode(), content_type="application/json"
        )
    invoice = extraction.invoice
    return ProcessedInvoice(
        outcome=_outcome(
            ctx, job, status=status, sha256=sha256, result_key=result_key, reasons=reasons
        ),
        vendor_name=invoice.vendor_name,
        total=invoice.total,
        currency=invoice.currency,
        prompt_tokens=extraction.prompt_tokens,
        completion_tokens=extraction.completion_tokens,
    )


def _check_size(ctx: InvoiceContext, job: InvoiceJob) -> None:
    if job.size > ctx.max_bytes:
        raise InvoiceFailure(
            "too_large", f"{job.size} bytes is over the {ctx.max_bytes}-byte limit per invoice"
        )


def field_sources(extraction: Extraction) -> dict[str, str]:
    invoice = extraction.invoice
    return {
        name: extraction.source
        for name in type(invoice).model_fields
        if getattr(invoice, name) not in (None, [], "")
    }


def _outcome(ctx: InvoiceContext, job: InvoiceJob, **fields) -> InvoiceOutcome:
    return InvoiceOutcome(
        key=job.key,
        etag=job.etag,
        attempt=job.attempt,
        flow_run_id=ctx.flow_run_id,
        extractor=ctx.extractor.name,
        **fields,
    )


def _failed(ctx: InvoiceContext, job: InvoiceJob, code: str, message: str) -> ProcessedInvoice:
    return ProcessedInvoice(
        outcome=_outcome(ctx, job, status="failed", error_code=code, error_message=message)
    )


def claim_outcome(ctx: InvoiceContext, job: InvoiceJob, lease_until: datetime) -> InvoiceOutcome:
    """`processing` under this run until `lease_until`: other runs leave the invoice alone."""
    return _outcome(
        ctx, job, status="processing", lease_until=lease_until, takes_over=job.takes_over
    )


def release_outcome(ctx: InvoiceContext, job: InvoiceJob) -> InvoiceOutcome:
    """This run's claim given back unfinished: the next run processes the invoice at once.
    The claim's attempt is given back too (`job.attempt` counted it)."""
    return _outcome(ctx, dataclasses.replace(job, attempt=job.attempt - 1), status="released")


def crashed_outcome(ctx: InvoiceContext, job: InvoiceJob, reason: str) -> ProcessedInvoice:
    """For the flow: an invoice whose chunk's task run crashed (e.g. its backstop timeout)."""
    processed = _failed(
        ctx, job, "task_crashed", f"the process-invoices-chunk task run ended without it: {reason}"
    )
    log_outcome(processed)
    return processed


async def process_chunk(
    ctx: InvoiceContext, jobs: list[InvoiceJob], on_done: Callable[[ProcessedInvoice], None]
) -> list[InvoiceOutcome]:
    """All `jobs` concurrently (bounded by `ctx.in_flight`); `on_done` gets each outcome as
    soon as it exists, so the manifest writer can commit it while the others still run.
    After a stop request (`ctx.stop`) jobs not yet started are left out, and those still
    running when its grace period ends are abandoned: neither gets an outcome. Returns the
    outcomes."""
    outcomes: list[InvoiceOutcome] = []

    async def one(job: InvoiceJob) -> None:
        async with ctx.in_flight:
            processed = await ctx.stop.guard(process_invoice(ctx, job))
        if processed is not None:  # None: stopped before it started, or abandoned
            outcomes.append(processed.outcome)
            on_done(processed)

    await asyncio.gather(*(one(job) for job in jobs))
    return outcomes


def chunk_state(jobs: list[InvoiceJob], outcomes: list[InvoiceOutcome]) -> State:
    """The state a chunk's task run ends in, so the task-run list does not call a chunk
    with failed invoices healthy: Failed when any invoice failed; for a chunk of one
    invoice, that invoice's outcome (`NeedsReview` is a Completed state by that name)."""
    message = describe_outcomes(outcomes)
    if len(outcomes) < len(jobs):
        message += f"; {len(jobs) - len(outcomes)} not finished (the run was stopped)"
    if len(jobs) == 1 and outcomes:
        outcome = outcomes[0]
        if outcome.status == "failed":
            message = f"{outcome.error_code}: {outcome.error_message}"
        elif outcome.status == "needs_review":
            return Completed(name="NeedsReview", message="; ".join(outcome.reasons))
    if any(outcome.status == "failed" for outcome in outcomes):
        return Failed(message=message)
    return Completed(message=message)


CHUNK_START_SPACING_S = 0.05


async def process_all(
    ctx: InvoiceContext,
    jobs: list[InvoiceJob],
    on_done: Callable[[ProcessedInvoice], None],
    *,
    chunk_size: int = 50,
) -> list[ProcessedInvoice]:
    """Every job, one `process-invoices-chunk` task run per `chunk_size` jobs, all chunks at
    once (their starts 50 ms apart). Each job gets exactly one outcome, also
    when its chunk's task run crashes, unless the run is stopped (`process_chunk`)."""
    processed: list[ProcessedInvoice] = []

    def record(done: ProcessedInvoice) -> None:
        processed.append(done)
        on_done(done)

    # Backstop only: an invoice bounds itself by invoice_timeout once it has a slot, so a
    # chunk cannot legitimately outlast the waves of invoices queued ahead of it.
    waves = math.ceil(len(jobs) / ctx.max_concurrency) + 1
    chunk_task = process_chunk_task.with_options(timeout_seconds=waves * ctx.invoice_timeout + 60)

    async def run_chunk(chunk: list[InvoiceJob]) -> None:
        # quote: Prefect would otherwise walk the context and every job for futures to
        # resolve, twice per task run, on the event loop; there are none.
        # The task returns a State, which Prefect's typing nests once more with return_state.
        state = await chunk_task(quote(ctx), quote(chunk), record, return_state=True)  # type: ignore[misc]
        if ctx.stop.requested:
            return  # invoices stopped before they finished are given back, not failed
        # An invoice without an outcome: the task run itself crashed or timed out.
        recorded = {done.outcome.key for done in processed}
        for job in chunk:
            if job.key not in recorded:
                record(crashed_outcome(ctx, job, state.message or state.name or "no reason"))

    async with asyncio.TaskGroup() as group:
        for chunk in chunked(jobs, chunk_size):
            group.create_task(run_chunk(chunk))
            # A chunk's start (a task run's set-up in Prefect's engine, its invoices' first
            # requests) is CPU on the event loop; started together, chunks stall every
            # invoice in flight (bench/README.md). Spaced out, they don't, and invoices past
            # the first `max_concurrency` wait for a slot far longer anyway.
            await asyncio.sleep(CHUNK_START_SPACING_S)
    return processed


def chunked(jobs: list[InvoiceJob], size: int) -> list[list[InvoiceJob]]:
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _chunk_run_name(parameters: dict[str, Any]) -> str:
    """A chunk of one is named by its invoice's key, so with `chunk_size=1` the task-run
    list is the invoice list."""
    jobs: list[InvoiceJob] = parameters["jobs"]
    return f"{jobs[0].key} and {len(jobs) - 1} more" if len(jobs) > 1 else jobs[0].key


# One task run per chunk by default, not per invoice: a task run costs the Prefect server
# several writes (states, events), which at thousands of invoices dominated the run
# (bench/README.md).
@task(
    name="process-invoices-chunk",
    # A function of the parameters, which Prefect supports; its Protocol type cannot say so.
    task_run_name=_chunk_run_name,  # type: ignore[arg-type]
    cache_policy=NO_CACHE,
    retries=0,
)
async def process_chunk_task(
    ctx: InvoiceContext, jobs: list[InvoiceJob], on_done: Callable[[ProcessedInvoice], None]
) -> State:
    return chunk_state(jobs, await process_chunk(ctx, jobs, on_done))
