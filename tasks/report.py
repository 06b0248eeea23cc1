"""The run summary: counts, failures with reasons, and the artifacts that show them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prefect import task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.pipeline import BatchPlan, ProcessedInvoice, describe_outcomes

logger = logging.getLogger(__name__)


class InvoiceRow(BaseModel):
    invoice: str
    status: str
    vendor: str | None = None
    total: str | None = None
    currency: str | None = None
    reason: str | None = None


class RunSummary(BaseModel):
    source: str
    output: str
    discovered: int
    processed: int
    counts: dict[str, int]
    skipped_done: int = 0
    skipped_review: int = 0
    skipped_exhausted: int = 0
    skipped_in_flight: int = 0
    taken_over: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    manifest_writes: int = 0
    seconds: float = 0.0
    max_loop_stall_s: float = 0.0
    flow_run_id: str | None = None
    # The live runs (name and id) holding the claims of the invoices skipped as in flight.
    claim_holders: list[str] = Field(default_factory=list)
    # The signal that stopped the run early, and how many invoices it gave back unfinished.
    stopped_by: str | None = None
    unfinished: int = 0
    rows: list[InvoiceRow] = Field(default_factory=list)
    # One line on what the run came to, for its state message: "3 of 6 failed: not_a_pdf 1, ...".
    headline: str = ""

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)


class RunRefused(BaseModel):
    """The result of a run that could not go ahead as configured (nothing was processed)."""

    reason: str


def summarize(
    *,
    source: str,
    output: str,
    plan: BatchPlan,
    processed: list[ProcessedInvoice],
    manifest_writes: int,
    seconds: float,
    max_loop_stall_s: float = 0.0,
    flow_run_id: str | None = None,
    claim_holders: list[str] | None = None,
    stopped_by: str | None = None,
) -> RunSummary:
    rows = []
    for item in sorted(processed, key=lambda p: p.outcome.key):
        outcome = item.outcome
        reason: str | None
        if outcome.status == "failed":
            reason = f"{outcome.error_code}: {outcome.error_message}"
        else:
            reason = "; ".join(outcome.reasons) or None
        rows.append(
            InvoiceRow(
                invoice=outcome.key,
                status=outcome.status,
                vendor=item.vendor_name,
                total=None if item.total is None else f"{item.total:.2f}",
                currency=item.currency,
                reason=reason,
            )
        )
    skipped = (
        len(plan.skipped_done)
        + len(plan.skipped_review)
        + len(plan.skipped_exhausted)
        + len(plan.in_flight_elsewhere)
    )
    return RunSummary(
        source=source,
        output=output,
        discovered=len(plan.todo) + skipped,
        processed=len(processed),
        counts=dict(Counter(p.outcome.status for p in processed)),
        skipped_done=len(plan.skipped_done),
        skipped_review=len(plan.skipped_review),
        skipped_exhausted=len(plan.skipped_exhausted),
        skipped_in_flight=len(plan.in_flight_elsewhere),
        taken_over=len(plan.taken_over),
        prompt_tokens=sum(p.prompt_tokens for p in processed),
        completion_tokens=sum(p.completion_tokens for p in processed),
        manifest_writes=manifest_writes,
        seconds=round(seconds, 3),
        max_loop_stall_s=round(max_loop_stall_s, 4),
        flow_run_id=flow_run_id,
        claim_holders=claim_holders or [],
        stopped_by=stopped_by,
        unfinished=len(plan.todo) - len(processed),
        rows=rows,
        headline=describe_outcomes([p.outcome for p in processed]),
    )


def format_table(summary: RunSummary) -> str:
    """A plain-text table for terminals."""
    header = ("invoice", "status", "vendor", "total", "currency", "reason")
    lines = [header] + [
        (r.invoice, r.status, r.vendor or "", r.total or "", r.currency or "", r.reason or "")
        for r in summary.rows
    ]
    # Columns are padded to at most 60 characters (a longer cell pushes its row over); none
    # is cut: the reason, last, is often what the table is read for.
    widths = [min(60, max(len(line[i]) for line in lines)) for i in range(len(header))]
    out = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip()
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items())) or "nothing"
    out.append("")
    out.append(
        f"{summary.processed} processed ({counts}); skipped {summary.skipped_done} done, "
        f"{summary.skipped_review} needs_review, {summary.skipped_exhausted} out of attempts, "
        f"{summary.skipped_in_flight} claimed by another run; "
        f"{summary.manifest_writes} manifest writes; {summary.seconds:.2f} s"
    )
    if summary.taken_over:
        out.append(f"taken over from a run that ended or died: {summary.taken_over}")
    if summary.claim_holders:
        out.append(f"claimed by a run still going: {', '.join(summary.claim_holders)}")
    if summary.stopped_by:
        out.append(
            f"stopped by {summary.stopped_by}: {summary.unfinished} invoices given back "
            "unfinished (the next run takes them at once)"
        )
    if summary.prompt_tokens or summary.completion_tokens:
        out.append(
            f"LLM tokens: {summary.prompt_tokens} prompt, {summary.completion_tokens} completion"
        )
    out.append(f"results and manifest: {summary.output}")
    return "\n".join(out)


def format_markdown(summary: RunSummary) -> str:
    counts = (
        ", ".join(f"**{n}** {status}" for status, n in sorted(summary.counts.items())) or "none"
    )
    lines = [
        f"# Invoice run: {summary.processed} processed",
        "",
        f"- source: `{summary.source}`",
        f"- results and manifest: `{summary.output}`",
        f"- outcomes: {counts}",
        f"- skipped: {summary.skipped_done} already done, {summary.skipped_review} needs_review, "
        f"{summary.skipped_exhausted} out of attempts, {summary.skipped_in_flight} claimed by "
        f"another run",
        f"- taken over from a run that ended or died: {summary.taken_over}",
        *(
            [f"- claimed by a run still going: {', '.join(summary.claim_holders)}"]
            if summary.claim_holders
            else []
        ),
        *(
            [
                f"- stopped by {summary.stopped_by}: {summary.unfinished} invoices given back "
                "unfinished"
            ]
            if summary.stopped_by
            else []
        ),
        f"- LLM tokens: {summary.prompt_tokens} prompt, {summary.completion_tokens} completion",
        f"- manifest writes: {summary.manifest_writes}",
        f"- time: {summary.seconds:.1f} s (longest event-loop stall {summary.max_loop_stall_s * 1000:.0f} ms)",
    ]
    failures = [row for row in summary.rows if row.status == "failed"]
    if failures:
        lines += ["", "## Failures", "", "| invoice | reason |", "| --- | --- |"]
        lines += [f"| `{row.invoice}` | {row.reason} |" for row in failures]
    return "\n".join(lines)


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a run is: invoices to process, processed so far by outcome, recorded in the
    manifest, and how long it has been going (seconds since the work started)."""

    total: int
    processed: int = 0
    done: int = 0
    needs_review: int = 0
    failed: int = 0
    recorded: int = 0
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        """Invoices processed per second so far."""
        return self.processed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until every invoice is processed at the rate so far; None before any."""
        if not self.processed:
            return None
        return max(0.0, self.total - self.processed) / self.rate


ProgressListener = Callable[[ProgressSnapshot], None]
_listeners: list[ProgressListener] = []


@contextmanager
def watching_progress(listener: ProgressListener) -> Iterator[None]:
    """Call `listener` with a `ProgressSnapshot` whenever a run in this process moves on (an
    invoice processed or outcomes recorded), while the block runs. For displays in the same
    process (the `invoices` CLI); the progress artifact is for everyone else."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class RunProgress:
    """A run's progress: a progress artifact moved on as outcomes are recorded in the
    manifest, and a `ProgressSnapshot` for the listeners of this process at every step.

    Updates never hold up the run: `advance` only schedules one (coalescing those that pile
    up), and a failed update is logged, not raised: progress is for watching, the manifest
    is the record."""

    def __init__(self, artifact_id, total: int) -> None:
        self.artifact_id, self.total, self.recorded = artifact_id, total, 0
        self.counts: Counter[str] = Counter()
        self._started = time.perf_counter()
        self._pushed = 0
        self._pushing: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, total: int) -> RunProgress:
        artifact_id = await acreate_progress_artifact(
            0.0 if total else 100.0,
            key="invoice-run-progress",
            description=f"0 of {total} invoices recorded",
        )
        progress = cls(artifact_id, total)
        progress._notify()
        return progress

    def snapshot(self) -> ProgressSnapshot:
        return ProgressSnapshot(
            total=self.total,
            processed=sum(self.counts.values()),
            done=self.counts["done"],
            needs_review=self.counts["needs_review"],
            failed=self.counts["failed"],
            recorded=self.recorded,
            elapsed=time.perf_counter() - self._started,
        )

    def processed(self, status: str) -> None:
        """One invoice finished with `status` (it is recorded later, by `advance`)."""
        self.counts[status] += 1
        self._notify()

    async def advance(self, count: int) -> None:
        self.recorded += count
        self._notify()
        if self._pushing is None or self._pushing.done():
            self._pushing = asyncio.create_task(self._push())

    async def finish(self) -> None:
        """Wait for the last update, so the artifact ends at what was recorded."""
        while self._pushing is not None and not self._pushing.done():
            await self._pushing
        if self._pushed != self.recorded:
            await self._push()

    def _notify(self) -> None:
        if not _listeners:
            return
        snapshot = self.snapshot()
        for listener in list(_listeners):
            try:
                listener(snapshot)
            except Exception as exc:  # a display must not break the run it shows
                logger.warning("progress display failed: %r", exc)

    async def _push(self) -> None:
        while self._pushed != self.recorded:
            recorded = self.recorded
            try:
                await aupdate_progress_artifact(
                    self.artifact_id,
                    100.0 * recorded / max(self.total, 1),
                    description=f"{recorded} of {self.total} invoices recorded",
                )
            except Exception as exc:
                logger.warning("progress artifact not updated: %r", exc)
            self._pushed = recorded


@task(name="publish-summary", cache_policy=NO_CACHE, retries=2)
async def publish_summary(summary: RunSummary) -> None:
    await acreate_markdown_artifact(
        format_markdown(summary),
        key="invoice-run-report",
        description="Counts, failures, tokens and time of the run",
    )
    await acreate_table_artifact(
        key="invoice-run-summary",
        table=[row.model_dump() for row in summary.rows],
        description=(
            f"{summary.processed} invoices processed: "
            + ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items()))
        ),
    )
