"""Trust the record (issue #20): nothing lost, nothing overwritten, no silent success.

Flow-level scenarios, each against real servers (moto's S3 over HTTP, the project's fake
OpenAI server, Prefect's test server or a real `prefect server start`), no mocks:

1. colliding keys (`inv.pdf` / `inv.PDF`, `x//y.pdf`, `x/./y.pdf`) get distinct results;
2. a manifest deleted, or replaced by an older copy, in the middle of a run loses nothing;
3. two sources into one output: the second is refused, the first's record untouched;
4. another tool's `manifest.json` is refused, not destroyed; unknown fields are kept;
5. a missing source (or a file as source or output) is an error, and nothing is created;
6. claims outlive their run no more: a cancelled run gives them back, an ended run's are
   taken over at once, only a live run's are left (and named);
7. SIGTERM / SIGINT: in-flight invoices finish and are recorded, exit 143 / 130, and a rerun
   pays the LLM for nothing twice;
8. bad parameters are refused before any work.

Every scenario with invoices ends with `scenario.record(...)` (tests/reliability_report.py):
zero lost, zero duplicated, and a row in `make reliability`'s table.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import pytest_asyncio

from flows.process_invoices import process_invoices
from tasks.manifest.model import MANIFEST_KEY, Manifest, ManifestEntry, utcnow
from tasks.report import RunRefused, RunSummary
from tasks.storage import etag_of
from testing.fake_llm.server import FakeLLMConfig, FakeLLMServer
from testing.samples import make_invoice, write_samples
from tests.test_reliability import run_flow as reliability_run

pytest_plugins = ["tests.reliability_report"]

FINAL_OK = ("done", "needs_review")


# --------------------------------------------------------------------------------------------
# Inputs


_PDFS: dict[int, bytes] = {}


def pdf(seed: int) -> bytes:
    """A clean sample invoice (passes every check); cached per seed."""
    if seed not in _PDFS:
        _PDFS[seed] = make_invoice(seed)[0]
    return _PDFS[seed]


def invoices(n: int, *, seed: int = 7000, distinct: int = 10, prefix: str = "") -> dict[str, bytes]:
    """`n` invoices under distinct keys, at most `distinct` different contents."""
    return {f"{prefix}inv-{i:03d}.pdf": pdf(seed + i % distinct) for i in range(n)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Places: a folder or an S3 prefix, read and written by the test directly (never through the
# pipeline's stores), so what a test checks is what is really stored.


class Place:
    url: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def delete(self, key: str) -> None: ...
    def objects(self) -> dict[str, bytes]: ...  # every object under the place, by key
    def created(self) -> bool: ...  # whether anything exists at the place

    def write(self, files: dict[str, bytes]) -> list[str]:
        for key, data in files.items():
            self.put(key, data)
        return sorted(files)

    def manifest_bytes(self) -> bytes | None:
        return self.get(MANIFEST_KEY)

    def manifest(self) -> Manifest | None:
        data = self.manifest_bytes()
        return None if data is None else Manifest.model_validate_json(data)

    def put_manifest(self, manifest: Manifest) -> None:
        self.put(MANIFEST_KEY, manifest.model_dump_json().encode())

    def results(self) -> dict[str, bytes]:
        """Every result object, by its key under the place."""
        return {k: v for k, v in self.objects().items() if k.startswith("results/")}

    def result_invoice_keys(self) -> list[str]:
        """The `key` field of every result object (one item per object)."""
        return [json.loads(body)["key"] for body in self.results().values()]


class Folder(Place):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def put(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".~test-{uuid.uuid4().hex}")  # reserved name: never listed
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers never see half a file

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        (self.root / key).unlink()

    def objects(self) -> dict[str, bytes]:
        if not self.root.is_dir():
            return {}
        found = {}
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and not any(part.startswith(".~") for part in key.split("/")):
                found[key] = path.read_bytes()
        return found

    def created(self) -> bool:
        return self.root.exists()


class Prefix(Place):
    def __init__(self, s3, bucket: str, prefix: str) -> None:
        self.s3, self.bucket, self.prefix = s3, bucket, prefix.rstrip("/") + "/"
        self.url = f"s3://{bucket}/{self.prefix.rstrip('/')}"

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def get(self, key: str) -> bytes | None:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def objects(self) -> dict[str, bytes]:
        return {
            key[len(self.prefix) :]: data
            for key, data in bucket_objects(self.s3, self.bucket, self.prefix).items()
        }

    def created(self) -> bool:
        return bool(self.objects())


def bucket_objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    found = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            found[obj["Key"]] = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return found


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """A boto3 client straight to moto; the flow reaches moto through AWS_ENDPOINT_URL."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture(params=["local", "s3"])
def places(request, tmp_path):
    """A factory of places on each backend: places("in") is a folder or an S3 prefix."""
    if request.param == "local":
        return lambda name: Folder(tmp_path / name)
    client, bucket = request.getfixturevalue("s3"), request.getfixturevalue("s3_bucket")
    return lambda name: Prefix(client, bucket, name)


