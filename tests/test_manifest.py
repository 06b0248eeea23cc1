"""The manifest protocol without Prefect: merge rules, compare-and-swap, group commit."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from datetime import timedelta

import pytest

from tasks.errors import ConfigurationError
from tasks.manifest import (
    InvoiceOutcome,
    Manifest,
    ManifestTarget,
    ManifestUnreadable,
    ManifestWriteError,
    ManifestWriter,
    SourceMismatch,
    apply_outcomes,
    commit_outcomes,
    merge_entry,
    read_manifest,
    utcnow,
)
from tasks.orchestration.manifest_lock import manifest_lock_tag
from tasks.storage import LocalStore


def outcome(key="a.pdf", status="done", etag='"e1"', *, ago=0.0, **kw) -> InvoiceOutcome:
    return InvoiceOutcome(
        key=key, etag=etag, status=status, finished_at=utcnow() - timedelta(seconds=ago), **kw
    )


class TestMerge:
    def test_applying_a_batch_twice_changes_nothing(self):
        batch = [
            outcome("a.pdf"),
            outcome("b.pdf", "failed", error_code="x"),
            outcome("c.pdf", "needs_review"),
        ]
        once = apply_outcomes(Manifest(), batch)
        twice = apply_outcomes(once, batch)
        assert twice.entries == once.entries

    def test_done_is_never_downgraded_for_the_same_content(self):
        done = merge_entry(None, outcome(status="done", ago=10, result_key="r.json"))
        later_failure = merge_entry(
            done, outcome(status="failed", error_code="llm_timeout", attempt=2)
        )
        assert later_failure.status == "done"
        assert later_failure.result_key == "r.json"
        assert later_failure.attempts == 2

    def test_new_content_replaces_done(self):
        done = merge_entry(None, outcome(status="done", ago=10))
        changed = merge_entry(done, outcome(status="failed", etag='"e2"', error_code="pdf_damaged"))
        assert (changed.status, changed.etag, changed.attempts) == ("failed", '"e2"', 1)

    def test_a_late_older_report_does_not_win(self):
        newer = merge_entry(None, outcome(status="needs_review", ago=1))
        stale = merge_entry(newer, outcome(status="failed", ago=5, error_code="x"))
        assert stale.status == "needs_review"

    def test_a_late_done_still_beats_a_newer_failure(self):
        failed = merge_entry(None, outcome(status="failed", ago=1, error_code="x"))
        assert merge_entry(failed, outcome(status="done", ago=5)).status == "done"

    def test_first_seen_is_kept_and_attempts_never_go_back(self):
        first = merge_entry(None, outcome(status="failed", ago=10, attempt=3, error_code="x"))
        second = merge_entry(first, outcome(status="done", attempt=2))
        assert second.first_seen_at == first.first_seen_at
        assert second.attempts == 3


async def test_commit_creates_then_updates_with_a_version_counter(store):
    first = await commit_outcomes(store, [outcome("a.pdf")])
    second = await commit_outcomes(store, [outcome("b.pdf")])
    manifest, etag = await read_manifest(store)
    assert (first.version, second.version, manifest.version) == (1, 2, 2)
    assert set(manifest.entries) == {"a.pdf", "b.pdf"}
    assert etag is not None


async def test_recommitting_the_same_batch_writes_nothing(store):
    batch = [outcome("a.pdf"), outcome("b.pdf")]
    await commit_outcomes(store, batch)
    _, etag_before = await read_manifest(store)
    again = await commit_outcomes(store, batch)
    _, etag_after = await read_manifest(store)
    assert not again.written and etag_before == etag_after


async def test_commits_from_the_last_snapshot_match_what_a_reader_sees(store):
    first = await commit_outcomes(store, [outcome("a.pdf")])
    second = await commit_outcomes(store, [outcome("b.pdf")], base=first.snapshot)
    manifest, etag = await read_manifest(store)
    assert second.attempts == 1 and second.snapshot == (manifest, etag)
    assert set(manifest.entries) == {"a.pdf", "b.pdf"} and manifest.version == 2


async def test_a_stale_snapshot_is_refused_and_the_commit_rereads(store):
    """Someone else wrote after our last commit: the write conditional on our snapshot's
    ETag fails, and the commit re-reads and keeps both the other writer's entry and ours."""
    ours = await commit_outcomes(store, [outcome("a.pdf")])
    await commit_outcomes(store, [outcome("other.pdf")])  # a writer that bypasses ours
    again = await commit_outcomes(store, [outcome("b.pdf")], base=ours.snapshot, backoff_base=0.001)
    manifest, _ = await read_manifest(store)
    assert again.attempts == 2
    assert set(manifest.entries) == {"a.pdf", "other.pdf", "b.pdf"} and manifest.version == 3


