"""Parse executor benchmark: the same PDFs parsed on the event loop, in threads, in processes.

    .venv/bin/python bench/parse_executor.py                     # N=200, 3 rounds, median
    .venv/bin/python bench/parse_executor.py --n 40 --repeat 1   # quick look

The PDFs are made in memory before any timing, with the project's generator,
``testing.samples.make_invoice(seed, pages=p)`` for seeds ``--seed`` .. ``--seed``+N-1.
A fixed share of them (``--long-share``, default 10%, rounded; which ones is drawn
from a seeded RNG) has 20 to 30 pages; the others have 1 to ``--pages-max``
(default 5) pages. The page counts come from ``random.Random(f"parse-bench:{seed}")``,
so a given set of options always gives the same set of PDFs.

Then, in this one process, each row parses every PDF once per round (rows are
interleaved: round 1 runs every row, then round 2, ...):

- ``sequential``: ``parse_pdf_bytes`` called directly in a coroutine, one file after
  another, with ``await asyncio.sleep(0)`` between files. This is the baseline. It
  blocks the event loop for each file, so its stall is the slowest single file.
  Without the ``sleep(0)``, or with all files in one ``gather`` of synchronous
  coroutines, the loop would not run at all and the stall would be the whole run.
- ``threads, run_in_executor``: every file submitted at once (``asyncio.gather``) with
  ``loop.run_in_executor(ThreadPoolExecutor(--workers), ...)``, each call holding
  the project's process-wide PyMuPDF lock (``tasks.pdf.pool._serialized``, the
  function ``PdfParser("thread")`` runs). PyMuPDF is not thread-safe: MuPDF
  contexts and its warning store are shared, and ``parse_pdf_bytes`` resets that
  store per file. So an unlocked thread pool is not measured: it could crash or
  misreport, and its speed would not be a usable number. With the lock the threads
  take turns, so this row measures what threads can give here, which is only a
  more responsive loop than ``sequential``. The GIL is released between
  bytecodes of PyMuPDF's pure-Python parts (``sort=True``), but MuPDF's C calls
  hold it.
- ``PdfParser("thread")``: the project's thread mode, the same calls through one
  thread with the same lock, plus the parser's deadline and its ``workers x 4``
  in-flight bound.
- ``PdfParser("process")``: the project's process mode, a forkserver
  ``ProcessPoolExecutor(--workers)`` with PyMuPDF preloaded, reached with
  ``loop.run_in_executor``. Every file goes to ``parser.parse`` at once
  (``asyncio.gather``), and the parser keeps ``workers x 4`` of them in flight.
  Start-up (``await parser.start()``: process start, PyMuPDF import) is timed on
  its own and is not part of the parse time.
- ``process pool, plain``: ``loop.run_in_executor(ProcessPoolExecutor(--workers,
  mp_context=forkserver), parse_pdf_bytes, pdf)`` for every file at once, with no
  in-flight bound, deadline or crash handling. The forkserver is process-wide, so
  this row shares the one that ``PdfParser`` started, with PyMuPDF preloaded. Its
  workers import this script as ``__mp_main__``, which is cheap. Start-up is timed
  by pinging the pool, with a call that imports ``tasks.pdf.parse``, until every worker
  has answered. ``--plain-context fork|spawn`` changes the start method.

Columns:

- ``wall s``: from the first submission to the last result, start-up excluded.
- ``PDF/s`` and ``page/s``: N and the total page count divided by ``wall s``.
- ``speedup``: sequential's ``wall s`` divided by the row's.
- ``stall max`` and ``stall p99``: how late a probe coroutine wakes, in ms. It sleeps
  10 ms in a loop during the timed part, so these show how long the event loop was
  blocked. A stall still open when timing ends is counted too. The probe wakes at
  most once per file in ``sequential``, so there p99 is about the max.
- ``start s``: pool start-up, timed before the parse. The first process pool also
  starts the forkserver; its start is printed below the table.
- ``CPU s``: CPU time of this process during the timed part, from
  ``time.process_time``. It covers every thread, so in the thread rows it includes
  the parsing, and in the process rows it is the loop's own cost: pickling,
  unpickling and the probe.
- ``wkr CPU``: CPU seconds of this process's descendants (the pool workers) during
  the timed part, read from ``/proc/<pid>/stat``.
- ``others``: cores that other processes on the machine kept busy, on average over
  the timed part: the machine's busy time from ``/proc/stat``, less ``CPU s`` and
  ``wkr CPU``, divided by ``wall s``. The machine is shared. When this is near 1,
  a 2-worker pool had about one core, and no speedup is possible.

``--repeat K`` (default 3) runs K rounds; round i starts with the i-th row (rotated),
so that no row always runs first. For each row the table shows the run with
the median ``wall s`` (the lower middle one when K is even), and every column comes
from that run. ``speedup`` divides sequential's median by the row's median. The wall
times of all runs are printed under the table, and one line per run as it ends.
Every run checks what it parsed: the generated page count, and the same text
digest as the first run (sequential's). A mismatch is shown in the note, and a
row that raises is shown as failed. The last line says whether the issue's target is met:
``PdfParser("process")`` at least 1.6x faster than sequential, on 2 cores, judged on the
median of the per-round ratios (sequential's run over the parser's run of the same round),
because the host's speed drifts between rounds; the ratio of the medians is printed too,
and so is the spread of sequential's CPU seconds, a gauge of that drift. A miss while
other processes kept more than 0.3 cores busy (``others``, in either median run) is
called inconclusive: the target assumes two free cores.

``--workers`` (default 2) sizes every pool. The machine has 2 shared cores, so
timings are noisy: compare runs made one after another, and look at the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import math
import multiprocessing
import os
import platform
import random
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

# Heavy imports (tasks.pdf.parse: pydantic via tasks.errors; testing.samples: pymupdf) are made
# inside functions: the plain process pool's forkserver workers import this script as
# __mp_main__ and need none of them at import time.

TARGET_SPEEDUP = 1.6
OTHERS_CONTENDED = 0.3  # cores used by other processes above which a miss is inconclusive
LONG_PAGES = (20, 30)
PROBE_INTERVAL = 0.010
START_TIMEOUT = 60.0


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


@dataclass
class Workload:
    pdfs: list[bytes]
    pages: list[int]  # requested page count per PDF (checked against the parse)
    seconds: float  # generation time

    @property
    def total_pages(self) -> int:
        return sum(self.pages)


def page_plan(n: int, pages_max: int, long_share: float, seed: int) -> list[int]:
    """Page count per PDF: round(n * long_share) long ones (20-30 pages), the rest 1..pages_max."""
    rng = random.Random(f"parse-bench:{seed}")
    n_long = min(n, round(n * long_share))
    long_idx = set(rng.sample(range(n), n_long))
    return [
        rng.randint(*LONG_PAGES) if i in long_idx else rng.randint(1, pages_max) for i in range(n)
    ]


def make_workload(n: int, pages_max: int, long_share: float, seed: int) -> Workload:
    from testing.samples import make_invoice

    plan = page_plan(n, pages_max, long_share, seed)
    t0 = time.perf_counter()
    pdfs = [make_invoice(seed + i, pages=p)[0] for i, p in enumerate(plan)]
    return Workload(pdfs, plan, time.perf_counter() - t0)


def digest(docs: list) -> tuple[int, str]:
    """(pages, sha256 of every page's text) of a list of ParsedDocument, in input order."""
    h = hashlib.sha256()
    pages = 0
    for doc in docs:
        pages += doc.page_count
        for text in doc.pages:
            h.update(text.encode())
            h.update(b"\0")
        h.update(b"\1")
    return pages, h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# CPU accounting (Linux /proc): who used the 2 cores during a timed run
# --------------------------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def host_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores; /proc/stat, not idle or iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(fields) - fields[3] - fields[4]) / _TICK


def descendants_cpu_s() -> dict[int, float]:
    """CPU seconds (user + system) of every live descendant of this process, by pid.

    Pool workers are descendants (the forkserver's children, or ours), started before timing
    and stopped after it, so the difference over the timed part is their CPU.
    """
    stats: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()  # the command name may contain spaces
        stats[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK)
    me = os.getpid()
    tree: dict[int, float] = {}
    frontier = [me]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cpu) in stats.items():
            if ppid == parent and pid not in tree:
                tree[pid] = cpu
                frontier.append(pid)
    return tree


