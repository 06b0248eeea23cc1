"""Claims and leases without Prefect: merge rules for `processing`, planning, Claims."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from functools import partial

import pytest

from tasks.extract.rules import OfflineExtractor
from tasks.manifest import (
    InvoiceOutcome,
    Manifest,
    ManifestTarget,
    ManifestWriter,
    apply_outcomes,
    commit_outcomes,
    merge_entry,
    read_manifest,
    utcnow,
)
from tasks.manifest.claims import Claims
from tasks.pipeline import InvoiceContext, InvoiceJob, plan_batch
from tasks.storage import LocalStore, ObjectInfo
from tests.test_manifest import session_of


def claim(run: str, *, lease: float = 60.0, ago: float = 0.0, key="a.pdf", etag='"e1"'):
    at = utcnow() - timedelta(seconds=ago)
    return InvoiceOutcome(
        key=key,
        etag=etag,
        status="processing",
        flow_run_id=run,
        finished_at=at,
        lease_until=at + timedelta(seconds=lease),
    )


def final(run: str, status="done", *, ago: float = 0.0, etag='"e1"'):
    return InvoiceOutcome(
        key="a.pdf",
        etag=etag,
        status=status,
        flow_run_id=run,
        finished_at=utcnow() - timedelta(seconds=ago),
        error_code="x" if status == "failed" else None,
    )


@pytest.mark.parametrize(
    ("existing", "new", "granted"),
    [
        (None, claim("B"), True),
        (final("A", "done", ago=5), claim("B"), False),  # done is never reopened
        (final("A", "done", ago=5, etag='"old"'), claim("B"), True),  # new content
        (final("A", "failed", ago=5), claim("B"), True),  # a retry by a new run
        (final("A", "needs_review", ago=5), claim("B"), True),  # reprocess asked for
        (final("B", "done", ago=5), claim("B"), False),  # a late renewal of a finished one
        (final("B", "failed", ago=5), claim("B"), False),
        (claim("A", lease=60, ago=5), claim("B"), False),  # A's lease is still running
        (claim("A", lease=1, ago=5), claim("B"), True),  # A's lease ran out: taken over
        (claim("B", lease=60, ago=5), claim("B"), True),  # renewal
    ],
)
def test_when_a_claim_is_granted(existing, new, granted):
    entry = None if existing is None else merge_entry(None, existing)
    merged = merge_entry(entry, new)
    assert (merged.status == "processing" and merged.flow_run_id == "B") == granted
    if not granted:
        assert merged == entry  # a refused claim leaves no trace


def test_a_final_outcome_replaces_the_claim_of_its_own_run_and_a_late_done_wins():
    manifest = apply_outcomes(Manifest(), [claim("A", ago=2), final("A", "done")])
    assert manifest.entries["a.pdf"].status == "done"
    # B took over after A's lease ran out; A, slow but alive, still reports done: kept
    manifest = apply_outcomes(
        Manifest(), [claim("A", lease=1, ago=10), claim("B", ago=1), final("A", "done")]
    )
    assert manifest.entries["a.pdf"].status == "done"


def test_plan_leaves_live_claims_to_their_run_and_takes_over_expired_ones():
    manifest = apply_outcomes(
        Manifest(),
        [
            claim("A", lease=60, key="live.pdf"),
            claim("A", lease=1, ago=10, key="dead.pdf"),
            claim("A", lease=60, key="changed.pdf", etag='"old"'),
        ],
    )
    listing = [
        ObjectInfo(k, '"e1"', 10) for k in ("live.pdf", "dead.pdf", "changed.pdf", "new.pdf")
    ]
    plan = plan_batch(listing, manifest)
    assert plan.in_flight_elsewhere == ["live.pdf"]
    assert plan.taken_over == ["dead.pdf"]
    assert {job.key: job.attempt for job in plan.todo} == {
        "dead.pdf": 2,
        "changed.pdf": 1,
        "new.pdf": 1,
    }


def context(store: LocalStore, run: str) -> InvoiceContext:
    return InvoiceContext(store, store, parser=None, extractor=OfflineExtractor(), flow_run_id=run)  # type: ignore[arg-type]


def jobs(*keys: str) -> list[InvoiceJob]:
    return [InvoiceJob(key, '"e1"', 10) for key in keys]


async def test_two_runs_claiming_overlapping_sets_hold_disjoint_ones(tmp_path):
    async with LocalStore(tmp_path) as store:
        await two_runs_claim(store)


async def two_runs_claim(store: LocalStore) -> None:
    session = session_of(partial(commit_outcomes, store))
    async with ManifestWriter(session) as w1, ManifestWriter(session) as w2:
        async with (
            Claims(w1, context(store, "A"), ManifestTarget(store)) as a,
            Claims(w2, context(store, "B"), ManifestTarget(store)) as b,
        ):
            (held_a, refused_a), (held_b, refused_b) = await asyncio.gather(
                a.take(jobs("1.pdf", "2.pdf", "3.pdf")), b.take(jobs("2.pdf", "3.pdf", "4.pdf"))
            )
    keys_a, keys_b = {j.key for j in held_a}, {j.key for j in held_b}
    assert not keys_a & keys_b
    assert keys_a | keys_b == {"1.pdf", "2.pdf", "3.pdf", "4.pdf"}
    assert set(refused_a) | set(refused_b) == {"2.pdf", "3.pdf"}
    manifest, _ = await read_manifest(store)
    assert {k: e.flow_run_id for k, e in manifest.entries.items()} == (
        {k: "A" for k in keys_a} | {k: "B" for k in keys_b}
    )


async def test_claims_are_renewed_until_released(tmp_path):
    store = LocalStore(tmp_path)
    writer = ManifestWriter(session_of(partial(commit_outcomes, store)), min_interval=0)
    async with (
        store,
        writer,
        Claims(writer, context(store, "A"), ManifestTarget(store), lease_seconds=0.6) as claims,
    ):
        await claims.take(jobs("kept.pdf", "released.pdf"))
        first, _ = await read_manifest(store)
        claims.release("released.pdf")
        await asyncio.sleep(0.5)  # past one renewal period (lease / 3)
        await writer.flush()
        later, _ = await read_manifest(store)
    lease = lambda m, k: m.entries[k].lease_until  # noqa: E731
    assert lease(later, "kept.pdf") > lease(first, "kept.pdf")
    assert lease(later, "released.pdf") == lease(first, "released.pdf")


def test_shards_split_a_listing_exactly_once():
    from tasks.pipeline import in_shard, parse_shard

    keys = [f"invoices/{i:05d} näme.pdf" for i in range(1000)]
    parts = [parse_shard(f"{i}/3") for i in range(3)]
    owners = [[p for p in parts if in_shard(key, p)] for key in keys]
    assert all(len(o) == 1 for o in owners)
    sizes = [sum(o[0] == p for o in owners) for p in parts]
    assert min(sizes) > 250  # roughly even
    assert parse_shard(None) is None and in_shard("x", None)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