# --------------------------------------------------------------------------------------------
# Running the flow in-process (Prefect test harness)


@dataclass
class Run:
    state: object
    result: object  # RunSummary, or RunRefused when the run could not go ahead
    wall_s: float

    @property
    def summary(self) -> RunSummary:
        assert isinstance(self.result, RunSummary), (self.state, self.result)
        return self.result

    @property
    def refused(self) -> RunRefused:
        assert isinstance(self.result, RunRefused), (self.state, self.result)
        return self.result

    @property
    def reported(self) -> list[str]:
        return [row.invoice for row in getattr(self.result, "rows", None) or []]


async def run_flow(**params) -> Run:
    """One in-process flow run, bounded (tests/test_reliability.py), its result checked."""
    run = await reliability_run(**params)
    return Run(run.state, run.summary, run.wall_s)


@pytest.fixture
def fake_llm(monkeypatch):
    """Start the fake OpenAI server with a fixed latency; the flow's `openai` extractor talks
    to it (OPENAI_BASE_URL / OPENAI_API_KEY)."""
    servers: list[FakeLLMServer] = []

    def start(latency: float) -> FakeLLMServer:
        server = FakeLLMServer(FakeLLMConfig(latency=latency)).start()
        servers.append(server)
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-trust")
        return server

    yield start
    for server in servers:
        server.stop()


def counts(manifest: Manifest | None) -> Counter[str]:
    return Counter(e.status for e in (manifest.entries.values() if manifest else ()))


async def wait_for(check, *, what: str, timeout: float = 60, every: float = 0.05):
    """Poll `check()` (sync, run in a thread) until it returns something truthy; that."""
    async with asyncio.timeout(timeout):
        while True:
            got = await asyncio.to_thread(check)
            if got:
                return got
            await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")  # pragma: no cover


def assert_all_recorded(place: Place, sources: dict[str, bytes]) -> Manifest:
    """Every invoice `done`/`needs_review`, its result there and about its own bytes."""
    manifest = place.manifest()
    assert manifest is not None
    for key, data in sources.items():
        entry = manifest.entries.get(key)
        assert entry is not None and entry.status in FINAL_OK, (key, entry)
        result = json.loads(place.get(entry.result_key))
        assert (result["key"], result["sha256"]) == (key, sha256(data)), key
        assert entry.sha256 == sha256(data) and entry.etag == etag_of(data), key
    return manifest