async def test_compare_and_swap_alone_loses_nothing_under_contention(store):
    """50 unsynchronised writers, no lock at all: the conditional write keeps every update."""
    results = await asyncio.gather(
        *(
            commit_outcomes(store, [outcome(f"inv-{i}.pdf")], max_attempts=200, backoff_max=0.2)
            for i in range(50)
        )
    )
    manifest, _ = await read_manifest(store)
    assert len(manifest.entries) == 50
    assert manifest.version == 50
    assert any(r.attempts > 1 for r in results), "the test must actually produce conflicts"


async def test_identical_entries_still_change_the_etag(store):
    await commit_outcomes(store, [outcome("a.pdf", status="failed", error_code="x", ago=5)])
    _, etag1 = await read_manifest(store)
    await commit_outcomes(store, [outcome("a.pdf", status="failed", error_code="x", ago=1)])
    data = json.loads((await store.get("manifest.json")).data)
    _, etag2 = await read_manifest(store)
    assert etag1 != etag2 and data["version"] == 2


def session_of(commit):
    """A lock session as the flow runs one (minus Prefect): commit each batch it is given."""

    async def session(batches):
        async for batch in batches:
            await commit(batch)

    return session


class TestManifestWriter:
    async def test_group_commit_batches_what_arrives_during_a_write(self):
        committed: list[list[str]] = []

        async def slow_commit(batch):
            await asyncio.sleep(0.05)
            committed.append([o.key for o in batch])

        async with ManifestWriter(session_of(slow_commit), min_interval=0) as writer:
            for i in range(200):
                writer.submit(outcome(f"{i}.pdf"))
                if i % 20 == 0:
                    await asyncio.sleep(0.01)
        keys = [k for batch in committed for k in batch]
        assert sorted(keys) == sorted(f"{i}.pdf" for i in range(200))
        assert len(committed) < 20
        assert writer.recorded == 200 and writer.batches == [len(b) for b in committed]

    async def test_writes_linger_so_each_carries_more(self):
        committed: list[int] = []

        async def commit(batch):
            committed.append(len(batch))

        async with ManifestWriter(session_of(commit), min_interval=0.2) as writer:
            for i in range(100):
                writer.submit(outcome(f"{i}.pdf"))
                await asyncio.sleep(0.005)
        assert sum(committed) == 100 and len(committed) <= 5
        assert writer.sessions == 1, "one lock acquisition for the whole run"

    async def test_an_eager_session_holds_the_lock_before_anything_is_submitted(self):
        async def commit(batch):
            pass

        writer = await ManifestWriter(session_of(commit)).open(wait_for_lock=1.0)
        assert writer._held.is_set()
        writer.submit(outcome("a.pdf"))
        await writer.close()
        assert writer.sessions == 1 and writer.recorded == 1

    async def test_a_session_is_released_after_max_hold_so_other_runs_get_the_lock(self):
        async def commit(batch):
            pass

        async with ManifestWriter(session_of(commit), max_hold=0.05, min_interval=0) as writer:
            for i in range(4):
                writer.submit(outcome(f"{i}.pdf"))
                await asyncio.sleep(0.1)
        assert writer.recorded == 4 and writer.sessions == 4

    async def test_progress_is_reported_per_committed_batch(self):
        reported = []

        async def commit(batch):
            pass

        async def on_commit(count):
            reported.append(count)

        async with ManifestWriter(session_of(commit), on_commit=on_commit) as writer:
            for i in range(5):
                writer.submit(outcome(f"{i}.pdf"))
        assert sum(reported) == 5

    async def test_a_failed_write_is_retried_with_its_batch_in_a_new_session(self):
        calls = []

        async def flaky(batch):
            calls.append(len(batch))
            if len(calls) == 1:
                raise OSError("S3 unreachable")

        async with ManifestWriter(session_of(flaky), retry_delay=0.01) as writer:
            for i in range(5):
                writer.submit(outcome(f"{i}.pdf"))
        assert calls == [5, 5] and writer.recorded == 5 and writer.sessions == 2

    async def test_a_manifest_that_cannot_be_written_fails_loudly_naming_what_is_unrecorded(self):
        async def broken(batch):
            raise OSError("access denied")

        writer = ManifestWriter(session_of(broken), max_failures=2, retry_delay=0.01)
        with pytest.raises(ManifestWriteError) as caught:
            async with writer:
                writer.submit(outcome("a.pdf"))
                writer.submit(outcome("b.pdf"))
        assert sorted(o.key for o in caught.value.unrecorded) == ["a.pdf", "b.pdf"]
        assert "2 outcomes are not recorded" in str(caught.value)


