"""Manifest lock benchmark: how the manifest writes scale, and what they cost.

    .venv/bin/python bench/manifest_lock.py --n 100 --n 1000

For each N and each variant, one run of the same workload: N invoices, each
"finishes" after a simulated 0.5 s extraction (``asyncio.sleep``), and its
outcome must end up as one entry in a single JSON object ``manifest.json``
in S3. S3 is moto, a real HTTP server on 127.0.0.1 (``ThreadedMotoServer(port=0)``)
started in a child process (``--moto thread``: in this process), reached through aioboto3
(one shared client per variant run). One table row per variant and N:

    variant  N  wall s  lost  writes  note

- ``wall s``: the variant's own timing of the workload (a Prefect server's
  start-up is not included; creating the tag limit is not included either).
- ``lost``: N minus the invoice keys found in the final manifest (read back
  by the harness, not reported by the variant).
- ``writes``: PUTs of ``manifest.json`` received by the S3 server for that
  variant's bucket (counted server side, by a WSGI wrapper around moto);
  ``writes`` shows ``ok/total`` when some PUTs were refused (412 etc.).
- ``w/inv``: accepted manifest writes per invoice.

Variants (``--variants``, default all):

- ``a``  plain asyncio: gather over N coroutines; each sleeps 0.5 s, then
  read-modify-writes the manifest under one ``asyncio.Lock``.
- ``a0`` the same without the lock (shows the lost updates).
- ``b``  naive Prefect: one ``@flow``; each invoice coroutine awaits
  ``update_manifest_entry(key)``, a ``@task(tags=["manifest"])`` doing the
  read-modify-write, after the ``tag:manifest`` limit (1) has been created.
- ``c``  this project's flow: ``process_invoices(source="s3://<bucket>/in",
  output="s3://<bucket>/out", max_concurrency=N)`` on the same simulated extraction as
  a/b: its extractor is a ``SimulatedExtractor`` (``EXTRACT_SECONDS`` of waiting in the
  flow's process, then one valid answer, ``canned_answer``), swapped in by
  ``simulated_extraction()``; the rest of the flow is untouched. N small invoice PDFs
  (``make_invoice(seed)`` for 50 seeds, reused) are uploaded under ``in/`` before timing.
  Beyond a/b, each invoice is also downloaded, parsed by PyMuPDF in a process pool,
  validated, and its result JSON is written to S3; the manifest is ``out/manifest.json``.
  ``wall s`` is timed around the flow call; the note gives the flow's own
  ``summary.seconds`` (time inside the flow), its count of manifest writes and the
  outcomes.
- ``c-llm`` the same flow with its real LLM path (``extractor="openai"``): the 0.5 s
  extraction is a ``FakeLLMServer(FakeLLMConfig(latency=0.5))`` (canned answer, see
  ``canned_answer``) started in a child process (``LLMProcess``, as moto: a real model
  does not share the flow's process) and reached through ``OPENAI_BASE_URL`` and the
  ``openai`` client, under the Prefect LLM limits. So beyond ``c`` it pays the
  requests' CPU (client and fake server: ~2 s of CPU at N=1000, on the same 2 cores).
  Until 2026-11-24 this row was named ``c``. The note adds the fake server's peak of
  requests in flight. ``--llm-limits fit``
  (default) first sets the Prefect limits the LLM calls take
  (``llm-in-flight`` = N, ``llm-rate`` burst N, refilled at N/s) so that all
  N extractions can be in flight at once, as in a/b; ``keep`` leaves them as
  they are (the flow creates the project's defaults, 100 in flight and
  3000/min, when missing).

Warm and cold: a's timer starts with its S3 client made and its code imported. c's
first flow call in a process also pays one-time costs: importing what Prefect's engine
loads on its first run, the server's first queries of each kind, the parse pool's
forkserver. So before c's (and c-llm's) first timed row the harness runs it once at the
same N and prints that run as ``c-cold`` (a deployment run, a fresh process, pays about this); the
``c`` rows are then warm, like a. ``--no-warm-up`` leaves the warm-up out, so the
first ``c`` row is the cold one.

Adding a variant: write ``async def variant_x(n, endpoint, bucket) ->
Result`` (the bucket exists and is empty; ``endpoint`` is the S3 URL; the
manifest key is ``MANIFEST_KEY``; invoice keys are ``invoice_keys(n)``), and
register it in ``VARIANTS`` (``needs_prefect=True`` when it runs flows: the
harness then starts or connects to the Prefect server before it runs).
``Result.lost`` / ``Result.writes`` may be left ``None``: the harness fills
them from the final manifest and the server-side PUT count. The manifest
may be ``{"entries": {key: ...}, ...}`` or ``{key: ...}``; a variant that
writes it elsewhere in the bucket says so with ``Variant.manifest_key``.

A variant whose linear estimate (from its previous, smaller N) exceeds
``--budget`` seconds is skipped and printed as ``skipped (est. X s)``.

Prefect server (``--prefect``): ``start`` (default) runs ``prefect server
start`` in a temporary PREFECT_HOME with SQLite on a free port, the way the
pipeline runs against a local server; ``harness`` uses
``prefect.testing.utilities.prefect_test_harness()`` (what the tests use;
it is also a SQLite server in a subprocess and behaves the same); a URL
uses an existing server. ``--server-env K=V`` passes settings to a started
server (e.g. ``PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://...``).

Timings on a shared 2-core machine are noisy: compare runs made one after
another, not across days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testing.harness import (
    LLMProcess,
    PrefectAPI,
    PutCounter,
    canned_answer,
    drain_prefect_workers,
    patched_environ,
    s3_client,
    service_env,
    start_moto,
)

MANIFEST_KEY = "manifest.json"
EXTRACT_SECONDS = 0.5
TAG = "manifest"


# --------------------------------------------------------------------------
# Result record
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    variant: str
    n: int
    wall_s: float | None
    lost: int | None = None
    writes: int | None = None
    note: str = ""
    writes_total: int | None = None  # filled by the harness (incl. refused PUTs)


def invoice_keys(n: int) -> list[str]:
    return [f"invoices/inv-{i:05d}.pdf" for i in range(n)]


# --------------------------------------------------------------------------
# S3: the manifest, read and written through the harness's aioboto3 client
# --------------------------------------------------------------------------


async def read_manifest(client: Any, bucket: str, key: str = MANIFEST_KEY) -> dict[str, Any]:
    try:
        obj = await client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.NoSuchKey:
        return {"version": 0, "entries": {}}
    async with obj["Body"] as body:
        return json.loads(await body.read())


async def write_manifest(client: Any, bucket: str, manifest: dict[str, Any]) -> None:
    await client.put_object(
        Bucket=bucket,
        Key=MANIFEST_KEY,
        Body=json.dumps(manifest, separators=(",", ":")).encode(),
        ContentType="application/json",
    )


async def read_modify_write(client: Any, bucket: str, key: str) -> None:
    """The unsafe primitive every variant serializes: read, add one entry, write."""
    manifest = await read_manifest(client, bucket)
    manifest.setdefault("entries", {})[key] = {"status": "done"}
    manifest["version"] = int(manifest.get("version", 0)) + 1
    await write_manifest(client, bucket, manifest)


def count_entries(manifest: dict[str, Any], keys: list[str]) -> int:
    entries = manifest.get("entries", manifest)
    if not isinstance(entries, dict):
        return 0
    return sum(1 for k in keys if k in entries)


# --------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------


async def variant_a(n: int, endpoint: str, bucket: str) -> Result:
    lock = asyncio.Lock()
    async with s3_client(endpoint) as client:

        async def one(key: str) -> None:
            await asyncio.sleep(EXTRACT_SECONDS)
            async with lock:
                await read_modify_write(client, bucket, key)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in invoice_keys(n)))
        return Result("a", n, time.perf_counter() - t0, note="asyncio.Lock, 1 write/invoice")


async def variant_a0(n: int, endpoint: str, bucket: str) -> Result:
    async with s3_client(endpoint) as client:

        async def one(key: str) -> None:
            await asyncio.sleep(EXTRACT_SECONDS)
            await read_modify_write(client, bucket, key)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(k) for k in invoice_keys(n)))
        return Result("a0", n, time.perf_counter() - t0, note="no lock")


# Prefect objects are built lazily: prefect must be imported only after the
# harness has chosen PREFECT_HOME / PREFECT_API_URL.
_B_CLIENT: dict[str, Any] = {}
_PREFECT_DEFS: dict[str, Any] = {}


def _prefect_b_defs() -> tuple[Any, Any]:
    if not _PREFECT_DEFS:
        from prefect import flow, task

        @task(tags=[TAG])
        async def update_manifest_entry(bucket: str, key: str) -> None:
            await read_modify_write(_B_CLIENT["client"], bucket, key)

        @flow(name="bench-naive-manifest")
        async def naive_manifest_flow(bucket: str, keys: list[str]) -> None:
            async def one(key: str) -> None:
                await asyncio.sleep(EXTRACT_SECONDS)
                await update_manifest_entry(bucket, key)

            await asyncio.gather(*(one(k) for k in keys))

        _PREFECT_DEFS["b"] = (update_manifest_entry, naive_manifest_flow)
    return _PREFECT_DEFS["b"]


async def ensure_tag_limit(tag: str, limit: int) -> str:
    """Create or update the global limit `tag:<tag>` (what the 3.8.8 task engine enforces)."""
    from prefect import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists

    name = f"tag:{tag}"
    async with get_client() as client:
        try:
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
            )
        except ObjectAlreadyExists:
            await client.update_global_concurrency_limit(
                name, GlobalConcurrencyLimitUpdate(limit=limit, active=True)
            )
        found = await client.read_global_concurrency_limit_by_name(name)
    if found.limit != limit or not found.active:
        raise RuntimeError(f"{name}: limit={found.limit} active={found.active}, wanted {limit}")
    return f"{name} limit={found.limit} active_slots={found.active_slots}"


class _RetryLogCounter(logging.Handler):
    """Counts the client's 423 (Retry-After) waits and 503 retries from Prefect's debug logs."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.waits_423 = 0
        self.wait_423_s = 0.0
        self.retries_503 = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Unable to acquire concurrency slot" in msg and "Retrying in" in msg:
            self.waits_423 += 1
            with contextlib.suppress(ValueError, IndexError):
                self.wait_423_s += float(msg.rsplit("Retrying in", 1)[1].split()[0])
        elif "retryable status code 503" in msg:
            self.retries_503 += 1