# --------------------------------------------------------------------------------------------
# 1. Colliding keys


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    "backend, keys",
    [
        ("s3", ["inv.pdf", "inv.PDF", "x/y.pdf", "x//y.pdf", "x/./y.pdf"]),
        ("local", ["inv.pdf", "inv.PDF", "sub/inv.pdf"]),
    ],
)
async def test_keys_that_used_to_collide_get_one_result_each(
    request, tmp_path, scenario, backend, keys
):
    """Keys differing in case, in an empty or a `.` segment: each its own `done` entry and its
    own result object, whose `key` and `sha256` are those of its own source object."""
    if backend == "s3":
        client, bucket = request.getfixturevalue("s3"), request.getfixturevalue("s3_bucket")
        source, output = Prefix(client, bucket, "in"), Prefix(client, bucket, "out")
    else:
        source, output = Folder(tmp_path / "in"), Folder(tmp_path / "out")
    files = {key: pdf(7100 + i) for i, key in enumerate(keys)}
    source.write(files)
    assert sorted(source.objects()) == sorted(keys)  # stored as named, nothing normalised

    run = await run_flow(source=source.url, output=output.url)

    manifest = output.manifest()
    scenario.record(
        name=f"colliding keys ({backend})",
        invoices_in=len(keys),
        manifest=manifest,
        expected_keys=keys,
        wall_s=run.wall_s,
        results=output.result_invoice_keys(),
        reported=run.reported,
    )
    assert run.state.is_completed(), run.state.message
    assert {k: e.status for k, e in manifest.entries.items()} == {k: "done" for k in keys}
    assert len({e.result_key for e in manifest.entries.values()}) == len(keys)
    assert len(output.results()) == len(keys)
    assert_all_recorded(output, files)


# --------------------------------------------------------------------------------------------
# 2. The manifest deleted, or replaced by an older copy, mid-run


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("damage", ["deleted", "older copy"])
async def test_a_manifest_deleted_or_rolled_back_mid_run_loses_nothing(
    places, fake_llm, caplog, scenario, damage
):
    """While a run works (30 invoices, 0.5 s LLM calls, 5 at a time), its manifest is deleted,
    or replaced by the copy written right after the claims: the run puts back everything it
    knew, says so in a warning, and ends Completed with every invoice recorded."""
    caplog.set_level(logging.INFO, logger="tasks.manifest.model")
    n = 30
    source, output = places("in"), places("out")
    files = invoices(n, seed=7200)
    keys = source.write(files)
    llm = fake_llm(0.5)

    flow = asyncio.create_task(
        run_flow(source=source.url, output=output.url, extractor="openai", max_concurrency=5)
    )
    try:
        # The copy taken right after the claims: every invoice there, (almost) all processing.
        def claimed():
            data = output.manifest_bytes()
            return data if data and len(Manifest.model_validate_json(data).entries) == n else None

        old_copy = await wait_for(claimed, what="the claims")
        old = Manifest.model_validate_json(old_copy)
        done_in_copy = counts(old)["done"] + counts(old)["needs_review"]

        def progressed():
            now = counts(output.manifest())
            return (
                now["done"] + now["needs_review"] >= done_in_copy + 3 and now["processing"] >= 5
            ) and now

        before = await wait_for(progressed, what="a few invoices done, others in flight")
        if damage == "deleted":
            await asyncio.to_thread(output.delete, MANIFEST_KEY)
        else:
            await asyncio.to_thread(output.put, MANIFEST_KEY, old_copy)
        run = await flow
    finally:
        flow.cancel()

    manifest = output.manifest()
    scenario.record(
        name=f"manifest {damage} mid-run ({type(output).__name__.lower()})",
        invoices_in=n,
        manifest=manifest,
        expected_keys=keys,
        wall_s=run.wall_s,
        results=output.result_invoice_keys(),
        reported=run.reported,
        llm_answers=llm.stats()["outcomes"].get("ok", 0),
        note=f"{damage} at {before['done']} done / {before['processing']} in flight",
    )
    assert run.state.is_completed(), run.state.message
    assert run.summary.processed == n
    assert_all_recorded(output, files)
    assert set(manifest.entries) == set(keys)
    assert manifest.version > old.version  # it never went backwards for good
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "tasks.manifest.model" and r.levelno == logging.WARNING
    ]
    expected = "disappeared" if damage == "deleted" else "went back from version"
    assert any(expected in w and "manifest.json" in w for w in warnings), warnings


# --------------------------------------------------------------------------------------------
# 3. Two sources, one output


