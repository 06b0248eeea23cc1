"""End-to-end benchmark: the `invoices run` CLI against a plain asyncio reference.

    .venv/bin/python bench/end_to_end.py                      # N = 100 and N = 1000
    .venv/bin/python bench/end_to_end.py --n 20 --latency 0.5

One script run starts, each in a child process of its own: moto's S3 server (with the
server-side PUT counter of ``testing/harness.py``, whose servers this script starts), the
fake OpenAI-compatible server (fixed ``--latency``, 1.0 s by default, answering with
``canned_answer()``: see below), and a Prefect server (``PrefectAPI``: ``prefect server
start`` with SQLite in a temporary PREFECT_HOME). The manifest helpers come from
``manifest_lock.py`` (``ml``). It sets the Prefect LLM
limits to the project defaults (``tasks.orchestration.limits.ensure_llm_limits()``: 100 in flight,
3000/min).

Workload: N invoice PDFs under ``s3://<bucket>/in-N/invoices/``. Generating 1000 PDFs
(some of 20+ pages) would take minutes, so a pool of ``--pool`` (60) distinct PDFs is
generated once, ``make_invoice(seed=j, pages=p)`` for j = 0..pool-1, and reused round-robin
under distinct keys (key i gets pool PDF i mod pool). A ``--long-share`` (0.1) of the pool,
spread evenly (j = 9, 19, ... at 0.1), has 20 to 25 pages; the others 1 to 5 (pages drawn
from ``random.Random(f"e2e:{j}")``). At N = 100 or a multiple of the pool the share of long
invoices is exact.

For each N, two runs, each a separate process, measured from this process:

- ``flow``: ``.venv/bin/invoices run s3://<bucket>/in-N -o s3://<bucket>/out-N
  --extractor openai --json`` (the project's ``process-invoices`` flow, default
  ``--max-concurrency 100``), with AWS_ENDPOINT_URL, fake AWS keys, OPENAI_BASE_URL,
  OPENAI_API_KEY=dummy and PREFECT_API_URL in its environment.
- ``asyncio``: the reference, ``bench/end_to_end.py --reference SOURCE OUTPUT``: a plain
  asyncio script with no Prefect flow and no task runs. It lists the same prefix, then
  ``asyncio.gather`` over every invoice: under one ``asyncio.Semaphore(100)`` it runs the
  project's own ``tasks.pipeline.process_invoice`` (the same download, ``PdfParser``
  process pool, ``OpenAIExtractor`` HTTP call, validation and result write), then, under
  one ``asyncio.Lock``, it read-modify-writes the JSON manifest ``ref-N/manifest.json``
  with ``tasks.manifest.model.commit_outcomes`` (read, merge, conditional PUT: one write per
  invoice, the same format as the flow's). Prefect is imported (the tasks import it) but
  no API is called: its PREFECT_API_URL points at a closed port. The same
  ``LoopStallProbe`` as the flow's measures its event loop, from before its set-up (as in
  the flow); its note also gives the set-up time and the largest stall after it. The
  ``tasks`` modules are imported before its timing starts (the flow's are imported before
  the flow function starts too).

Columns:

- ``wall s``: around the child process, from spawn to exit (interpreter start and
  imports included, for both). ``inside s``: the run's own timing (flow:
  ``summary.seconds``; reference: its main coroutine, set-up and tear-down included).
- ``inv/s``: N / wall. ``x ref``: flow wall / reference wall at the same N.
- ``peak MB``: peak RSS (VmHWM) of the run's own process, polled from /proc every 0.2 s.
  ``wkr MB``: the largest peak of one PDF parse worker (grandchildren: forkserver
  children). The note gives the peak of the whole tree's summed RSS and ``wait4``'s
  ``ru_maxrss``.
- ``cpu s``: user + system CPU of the process and every descendant (parse workers and
  forkserver), from /proc (the process's own at exit, descendants as last seen); the
  note splits it.
- ``tasks/inv``: Prefect task runs of the flow run (``summary.flow_run_id``, read from the
  API once the count is stable) per invoice; 0 for the reference.
- ``w/inv``: manifest PUTs the S3 server accepted during the run (server-side counter,
  any key ending in ``/manifest.json`` in the bucket) per invoice.
- ``stall ms``: the largest wake-up delay of a 10 ms sleeper on the run's event loop
  (``tasks.runtime.LoopStallProbe``; flow: ``summary.max_loop_stall_s``).
- ``lost``: N minus the invoices recorded in the run's manifest.

A note per row gives the exit code, the outcomes, the fake LLM's requests and peak in
flight, the Prefect task runs by name, and the CPU the other processes used during the
run (Prefect server, moto, fake LLM). The script ends with the targets at the largest N:
flow wall <= 1.3 x reference wall, flow peak RSS < 600 MB, flow stall < 100 ms.

The fake LLM is the harness's ``LLMProcess`` (a child process), not ``python -m testing.fake_llm``:
the standalone server answers with the offline rules extractor run per request, which on
this 2-core machine would bill the extraction's CPU to the benchmark; here it answers with
``canned_answer()`` (one valid invoice made once), like the other benches. Its
statistics are read and reset through its stdin.

``--stall-log`` (diagnosis) says what the event loop did while it stalled: in both children
the ``LoopStallProbe`` is replaced by a subclass (same measurement) that logs every wake-up
>= 50 ms late, and every callback the loop runs is timed. For each stall the note gives when
it happened (seconds after the probe started), how many callbacks ran meanwhile and their
summed time, and the slowest of them by name (a task step is named by its coroutine chain
where the step stopped). A stall much longer than its callbacks' sum is the loop thread
waiting: for a CPU (2 shared cores), for the GIL, or in epoll. The flow then runs as
``python bench/end_to_end.py --cli-with-stall-log run ...`` (the same ``flows.cli.main``)
instead of ``bin/invoices``. ``--runs flow`` (or ``reference``) runs one of the two rows.

Options: ``--n`` (repeatable; default 100 and 1000), ``--latency``, ``--long-share``,
``--pool``, ``--timeout`` (per child process), ``--stall-log``, ``--runs``, ``--keep-home`` (keep the
Prefect server's temporary home and the children's stdout, stderr and stall logs; their
folders are printed). Timings on the shared 2-core machine are noisy: compare runs made
one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import manifest_lock as ml  # bench/ is on sys.path when run as a script

from testing.harness import (
    LLMProcess,
    PrefectAPI,
    drain_prefect_workers,
    s3_client,
    service_env,
    start_moto,
    with_env,
)

HERE = os.path.abspath(__file__)
VENV_BIN = os.path.dirname(sys.executable)
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEAD_API_URL = "http://127.0.0.1:9/api"  # the reference must not call Prefect's API
POLL_S = 0.2


# --------------------------------------------------------------------------
# Invoice pool and upload
# --------------------------------------------------------------------------


def pool_pages(pool: int, long_share: float) -> list[int]:
    """Pages of each pool PDF: long ones (20-25 pages) spread evenly, the rest 1-5."""
    pages = []
    for j in range(pool):
        rng = random.Random(f"e2e:{j}")
        is_long = int((j + 1) * long_share) > int(j * long_share)
        pages.append(rng.randint(20, 25) if is_long else rng.randint(1, 5))
    return pages


def make_pool(pool: int, long_share: float) -> list[bytes]:
    from testing.samples import make_invoice

    return [make_invoice(j, pages=p)[0] for j, p in enumerate(pool_pages(pool, long_share))]


async def upload(endpoint: str, bucket: str, prefix: str, n: int, pdfs: list[bytes]) -> None:
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

        await asyncio.gather(*(put(i, k) for i, k in enumerate(ml.invoice_keys(n))))


async def create_bucket(endpoint: str) -> str:
    bucket = f"e2e-{uuid.uuid4().hex[:8]}"
    async with s3_client(endpoint) as admin:
        await admin.create_bucket(Bucket=bucket)
    return bucket


async def manifest_of(endpoint: str, bucket: str, key: str) -> dict[str, Any]:
    async with s3_client(endpoint) as client:
        return await ml.read_manifest(client, bucket, key)


# --------------------------------------------------------------------------
# /proc: CPU and memory of a process tree
# --------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, own user+system CPU seconds) of pid, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def _status_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        return " ".join(a.decode(errors="replace") for a in argv if a)[:200]
    except OSError:
        return "?"


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    return children


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, ppid) of every live descendant of root."""
    children = _children_map()
    found, todo = [], [(c, root) for c in children.get(root, [])]
    while todo:
        pid, ppid = todo.pop()
        found.append((pid, ppid))
        todo.extend((c, pid) for c in children.get(pid, []))
    return found