@contextlib.contextmanager
def count_prefect_retries():
    counter = _RetryLogCounter()
    loggers = [
        logging.getLogger("prefect._internal.concurrency"),
        logging.getLogger("prefect.client"),
    ]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(counter)
        lg.setLevel(logging.DEBUG)
    try:
        yield counter
    finally:
        for lg, level in zip(loggers, saved, strict=False):
            lg.removeHandler(counter)
            lg.setLevel(level)


async def variant_b(n: int, endpoint: str, bucket: str) -> Result:
    _, naive_manifest_flow = _prefect_b_defs()
    await ensure_tag_limit(TAG, 1)
    async with s3_client(endpoint) as client:
        _B_CLIENT["client"] = client
        try:
            with count_prefect_retries() as retries:
                t0 = time.perf_counter()
                await naive_manifest_flow(bucket, invoice_keys(n))
                wall = time.perf_counter() - t0
        finally:
            _B_CLIENT.clear()
    waits = (
        f"423 waits {retries.waits_423} (sum {retries.wait_423_s:.1f} s)"
        if os.environ.get("PREFECT_LOGGING_INTERNAL_LEVEL") == "DEBUG"
        else "423 waits n/a (--diagnose)"
    )
    note = f"{n} tagged task runs; {waits}; 503 retries {retries.retries_503}"
    return Result("b", n, wall, note=note)