@pytest.mark.usefixtures("prefect_harness")
async def test_a_second_source_into_the_same_output_is_refused_and_the_first_kept(places, scenario):
    """Source A into an output, then source B (same names, other contents) into the same
    output: refused, naming A; the manifest and every result unchanged, byte for byte. A again
    skips everything."""
    a, b, output = places("month-a"), places("month-b"), places("out")
    names = [f"inv-{i}.pdf" for i in range(4)]
    files_a = {name: pdf(7300 + i) for i, name in enumerate(names)}
    files_b = {name: pdf(7350 + i) for i, name in enumerate(names)}
    a.write(files_a)
    b.write(files_b)

    first = await run_flow(source=a.url, output=output.url)
    assert first.state.is_completed(), first.state.message
    before = output.objects()

    second = await run_flow(source=b.url, output=output.url)
    assert second.state.is_failed()
    reason = second.refused.reason
    assert "records the invoices of" in reason and a.url.rstrip("/") in reason, reason
    assert b.url.rstrip("/") in reason, reason
    assert output.objects() == before  # manifest and results: every byte as it was

    again = await run_flow(source=a.url, output=output.url)
    assert again.state.is_completed(), again.state.message
    assert again.summary.processed == 0
    assert again.summary.skipped_done + again.summary.skipped_review == len(names)
    manifest = assert_all_recorded(output, files_a)
    scenario.record(
        name=f"two sources, one output ({type(output).__name__.lower()})",
        invoices_in=len(names),
        manifest=manifest,
        expected_keys=names,
        wall_s=first.wall_s + second.wall_s + again.wall_s,
        results=output.result_invoice_keys(),
        reported=[first.reported, again.reported],
        note="the second source refused, nothing of the first rewritten",
    )


# --------------------------------------------------------------------------------------------
# 4. Another tool's manifest.json; unknown fields


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    "foreign", [b'{"hello": "world"}', b'[{"key": "inv-0.pdf"}]'], ids=["object", "list"]
)
async def test_another_tools_manifest_is_refused_and_left_as_it_is(places, foreign):
    source, output = places("in"), places("out")
    source.write(invoices(2, seed=7400))
    output.put(MANIFEST_KEY, foreign)

    run = await run_flow(source=source.url, output=output.url)

    assert run.state.is_failed()
    reason = run.refused.reason
    assert f"{output.url.rstrip('/')}/manifest.json" in reason, reason
    assert "not an invoice-pipeline manifest" in reason, reason
    assert output.objects() == {MANIFEST_KEY: foreign}  # unchanged, nothing else written
    if isinstance(output, Folder):  # not even the local store's lock files
        assert [p.name for p in output.root.iterdir()] == [MANIFEST_KEY]


@pytest.mark.usefixtures("prefect_harness")
async def test_unknown_fields_of_a_manifest_survive_a_run(places, scenario):
    """Fields this version does not know, at the top level and in entries (one left alone,
    one rewritten because its invoice changed), are still there after the next run."""
    source, output = places("in"), places("out")
    files = invoices(3, seed=7450)
    keys = source.write(files)
    first = await run_flow(source=source.url, output=output.url)
    assert first.state.is_completed(), first.state.message

    manifest = output.manifest()
    raw = json.loads(output.manifest_bytes())
    raw["x_owner"] = {"team": "accounts payable"}
    raw["entries"][keys[0]]["x_note"] = "checked by hand"  # left alone by the next run
    raw["entries"][keys[1]]["x_note"] = "re-sent by vendor"  # its invoice changes: rewritten
    output.put(MANIFEST_KEY, json.dumps(raw).encode())
    files[keys[1]] = pdf(7499)
    source.put(keys[1], files[keys[1]])

    second = await run_flow(source=source.url, output=output.url)

    assert second.state.is_completed(), second.state.message
    assert second.reported == [keys[1]]
    after = json.loads(output.manifest_bytes())
    assert after["x_owner"] == {"team": "accounts payable"}
    assert after["entries"][keys[0]]["x_note"] == "checked by hand"
    assert after["entries"][keys[1]]["x_note"] == "re-sent by vendor"
    assert after["entries"][keys[1]]["etag"] != manifest.entries[keys[1]].etag
    final = assert_all_recorded(output, files)
    scenario.record(
        name=f"unknown manifest fields kept ({type(output).__name__.lower()})",
        invoices_in=len(keys),
        manifest=final,
        expected_keys=keys,
        wall_s=first.wall_s + second.wall_s,
        results=output.result_invoice_keys(),
        reported=[first.reported, second.reported],
    )