def tree_cpu(root: int) -> float:
    """CPU seconds of root and its live descendants now."""
    total = 0.0
    for pid in [root, *(pid for pid, _ in descendants(root))]:
        st = _stat(pid)
        if st is not None:
            total += st[1]
    return total


class TreeMonitor(threading.Thread):
    """Polls a child's tree: its own VmHWM, each descendant's VmHWM and CPU, the summed RSS."""

    def __init__(self, root: int, deadline: float) -> None:
        super().__init__(daemon=True, name="tree-monitor")
        self.root = root
        self.deadline = deadline
        self.stop = threading.Event()
        self.timed_out = False
        self.root_hwm_kb = 0
        self.tree_rss_peak_kb = 0
        self.cpu: dict[int, float] = {}  # descendant pid -> CPU seconds last seen
        self.hwm: dict[int, int] = {}  # descendant pid -> VmHWM kB last seen
        self.names: dict[int, str] = {}
        self.parent: dict[int, int] = {}

    def sample(self) -> None:
        status = _status_kb(self.root)
        self.root_hwm_kb = max(self.root_hwm_kb, status.get("VmHWM", 0))
        rss = status.get("VmRSS", 0)
        for pid, ppid in descendants(self.root):
            st = _stat(pid)
            if st is None:
                continue
            if pid not in self.names:
                self.names[pid] = _comm(pid)
                self.parent[pid] = ppid
            self.cpu[pid] = st[1]
            s = _status_kb(pid)
            self.hwm[pid] = max(self.hwm.get(pid, 0), s.get("VmHWM", 0))
            rss += s.get("VmRSS", 0)
        self.tree_rss_peak_kb = max(self.tree_rss_peak_kb, rss)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            if time.monotonic() > self.deadline and not self.timed_out:
                self.timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.root, signal.SIGKILL)  # the child's own session only
            self.stop.wait(POLL_S)

    def workers(self) -> list[int]:
        """Grandchildren: the parse workers (children of the forkserver)."""
        return [p for p in self.names if self.parent[p] != self.root]