# --------------------------------------------------------------------------------------------
# Event-loop stall probe
# --------------------------------------------------------------------------------------------


class StallProbe:
    """Sleeps PROBE_INTERVAL in a loop and records how late each wake-up is (seconds)."""

    def __init__(self, interval: float = PROBE_INTERVAL) -> None:
        self.interval = interval
        self.lates: list[float] = []
        self._due: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self._due = time.perf_counter() + self.interval
            await asyncio.sleep(self.interval)
            self.lates.append(max(0.0, time.perf_counter() - self._due))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)  # let it enter its first sleep before timing starts

    async def stop(self) -> None:
        now = time.perf_counter()
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        # A stall still open at the end (the loop was blocked until the work finished).
        if self._due is not None and now > self._due:
            self.lates.append(now - self._due)

    def max_ms(self) -> float:
        return max(self.lates, default=0.0) * 1000

    def p99_ms(self) -> float:
        if not self.lates:
            return 0.0
        ordered = sorted(self.lates)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] * 1000  # nearest rank


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    wall_s: float
    start_s: float | None
    stall_max_ms: float
    stall_p99_ms: float
    cpu_s: float
    workers_cpu_s: float
    others_cores: float
    pages: int
    text_digest: str
    note: str = ""
    round_no: int = 0


@dataclass
class Mode:
    name: str
    label: str
    # await setup(args) -> (parse_all: async pdfs -> docs, close: () -> None, start s or None)
    setup: Callable[[argparse.Namespace], Awaitable[tuple]]
    runs: list[Run] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _ping() -> int:
    return os.getpid()


