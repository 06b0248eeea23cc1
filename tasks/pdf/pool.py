"""Running PDF parsing (`tasks.pdf.parse`) and other CPU-bound steps off the event loop.

`PdfParser` runs `parse_pdf_bytes` in an executor with a deadline, so the event loop never
stalls on PyMuPDF (which holds the GIL) and a pathological file cannot hang the batch.
`PdfParser.run` gives other CPU-bound steps (the offline extraction rules, e-invoice XML) the
same pool, deadline and clean-up. Where it relies on CPython internals, it goes through
`tasks.pdf.stdlib_internals`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import os
import re
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, NamedTuple, TypeVar

from tasks.errors import InvoiceFailure
from tasks.pdf.parse import ParsedDocument, _size, parse_pdf_bytes
from tasks.pdf.priority import lower_priority, lowered
from tasks.pdf.stdlib_internals import kill_workers, main_module_not_reimported

T = TypeVar("T")


# PyMuPDF is documented as not thread-safe (MuPDF contexts and its global warning store are
# shared). In thread mode every call goes through this one process-wide lock, so two parsers
# (or two threads of one) never run PyMuPDF at the same time. Other code in the same process
# that uses PyMuPDF while thread-mode parsers run must hold it too.
_FITZ_LOCK = threading.Lock()


def _serialized(fn: Callable[[], T]) -> T:
    with _FITZ_LOCK:
        return fn()


def _init_worker(niceness: int) -> None:
    # Runs once per worker process: lower its priority (a no-op when it inherited it from
    # the forkserver; not when some other code started the forkserver first), import what
    # a parse needs now (a no-op when the forkserver preloaded it) so the first parse does
    # not pay for it, and keep MuPDF's repair chatter off stderr; what it says is carried in
    # the InvoiceFailure message instead. A Ctrl-C or a SIGTERM sent to the whole process
    # group is the run's to handle (it lets the invoices in flight finish): the workers
    # ignore it, and the run ends them when it closes the pool.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    lower_priority(niceness)
    import pymupdf as _pymupdf

    import tasks.pdf.embedded_xml  # noqa: F401

    _pymupdf.TOOLS.mupdf_display_errors(False)


_START_TIMEOUT = 60.0


def _ping() -> int:
    return os.getpid()


def _process_context() -> multiprocessing.context.BaseContext:
    # Never "fork": the flow process runs Prefect's threads, and forking a process with
    # threads can deadlock the child on a lock some other thread held. Pools are rebuilt after
    # every timeout or crash, so their start must be cheap: a forkserver with what a parse
    # needs preloaded forks ready workers, where spawn would start and import each from
    # scratch. The preload list is process-wide and only takes effect if the forkserver has
    # not started yet; preloading pymupdf is harmless for any other user, and any other
    # user's processes are batch work too. It holds what a parse imports (tasks.pdf.parse,
    # tasks.pdf.embedded_xml to look for an e-invoice attachment, this module for the worker
    # initializer) and no more: each run's first parse waits for the forkserver's start, so
    # not tasks.extract.einvoice, which brings the invoice models and the offline extractor.
    # A run that extracts in the pool adds them through `PdfParser.preload`.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


# What the forkserver imports when it starts, in this order (dotted module paths): see
# _process_context and PdfParser.preload.
_PRELOAD = [
    "tasks.pdf.forkserver_preload",
    "pymupdf",
    "tasks.pdf.parse",
    "tasks.pdf.embedded_xml",
    "tasks.pdf.pool",
]


class _Pool:
    """One executor plus the bookkeeping needed to retire it safely."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.active = 0  # calls (parse() and run()) awaiting a result from this executor
        self.retired = False

    def stop(self) -> None:
        """Shut the executor down; in a process pool, kill workers still busy (abandoned work)."""
        executor = self.executor
        if not isinstance(executor, ProcessPoolExecutor):
            # Threads cannot be killed: a running parse finishes in the background.
            executor.shutdown(wait=False, cancel_futures=True)
        elif self.active == 0 and not self.retired:
            executor.shutdown(wait=True, cancel_futures=True)  # idle: quick and clean
        else:
            kill_workers(executor)


PIPELINE = 4

_STAGE_RE = re.compile(r"[a-z][a-z0-9_]*")


class _Work(NamedTuple):
    """What a pool call does, for its failures: codes `<stage>_timeout`, `<stage>_crashed`;
    `doing` completes "... did not finish", "... died while ..." ("parsing this file (2 KiB)")."""

    stage: str
    doing: str

    def failure(self, what: Literal["timeout", "crashed"], message: str) -> InvoiceFailure:
        return InvoiceFailure(f"{self.stage}_{what}", message, retryable=True)