# --------------------------------------------------------------------------
# Variant c: the project's flow (helpers shared with bench/llm_latency.py)
# --------------------------------------------------------------------------

INPUT_PREFIX = "in"
OUTPUT_PREFIX = "out"
C_MANIFEST_KEY = f"{OUTPUT_PREFIX}/{MANIFEST_KEY}"
PDF_POOL = 50
_PDFS: list[bytes] = []


def invoice_pdfs() -> list[bytes]:
    """PDF_POOL small invoice PDFs (make_invoice(seed), seeds 0..PDF_POOL-1), made once."""
    if not _PDFS:
        from testing.samples import make_invoice

        _PDFS.extend(make_invoice(seed)[0] for seed in range(PDF_POOL))
    return _PDFS


async def upload_invoices(endpoint: str, bucket: str, prefix: str, keys: list[str]) -> None:
    """PUT one pool PDF per key under `prefix/` (the pool is reused round-robin)."""
    pdfs = invoice_pdfs()
    gate = asyncio.Semaphore(50)
    async with s3_client(endpoint) as client:

        async def put(i: int, key: str) -> None:
            async with gate:
                await client.put_object(
                    Bucket=bucket,
                    Key=f"{prefix}/{key}",
                    Body=pdfs[i % len(pdfs)],
                    ContentType="application/pdf",
                )

        await asyncio.gather(*(put(i, k) for i, k in enumerate(keys)))