class TestFormat:
    """The manifest names its format; anything else at its place is refused, never overwritten."""

    @pytest.mark.parametrize(
        ("data", "says"),
        [
            (b'{"hello": "world"}', 'not an invoice-pipeline manifest (no "format"'),
            (
                b'{"version": 3, "entries": {}, "owner": "other-tool"}',
                "not an invoice-pipeline manifest",
            ),
            (b"[1, 2]", "not an object"),
            (b"not json at all", "is not JSON"),
            (
                b'{"format": "other-tool/manifest", "entries": {}}',
                "a 'other-tool/manifest' document",
            ),
            (b'{"format": "invoice-pipeline/manifest", "format_version": 99}', "format version 99"),
        ],
    )
    async def test_what_is_not_our_manifest_is_refused_and_left_as_it_is(self, store, data, says):
        await store.put("manifest.json", data)
        with pytest.raises(ManifestUnreadable, match=re.escape(says)) as refused:
            await read_manifest(store)
        assert f"{store.url.rstrip('/')}/manifest.json" in str(refused.value)  # names the place
        assert isinstance(refused.value, ConfigurationError)  # one line, exit 2
        with pytest.raises(ManifestUnreadable):
            await commit_outcomes(store, [outcome("a.pdf")])
        assert (await store.get("manifest.json")).data == data

    async def test_a_damaged_manifest_says_which_field_is_wrong_and_what_to_do(self, store):
        broken = Manifest().model_dump(mode="json") | {
            "entries": {"a.pdf": {"status": "exploded", "etag": '"e"'}}
        }
        await store.put("manifest.json", json.dumps(broken).encode())
        with pytest.raises(ManifestUnreadable) as refused:
            await read_manifest(store)
        message = str(refused.value)
        assert "entries.a.pdf.status" in message and "restore it from a backup" in message
        assert "\n" not in message and "pydantic" not in message

    async def test_unknown_fields_survive_every_rewrite(self, store):
        await commit_outcomes(store, [outcome("a.pdf")])
        data = json.loads((await store.get("manifest.json")).data)
        data["retention_days"] = 30
        data["entries"]["a.pdf"]["approved_by"] = "jane"
        await store.put("manifest.json", json.dumps(data).encode())
        await commit_outcomes(store, [outcome("a.pdf", status="done", ago=-1), outcome("b.pdf")])
        after = json.loads((await store.get("manifest.json")).data)
        assert after["retention_days"] == 30
        assert after["entries"]["a.pdf"]["approved_by"] == "jane"
        assert after["format"] == "invoice-pipeline/manifest" and after["format_version"] == 1

    async def test_a_manifest_from_before_the_format_mark_is_read_and_marked(self, store):
        legacy = {
            "version": 4,
            "updated_at": None,
            "entries": {"a.pdf": merge_entry(None, outcome("a.pdf")).model_dump(mode="json")},
        }
        await store.put("manifest.json", json.dumps(legacy).encode())
        manifest, _ = await read_manifest(store)
        assert manifest.version == 4 and manifest.entries["a.pdf"].status == "done"
        await commit_outcomes(store, [outcome("b.pdf")])
        after = json.loads((await store.get("manifest.json")).data)
        assert after["format"] == "invoice-pipeline/manifest" and set(after["entries"]) == {
            "a.pdf",
            "b.pdf",
        }


class TestSourceBinding:
    async def test_the_first_write_binds_the_output_to_its_source_and_another_is_refused(
        self, store
    ):
        await commit_outcomes(store, [outcome("a.pdf")], source="s3://bucket/2026-11/")
        manifest, _ = await read_manifest(store)
        assert manifest.source == "s3://bucket/2026-11/"
        with pytest.raises(SourceMismatch, match="records the invoices of s3://bucket/2026-11/"):
            await commit_outcomes(
                store, [outcome("a.pdf", etag='"other"')], source="s3://bucket/2026-12/"
            )
        after, _ = await read_manifest(store)
        assert after.entries == manifest.entries and after.version == manifest.version

    async def test_the_target_refuses_another_source_at_its_first_read(self, store):
        await commit_outcomes(store, [outcome("a.pdf")], source="/data/a")
        with pytest.raises(SourceMismatch):
            await ManifestTarget(store, source="/data/b").read()