# --------------------------------------------------------------------------------------------
# 5. A missing source, a file as source or output


def invoices_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )


def one_line_refusal(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, one `invoices run:` line on stderr, no traceback; that line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("invoices run:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", ["source missing", "source is a file", "output is a file"])
def test_a_missing_source_or_a_file_in_the_way_is_one_clear_line_and_exit_2(
    prefect_server, tmp_path, case
):
    source, output = tmp_path / "invoices", tmp_path / "out"
    if case == "source missing":
        source = tmp_path / "invoicse"  # a typo
        expected = f"the source folder {source} does not exist"
    elif case == "source is a file":
        source = tmp_path / "invoice.pdf"
        source.write_bytes(pdf(7500))
        expected = f"the source {source} is a file, not a folder"
    else:
        write_samples(source, 1, seed=75)
        output.write_bytes(b"an output file, not a folder")
        expected = f"the output {output} is a file, not a folder"

    proc = invoices_cli(
        "run", str(source), "--output", str(output), "--json", env=prefect_server.env
    )

    line = one_line_refusal(proc)
    assert expected in line, line
    assert proc.stdout.strip() == ""
    if case == "output is a file":
        assert output.read_bytes() == b"an output file, not a folder"
    else:
        assert not output.exists()  # the output folder was not created
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (source, output) if p.exists()
    )


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize("where", ["misspelt prefix", "empty prefix", "missing bucket"])
async def test_an_s3_source_with_nothing_under_it_is_refused_and_nothing_written(
    s3, s3_bucket, where
):
    s3.put_object(Bucket=s3_bucket, Key="incoming/inv-0.pdf", Body=pdf(7510))
    if where == "misspelt prefix":
        source, expected = f"s3://{s3_bucket}/incomming", "nothing is stored under the source"
    elif where == "empty prefix":
        source, expected = f"s3://{s3_bucket}/2026-12", "nothing is stored under the source"
    else:
        source, expected = "s3://no-such-bucket-trust/incoming", "does not exist"
    before = bucket_objects(s3, s3_bucket)

    run = await run_flow(source=source, output=f"s3://{s3_bucket}/processed")

    assert run.state.is_failed()
    assert expected in run.refused.reason, run.refused.reason
    assert bucket_objects(s3, s3_bucket) == before  # nothing written
    assert "no-such-bucket-trust" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


# --------------------------------------------------------------------------------------------
# 6. Claims outlive their run no more


def claim(
    manifest: Manifest,
    files: dict[str, bytes],
    run_id: str,
    *,
    lease: timedelta = timedelta(minutes=10),
) -> Manifest:
    """`manifest` with `files` claimed (`processing`) by flow run `run_id` until now + lease,
    as that run would have written them."""
    now = utcnow()
    entries = dict(manifest.entries)
    for key, data in files.items():
        entries[key] = ManifestEntry(
            status="processing",
            etag=etag_of(data),
            attempts=1,
            flow_run_id=run_id,
            extractor="offline",
            first_seen_at=now,
            updated_at=now,
            lease_until=now + lease,
        )
    return manifest.model_copy(
        update={"entries": entries, "version": manifest.version + 1, "updated_at": now}
    )