async def set_llm_limits(mode: str, n: int) -> str:
    """Size the Prefect limits the flow's LLM calls take ('fit': all N in flight at once)
    or leave them ('keep'); returns what is in force."""
    from tasks.orchestration.limits import ensure_llm_limits

    if mode == "fit":
        in_flight, burst = await ensure_llm_limits(
            max_in_flight=n, requests_per_minute=60 * n, update_existing=True
        )
    elif mode == "keep":
        # What the flow itself does: create the project defaults if missing, else leave them.
        in_flight, burst = await ensure_llm_limits(update_existing=False)
    else:
        raise ValueError(f"--llm-limits must be 'fit' or 'keep', not {mode!r}")
    return f"llm limits ({mode}): {in_flight} in flight, rate burst {burst}"


@dataclasses.dataclass
class FlowRun:
    wall_s: float  # around the flow call
    inside_s: float | None  # summary.seconds: time inside the flow
    manifest_writes: int | None  # summary.manifest_writes (the flow's own count)
    state: str
    message: str
    retries_503: int = 0  # the Prefect client's retries after a 503 (about 2 s each)


async def run_flow(
    bucket: str,
    n: int,
    output_prefix: str = OUTPUT_PREFIX,
    *,
    source: str | None = None,
    output: str | None = None,
) -> FlowRun:
    """One process-invoices run over s3://bucket/in -> s3://bucket/<output_prefix> (or
    `source` -> `output`: folders, say), all N in flight."""
    from flows.process_invoices import process_invoices
    from tasks.report import RunSummary

    with count_prefect_retries() as retries:
        t0 = time.perf_counter()
        state = await process_invoices(
            source=source or f"s3://{bucket}/{INPUT_PREFIX}",
            output=output or f"s3://{bucket}/{output_prefix}",
            extractor="openai",
            max_concurrency=n,
            return_state=True,
        )
        wall = time.perf_counter() - t0
    summary = await state.aresult(raise_on_failure=False)
    if not isinstance(summary, RunSummary):
        return FlowRun(
            wall,
            None,
            None,
            state.type.value,
            f"{state.message}: {summary!r}"[:200],
            retries.retries_503,
        )
    return FlowRun(
        wall,
        summary.seconds,
        summary.manifest_writes,
        state.type.value,
        state.message or "",
        retries.retries_503,
    )