class TestRollback:
    """A manifest deleted, or replaced by an older copy, while a run writes to it."""

    async def test_a_deleted_manifest_gets_back_everything_the_writer_knew(self, store, caplog):
        target = ManifestTarget(store, source="src")
        await target.read()
        for i in range(5):
            await target.commit([outcome(f"{i}.pdf")])
        await _delete(store, "manifest.json")
        with caplog.at_level(logging.WARNING, logger="tasks.manifest.model"):
            result = await target.commit([outcome("5.pdf")])
        manifest, _ = await read_manifest(store)
        assert set(manifest.entries) == {f"{i}.pdf" for i in range(6)}
        assert result.version == manifest.version == 6 and manifest.source == "src"
        assert "disappeared" in caplog.text

    async def test_an_older_copy_is_merged_with_what_the_writer_knew_and_the_version_goes_on(
        self, store, caplog
    ):
        target = ManifestTarget(store)
        await target.commit([outcome("a.pdf", status="processing")])
        old = (await store.get("manifest.json")).data
        await target.commit([outcome("a.pdf", status="done", ago=-1), outcome("b.pdf")])
        other = ManifestTarget(store)
        await other.commit([outcome("other.pdf")])  # another writer: version 3
        await store.put("manifest.json", old)  # someone restores version 1
        with caplog.at_level(logging.WARNING, logger="tasks.manifest.model"):
            await target.commit([outcome("c.pdf")])
            manifest, _ = await read_manifest(store)
            assert manifest.entries["a.pdf"].status == "done"  # not back to processing
            assert set(manifest.entries) == {"a.pdf", "b.pdf", "c.pdf"}
            assert manifest.version == 3  # past what this writer knew (2)
            assert "went back from version 2 to 1" in caplog.text
            await other.commit([outcome("d.pdf")])  # the other writer's entry comes back too
        manifest, _ = await read_manifest(store)
        assert set(manifest.entries) == {"a.pdf", "b.pdf", "c.pdf", "other.pdf", "d.pdf"}
        assert "lacks 1 entries" in caplog.text

    async def test_a_newer_manifest_from_another_writer_is_not_a_rollback(self, store, caplog):
        target = ManifestTarget(store)
        await target.commit([outcome("a.pdf")])
        await commit_outcomes(store, [outcome("b.pdf")])
        with caplog.at_level(logging.WARNING, logger="tasks.manifest.model"):
            await target.commit([outcome("c.pdf")])
        assert "went back" not in caplog.text and "disappeared" not in caplog.text


async def _delete(store, key: str) -> None:
    if isinstance(store, LocalStore):
        (store.root / key).unlink()
    else:
        async with store._requests:
            await store._require_client().delete_object(Bucket=store.bucket, Key=store.prefix + key)


class TestRelease:
    def test_a_run_gives_back_only_its_own_live_claim(self):
        at = utcnow()
        claim = outcome(
            status="processing", flow_run_id="A", lease_until=at + timedelta(seconds=60), ago=1
        )
        release = outcome(status="released", flow_run_id="A", attempt=0)
        released = merge_entry(merge_entry(None, claim), release)
        assert released.status == "released" and released.attempts == 0
        others = outcome(status="released", flow_run_id="B", attempt=0)
        assert merge_entry(merge_entry(None, claim), others).status == "processing"
        done = merge_entry(None, outcome(status="done", flow_run_id="A", ago=1))
        assert merge_entry(done, release) == done  # a late release never undoes an outcome
        reclaimed = merge_entry(
            released,
            outcome(
                status="processing",
                flow_run_id="C",
                attempt=1,
                lease_until=at + timedelta(seconds=60),
            ),
        )
        assert reclaimed.status == "processing" and reclaimed.flow_run_id == "C"


async def test_a_source_mismatch_found_when_writing_is_not_retried_and_names_its_cause(store):
    """Two runs of different sources started on a fresh output: the one that writes second
    finds the output bound to the other; retrying cannot help, so the writer stops at once."""
    await commit_outcomes(store, [outcome("a.pdf")], source="src-A")
    target = ManifestTarget(store, source="src-B")
    writer = ManifestWriter(session_of(target.commit), retry_delay=0.01)
    with pytest.raises(ManifestWriteError) as caught:
        async with writer:
            writer.submit(outcome("a.pdf", status="processing"))
    assert isinstance(caught.value.cause, SourceMismatch) and writer.sessions == 1
    manifest, _ = await read_manifest(store)
    assert manifest.source == "src-A" and manifest.entries["a.pdf"].status == "done"


class TestLockTag:
    LOCATIONS = [
        "s3://bucket/out/manifest.json",
        "s3://bucket/out2/manifest.json",
        "s3://bucket-out/manifest.json",
        "/data/out/manifest.json",
        "/data/Out/manifest.json",
        "/data/out dir/%ü/manifest.json",
        "/" + "x" * 300 + "/manifest.json",
    ]

    def test_one_lock_per_output_each_a_valid_prefect_limit_name(self):
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        from tasks.orchestration.limits import tag_limit_name

        tags = [manifest_lock_tag(location) for location in self.LOCATIONS]
        assert len(set(tags)) == len(tags)
        assert tags == [manifest_lock_tag(location) for location in self.LOCATIONS]  # stable
        for tag in tags:
            assert tag.startswith("manifest:") and len(tag) < 100
            GlobalConcurrencyLimitCreate(name=tag_limit_name(tag), limit=1)  # raises if not valid
        assert "bucket-out-manifest.json" in tags[0]  # readable in the UI