@pytest.mark.usefixtures("prefect_harness")
async def test_a_cancelled_run_gives_its_claims_back_and_a_rerun_takes_them_at_once(
    tmp_path, fake_llm, scenario
):
    n, lease = 20, 60.0
    source, output = Folder(tmp_path / "in"), Folder(tmp_path / "out")
    files = invoices(n, seed=7600)
    keys = source.write(files)
    llm = fake_llm(0.5)

    flow = asyncio.create_task(
        run_flow(
            source=source.url,
            output=output.url,
            extractor="openai",
            max_concurrency=4,
            lease_seconds=lease,
        )
    )

    def progressed():
        now = counts(output.manifest())
        return now["done"] + now["needs_review"] >= 3 and now["processing"] >= 5 and now

    at_cancel = await wait_for(progressed, what="some invoices done, others claimed")
    flow.cancel()
    async with asyncio.timeout(60):
        with pytest.raises(asyncio.CancelledError):
            await flow

    after = output.manifest()
    statuses = counts(after)
    assert statuses["processing"] == 0, {k: e.status for k, e in after.entries.items()}
    unfinished = [k for k, e in after.entries.items() if e.status == "released"]
    finished = [k for k, e in after.entries.items() if e.status in FINAL_OK]
    assert unfinished and sorted(unfinished + finished) == keys
    requests_before = llm.stats()["total_requests"]

    rerun = await run_flow(
        source=source.url,
        output=output.url,
        extractor="openai",
        max_concurrency=4,
        lease_seconds=lease,
    )

    assert rerun.state.is_completed(), rerun.state.message
    assert rerun.wall_s < lease / 2, f"the rerun waited {rerun.wall_s:.1f} s"
    assert rerun.summary.taken_over == 0 and rerun.summary.skipped_in_flight == 0
    assert sorted(rerun.reported) == sorted(unfinished)
    manifest = assert_all_recorded(output, files)
    scenario.record(
        name="run cancelled mid-batch, rerun",
        invoices_in=n,
        manifest=manifest,
        expected_keys=keys,
        wall_s=rerun.wall_s,
        results=output.result_invoice_keys(),
        reported=rerun.reported,
        note=f"cancelled at {at_cancel['done']} done, {len(unfinished)} released; "
        f"LLM calls {requests_before} + "
        f"{llm.stats()['total_requests'] - requests_before}",
    )


@pytest.mark.usefixtures("prefect_harness")
async def test_claims_of_a_run_that_ended_are_taken_over_at_once(tmp_path, scenario):
    """Claims with 10 minutes of lease left, held by a flow run that is Completed in Prefect:
    the next run takes them over at once instead of skipping them."""
    source, output = Folder(tmp_path / "in"), Folder(tmp_path / "out")
    first_files = invoices(3, seed=7700)
    source.write(first_files)
    first = await run_flow(source=source.url, output=output.url)
    assert first.state.is_completed(), first.state.message
    ended_run = first.summary.flow_run_id
    assert ended_run

    claimed = invoices(7, seed=7700)
    claimed = {k: v for k, v in claimed.items() if k not in first_files}
    source.write(claimed)
    output.put_manifest(claim(output.manifest(), claimed, ended_run))

    run = await run_flow(source=source.url, output=output.url, lease_seconds=60)

    assert run.state.is_completed(), run.state.message
    assert run.summary.taken_over == len(claimed) == 4
    assert sorted(run.reported) == sorted(claimed), (
        f"taken over but not processed: {run.state.message}; manifest: "
        f"{ {k: (e.status, e.flow_run_id) for k, e in output.manifest().entries.items()} }"
    )
    assert run.summary.skipped_in_flight == 0 and run.summary.claim_holders == []
    assert run.wall_s < 30
    files = first_files | claimed
    manifest = assert_all_recorded(output, files)
    scenario.record(
        name="claims of an ended run taken over",
        invoices_in=len(files),
        manifest=manifest,
        expected_keys=files,
        wall_s=run.wall_s,
        results=output.result_invoice_keys(),
        reported=[first.reported, run.reported],
    )