def _ping_import() -> int:
    import tasks.pdf.parse  # noqa: F401  (else the first parse in each worker imports it, timed)

    return os.getpid()


async def _start_all(loop: asyncio.AbstractEventLoop, executor: Executor, workers: int) -> None:
    """Ping until every worker has answered (one worker may answer a whole round)."""
    deadline = time.perf_counter() + START_TIMEOUT
    seen: set[int] = set()
    while len(seen) < workers:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{len(seen)} of {workers} workers answered in {START_TIMEOUT:g} s")
        pings = [loop.run_in_executor(executor, _ping_import) for _ in range(workers)]
        seen.update(await asyncio.gather(*pings))


async def setup_sequential(args: argparse.Namespace):
    from tasks.pdf.parse import parse_pdf_bytes

    async def parse_all(pdfs: list[bytes]) -> list:
        out = []
        for data in pdfs:
            out.append(parse_pdf_bytes(data))  # on the loop's thread: blocks the loop
            await asyncio.sleep(0)  # let the loop (and the probe) run between files
        return out

    return parse_all, (lambda: None), None


async def setup_threads(args: argparse.Namespace):
    from functools import partial

    from tasks.pdf.parse import parse_pdf_bytes
    from tasks.pdf.pool import _serialized  # runs a call under the process-wide PyMuPDF lock

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    executor = ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="bench-parse")
    await _start_all_threads(loop, executor, args.workers)
    start_s = time.perf_counter() - t0

    async def parse_all(pdfs: list[bytes]) -> list:
        return await asyncio.gather(
            *(
                loop.run_in_executor(executor, _serialized, partial(parse_pdf_bytes, data))
                for data in pdfs
            )
        )

    return parse_all, (lambda: executor.shutdown(wait=True)), start_s


