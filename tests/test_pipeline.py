"""One invoice's path and the run's plan, without Prefect: result keys, takeover of claims
left by runs that ended, and an object replaced between its listing and its download."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest

from tasks.extract.rules import OfflineExtractor
from tasks.manifest.model import InvoiceOutcome, Manifest, apply_outcomes, utcnow
from tasks.pdf.pool import PdfParser
from tasks.pipeline import InvoiceContext, InvoiceJob, plan_batch, process_invoice, result_key_for
from tasks.storage import ObjectInfo, etag_of
from testing.samples import make_invoice

# Keys that collided before: case, empty and dot segments, escapes, the store's reserved names.
TRICKY_KEYS = [
    "inv.pdf",
    "inv.PDF",
    "Inv.pdf",
    "x/y.pdf",
    "x//y.pdf",
    "x/./y.pdf",
    "x/../y.pdf",
    "./x/y.pdf",
    "/x/y.pdf",
    "x/y.pdf/",
    "%2F.pdf",
    "%252F.pdf",
    "a%2Fb.pdf",
    "a\\b.pdf",
    ".~locks/a.pdf",
    "..pdf",
    "a b/ü €.pdf",
    "tab\there.pdf",
    "inv.pdf.json",
    "inv",
]


def test_result_keys_are_distinct_per_key_and_readable():
    results = [result_key_for(key) for key in TRICKY_KEYS]
    assert len(set(results)) == len(TRICKY_KEYS)
    assert result_key_for("2026/11/inv-0001.pdf") == "results/2026/11/inv-0001.pdf.json"
    assert result_key_for("a b/ü €.pdf") == "results/a b/ü €.pdf.json"  # still readable


async def test_every_result_key_is_writable_and_distinct_on_both_stores(store):
    for key in TRICKY_KEYS:
        await store.put(result_key_for(key), key.encode())
    for key in TRICKY_KEYS:
        assert (await store.get(result_key_for(key))).data == key.encode()


def _claim(key: str, run: str, *, lease: float = 60.0) -> InvoiceOutcome:
    at = utcnow()
    return InvoiceOutcome(
        key=key,
        etag='"e"',
        status="processing",
        flow_run_id=run,
        finished_at=at,
        lease_until=at + timedelta(seconds=lease),
    )


def test_claims_of_an_ended_run_or_of_this_run_are_taken_over_at_once():
    manifest = apply_outcomes(
        Manifest(),
        [
            _claim("live.pdf", "running"),
            _claim("ended.pdf", "crashed"),
            _claim("mine.pdf", "me"),
            InvoiceOutcome(key="released.pdf", etag='"e"', status="released", attempt=0),
        ],
    )
    listing = [
        ObjectInfo(key, '"e"', 10) for key in ("live.pdf", "ended.pdf", "mine.pdf", "released.pdf")
    ]
    plan = plan_batch(listing, manifest, flow_run_id="me", ended_runs={"crashed"})
    assert plan.in_flight_elsewhere == ["live.pdf"] and plan.holders == {"live.pdf": "running"}
    assert sorted(plan.taken_over) == ["ended.pdf", "mine.pdf"]
    assert sorted(job.key for job in plan.todo) == ["ended.pdf", "mine.pdf", "released.pdf"]
    assert {job.key: job.attempt for job in plan.todo}["released.pdf"] == 1


@pytest.mark.parametrize("parse_executor", ["thread"])
async def test_an_object_replaced_after_listing_is_recorded_as_read(store, parse_executor):
    """The listing said ETag A; by the download the object holds other bytes (ETag B): the
    outcome and the result name B and the sha256 of B, never A with B's bytes."""
    first, _ = make_invoice(1)
    second, _ = make_invoice(2)
    await store.put("inv.pdf", first)
    listed = InvoiceJob("inv.pdf", etag_of(first), len(first), attempt=2)
    await store.put("inv.pdf", second)
    async with PdfParser(parse_executor) as parser:
        ctx = InvoiceContext(store, store, parser, OfflineExtractor(), flow_run_id="run")
        processed = await process_invoice(ctx, listed)
    outcome = processed.outcome
    assert outcome.status == "done", outcome
    assert outcome.etag == etag_of(second) and outcome.attempt == 1
    assert outcome.sha256 == hashlib.sha256(second).hexdigest()
    result = json.loads((await store.get(outcome.result_key)).data)
    assert result["etag"] == etag_of(second) and result["sha256"] == outcome.sha256


class TestWhatABatchCameTo:
    @staticmethod
    def outcome(key: str, status: str, code: str | None = None, reasons=()):
        from tasks.manifest.model import InvoiceOutcome

        return InvoiceOutcome(
            key=key,
            etag='"e"',
            status=status,
            error_code=code,
            error_message="why" if code else None,
            reasons=list(reasons),
        )

    def test_failures_are_counted_by_code_most_first(self):
        from tasks.pipeline import describe_outcomes

        outcomes = [
            self.outcome("a", "failed", "not_a_pdf"),
            self.outcome("b", "done"),
            self.outcome("c", "failed", "empty_file"),
            self.outcome("d", "failed", "not_a_pdf"),
        ]
        assert describe_outcomes(outcomes) == "3 of 4 failed: not_a_pdf 2, empty_file 1"
        assert describe_outcomes(outcomes[1:2]) == "1 processed: 1 done"
        assert describe_outcomes([]) == "0 processed"

    def test_a_chunk_with_a_failed_invoice_is_failed_and_a_chunk_of_one_is_its_invoice(self):
        from tasks.pipeline import InvoiceJob, chunk_state

        jobs = [InvoiceJob("a", '"e"', 1), InvoiceJob("b", '"e"', 1)]
        mixed = chunk_state(
            jobs, [self.outcome("a", "done"), self.outcome("b", "failed", "too_large")]
        )
        assert mixed.is_failed() and mixed.message == "1 of 2 failed: too_large 1"
        assert chunk_state(
            jobs, [self.outcome("a", "done"), self.outcome("b", "done")]
        ).is_completed()
        stopped = chunk_state(jobs, [self.outcome("a", "done")])
        assert stopped.is_completed() and "1 not finished" in stopped.message

        one = chunk_state(jobs[:1], [self.outcome("a", "failed", "pdf_damaged")])
        assert one.is_failed() and one.message == "pdf_damaged: why"
        review = chunk_state(jobs[:1], [self.outcome("a", "needs_review", reasons=["total off"])])
        assert (
            review.is_completed() and review.name == "NeedsReview" and review.message == "total off"
        )