@pytest_asyncio.fixture(loop_scope="function")
async def live_flow_run(prefect_harness):
    """A flow run that is Running in Prefect (set Completed again afterwards)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Running

    @flow(name="trust-claim-holder")
    def holder() -> None:  # never runs: only its flow run record matters
        pass

    async with get_client() as client:
        created = await client.create_flow_run(holder, name=f"holder-{uuid.uuid4().hex[:8]}")
        await client.set_flow_run_state(created.id, Running(), force=True)
        live = await client.read_flow_run(created.id)
    yield live
    async with get_client() as client:
        await client.set_flow_run_state(created.id, Completed(), force=True)


@pytest.mark.usefixtures("prefect_harness")
async def test_claims_of_a_live_run_are_left_to_it_and_the_summary_names_it(
    tmp_path, live_flow_run, scenario
):
    source, output = Folder(tmp_path / "in"), Folder(tmp_path / "out")
    files = invoices(6, seed=7800)
    keys = source.write(files)
    held = {k: files[k] for k in keys[:3]}
    free = [k for k in keys if k not in held]
    output.put_manifest(claim(Manifest(source=source.url), held, str(live_flow_run.id)))
    assert live_flow_run.state.is_running()

    run = await run_flow(source=source.url, output=output.url, lease_seconds=60)

    assert run.state.is_completed(), run.state.message
    assert run.summary.skipped_in_flight == len(held) and run.summary.taken_over == 0
    assert run.summary.claim_holders == [f"{live_flow_run.name} ({live_flow_run.id})"]
    assert sorted(run.reported) == free
    assert run.wall_s < 30  # a live run's fresh claims are not waited out either
    manifest = output.manifest()
    for key in held:  # untouched
        entry = manifest.entries[key]
        assert (entry.status, entry.flow_run_id) == ("processing", str(live_flow_run.id))
    assert_all_recorded(output, {k: files[k] for k in free})
    scenario.record(
        name="claims of a live run left to it",
        invoices_in=len(free),
        manifest=manifest,
        expected_keys=free,
        wall_s=run.wall_s,
        results=output.result_invoice_keys(),
        reported=run.reported,
        note=f"{len(held)} more left to the live run that claimed them",
    )


# --------------------------------------------------------------------------------------------
# 7. SIGTERM and SIGINT


def start_cli_run(source: Path, output: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows",
            "run",
            str(source),
            "--output",
            str(output),
            "--extractor",
            "openai",
            "--max-concurrency",
            "3",
            "--stop-grace-seconds",
            "15",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
        start_new_session=True,  # a stray signal never reaches pytest
    )


def manifest_of(output: Path) -> Manifest | None:
    path = output / MANIFEST_KEY
    return Manifest.model_validate_json(path.read_bytes()) if path.exists() else None


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_stop_signal_finishes_and_records_what_is_in_flight(
    prefect_server, tmp_path, scenario, signum, code
):
    """SIGTERM / SIGINT once invoices are done and others in flight (2 s LLM calls, 3 at a
    time, 15 s grace): those in flight finish and are recorded, the rest given back
    (`released`), the summary names the signal, exit 143 / 130. The rerun finishes the rest,
    and the LLM was paid once per invoice across both runs."""
    n = 12
    source, output = tmp_path / "in", tmp_path / "out"
    keys = sorted(p.name for p in write_samples(source, n, seed=77))
    with FakeLLMServer(FakeLLMConfig(latency=2.0)) as llm:
        env = {
            **prefect_server.env,
            "OPENAI_BASE_URL": llm.base_url,
            "OPENAI_API_KEY": "sk-test-trust",
        }
        proc = start_cli_run(source, output, env)
        try:
            deadline = time.monotonic() + 120
            while True:
                status = counts(manifest_of(output))
                if (
                    status["done"] + status["needs_review"] >= 1
                    and status["processing"]
                    and llm.in_flight > 0
                ):
                    break
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                assert time.monotonic() < deadline, "the run made no progress"
                time.sleep(0.05)
            asked_at_signal = llm.stats()["total_requests"]
            os.kill(proc.pid, signum)
            stdout, stderr = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

        assert proc.returncode == code, (proc.returncode, stderr[-3000:])
        assert "Traceback" not in stderr, stderr[-3000:]
        summary = json.loads(stdout)
        assert summary["stopped_by"] == signum.name
        assert summary["unfinished"] > 0
        stopped = manifest_of(output)
        statuses = {k: e.status for k, e in stopped.entries.items()}
        assert "processing" not in statuses.values(), statuses
        released = sorted(k for k, s in statuses.items() if s == "released")
        finished = sorted(k for k, s in statuses.items() if s in FINAL_OK)
        assert len(released) == summary["unfinished"] and sorted(released + finished) == keys
        # Every LLM answer paid for was recorded, those in flight at the signal included.
        paid = llm.stats()["total_requests"]
        assert paid >= asked_at_signal and paid == len(finished), (paid, asked_at_signal, statuses)
        assert summary["processed"] == len(finished)

        started = time.monotonic()
        rerun = start_cli_run(source, output, env)
        try:
            stdout2, stderr2 = rerun.communicate(timeout=180)
        finally:
            if rerun.poll() is None:
                os.killpg(rerun.pid, signal.SIGKILL)
                rerun.wait()
        rerun_s = time.monotonic() - started
        assert rerun.returncode == 0, stderr2[-3000:]
        again = json.loads(stdout2)
        assert sorted(row["invoice"] for row in again["rows"]) == released
        assert again["taken_over"] == 0 and again["skipped_in_flight"] == 0
        final = manifest_of(output)
        total = llm.stats()
        assert total["total_requests"] == n  # nothing paid twice
        scenario.record(
            name=f"{signum.name} mid-batch, rerun",
            invoices_in=n,
            manifest=final,
            expected_keys=keys,
            wall_s=rerun_s,
            results=[
                json.loads(p.read_text())["key"] for p in (output / "results").rglob("*.json")
            ],
            reported=[[row["invoice"] for row in run["rows"]] for run in (summary, again)],
            llm_answers=total["outcomes"].get("ok", 0),
            note=f"{len(finished)} recorded by the stopped run ({asked_at_signal} LLM calls at the "
            f"signal), {len(released)} released and done by the rerun",
        )


# --------------------------------------------------------------------------------------------
# 8. Parameters


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(
    "bad",
    [
        {"max_concurrency": 0},
        {"chunk_size": 0},
        {"invoice_timeout": -1},
        {"lease_seconds": 0},
        {"stop_grace_seconds": -1},
        {"shard": "3/2"},
    ],
    ids=lambda bad: next(iter(bad)),
)
async def test_bad_parameters_fail_the_run_before_any_work(tmp_path, bad):
    source, output = Folder(tmp_path / "in"), Folder(tmp_path / "out")
    source.write(invoices(2, seed=7900))
    async with asyncio.timeout(60):
        state = await process_invoices(
            source=source.url, output=output.url, extractor="offline", return_state=True, **bad
        )
    assert state.is_failed(), state
    assert not output.created()  # no manifest, no claims, no output folder


@pytest.mark.parametrize(
    "option, value",
    [
        ("--max-concurrency", "0"),
        ("--chunk-size", "0"),
        ("--invoice-timeout", "-1"),
        ("--shard", "3/2"),
    ],
)
def test_the_cli_refuses_a_bad_option_in_one_line_without_starting_prefect(tmp_path, option, value):
    """A bad option: exit 2 and one line naming it; no Prefect server is started (none is
    configured here, so starting one would make a temporary server, whose database would
    appear in PREFECT_HOME)."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(home)
    source = tmp_path / "in"
    write_samples(source, 1, seed=79)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()

    proc = invoices_cli(
        "run", str(source), "--output", str(tmp_path / "out"), option, value, env=env, timeout=90
    )

    wall = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    line = one_line_refusal(proc)
    assert proc.stderr.strip() == line  # that line only
    assert line.startswith(f"invoices run: {option} {value!r}") or line.startswith(
        f"invoices run: {option} {value}"
    ), line
    assert not (tmp_path / "out").exists()
    assert not (home / "prefect.db").exists()  # no temporary Prefect server
    # < 10 s on an idle machine; the CPU time is the robust measure on a loaded one.
    assert cpu < 10 and wall < 30, (cpu, wall)