@dataclasses.dataclass
class Measured:
    returncode: int
    wall_s: float
    timed_out: bool
    own_cpu_s: float
    desc_cpu: dict[int, float]
    desc_names: dict[int, str]
    workers: list[int]
    peak_kb: int
    worker_peak_kb: int
    tree_rss_peak_kb: int
    wait4_maxrss_kb: int
    wait4_cpu_s: float
    stdout: str
    stderr: str


def run_measured(
    cmd: list[str], env: dict[str, str], timeout: float, logdir: str, label: str
) -> Measured:
    out_path = os.path.join(logdir, f"{label}.stdout")
    err_path = os.path.join(logdir, f"{label}.stderr")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
    monitor = TreeMonitor(proc.pid, time.monotonic() + timeout)
    monitor.start()
    try:
        # Wait for the exit without reaping, so the zombie's own CPU can still be read.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        wall = time.perf_counter() - t0
        monitor.stop.set()
        monitor.join()
        st = _stat(proc.pid)
        own_cpu = st[1] if st is not None else 0.0
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        monitor.stop.set()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Descendants that outlive the child (a forkserver winding down) are ours to end;
    # the command line is compared first, so a reused pid is left alone.
    for pid, name in monitor.names.items():
        if _stat(pid) is not None and _comm(pid) == name:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    workers = monitor.workers()
    with open(out_path, encoding="utf-8", errors="replace") as f:
        stdout = f.read()
    with open(err_path, encoding="utf-8", errors="replace") as f:
        stderr = f.read()
    return Measured(
        returncode=proc.returncode,
        wall_s=wall,
        timed_out=monitor.timed_out,
        own_cpu_s=own_cpu,
        desc_cpu=dict(monitor.cpu),
        desc_names=dict(monitor.names),
        workers=workers,
        peak_kb=monitor.root_hwm_kb,
        worker_peak_kb=max((monitor.hwm.get(p, 0) for p in workers), default=0),
        tree_rss_peak_kb=monitor.tree_rss_peak_kb,
        wait4_maxrss_kb=ru.ru_maxrss,
        wait4_cpu_s=ru.ru_utime + ru.ru_stime,
        stdout=stdout,
        stderr=stderr,
    )


# --------------------------------------------------------------------------
# The plain asyncio reference (child process)
# --------------------------------------------------------------------------


def invoice_context(
    cls: Any, src: Any, out: Any, parser: Any, extractor: Any, concurrency: int
) -> Any:
    """`tasks.pipeline.InvoiceContext` with its defaults (as the flow's, but no flow run id);
    its in-flight cap is given whichever way the class takes it (the class keeps changing)."""
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    extra: dict[str, Any] = {}
    if "max_concurrency" in init:
        extra["max_concurrency"] = concurrency
    elif "in_flight" in init:
        extra["in_flight"] = asyncio.Semaphore(concurrency)
    return cls(source=src, output=out, parser=parser, extractor=extractor, **extra)


async def reference_async(source: str, output: str, concurrency: int) -> dict[str, Any]:
    # Imported in reference_main, before timing starts (the flow's imports precede it too).
    from tasks.extract.llm import LLMSettings, OpenAIExtractor
    from tasks.manifest import commit_outcomes, read_manifest
    from tasks.pdf.pool import PdfParser
    from tasks.pipeline import InvoiceContext, plan_batch, process_invoice
    from tasks.runtime import LoopStallProbe
    from tasks.storage import open_store

    started = time.perf_counter()
    counts: dict[str, int] = {}
    writes = 0
    async with contextlib.AsyncExitStack() as stack:
        probe = await stack.enter_async_context(LoopStallProbe())
        # Set-up steps overlap, as in the flow.
        src, out, parser, extractor = await asyncio.gather(
            stack.enter_async_context(open_store(source)),
            stack.enter_async_context(open_store(output)),
            stack.enter_async_context(PdfParser("process")),
            stack.enter_async_context(OpenAIExtractor(LLMSettings.from_env())),
        )
        in_flight = asyncio.Semaphore(concurrency)
        ctx = invoice_context(InvoiceContext, src, out, parser, extractor, concurrency)
        (manifest, _), listing = await asyncio.gather(read_manifest(out), src.list(suffix=".pdf"))
        plan = plan_batch(listing, manifest)
        set_up = time.perf_counter() - started
        processing = await stack.enter_async_context(LoopStallProbe())  # after the set-up only
        lock = asyncio.Lock()

        async def one(job: Any) -> None:
            nonlocal writes
            async with in_flight:
                processed = await process_invoice(ctx, job)
            async with lock:  # one read-modify-write of the manifest per invoice
                result = await commit_outcomes(out, [processed.outcome])
                writes += int(result.written)
            status = processed.outcome.status
            counts[status] = counts.get(status, 0) + 1

        await asyncio.gather(*(one(job) for job in plan.todo))
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "processed": sum(counts.values()),
        "counts": counts,
        "manifest_writes": writes,
        "max_loop_stall_s": round(probe.max_stall, 4),
        "set_up_s": round(set_up, 3),
        "max_loop_stall_after_set_up_s": round(processing.max_stall, 4),
    }


