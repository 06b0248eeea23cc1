"""The run summary: counts, failures with reasons, and the artifacts that show them."""

from __future__ import annotations

from collections import Counter

from prefect import task
from prefect.artifacts import acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.pipeline import BatchPlan, ProcessedInvoice


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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    manifest_writes: int = 0
    seconds: float = 0.0
    rows: list[InvoiceRow] = Field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)


def summarize(
    *,
    source: str,
    output: str,
    plan: BatchPlan,
    processed: list[ProcessedInvoice],
    manifest_writes: int,
    seconds: float,
) -> RunSummary:
    rows = []
    for item in sorted(processed, key=lambda p: p.outcome.key):
        outcome = item.outcome
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
    skipped = len(plan.skipped_done) + len(plan.skipped_review) + len(plan.skipped_exhausted)
    return RunSummary(
        source=source,
        output=output,
        discovered=len(plan.todo) + skipped,
        processed=len(processed),
        counts=dict(Counter(p.outcome.status for p in processed)),
        skipped_done=len(plan.skipped_done),
        skipped_review=len(plan.skipped_review),
        skipped_exhausted=len(plan.skipped_exhausted),
        prompt_tokens=sum(p.prompt_tokens for p in processed),
        completion_tokens=sum(p.completion_tokens for p in processed),
        manifest_writes=manifest_writes,
        seconds=round(seconds, 3),
        rows=rows,
    )


def format_table(summary: RunSummary) -> str:
    """A plain-text table for terminals."""
    header = ("invoice", "status", "vendor", "total", "currency", "reason")
    lines = [header] + [
        (r.invoice, r.status, r.vendor or "", r.total or "", r.currency or "", r.reason or "")
        for r in summary.rows
    ]
    widths = [min(60, max(len(line[i]) for line in lines)) for i in range(len(header))]
    out = ["  ".join(cell[:60].ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.counts.items())) or "nothing"
    out.append("")
    out.append(
        f"{summary.processed} processed ({counts}); skipped {summary.skipped_done} done, "
        f"{summary.skipped_review} needs_review, {summary.skipped_exhausted} out of attempts; "
        f"{summary.manifest_writes} manifest writes; {summary.seconds:.2f} s"
    )
    if summary.prompt_tokens or summary.completion_tokens:
        out.append(f"LLM tokens: {summary.prompt_tokens} prompt, {summary.completion_tokens} completion")
    out.append(f"results and manifest: {summary.output}")
    return "\n".join(out)


@task(name="publish-summary", cache_policy=NO_CACHE, retries=2)
async def publish_summary(summary: RunSummary) -> None:
    await acreate_table_artifact(
        key="invoice-run-summary",
        table=[row.model_dump() for row in summary.rows],
        description=(
            f"{summary.processed} invoices processed: "
            + ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items()))
        ),
    )