async def _start_all_threads(
    loop: asyncio.AbstractEventLoop, executor: Executor, workers: int
) -> None:
    # Threads are started on demand, one per submit while none is idle; a ping per worker,
    # submitted together, starts them all (which thread answers does not matter).
    await asyncio.gather(*(loop.run_in_executor(executor, _ping) for _ in range(workers)))


def _parser_setup(kind: str):
    async def setup(args: argparse.Namespace):
        from tasks.pdf.pool import PdfParser

        parser = PdfParser(kind, max_workers=args.workers)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        await parser.start()  # a no-op in thread mode
        start_s = time.perf_counter() - t0

        async def parse_all(pdfs: list[bytes]) -> list:
            return await asyncio.gather(*(parser.parse(data) for data in pdfs))

        return parse_all, parser.close, (start_s if kind == "process" else None)

    return setup


async def setup_plain_process(args: argparse.Namespace):
    from tasks.pdf.parse import parse_pdf_bytes

    loop = asyncio.get_running_loop()
    ctx = multiprocessing.get_context(args.plain_context)
    t0 = time.perf_counter()
    executor = ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx)
    await _start_all(loop, executor, args.workers)
    start_s = time.perf_counter() - t0

    async def parse_all(pdfs: list[bytes]) -> list:
        return await asyncio.gather(
            *(loop.run_in_executor(executor, parse_pdf_bytes, data) for data in pdfs)
        )

    return parse_all, (lambda: executor.shutdown(wait=True)), start_s


def all_modes(args: argparse.Namespace) -> list[Mode]:
    w = args.workers
    return [
        Mode("sequential", "sequential (on the loop)", setup_sequential),
        Mode("threads", f"threads ({w}), run_in_executor, locked", setup_threads),
        Mode("parser-thread", 'PdfParser("thread")', _parser_setup("thread")),
        Mode("parser-process", f'PdfParser("process"), {w} workers', _parser_setup("process")),
        Mode(
            "plain-process", f"process pool ({w}), plain, {args.plain_context}", setup_plain_process
        ),
    ]


async def run_mode(mode: Mode, args: argparse.Namespace, pdfs: list[bytes]) -> Run:
    gc.collect()
    parse_all, close, start_s = await mode.setup(args)
    try:
        probe = StallProbe()
        await probe.start()
        host0, kids0 = host_busy_s(), descendants_cpu_s()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        docs = await parse_all(pdfs)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        kids1 = descendants_cpu_s()
        kids = sum(kids1[pid] - before for pid, before in kids0.items() if pid in kids1)
        host = host_busy_s() - host0
        await probe.stop()
    finally:
        close()  # not timed
    pages, text_digest = digest(docs)
    others = max(0.0, host - cpu - kids) / wall
    return Run(wall, start_s, probe.max_ms(), probe.p99_ms(), cpu, kids, others, pages, text_digest)


async def idle_probe(seconds: float = 1.0) -> StallProbe:
    probe = StallProbe()
    await probe.start()
    await asyncio.sleep(seconds)
    await probe.stop()
    return probe


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------