def reference_main(source: str, output: str, concurrency: int) -> int:
    install_stall_log()

    result = asyncio.run(reference_async(source, output, concurrency))
    print(json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# --stall-log: where the event loop stalls (diagnosis)
# --------------------------------------------------------------------------

STALL_LOG_ENV = "E2E_STALL_LOG"
STALL_THRESHOLD_S = 0.05


class _StallLog:
    """Each wake-up of the probe that is >= 50 ms late is logged with what the loop ran in
    the meantime: every callback is timed (a wrapper around asyncio's Handle._run), and a
    stall's entry gives the callbacks run since the probe last woke, their summed time, and
    the slowest, named by their task's coroutine chain where the step stopped ("ran until").
    What the callbacks' sum leaves of the stall is time the loop thread was not running
    callbacks: waiting for the CPU (other processes), for the GIL (other threads) or in
    epoll. The loop thread's run-queue wait over the stall (/proc/thread-self/schedstat:
    runnable, but no core free) tells the first apart from the others."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.t0: float | None = None  # the first probe's start
        self.events: list[dict[str, Any]] = []
        self.loop_thread: int | None = None  # the probe's; other threads' loops are not timed
        self.window: list[tuple[float, float, str]] = []  # (seconds, CPU s, name) of slow ones
        self.window_n = 0
        self.window_s = 0.0
        self.window_cpu = 0.0
        self.window_gc: list[tuple[int, float]] = []  # (generation, seconds) of collections
        self._gc_started = 0.0
        self._runq_at_reset = 0.0
        self._install()

    def _install(self) -> None:
        log = self
        original = asyncio.events.Handle._run
        perf, cpu = time.perf_counter, time.thread_time
        get_ident = threading.get_ident

        def timed_run(handle: Any) -> None:
            if get_ident() != log.loop_thread:
                return original(handle)
            before = _task_chain(handle)
            started, cpu_started = perf(), cpu()
            original(handle)
            spent, cpu_spent = perf() - started, cpu() - cpu_started
            log.window_n += 1
            log.window_s += spent
            log.window_cpu += cpu_spent
            if spent >= 0.005:
                log.window.append((spent, cpu_spent, _handle_name(handle, before)))

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self.loop_thread:
            return
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.window_gc.append((info["generation"], time.perf_counter() - self._gc_started))

    def reset(self) -> None:
        self.window, self.window_n, self.window_s, self.window_cpu = [], 0, 0.0, 0.0
        self.window_gc = []
        self._runq_at_reset = _runqueue_wait_s()

    def stalled(self, due: float, stall: float) -> None:
        import collections

        by_name: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
        for spent, cpu_spent, name in self.window:
            by_name[name].append((spent, cpu_spent))
        slowest = sorted(by_name.items(), key=lambda kv: -sum(t for t, _ in kv[1]))[:3]
        self.events.append(
            {
                "at_s": round(due - (self.t0 or due), 3),
                "stall_s": round(stall, 4),
                "callbacks": self.window_n,
                "callbacks_s": round(self.window_s, 4),
                "callbacks_cpu_s": round(self.window_cpu, 4),
                "runq_s": round(_runqueue_wait_s() - self._runq_at_reset, 4),
                "gc": [[gen, round(secs, 4)] for gen, secs in self.window_gc if secs >= 0.001],
                "slowest": [
                    [
                        name,
                        len(times),
                        round(sum(t for t, _ in times), 4),
                        round(max(t for t, _ in times), 4),
                        round(sum(c for _, c in times), 4),
                    ]
                    for name, times in slowest
                ],
            }
        )

    def dump(self) -> None:
        with open(self.path, "w") as f:
            json.dump(self.events, f)


def _runqueue_wait_s() -> float:
    """Seconds the calling thread has spent runnable but waiting for a core (Linux)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _task_chain(handle: Any) -> list[str] | None:
    """For a task step, its coroutine chain ("qualname:line" each, "end" once finished)."""
    task = getattr(handle._callback, "__self__", None)
    if not isinstance(task, asyncio.Task):
        return None
    parts = []
    coro: Any = task.get_coro()
    while coro is not None and len(parts) < 40:
        code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if code is None:
            parts.append(type(coro).__name__)
            break
        parts.append(f"{code.co_qualname}:{frame.f_lineno if frame else 'end'}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return parts


def _handle_name(handle: Any, before: list[str] | None) -> str:
    """A callback's name; a task step is named by its coroutine chain where the step began
    and where it stopped."""
    if before is None:
        callback = handle._callback
        return getattr(callback, "__qualname__", None) or type(callback).__name__

    def shown(parts: list[str]) -> str:
        return " > ".join(parts if len(parts) <= 5 else [*parts[:2], "...", *parts[-3:]])

    return f"task step from {shown(before)} until {shown(_task_chain(handle) or [])}"


def install_stall_log() -> None:
    """Replace tasks.runtime.LoopStallProbe (and the flow's name for it) with one that
    also logs its stalls to $E2E_STALL_LOG; the measured max_stall is the same."""
    path = os.environ.get(STALL_LOG_ENV)
    if not path:
        return
    import tasks.runtime as runtime

    log = _StallLog(path)
    base = runtime.LoopStallProbe

    class StallLogProbe(base):  # type: ignore[misc, valid-type]
        async def _watch(self) -> None:
            loop = asyncio.get_running_loop()
            owner = log.t0 is None  # only the first probe logs (the reference runs two)
            if owner:
                log.t0 = loop.time()
                log.loop_thread = threading.get_ident()
            while True:
                asleep = loop.time()
                if owner:
                    log.reset()
                await asyncio.sleep(self.interval)
                woke = loop.time()
                stall = woke - asleep - self.interval
                self.max_stall = max(self.max_stall, stall)
                if owner and stall >= STALL_THRESHOLD_S:
                    log.stalled(asleep + self.interval, stall)

        async def __aexit__(self, *exc_info: object) -> None:
            await super().__aexit__(*exc_info)
            log.dump()

    runtime.LoopStallProbe = StallLogProbe
    with contextlib.suppress(ImportError):
        import flows.run as run

        run.LoopStallProbe = StallLogProbe


def cli_with_stall_log(argv: list[str]) -> int:
    """`invoices` with the stall log installed (the flow row under --stall-log)."""
    install_stall_log()
    from flows.cli import main as cli_main

    return cli_main(argv)


def stall_summary(path: str, top: int = 4) -> str:
    try:
        with open(path) as f:
            events = json.load(f)
    except (OSError, ValueError):
        return "stall log: none written"
    if not events:
        return f"stall log: no stall >= {STALL_THRESHOLD_S * 1000:.0f} ms"
    total = sum(e["stall_s"] for e in events)
    parts = []
    for e in sorted(events, key=lambda e: -e["stall_s"])[:top]:
        slowest = (
            "; ".join(
                f"{n}x {spent * 1000:.0f} ms (max {most * 1000:.0f}, CPU {cpu * 1000:.0f}) {name}"
                for name, n, spent, most, cpu in e["slowest"]
            )
            or "none >= 5 ms"
        )
        gc_note = "".join(f", gc gen{gen} {secs * 1000:.0f} ms" for gen, secs in e.get("gc", []))
        parts.append(
            f"{e['stall_s'] * 1000:.0f} ms at +{e['at_s']:.1f} s: {e['callbacks']} "
            f"callbacks, {e['callbacks_s'] * 1000:.0f} ms in them (CPU "
            f"{e['callbacks_cpu_s'] * 1000:.0f}), waiting for a core "
            f"{e.get('runq_s', 0) * 1000:.0f} ms{gc_note}; slowest: "
            f"{slowest}"
        )
    late = [e for e in events if e["at_s"] > 5.0]
    return (
        f"stall log: {len(events)} stalls >= {STALL_THRESHOLD_S * 1000:.0f} ms "
        f"({total:.2f} s in all; {len(late)} after +5 s, longest of those "
        f"{max((e['stall_s'] for e in late), default=0) * 1000:.0f} ms); longest: "
        + " || ".join(parts)
    )


# --------------------------------------------------------------------------
# Prefect API: task runs of a flow run
# --------------------------------------------------------------------------


async def task_runs_of(flow_run_id: str) -> dict[str, int]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    names: dict[str, int] = {}
    flt = FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
    async with get_client() as client:
        offset = 0
        while True:
            page = await client.read_task_runs(flow_run_filter=flt, limit=200, offset=offset)
            for run in page:
                base = run.task_key.rsplit("-", 1)[0] if run.task_key else run.name
                names[base] = names.get(base, 0) + 1
            if len(page) < 200:
                return names
            offset += 200


async def stable_task_runs(flow_run_id: str, timeout: float = 30.0) -> dict[str, int]:
    """The server records task runs from events, after the client has exited: poll until
    two reads a second apart agree."""
    deadline = time.monotonic() + timeout
    last = await task_runs_of(flow_run_id)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        now = await task_runs_of(flow_run_id)
        if now == last and sum(now.values()) > 0:
            return now
        last = now
    return last


# --------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    run: str
    n: int
    wall_s: float | None = None
    inside_s: float | None = None
    peak_mb: float | None = None
    worker_mb: float | None = None
    cpu_s: float | None = None
    task_runs: int | None = None
    writes: int | None = None
    stall_s: float | None = None
    lost: int | None = None
    x_ref: float | None = None
    note: str = ""


STALL_LOG = {"on": False}  # --stall-log


def child_env(
    endpoint: str, llm_url: str, api_url: str, stall_log: str | None = None
) -> dict[str, str]:
    return with_env(
        os.environ,
        {
            **service_env(endpoint, llm_url),
            STALL_LOG_ENV: stall_log or None,
            "PREFECT_API_URL": api_url,
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        },
    )


@dataclasses.dataclass
class Others:
    """The other processes whose CPU use during a run is reported."""

    pids: dict[str, int]

    def snapshot(self) -> dict[str, float]:
        return {name: tree_cpu(pid) for name, pid in self.pids.items()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> str:
        return ", ".join(f"{k} {after[k] - before[k]:.1f} s" for k in before)


def measured_columns(row: Row, m: Measured) -> str:
    worker_cpu = sum(m.desc_cpu.get(p, 0.0) for p in m.workers)
    other_cpu = sum(m.desc_cpu.values()) - worker_cpu
    row.wall_s = m.wall_s
    row.peak_mb = m.peak_kb / 1024
    row.worker_mb = m.worker_peak_kb / 1024 if m.worker_peak_kb else None
    row.cpu_s = m.own_cpu_s + sum(m.desc_cpu.values())
    helpers = sorted({_short(m.desc_names[p]) for p in m.desc_names if p not in m.workers})
    return (
        f"cpu: process {m.own_cpu_s:.1f} s + {len(m.workers)} parse workers {worker_cpu:.1f} s"
        f" + {'/'.join(helpers) or 'no helpers'} {other_cpu:.1f} s; tree RSS peak {m.tree_rss_peak_kb / 1024:.0f} MB; "
        f"wait4: maxrss {m.wait4_maxrss_kb / 1024:.0f} MB, cpu {m.wait4_cpu_s:.1f} s"
    )


def _short(cmdline: str) -> str:
    for word in ("forkserver", "resource_tracker", "semaphore_tracker"):
        if word in cmdline:
            return word
    return cmdline.split(" ")[0].rsplit("/", 1)[-1]


def failure_note(m: Measured) -> str:
    tail = " | ".join(m.stderr.strip().splitlines()[-3:])
    return f"exit {m.returncode}{' (timed out)' if m.timed_out else ''}: {tail[:300]}"


def run_flow_row(
    n: int,
    bucket: str,
    endpoint: str,
    llm: LLMProcess,
    api_url: str,
    counter: Any,
    others: Others,
    timeout: float,
    logdir: str,
) -> Row:
    row = Row("flow", n)
    out_prefix = f"out-{n}"
    cli_args = [
        "run",
        f"s3://{bucket}/in-{n}",
        "-o",
        f"s3://{bucket}/{out_prefix}",
        "--extractor",
        "openai",
        "--json",
    ]
    cmd = [os.path.join(VENV_BIN, "invoices"), *cli_args]
    stall_log = None
    if STALL_LOG["on"]:
        cmd = [sys.executable, HERE, "--cli-with-stall-log", *cli_args]
        stall_log = os.path.join(logdir, f"flow-{n}.stalls.json")
    llm.reset_stats()
    puts0, cpu0 = counter.get(bucket), others.snapshot()
    m = run_measured(
        cmd, child_env(endpoint, llm.base_url, api_url, stall_log), timeout, logdir, f"flow-{n}"
    )
    puts1, cpu1, stats = counter.get(bucket), others.snapshot(), llm.stats()
    notes = [measured_columns(row, m)]
    row.writes = puts1["ok"] - puts0["ok"]
    refused = (puts1["total"] - puts0["total"]) - row.writes
    try:
        summary = json.loads(m.stdout)
    except ValueError:
        summary = None
    if summary is None:
        notes.insert(0, failure_note(m))
    else:
        row.inside_s = summary["seconds"]
        row.stall_s = summary["max_loop_stall_s"]
        notes.insert(
            0, f"exit {m.returncode}; summary.manifest_writes {summary['manifest_writes']}"
        )
        if summary.get("flow_run_id"):
            runs = asyncio.run(stable_task_runs(summary["flow_run_id"]))
            row.task_runs = sum(runs.values())
            notes.append("task runs: " + ", ".join(f"{v} {k}" for k, v in sorted(runs.items())))
    manifest = asyncio.run(manifest_of(endpoint, bucket, f"{out_prefix}/{ml.MANIFEST_KEY}"))
    row.lost = n - ml.count_entries(manifest, ml.invoice_keys(n))
    outcomes = ", ".join(f"{v} {k}" for k, v in ml.manifest_outcomes(manifest).items())
    notes.append(
        f"manifest: {outcomes or 'no entries'}" + (f"; {refused} PUTs refused" if refused else "")
    )
    notes.append(f"LLM {stats['total_requests']} requests, max {stats['max_in_flight']} in flight")
    notes.append("other processes' CPU: " + Others.delta(cpu0, cpu1))
    if stall_log:
        notes.append(stall_summary(stall_log))
    row.note = "; ".join(notes)
    return row


def run_reference_row(
    n: int,
    bucket: str,
    endpoint: str,
    llm: LLMProcess,
    counter: Any,
    others: Others,
    timeout: float,
    logdir: str,
    concurrency: int,
) -> Row:
    row = Row("asyncio", n, task_runs=0)
    out_prefix = f"ref-{n}"
    cmd = [
        sys.executable,
        HERE,
        "--reference",
        f"s3://{bucket}/in-{n}",
        f"s3://{bucket}/{out_prefix}",
        "--concurrency",
        str(concurrency),
    ]
    stall_log = os.path.join(logdir, f"reference-{n}.stalls.json") if STALL_LOG["on"] else None
    llm.reset_stats()
    puts0, cpu0 = counter.get(bucket), others.snapshot()
    m = run_measured(
        cmd,
        child_env(endpoint, llm.base_url, DEAD_API_URL, stall_log),
        timeout,
        logdir,
        f"reference-{n}",
    )
    puts1, cpu1, stats = counter.get(bucket), others.snapshot(), llm.stats()
    notes = [measured_columns(row, m)]
    row.writes = puts1["ok"] - puts0["ok"]
    try:
        result = json.loads(m.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = None
    if result is None:
        notes.insert(0, failure_note(m))
    else:
        row.inside_s = result["seconds"]
        row.stall_s = result["max_loop_stall_s"]
        notes.insert(
            0,
            f"exit {m.returncode}; its own count of manifest writes "
            f"{result['manifest_writes']}; set-up {result['set_up_s']:.2f} s, max "
            f"stall after it {result['max_loop_stall_after_set_up_s'] * 1000:.0f} ms",
        )
    manifest = asyncio.run(manifest_of(endpoint, bucket, f"{out_prefix}/{ml.MANIFEST_KEY}"))
    row.lost = n - ml.count_entries(manifest, ml.invoice_keys(n))
    outcomes = ", ".join(f"{v} {k}" for k, v in ml.manifest_outcomes(manifest).items())
    notes.append(f"manifest: {outcomes or 'no entries'}")
    notes.append(f"LLM {stats['total_requests']} requests, max {stats['max_in_flight']} in flight")
    notes.append("other processes' CPU: " + Others.delta(cpu0, cpu1))
    if stall_log:
        notes.append(stall_summary(stall_log))
    row.note = "; ".join(notes)
    return row


# --------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------

HEADER = (
    f"{'run':<8} {'N':>5} {'wall s':>7} {'inside s':>8} {'inv/s':>6} {'x ref':>6} "
    f"{'peak MB':>7} {'wkr MB':>6} {'cpu s':>6} {'tasks/inv':>9} {'w/inv':>6} "
    f"{'stall ms':>8} {'lost':>5}"
)


def _f(value: float | None, width: int, fmt: str) -> str:
    return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def fmt_row(r: Row) -> str:
    per = lambda v: v / r.n if v is not None and r.n else None  # noqa: E731
    return " ".join(
        [
            f"{r.run:<8}",
            f"{r.n:>5}",
            _f(r.wall_s, 7, ".2f"),
            _f(r.inside_s, 8, ".2f"),
            _f(r.n / r.wall_s if r.wall_s else None, 6, ".1f"),
            _f(r.x_ref, 6, ".2f"),
            _f(r.peak_mb, 7, ".0f"),
            _f(r.worker_mb, 6, ".0f"),
            _f(r.cpu_s, 6, ".1f"),
            _f(per(r.task_runs), 9, ".3f"),
            _f(per(r.writes), 6, ".3f"),
            _f(r.stall_s * 1000 if r.stall_s is not None else None, 8, ".0f"),
            f"{r.lost:>5}" if r.lost is not None else f"{'-':>5}",
        ]
    )


def targets(rows: list[Row], n: int) -> list[str]:
    flow = next((r for r in rows if r.run == "flow" and r.n == n), None)
    if flow is None:
        return []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "NOT met")

    ratio_ok = flow.x_ref <= 1.3 if flow.x_ref is not None else None
    mem_ok = flow.peak_mb < 600 if flow.peak_mb is not None else None
    stall_ok = flow.stall_s < 0.1 if flow.stall_s is not None else None
    return [
        f"targets at N={n}: wall {_f(flow.x_ref, 0, '.2f').strip()} x reference (<= 1.3): "
        f"{verdict(ratio_ok)}; flow peak RSS {_f(flow.peak_mb, 0, '.0f').strip()} MB (< 600): "
        f"{verdict(mem_ok)}; max loop stall "
        f"{_f(flow.stall_s * 1000 if flow.stall_s is not None else None, 0, '.0f').strip()} ms "
        f"(< 100): {verdict(stall_ok)}; lost {flow.lost}"
    ]


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> int:
    from testing.fake_llm.server import FakeLLMConfig

    logdir = tempfile.mkdtemp(prefix="bench-e2e-")
    pages = pool_pages(args.pool, args.long_share)
    long_keys = {n: sum(1 for i in range(n) if pages[i % args.pool] >= 20) for n in args.n}
    print(
        f"end_to_end bench: N={args.n} latency={args.latency:g} s python "
        f"{platform.python_version()} cpus={os.cpu_count()} (shared machine: timings are noisy)",
        flush=True,
    )
    t0 = time.perf_counter()
    pdfs = make_pool(args.pool, args.long_share)
    print(
        f"# pool: {args.pool} distinct PDFs reused round-robin under distinct keys, made in "
        f"{time.perf_counter() - t0:.1f} s; pages {sorted(pages)}; sizes "
        f"{min(map(len, pdfs)) // 1024}-{max(map(len, pdfs)) // 1024} KB; invoices with 20+ "
        f"pages: " + ", ".join(f"{long_keys[n]} of {n}" for n in args.n),
        flush=True,
    )

    moto = llm = None
    server: PrefectAPI | None = None
    rows: list[Row] = []
    try:
        moto, endpoint, counter = start_moto(count_puts_of="/" + ml.MANIFEST_KEY)
        llm = LLMProcess(FakeLLMConfig(latency=args.latency))
        bucket = asyncio.run(create_bucket(endpoint))
        for n in args.n:
            t0 = time.perf_counter()
            asyncio.run(upload(endpoint, bucket, f"in-{n}", n, pdfs))
            print(
                f"# uploaded {n} PDFs to s3://{bucket}/in-{n}/ in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )

        server = PrefectAPI("start", [], args.keep_home).__enter__()
        api_url = os.environ["PREFECT_API_URL"]
        import prefect

        from tasks.orchestration.limits import ensure_llm_limits

        in_flight, burst = asyncio.run(ensure_llm_limits(update_existing=True))
        print(
            f"# prefect {prefect.__version__}: {server.description}, ready in "
            f"{server.startup_s:.1f} s; LLM limits: {in_flight} in flight, rate burst {burst} "
            f"(3000/min)" + (f"; home {server.home}, logs {logdir}" if args.keep_home else ""),
            flush=True,
        )
        others = Others(
            {"prefect server": server.proc.pid, "moto": moto.proc.pid, "fake LLM": llm.proc.pid}
        )

        print(HEADER, flush=True)
        for n in args.n:
            flow = ref = None
            if "flow" in args.runs:
                flow = run_flow_row(
                    n, bucket, endpoint, llm, api_url, counter, others, args.timeout, logdir
                )
                rows.append(flow)
                print(fmt_row(flow), flush=True)
            if "reference" in args.runs:
                ref = run_reference_row(
                    n,
                    bucket,
                    endpoint,
                    llm,
                    counter,
                    others,
                    args.timeout,
                    logdir,
                    args.concurrency,
                )
                rows.append(ref)
                print(fmt_row(ref), flush=True)
            if flow and ref and flow.wall_s and ref.wall_s:
                flow.x_ref = flow.wall_s / ref.wall_s
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                asyncio.run(drain_prefect_workers())
            server.__exit__(None, None, None)
        if llm is not None:
            llm.stop()
        if moto is not None:
            moto.stop()
        if not args.keep_home:
            import shutil

            shutil.rmtree(logdir, ignore_errors=True)

    print()
    print(HEADER)
    for r in rows:
        print(fmt_row(r))
    print()
    for r in rows:
        print(f"{r.run} N={r.n}: {r.note}")
    print()
    for line in targets(rows, max(args.n)):
        print(line)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--n", type=int, action="append", help="invoices (repeatable); default 100 and 1000"
    )
    p.add_argument("--latency", type=float, default=1.0, help="fake LLM latency in s (default 1.0)")
    p.add_argument(
        "--long-share",
        type=float,
        default=0.1,
        help="share of invoices with 20-25 pages (default 0.1)",
    )
    p.add_argument(
        "--pool", type=int, default=60, help="distinct PDFs generated and reused (default 60)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="limit per child process in s")
    p.add_argument(
        "--stall-log",
        action="store_true",
        help="diagnosis: log each event-loop stall >= 50 ms of both runs with the "
        "callbacks the loop ran meanwhile (the flow then runs through this script, "
        "not bin/invoices)",
    )
    p.add_argument(
        "--runs",
        default="flow,reference",
        help="diagnosis: which rows to run (default flow,reference)",
    )
    p.add_argument(
        "--keep-home",
        action="store_true",
        help="keep the Prefect server's temporary home and the children's stdout/stderr",
    )
    # Sub-modes run by the bench itself.
    p.add_argument("--concurrency", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--reference", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.n = sorted(set(args.n or [100, 1000]))
    args.runs = {r.strip() for r in args.runs.split(",") if r.strip()}
    if not args.runs or not args.runs <= {"flow", "reference"}:
        p.error("--runs takes flow, reference or both")
    if not 0 <= args.long_share <= 1:
        p.error("--long-share must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--cli-with-stall-log"]:
        return cli_with_stall_log(argv[1:])
    args = parse_args(argv)
    if args.reference:
        return reference_main(*args.reference, args.concurrency)
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    STALL_LOG["on"] = args.stall_log
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