class PdfParser:
    """Owns the executor; parses off the event loop with loop.run_in_executor and a deadline.
    `run` executes other CPU-bound steps (the extractors') in the same pool, the same way.

    kind="process" (default): a forkserver process pool. PyMuPDF holds the GIL, so processes are
    the only way to parse in parallel and keep the event loop responsive. Workers do not
    import the running `__main__` module (`tasks.pdf.stdlib_internals`), so what `run` is
    given must live in an importable module.

    kind="thread": one thread, every PyMuPDF call under a process-wide lock (PyMuPDF is not
    thread-safe), so `max_workers` is ignored. No parallelism; use it where processes are not
    allowed.

    Start: `async with` starts the workers in the background and the first parse waits for
    them; if they cannot start, every parse fails "parser_unavailable" (retryable) with the
    reason. `await start()` waits for them at once.

    Deadlines: `timeout` bounds each call (parse or run) from submission to result; waiting
    for a free worker is not counted (every call ahead holds its worker for at most `timeout`),
    so a large batch does not time out merely by queueing. A running call cannot be cancelled:
    when its caller gives up (timeout or cancellation) the worker keeps going. The pool is
    then retired: new calls go to a fresh pool at once, and once the retired pool's other
    calls have finished, its processes are killed, so abandoned work (even an endless loop in
    MuPDF) never holds a worker or a CPU for long and a flood of timeouts cannot wedge the
    parser. Threads cannot be killed: in thread mode an abandoned call runs to its end and
    holds the lock meanwhile (and interpreter exit waits for it); later calls then time out
    rather than hang.

    Crashes: if a worker process dies (segfault in MuPDF, OOM kill), every call on that pool
    still waiting fails with "parse_crashed" ("<stage>_crashed" for `run`; retryable: the
    culprit cannot be told apart from the work done next to it) and the pool is rebuilt for
    later calls.
    """

    def __init__(
        self,
        kind: Literal["process", "thread"] = "process",
        *,
        max_workers: int | None = None,
        timeout: float = 60.0,
        max_pages: int | None = 500,
    ) -> None:
        if kind not in ("process", "thread"):
            raise ValueError(f"kind must be 'process' or 'thread', not {kind!r}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.kind = kind
        self.max_workers = 1 if kind == "thread" else (max_workers or os.cpu_count() or 1)
        self.timeout = timeout
        self.max_pages = max_pages
        self._context = _process_context() if kind == "process" else None
        # A short backlog per worker keeps workers busy while a result travels back through
        # the event loop (with one call per worker, a worker idles for every round trip).
        # It stays short so that a crash hits few calls and the deadline still measures
        # parsing plus at most PIPELINE - 1 parses queued ahead.
        self._slots = asyncio.Semaphore(self.max_workers * PIPELINE)
        self._pool = self._new_pool()
        self._retired: list[_Pool] = []
        self._closed = False
        self._starting: asyncio.Future[None] | None = None

    def _new_pool(self) -> _Pool:
        if self.kind == "thread":
            return _Pool(ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdf-parse"))
        return _Pool(
            ProcessPoolExecutor(
                max_workers=self.max_workers,
                mp_context=self._context,
                initializer=_init_worker,
                initargs=(lowered(os.getpriority(os.PRIO_PROCESS, 0)),),
            )
        )

    def preload(self, *modules: str) -> None:
        """Have the workers import `modules` (what the functions given to `run` live in)
        before their first call. Process mode only, and only until this process's forkserver
        has started (it reads the list once; `async with` starts it): it then imports them
        once, and every worker forked from it, also in the pools that replace a retired one,
        has them. Otherwise a worker imports a module on its first call that needs it, and
        every fresh pool's first calls pay for that again."""
        if self._context is None:
            return
        _PRELOAD.extend(module for module in modules if module not in _PRELOAD)
        self._context.set_forkserver_preload(list(_PRELOAD))

    async def start(self) -> None:
        """Start every worker (process start, imports) and wait until all have answered.

        Idempotent: it also waits for the start that `async with` began in the background.
        Raises RuntimeError if they do not start within a minute."""
        if self.kind != "process":
            return
        await asyncio.shield(self._begin_start())

    def _begin_start(self) -> asyncio.Future[None]:
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start_workers())
        return self._starting

    async def _start_workers(self) -> None:
        executor = self._pool.executor

        def spawn() -> list[concurrent.futures.Future[int]]:
            with main_module_not_reimported():
                return [executor.submit(_ping) for _ in range(self.max_workers)]

        # One call per worker, submitted together: each submit finds no idle worker and spawns
        # one, and blocks until that process exists (the first time, until the forkserver has
        # started and imported its preload list), so it runs off the event loop.
        # Bounded on its own: starting processes is not parsing, and a tight parse deadline
        # must not make start-up fail.
        pings = [asyncio.wrap_future(f) for f in await asyncio.to_thread(spawn)]
        try:
            await asyncio.wait_for(asyncio.gather(*pings), _START_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"PDF parser workers did not start within {_START_TIMEOUT:g} s"
            ) from None

    async def parse(self, data: bytes) -> ParsedDocument:
        """The text of a PDF (`parse_pdf_bytes`), parsed in the pool. Failure codes, besides
        `parse_pdf_bytes`' own: `parse_timeout`, `parse_crashed`, `parser_unavailable`."""
        return await self._call(
            functools.partial(parse_pdf_bytes, data, max_pages=self.max_pages),
            _Work("parse", f"parsing this file ({_size(len(data))})"),
        )

    async def run(self, fn: Callable[..., T], /, *args: Any, stage: str = "extract") -> T:
        """`fn(*args)` in the pool, with the guarantees `parse` has: off the event loop, bounded
        by `timeout`, and when the deadline passes or the caller is cancelled, the call is
        abandoned and (process mode) its worker killed; in thread mode, serialized with every
        PyMuPDF call of the process.

        Process mode pickles `fn` and `args` (a top-level function, `functools.partial` of
        one) and the result; a worker imports `fn`'s module on its first such call, unless
        `preload` named it. Exceptions `fn` raises come back as they are. Failures of the pool
        itself are retryable `InvoiceFailure`s named after `stage`: `<stage>_timeout` (the
        deadline passed), `<stage>_crashed` (a worker died, or the parser was closed
        meanwhile), and `parser_unavailable` (workers did not start).
        The extractors use stage "extract": `extract_timeout`, `extract_crashed`.
        """
        if not _STAGE_RE.fullmatch(stage):
            raise ValueError(f"stage must be a lowercase identifier, not {stage!r}")
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        return await self._call(
            functools.partial(fn, *args), _Work(stage, f"running {name} ({stage} step)")
        )

    async def _call(self, fn: Callable[[], T], work: _Work) -> T:
        if self._closed:
            raise RuntimeError("PdfParser is closed")
        if self._starting is not None:
            await self._wait_started()
        async with self._slots:
            if self._closed:  # closed while we waited for a slot
                raise RuntimeError("PdfParser is closed")
            pool, future = self._submit(fn)
            abandoned = False
            try:
                return await asyncio.wait_for(future, self.timeout)
            except TimeoutError:
                abandoned = True
                raise work.failure(
                    "timeout",
                    f"{work.doing} did not finish within {self.timeout:g} s; it was abandoned",
                ) from None
            except asyncio.CancelledError:
                abandoned = True  # our caller gave up; the worker did not
                task = asyncio.current_task()
                if self._closed and task is not None and task.cancelling() == 0:
                    # Not our caller's cancellation: close() cancelled the queued future.
                    raise work.failure(
                        "crashed", f"the parser was shut down before {work.doing}"
                    ) from None
                raise
            except BrokenProcessPool:
                self._retire(pool)
                if self._closed:
                    message = f"the parser was shut down while {work.doing}"
                else:
                    message = (
                        f"a parser worker process died while {work.doing}; this work may have "
                        "crashed it, or other work in the pool at the same time did"
                    )
                raise work.failure("crashed", message) from None
            finally:
                pool.active -= 1
                if abandoned:
                    self._retire(pool)  # its worker is still busy with our call
                self._reap(pool)

    async def _wait_started(self) -> None:
        assert self._starting is not None
        try:
            await asyncio.shield(self._starting)
        except Exception as exc:
            raise InvoiceFailure(
                "parser_unavailable",
                f"the PDF parser's worker processes did not start: {type(exc).__name__}: {exc}",
                retryable=True,
            ) from None

    def _submit(self, fn: Callable[[], T]) -> tuple[_Pool, asyncio.Future[T]]:
        loop = asyncio.get_running_loop()
        if self.kind == "thread":
            fn = functools.partial(_serialized, fn)
        pool = self._pool
        try:
            with main_module_not_reimported():
                future = loop.run_in_executor(pool.executor, fn)
        except BrokenProcessPool:
            # The pool broke before this call reached it (a crash nobody awaited yet): not this
            # call's fault, so rebuild and submit once more.
            self._retire(pool)
            self._reap(pool)
            pool = self._pool
            with main_module_not_reimported():
                future = loop.run_in_executor(pool.executor, fn)
        pool.active += 1
        return pool, future

    def _retire(self, pool: _Pool) -> None:
        """Stop sending work to `pool`; later parses get a fresh one."""
        if pool.retired or self._closed:  # close() stops every pool itself
            return
        pool.retired = True
        self._retired.append(pool)
        if pool is self._pool:
            self._pool = self._new_pool()

    def _reap(self, pool: _Pool) -> None:
        """Stop a retired pool once no caller is waiting on it (what is left is abandoned)."""
        if pool.retired and pool.active == 0 and pool in self._retired:
            self._retired.remove(pool)
            pool.stop()

    def close(self) -> None:
        """Shut the pools down: cancel queued calls, kill workers still busy. Idempotent.

        Calls still in flight fail with "parse_crashed" / "<stage>_crashed" (process mode);
        close after the batch.
        """
        if self._closed:
            return
        self._closed = True
        starting = self._starting
        if starting is not None:
            if not starting.done():
                starting.cancel()
            elif not starting.cancelled():
                starting.exception()  # retrieved: a failed start was reported by the parses
        for pool in [self._pool, *self._retired]:
            pool.stop()
        self._retired.clear()

    async def __aenter__(self) -> PdfParser:
        # The workers start in the background while the caller goes on (a run lists, plans
        # and downloads meanwhile, and the pool's start is a large part of a run's set-up);
        # the first parse waits for them. `await start()` waits now.
        if self.kind == "process":
            self._begin_start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
