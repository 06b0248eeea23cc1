"""Run reporting helpers that need no Prefect server."""

from __future__ import annotations


def test_the_table_keeps_a_long_reason_whole() -> None:
    from tasks.report import InvoiceRow, RunSummary, format_table

    reason = "llm_invalid_output: " + "the answer broke the schema at line_items[3].amount " * 3
    summary = RunSummary(
        source="in",
        output="out",
        discovered=1,
        processed=1,
        counts={"failed": 1},
        rows=[InvoiceRow(invoice="a.pdf", status="failed", reason=reason)],
    )
    assert reason.strip() in format_table(summary)