HEADER = (
    f"{'row':<38} {'wall s':>7} {'PDF/s':>7} {'page/s':>7} {'speedup':>7} "
    f"{'stall max':>9} {'p99 ms':>7} {'start s':>7} {'CPU s':>6} {'wkr CPU':>7} {'others':>6}"
    "  note"
)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall_s)[(len(runs) - 1) // 2]


def fmt_row(mode: Mode, n: int, total_pages: int, base: float | None) -> str:
    if not mode.runs:
        why = mode.failures[0] if mode.failures else "not run"
        return f"{mode.label:<38} {'-':>7}  failed: {why}"
    r = median_run(mode.runs)
    failed = f"{len(mode.failures)} run(s) failed" if mode.failures else ""
    note = " ".join(filter(None, [r.note, failed]))
    speedup = f"{base / r.wall_s:6.2f}x" if base else f"{'-':>7}"
    start = f"{r.start_s:7.3f}" if r.start_s is not None else f"{'-':>7}"
    return (
        f"{mode.label:<38} {r.wall_s:7.2f} {n / r.wall_s:7.1f} {total_pages / r.wall_s:7.1f} "
        f"{speedup:>7} {r.stall_max_ms:9.1f} {r.stall_p99_ms:7.1f} {start} {r.cpu_s:6.2f} "
        f"{r.workers_cpu_s:7.2f} {r.others_cores:6.2f}  {note}"
    ).rstrip()


async def main_async(args: argparse.Namespace, modes: list[Mode], work: Workload) -> int:
    baseline = await idle_probe()
    print(
        f"# probe on an idle loop (1 s): stall max {baseline.max_ms():.1f} ms, "
        f"p99 {baseline.p99_ms():.1f} ms",
        flush=True,
    )
    reference: str | None = None
    for round_no in range(1, args.repeat + 1):
        # Each round starts one row later, so no row is always the one that runs first.
        shift = (round_no - 1) % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            try:
                run = await run_mode(mode, args, work.pdfs)
            except Exception as exc:  # a failing row is a note in the table, not a crash
                mode.failures.append(f"{type(exc).__name__}: {exc}"[:120])
                print(
                    f"# round {round_no}/{args.repeat} {mode.label}: failed: {mode.failures[-1]}",
                    flush=True,
                )
                continue
            # Every row must return the same documents: the generated page counts, and the
            # text of the first run made (sequential's, unless --modes leaves it out).
            reference = reference or run.text_digest
            if run.pages != work.total_pages:
                run.note = f"MISMATCH: parsed {run.pages} pages, generated {work.total_pages}"
            elif run.text_digest != reference:
                run.note = f"MISMATCH: text digest {run.text_digest}, first run {reference}"
            run.round_no = round_no
            mode.runs.append(run)
            start = f", start {run.start_s:.3f} s" if run.start_s is not None else ""
            print(
                f"# round {round_no}/{args.repeat} {mode.label}: {run.wall_s:.2f} s, stall max "
                f"{run.stall_max_ms:.0f} ms{start}, CPU {run.cpu_s:.2f} s + workers "
                f"{run.workers_cpu_s:.2f} s, others {run.others_cores:.2f} cores"
                f"{' ' + run.note if run.note else ''}",
                flush=True,
            )

    print()
    print(HEADER)
    seq = next((m for m in modes if m.name == "sequential"), None)
    base = median_run(seq.runs).wall_s if seq and seq.runs else None
    for mode in modes:
        print(fmt_row(mode, len(work.pdfs), work.total_pages, base))
    print()
    print(f"median of {args.repeat} run(s) per row; wall s of every run, in order:")
    for mode in modes:
        print(f"  {mode.label:<38} " + " ".join(f"{r.wall_s:.2f}" for r in mode.runs))
    firsts = [(m, m.runs[0]) for m in modes if "process" in m.name and m.runs]
    if firsts:
        # Round 1 runs the rows in order: the first forkserver pool also starts the server.
        print("start s in round 1 (the first forkserver pool also starts the forkserver):")
        for m, r in firsts:
            print(f"  {m.label:<38} {r.start_s:.3f}")

    target_mode = next((m for m in modes if m.name == "parser-process"), None)
    if base is None or target_mode is None:
        print("target: not evaluated (needs the sequential and parser-process rows)")
        return 0
    if not target_mode.runs or not seq or not seq.runs:
        print("target: not evaluated (a row needed for it failed)")
        return 1
    target_run = median_run(target_mode.runs)
    # The host's speed drifts (identical sequential runs differ by up to 40 % here, with
    # nothing else running in this VM), so each round's parser run is set against the
    # sequential run of the same round, minutes apart at most, and the target is judged on
    # the median of those paired ratios; the ratio of the medians is printed beside it.
    seq_by_round = {r.round_no: r.wall_s for r in seq.runs}
    paired = sorted(
        seq_by_round[r.round_no] / r.wall_s for r in target_mode.runs if r.round_no in seq_by_round
    )
    speedup = paired[(len(paired) - 1) // 2] if paired else base / target_run.wall_s
    seq_cpu = [r.cpu_s for r in seq.runs]
    print(
        'paired speedup (sequential / PdfParser("process"), same round): '
        + " ".join(f"{x:.2f}" for x in paired)
        + f"; median {speedup:.2f}x; ratio of the medians {base / target_run.wall_s:.2f}x"
    )
    print(
        f"host speed drift: the sequential rows' CPU s (identical work) ranged "
        f"{min(seq_cpu):.2f}-{max(seq_cpu):.2f} ({max(seq_cpu) / min(seq_cpu) - 1:+.0%})"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    met = speedup >= TARGET_SPEEDUP
    seq_run = median_run(seq.runs)
    busy = max(seq_run.others_cores, target_run.others_cores)
    # The target is about 2 free cores: when other processes took a good part of one, a miss
    # says more about the machine than about the parser.
    caveat = (
        f"; inconclusive: other processes kept up to {busy:.2f} of the cores busy"
        if not met and busy > OTHERS_CONTENDED
        else f"; other processes kept up to {busy:.2f} cores busy"
    )
    print(
        f'target: PdfParser("process") >= {TARGET_SPEEDUP}x faster than sequential on 2 cores '
        f"(median paired speedup): {'MET' if met else 'NOT MET'} ({speedup:.2f}x with "
        f"{args.workers} workers on {cores} cores{caveat})"
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="number of PDFs (default 200)")
    p.add_argument(
        "--pages-max", type=int, default=5, help="pages of a normal PDF: 1..this (default 5)"
    )
    p.add_argument(
        "--long-share",
        type=float,
        default=0.10,
        help=f"share of PDFs with {LONG_PAGES[0]}-{LONG_PAGES[1]} pages (default 0.10)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; the table shows each row's median run (default 3)",
    )
    p.add_argument("--workers", type=int, default=2, help="workers of every pool (default 2)")
    p.add_argument("--seed", type=int, default=0, help="first make_invoice seed (default 0)")
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated rows, default all: sequential,threads,parser-thread,"
        "parser-process,plain-process",
    )
    p.add_argument(
        "--plain-context",
        choices=["forkserver", "fork", "spawn"],
        default="forkserver",
        help="start method of the plain process pool (default forkserver)",
    )
    args = p.parse_args(argv)
    if args.n < 1 or args.pages_max < 1 or args.repeat < 1 or args.workers < 1:
        p.error("--n, --pages-max, --repeat and --workers must be >= 1")
    if not 0.0 <= args.long_share <= 1.0:
        p.error("--long-share must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = all_modes(args)
    if args.modes:
        by_name = {m.name: m for m in modes}
        names = [s.strip() for s in args.modes.split(",") if s.strip()]
        unknown = [s for s in names if s not in by_name]
        if unknown:
            print(f"unknown modes: {unknown}; known: {list(by_name)}", file=sys.stderr)
            return 2
        modes = [by_name[s] for s in names]  # in the order given

    work = make_workload(args.n, args.pages_max, args.long_share, args.seed)
    n_long = sum(1 for p in work.pages if p >= LONG_PAGES[0])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"parse_executor bench: python {platform.python_version()}, cpus={os.cpu_count()}, "
        f"load average {load} (shared machine: timings are noisy)"
    )
    print(
        f"# {len(work.pdfs)} PDFs, {work.total_pages} pages ({n_long} with "
        f"{LONG_PAGES[0]}-{LONG_PAGES[1]} pages, the rest 1-{args.pages_max}), "
        f"{sum(map(len, work.pdfs)) / 1e6:.1f} MB, generated in {work.seconds:.1f} s (not timed)",
        flush=True,
    )
    return asyncio.run(main_async(args, modes, work))


if __name__ == "__main__":
    sys.exit(main())