def manifest_outcomes(manifest: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in manifest.get("entries", {}).values():
        label = entry.get("status", "?")
        if entry.get("error_code"):
            label += f":{entry['error_code']}"
        counts[label] = counts.get(label, 0) + 1
    return dict(sorted(counts.items()))


_LLM_LIMITS_MODE = {"mode": "fit"}  # set from --llm-limits


class SimulatedExtractor:
    """The extraction a/b simulate, as an extractor for the flow: EXTRACT_SECONDS of waiting,
    then one valid answer (`canned_answer`, as the fake LLM gives). No request, no CPU."""

    name = "simulated"

    def __init__(self) -> None:
        self._answer = canned_answer()

    async def extract(self, document: Any) -> Any:
        from tasks.extract.base import Extraction

        await asyncio.sleep(EXTRACT_SECONDS)
        return Extraction(invoice=self._answer(document.text), source="llm")


@contextlib.contextmanager
def simulated_extraction() -> Iterator[None]:
    """The flow, with its extractor (whatever `extractor=` says) replaced by a
    `SimulatedExtractor`, wrapped like every extractor the flow builds; the rest of the flow
    is untouched."""
    from unittest import mock

    import flows.run
    from tasks.extract.einvoice import EmbeddedFirstExtractor

    @contextlib.asynccontextmanager
    async def build_simulated(choice: Any, **_: Any) -> Any:
        yield EmbeddedFirstExtractor(SimulatedExtractor())

    with mock.patch.object(flows.run, "build_extractor", build_simulated):
        yield


async def run_c(name: str, n: int, endpoint: str, bucket: str, *, llm: bool) -> Result:
    """One flow run over N invoices uploaded to the bucket; its extraction is simulated in
    the flow's process (`llm=False`) or the fake LLM server, reached over HTTP (`llm=True`)."""
    await upload_invoices(endpoint, bucket, INPUT_PREFIX, invoice_keys(n))
    note_llm = ""
    if llm:
        from testing.fake_llm.server import FakeLLMConfig

        limits = await set_llm_limits(_LLM_LIMITS_MODE["mode"], n)
        with LLMProcess(FakeLLMConfig(latency=EXTRACT_SECONDS)) as server:
            with patched_environ(service_env(endpoint, server.base_url)):
                run = await run_flow(bucket, n)
            stats = server.stats()
        note_llm = (
            f"; LLM {stats['total_requests']} requests, max {stats['max_in_flight']} "
            f"in flight; {limits}"
        )
    else:
        with patched_environ(service_env(endpoint, None)), simulated_extraction():
            run = await run_flow(bucket, n)
    async with s3_client(endpoint) as client:
        outcomes = manifest_outcomes(await read_manifest(client, bucket, C_MANIFEST_KEY))
    inside = f"{run.inside_s:.2f} s" if run.inside_s is not None else "n/a"
    note = (
        f"flow {run.state}, inside {inside}, summary.manifest_writes {run.manifest_writes}; "
        + ", ".join(f"{v} {k}" for k, v in outcomes.items())
        + f"; 503 retries {run.retries_503}"
        + note_llm
    )
    if run.state != "COMPLETED":
        note += f"; {run.message}"
    return Result(name, n, run.wall_s, writes=run.manifest_writes, note=note)


async def variant_c(n: int, endpoint: str, bucket: str) -> Result:
    return await run_c("c", n, endpoint, bucket, llm=False)


async def variant_c_llm(n: int, endpoint: str, bucket: str) -> Result:
    return await run_c("c-llm", n, endpoint, bucket, llm=True)


C_DESCRIPTION = (
    "c = the process-invoices flow: per invoice, beyond a/b's simulated extraction "
    f"({EXTRACT_SECONDS} s, in process) and manifest entry, it downloads the PDF from S3, "
    "parses it with PyMuPDF in a process pool, validates the fields and writes a result JSON; "
    "manifest writes are group commits under tag:manifest. c-llm = the same flow with the "
    f"extraction done by the fake LLM server over HTTP ({EXTRACT_SECONDS} s latency). "
    "wall s = around the flow call."
)


@dataclasses.dataclass
class Variant:
    name: str
    fn: Callable[[int, str, str], Awaitable[Result]]
    needs_prefect: bool = False
    manifest_key: str = MANIFEST_KEY  # where in the bucket the variant keeps its manifest
    # Run once, untimed for the table's comparison, before its first timed row: its first
    # call in a process pays one-time costs (imports, the server's first queries of a kind,
    # the parse pool's forkserver) that a's timing does not include either.
    warm_up: bool = False


VARIANTS: list[Variant] = [
    Variant("a", variant_a),
    Variant("a0", variant_a0),
    Variant("b", variant_b, needs_prefect=True),
    Variant("c", variant_c, needs_prefect=True, manifest_key=C_MANIFEST_KEY, warm_up=True),
    Variant("c-llm", variant_c_llm, needs_prefect=True, manifest_key=C_MANIFEST_KEY, warm_up=True),
]


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------

HEADER = f"{'variant':<11} {'N':>6} {'wall s':>8} {'lost':>6} {'writes':>9} {'w/inv':>6}  note"


def fmt_row(r: Result) -> str:
    wall = f"{r.wall_s:8.2f}" if r.wall_s is not None else f"{'-':>8}"
    lost = f"{r.lost:6d}" if r.lost is not None else f"{'-':>6}"
    if r.writes is None:
        writes = "-"
    elif r.writes_total is not None and r.writes_total != r.writes:
        writes = f"{r.writes}/{r.writes_total}"
    else:
        writes = str(r.writes)
    per_invoice = f"{r.writes / r.n:6.3f}" if r.writes is not None and r.n else f"{'-':>6}"
    return f"{r.variant:<11} {r.n:>6} {wall} {lost} {writes:>9} {per_invoice}  {r.note}"


async def run_one(v: Variant, n: int, endpoint: str, counter: PutCounter, timeout: float) -> Result:
    bucket = f"bench-{v.name.lower()}-{n}-{uuid.uuid4().hex[:8]}"
    async with s3_client(endpoint) as admin:
        await admin.create_bucket(Bucket=bucket)
    try:
        result = await asyncio.wait_for(v.fn(n, endpoint, bucket), timeout=timeout)
    except TimeoutError:
        result = Result(v.name, n, None, note=f"timed out after {timeout:.0f} s")
    except Exception as exc:  # a failing variant is a row, not a crash of the table
        result = Result(v.name, n, None, note=f"failed: {type(exc).__name__}: {exc}"[:200])
    async with s3_client(endpoint) as admin:
        found = count_entries(await read_manifest(admin, bucket, v.manifest_key), invoice_keys(n))
    puts = counter.get(bucket)
    if result.lost is not None and result.lost != n - found:
        result.note += f" [variant said lost={result.lost}]"
    if result.writes is not None and result.writes != puts["ok"]:
        result.note += f" [variant said writes={result.writes}]"
    result.lost = n - found
    result.writes = puts["ok"]
    result.writes_total = puts["total"]
    return result


async def main_async(args: argparse.Namespace, chosen: list[Variant]) -> int:
    # Entered and left inside this task: prefect_test_harness() sets context variables.
    stack = contextlib.ExitStack()
    moto, endpoint, counter = start_moto(args.moto, count_puts_of="/" + MANIFEST_KEY)
    server: PrefectAPI | None = None
    results: list[Result] = []
    last: dict[str, tuple[int, float]] = {}
    warmed: set[str] = set()
    try:
        print(HEADER, flush=True)
        for n in args.n:
            for v in chosen:
                prev = last.get(v.name)
                if prev is not None and prev[0] < n:
                    est = prev[1] * n / prev[0]
                    if est > args.budget:
                        r = Result(
                            v.name,
                            n,
                            None,
                            note=f"skipped (est. {est:.0f} s, linear from N={prev[0]})",
                        )
                        results.append(r)
                        print(fmt_row(r), flush=True)
                        continue
                if v.needs_prefect and server is None:
                    # Started lazily, so the variants without Prefect that come first do
                    # not share the CPU with a server that is still starting its services.
                    server = stack.enter_context(
                        PrefectAPI(args.prefect, args.server_env, args.keep_home)
                    )
                    import prefect

                    print(
                        f"# prefect {prefect.__version__}: {server.description}, ready in "
                        f"{server.startup_s:.1f} s"
                        + (f", home {server.home}" if args.keep_home else ""),
                        flush=True,
                    )
                if v.warm_up and args.warm_up and v.name not in warmed:
                    warmed.add(v.name)
                    cold = await run_one(v, n, endpoint, counter, args.timeout)
                    cold.variant = f"{v.name}-cold"
                    cold.note = (
                        "first call in this process (the warm-up; next row: timed warm); "
                        + cold.note
                    )
                    results.append(cold)
                    print(fmt_row(cold), flush=True)
                r = await run_one(v, n, endpoint, counter, args.timeout)
                if r.wall_s is not None:
                    last[v.name] = (n, r.wall_s)
                results.append(r)
                print(fmt_row(r), flush=True)
    finally:
        if server is not None:
            await drain_prefect_workers()
        stack.close()
        moto.stop()

    print()
    print("Summary")
    print(HEADER)
    for r in results:
        print(fmt_row(r))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n", type=int, action="append", help="number of invoices (repeatable); default 100"
    )
    p.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS),
        help="comma-separated variant names",
    )
    p.add_argument("--prefect", default="start", help="'start' (default), 'harness', or an API URL")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="K=V",
        help="setting for a started server",
    )
    p.add_argument(
        "--budget", type=float, default=300.0, help="skip a variant whose estimate exceeds this (s)"
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="hard limit for one variant run (s)"
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="count the client's 423 waits (turns on Prefect's internal debug logging: slightly perturbs timings)",
    )
    p.add_argument(
        "--keep-home", action="store_true", help="keep the temporary PREFECT_HOME (server log)"
    )
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="c: time its first call in this process only (no '<name>-cold' warm-up row)",
    )
    p.add_argument(
        "--llm-limits",
        choices=["fit", "keep"],
        default="fit",
        help="c: size the Prefect LLM limits to N ('fit', default) or leave them ('keep')",
    )
    p.add_argument(
        "--moto",
        choices=["process", "thread"],
        default="process",
        help="run moto's S3 server in a child process (default) or in a thread of the bench",
    )
    args = p.parse_args(argv)
    args.n = sorted(set(args.n or [100]))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    by_name = {v.name: v for v in VARIANTS}
    names = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [s for s in names if s not in by_name]
    if unknown:
        print(f"unknown variants: {unknown}; known: {list(by_name)}", file=sys.stderr)
        return 2
    chosen = [by_name[s] for s in names]
    _LLM_LIMITS_MODE["mode"] = args.llm_limits

    # Quiet Prefect's console (task-run INFO lines); logs still go to the API as usual.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    if args.diagnose:
        # services.py logs each 423 wait at DEBUG through a logger gated by this setting
        os.environ["PREFECT_LOGGING_INTERNAL_LEVEL"] = "DEBUG"
        os.environ["PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL"] = "WARNING"

    print(
        f"manifest_lock bench: N={args.n} variants={names} python {platform.python_version()} "
        f"cpus={os.cpu_count()} (shared machine: timings are noisy)"
    )
    if {"c", "c-llm"} & set(names):
        print("# " + C_DESCRIPTION)
    return asyncio.run(main_async(args, chosen))


if __name__ == "__main__":
    sys.exit(main())
