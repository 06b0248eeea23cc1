"""LLM latency benchmark: do N concurrent invoices take about 1x the LLM latency, not Nx?

    .venv/bin/python bench/llm_latency.py                  # N=100, 1.0 s latency
    .venv/bin/python bench/llm_latency.py --n 20 --prefect harness

One script run, one workload: N invoices (``make_invoice(seed)`` PDFs for 50
seeds, reused) in a moto S3 bucket under ``in/`` (moto is a real HTTP server
on 127.0.0.1 in a child process, started by ``testing/harness.py``; the flow and
manifest helpers come from ``manifest_lock.py``), and a ``FakeLLMServer`` with a fixed
``--latency`` per answer, also in a child process (the harness's ``LLMProcess``: a real
model does not share the flow's process and GIL). Rows:

- ``sequential bound``: N x latency, computed; and measured on
  ``--sequential-sample`` calls made one after another, scaled to N.
- ``asyncio.gather + Lock``: N coroutines gathered; each calls the fake
  server through ``tasks.extract.llm.OpenAIExtractor`` (the project's request, the
  unmodified ``openai.AsyncOpenAI`` client, one shared by all) on text
  parsed before timing, then read-modify-writes a JSON manifest in S3 under
  one ``asyncio.Lock``. No Prefect, no download, no parsing.
- ``flow``: ``process_invoices(source="s3://<bucket>/in", output=
  "s3://<bucket>/out", extractor="openai", max_concurrency=N)``, the
  project's flow unmodified. ``inside`` is the flow's own ``summary.seconds``;
  ``wall`` is timed around the flow call (flow-run creation and the client's
  first contact with the server included). ``process start`` is the time
  from the start of this script to the first flow call (bench setup, the
  Prefect server's start, importing the flow), reported apart; the age of
  the interpreter when the script started is added to its note.
- ``flow, warm-up (1st call)``: the same flow run once before ``flow`` (output
  ``out-warm-up/``), as the first flow call in this process. It pays one-time costs that
  the baseline's timing does not include either: importing what Prefect's engine loads on
  its first run, the server's first queries of each kind, botocore's models, the parse
  pool's forkserver. A deployment run, a fresh process, pays about this. Then the bench
  waits for the ``llm-rate`` limit to refill (burst / decay), so that ``flow`` starts with
  the limit as the warm-up found it. ``--no-warm-up`` leaves it out: ``flow`` is then the
  first call.
- ``flow, local folder`` (``--local-store``): the same flow with the invoices, results and
  manifest in a temporary folder (the quick start's store) instead of moto, so the
  S3 double's cost (moto handles requests one at a time in one Python process, ~3 ms of
  client CPU and ~5 ms of server time per request here) is out of the figure.
- ``flow, faults``: a second flow run (output ``out-faults/``) against a
  second fake server with log-normal latency (median ``--latency``, sigma
  0.5, capped at 5 s) and 10% 429s (``Retry-After: 1``): invoices recorded
  in its manifest (must be N), outcomes, fake-server requests and 429s,
  peak of requests in flight. The draws are seeded (``--seed``, default 1:
  11 of its first 100 draws are 429s; seed 0 has only 5).

``x lat`` is each row's time over one latency. A flow's ``wall`` row also
gives how busy the machine's CPUs were during the call (/proc/stat: every
process, the servers included). Order: bench setup, Prefect server, the warm-up flow
run, flow, then the baseline rows (the Prefect server idles meanwhile), then the
local-folder run, then the faults run.

The flow's LLM calls take Prefect concurrency slots (``llm-in-flight``,
``llm-rate``). ``--llm-limits keep`` (default) leaves them as the flow
would: the project's defaults (100 in flight, 3000/min, so a burst of 100)
created when missing; ``fit`` sets them to N in flight and a burst of N
refilled at N/s.

Prefect server (``--prefect``): ``start`` (default), ``harness`` or a URL,
as in ``manifest_lock.py``. Timings on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import time

T_SCRIPT = time.perf_counter()  # first statement: "process start" counts from here

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import manifest_lock as ml  # noqa: E402  (bench/ is on sys.path when run as a script)

from testing.harness import (  # noqa: E402
    LLMProcess,
    PrefectAPI,
    drain_prefect_workers,
    patched_environ,
    s3_client,
    service_env,
    start_moto,
)

FAULTS_OUTPUT_PREFIX = "out-faults"
WARM_UP_OUTPUT_PREFIX = "out-warm-up"
FAULT_SIGMA = 0.5
FAULT_LATENCY_CAP = 5.0
FAULT_429_RATE = 0.1
FAULT_RETRY_AFTER = 1.0


@dataclasses.dataclass
class Row:
    name: str
    n: int | None
    seconds: float | None
    recorded: int | None = None
    note: str = ""


def interpreter_age_at_script_start() -> float | None:
    """Seconds from this process's exec to the script's first line (Linux /proc; else None)."""
    try:
        with open("/proc/self/stat") as f:
            # Field 22 (starttime, clock ticks since boot) comes after the ")" of the name.
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    age_now = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return max(0.0, age_now - (time.perf_counter() - T_SCRIPT))


def fmt_row(r: Row, latency: float) -> str:
    n = str(r.n) if r.n is not None else "-"
    secs = f"{r.seconds:9.2f}" if r.seconds is not None else f"{'-':>9}"
    ratio = f"{r.seconds / latency:7.2f}" if r.seconds is not None and r.n else f"{'-':>7}"
    rec = str(r.recorded) if r.recorded is not None else "-"
    return f"{r.name:<50} {n:>5} {secs} {ratio} {rec:>8}  {r.note}"


HEADER = f"{'row':<50} {'N':>5} {'seconds':>9} {'x lat':>7} {'recorded':>8}  note"


async def create_bucket(endpoint: str, prefix: str) -> str:
    bucket = f"{prefix}-{uuid.uuid4().hex[:8]}"
    async with s3_client(endpoint) as admin:
        await admin.create_bucket(Bucket=bucket)
    return bucket


async def recorded_in(endpoint: str, bucket: str, key: str, n: int) -> tuple[int, dict[str, int]]:
    async with s3_client(endpoint) as client:
        manifest = await ml.read_manifest(client, bucket, key)
    return ml.count_entries(manifest, ml.invoice_keys(n)), ml.manifest_outcomes(manifest)


def server_note(llm: Any) -> str:
    s = llm.stats()
    return f"LLM {s['total_requests']} requests, max {s['max_in_flight']} in flight"


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (Linux /proc/stat;
    else None). Busy is all but idle and iowait."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    per_s = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / per_s, sum(ticks) / per_s


def cpu_note(before: tuple[float, float] | None, after: tuple[float, float] | None) -> str:
    if before is None or after is None or after[1] <= before[1]:
        return ""
    busy, total = after[0] - before[0], after[1] - before[1]
    return (
        f"; machine CPU busy {busy / total:.0%} during the call ({busy:.2f} of "
        f"{total:.2f} core-s, every process: flow, parser workers, servers)"
    )


def local_folder_invoices(n: int) -> tuple[str, str, Any]:
    """The N invoices in a temporary folder (as uploaded to S3); returns (source, output,
    the TemporaryDirectory to clean up)."""
    tmp = tempfile.TemporaryDirectory(prefix="llm-latency-")
    pdfs = ml.invoice_pdfs()
    for i, key in enumerate(ml.invoice_keys(n)):
        path = os.path.join(tmp.name, ml.INPUT_PREFIX, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(pdfs[i % len(pdfs)])
    return os.path.join(tmp.name, ml.INPUT_PREFIX), os.path.join(tmp.name, ml.OUTPUT_PREFIX), tmp


async def run_flow_row(
    name: str, endpoint: str, bucket: str, llm: Any, n: int, output_prefix: str, local: bool = False
) -> tuple[Row, Row]:
    """The flow once: a row for the time inside it and one for the wall time around the call.
    `local`: invoices, results and manifest in a local folder instead of moto S3."""
    llm.reset_stats()
    source = output = tmp = None
    if local:
        source, output, tmp = local_folder_invoices(n)
    try:
        with patched_environ(service_env(endpoint, llm.base_url)):
            cpu_before = machine_cpu_seconds()
            run = await ml.run_flow(bucket, n, output_prefix, source=source, output=output)
            cpu_after = machine_cpu_seconds()
        if output is not None:
            with open(os.path.join(output, ml.MANIFEST_KEY)) as f:
                manifest = json.load(f)
            recorded, outcomes = (
                ml.count_entries(manifest, ml.invoice_keys(n)),
                ml.manifest_outcomes(manifest),
            )
        else:
            recorded, outcomes = await recorded_in(
                endpoint, bucket, f"{output_prefix}/{ml.MANIFEST_KEY}", n
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    counts = ", ".join(f"{v} {k}" for k, v in outcomes.items()) or "no entries"
    stats = llm.stats()
    requests = (
        f"LLM {stats['total_requests']} requests ({stats['outcomes'].get('rate_limit', 0)} x 429)"
    )
    inside = Row(
        f"{name}: inside (summary.seconds)",
        n,
        run.inside_s,
        recorded,
        f"flow {run.state}; {counts}; {requests}, max {stats['max_in_flight']} in flight; "
        f"{run.manifest_writes} manifest writes; Prefect client 503 retries {run.retries_503}"
        + (f"; {run.message}" if run.state != "COMPLETED" else ""),
    )
    wall = Row(
        f"{name}: wall (around the call)",
        n,
        run.wall_s,
        None,
        "includes flow-run creation and result retrieval" + cpu_note(cpu_before, cpu_after),
    )
    return inside, wall


async def rate_refill_seconds() -> float:
    """How long the `llm-rate` limit takes to refill from empty (burst / decay per second):
    a run started sooner waits for its first block, which a first run did not."""
    from prefect.client.orchestration import get_client

    from tasks.orchestration.limits import LLM_RATE_LIMIT

    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name(LLM_RATE_LIMIT)
    return limit.limit / limit.slot_decay_per_second if limit.slot_decay_per_second else 0.0


async def asyncio_baseline(n: int, endpoint: str, llm: Any, texts: list[Any]) -> Row:
    from tasks.extract.llm import LLMSettings, OpenAIExtractor

    bucket = await create_bucket(endpoint, "llm-baseline")
    lock = asyncio.Lock()
    llm.reset_stats()
    settings = LLMSettings(base_url=llm.base_url, api_key="x")
    async with OpenAIExtractor(settings) as extractor, s3_client(endpoint) as client:

        async def one(i: int, key: str) -> None:
            await extractor.extract(texts[i % len(texts)])
            async with lock:
                await ml.read_modify_write(client, bucket, key)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, k) for i, k in enumerate(ml.invoice_keys(n))))
        wall = time.perf_counter() - t0
    recorded, _ = await recorded_in(endpoint, bucket, ml.MANIFEST_KEY, n)
    return Row(
        "asyncio.gather + asyncio.Lock",
        n,
        wall,
        recorded,
        f"one AsyncOpenAI client; {server_note(llm)}; {n} manifest writes",
    )


async def sequential_sample(k: int, n: int, llm: Any, texts: list[Any]) -> Row:
    from tasks.extract.llm import LLMSettings, OpenAIExtractor

    async with OpenAIExtractor(LLMSettings(base_url=llm.base_url, api_key="x")) as extractor:
        t0 = time.perf_counter()
        for i in range(k):
            await extractor.extract(texts[i % len(texts)])
        took = time.perf_counter() - t0
    return Row(
        f"sequential, measured (k={k})",
        n,
        took * n / k,
        None,
        f"{k} call{'s' if k != 1 else ''} one after another in {took:.2f} s, scaled to N",
    )


async def main_async(args: argparse.Namespace) -> int:
    from testing.fake_llm.server import FakeLLMConfig

    n, latency = args.n, args.latency
    age = interpreter_age_at_script_start()
    rows: list[Row] = []
    moto, endpoint, _ = start_moto()
    fixed = LLMProcess(FakeLLMConfig(latency=latency))
    faulty = LLMProcess(
        FakeLLMConfig(
            latency_median=latency,
            latency_sigma=FAULT_SIGMA,
            latency_max=FAULT_LATENCY_CAP,
            error_rate_429=FAULT_429_RATE,
            retry_after=FAULT_RETRY_AFTER,
            seed=args.seed,
        )
    )
    server: PrefectAPI | None = None
    try:
        bucket = await create_bucket(endpoint, "llm-latency")
        await ml.upload_invoices(endpoint, bucket, ml.INPUT_PREFIX, ml.invoice_keys(n))
        t_setup = time.perf_counter()

        server = PrefectAPI(args.prefect, args.server_env, args.keep_home).__enter__()
        t_server = time.perf_counter()
        import prefect

        import flows.process_invoices  # noqa: F401  (timed here: the flow's imports)

        t_imports = time.perf_counter()
        print(f"# prefect {prefect.__version__}: {server.description}", flush=True)
        limits = await ml.set_llm_limits(args.llm_limits, n)
        print(f"# {limits}", flush=True)
        t_first_call = time.perf_counter()

        rows.append(Row("sequential bound (N x latency)", n, n * latency, None, "computed"))
        if args.warm_up:
            cold_inside, cold_wall = await run_flow_row(
                "flow, warm-up (1st call)", endpoint, bucket, fixed, n, WARM_UP_OUTPUT_PREFIX
            )
            refill = await rate_refill_seconds()
            cold_wall.note += f"; then {refill:.1f} s for the llm-rate limit to refill"
            rows += [cold_inside, cold_wall]
            await asyncio.sleep(refill)
        inside, wall = await run_flow_row("flow", endpoint, bucket, fixed, n, ml.OUTPUT_PREFIX)
        interp = (
            f"; the interpreter was {age:.2f} s old at the script's start"
            if age is not None
            else ""
        )
        start = Row(
            "process start (to 1st flow call)",
            None,
            t_first_call - T_SCRIPT,
            None,
            f"bench setup (moto, fake LLM, {n} PDFs uploaded) {t_setup - T_SCRIPT:.2f} s, "
            f"Prefect server {t_server - t_setup:.2f} s, flow imports {t_imports - t_server:.2f} s, "
            f"LLM limits {t_first_call - t_imports:.2f} s{interp}",
        )

        from tasks.pdf.parse import parse_pdf_bytes

        texts = [parse_pdf_bytes(pdf) for pdf in ml.invoice_pdfs()]
        if args.sequential_sample > 0:
            rows.append(await sequential_sample(min(args.sequential_sample, n), n, fixed, texts))
        rows.append(await asyncio_baseline(n, endpoint, fixed, texts))
        rows += [inside, wall, start]
        if args.local_store:
            rows += await run_flow_row(
                "flow, local folder", endpoint, bucket, fixed, n, ml.OUTPUT_PREFIX, local=True
            )

        if not args.no_faults:
            f_inside, f_wall = await run_flow_row(
                "flow, faults", endpoint, bucket, faulty, n, FAULTS_OUTPUT_PREFIX
            )
            f_inside.note = (
                f"log-normal latency (median {latency:g} s, sigma {FAULT_SIGMA}, cap "
                f"{FAULT_LATENCY_CAP:g} s), {FAULT_429_RATE:.0%} 429s (Retry-After "
                f"{FAULT_RETRY_AFTER:g} s); " + f_inside.note
            )
            rows += [f_inside, f_wall]
    finally:
        if server is not None:
            await drain_prefect_workers()
            server.__exit__(None, None, None)
        fixed.stop()
        faulty.stop()
        moto.stop()

    print()
    print(HEADER)
    for r in rows:
        print(fmt_row(r, latency))
    print()
    flow_inside = next(r for r in rows if r.name == "flow: inside (summary.seconds)")
    if flow_inside.seconds is not None:
        ratio = flow_inside.seconds / latency
        print(
            f"flow inside / latency = {ratio:.2f} (target <= 1.5 at N=100): "
            f"{'met' if ratio <= 1.5 else 'NOT met'}"
        )
    for r in rows:
        if r.name.startswith("flow, faults: inside"):
            print(
                f"faults run: {r.recorded} of {n} invoices recorded: "
                f"{'met' if r.recorded == n else 'NOT met'}"
            )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="number of invoices (default 100)")
    p.add_argument("--latency", type=float, default=1.0, help="fake LLM latency in s (default 1.0)")
    p.add_argument("--prefect", default="start", help="'start' (default), 'harness', or an API URL")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="K=V",
        help="setting for a started server",
    )
    p.add_argument(
        "--llm-limits",
        choices=["keep", "fit"],
        default="keep",
        help="Prefect LLM limits: as the flow leaves them ('keep', default) or sized to N ('fit')",
    )
    p.add_argument(
        "--sequential-sample",
        type=int,
        default=3,
        metavar="K",
        help="measure K sequential calls and scale to N (0: computed bound only)",
    )
    # Seed 0 happens to draw only 5 faults in its first 100 draws; seed 1 draws 11.
    p.add_argument(
        "--seed", type=int, default=1, help="fault and latency seed of the faults run (default 1)"
    )
    p.add_argument("--no-faults", action="store_true", help="skip the log-normal + 429 flow run")
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="time the flow's first call in this process (no warm-up run before it)",
    )
    p.add_argument(
        "--local-store",
        action="store_true",
        help="also run the flow with invoices, results and manifest in a local folder "
        "(the quick start's store) instead of moto S3",
    )
    p.add_argument(
        "--keep-home", action="store_true", help="keep the temporary PREFECT_HOME (server log)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Quiet Prefect's console (task-run INFO lines); logs still go to the API as usual.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    print(
        f"llm_latency bench: N={args.n} latency={args.latency:g} s python "
        f"{platform.python_version()} cpus={os.cpu_count()} (shared machine: timings are noisy)",
        flush=True,
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
