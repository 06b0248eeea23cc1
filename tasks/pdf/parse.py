"""PDF text extraction with PyMuPDF, off the event loop.

`parse_pdf_bytes` is the plain, synchronous parser: bytes in, `ParsedDocument` out, or an
`InvoiceFailure` with a stable code for every way a file can be unreadable. `PdfParser` runs it
in an executor with a deadline, so the event loop never stalls on PyMuPDF (which holds the GIL)
and a pathological file cannot hang the batch. `PdfParser.run` gives other CPU-bound steps
(the offline extraction rules, e-invoice XML) the same pool, deadline and clean-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib.machinery
import multiprocessing
import os
import re
import signal
import sys
import threading
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeVar

from tasks.errors import InvoiceFailure
from tasks.pdf.priority import lower_priority, lowered

if TYPE_CHECKING:
    import pymupdf

    from tasks.pdf.embedded_xml import EmbeddedXml

T = TypeVar("T")


class Word(NamedTuple):
    """One word on a page: its box in points (origin top-left) and PyMuPDF's block and line
    numbers (words of one block and line were set as one run of text)."""

    x0: float
    y0: float
    x1: float
    y1: float
    text: str
    block: int
    line: int


# One page's words, packed for cheap pickling between processes: the texts joined by "\n"
# (a word never contains one) and an array('H') of x0, y0, x1, y1 in quarter points (pages
# up to 16383 pt, more than PDF's maximum of 14400) and block, line per word: 12 bytes a word.
PageWords = tuple[str, bytes]
_QUARTERS = 4.0
_MAX_H = 65535


def pack_words(words: list[tuple]) -> PageWords:
    """Pack PyMuPDF's `page.get_text("words")` tuples (x0, y0, x1, y1, text, block, line, n)."""
    numbers = array("H")
    texts = []
    for w in words:
        numbers.extend(min(_MAX_H, max(0, round(v * _QUARTERS))) for v in w[:4])
        numbers.extend((min(_MAX_H, w[5]), min(_MAX_H, w[6])))
        texts.append(w[4].replace("\n", " "))
    return "\n".join(texts), numbers.tobytes()


def unpack_words(packed: PageWords) -> list[Word]:
    texts, raw = packed
    n = array("H")
    n.frombytes(raw)
    q = _QUARTERS
    words = texts.split("\n") if texts else []
    return [
        Word(n[6 * i] / q, n[6 * i + 1] / q, n[6 * i + 2] / q, n[6 * i + 3] / q, text, n[6 * i + 4], n[6 * i + 5])
        for i, text in enumerate(words)
    ]


@dataclass(frozen=True)
class ParsedDocument:
    """Text of every page, in reading order; for a parsed PDF also every page's words with
    their positions (`page_words`), which table readers need. Documents made from text alone
    have no words (`has_words` is False). Equality and repr are by the text only."""

    pages: list[str]
    words: tuple[PageWords, ...] | None = field(default=None, compare=False, repr=False)
    # The e-invoice XML (Factur-X / ZUGFeRD / UBL) the PDF carries as an attachment, if any.
    einvoice: EmbeddedXml | None = field(default=None, compare=False, repr=False)

    @property
    def page_count(self) -> int:
        return len(self.pages)

    @property
    def text(self) -> str:
        return "\n\f".join(self.pages)

    @property
    def has_words(self) -> bool:
        return self.words is not None

    def page_words(self, page: int) -> list[Word]:
        """The words of one page (0-based) with their boxes; [] without word positions."""
        if self.words is None or not 0 <= page < len(self.words):
            return []
        return unpack_words(self.words[page])


# --------------------------------------------------------------------------------------------
# The synchronous parser
# --------------------------------------------------------------------------------------------

_PDF_MAGIC = b"%PDF-"
# Readers (Acrobat, MuPDF) accept the header anywhere in the first KiB; stray bytes before it
# are common in files from mail gateways and old generators.
_MAGIC_WINDOW = 1024


def parse_pdf_bytes(data: bytes, *, max_pages: int | None = None) -> ParsedDocument:
    """Text of every page of a PDF, or an `InvoiceFailure` saying why there is none.

    Synchronous and top-level so a process pool can pickle it. Not thread-safe (PyMuPDF is not):
    callers running it in threads must serialize calls, as `PdfParser(kind="thread")` does.
    """
    # Imported here, not at module level: importing this module (for ParsedDocument) should
    # not cost ~110 ms and ~40 MB of PyMuPDF in processes that never parse (the flow process
    # with a process pool).
    import pymupdf

    size = len(data)
    if size == 0:
        raise InvoiceFailure("empty_file", "the file is empty (0 bytes)")
    # Check the magic ourselves: with filetype="pdf" PyMuPDF still sniffs the content and opens
    # e.g. a PNG as a one-page image document, which would then pass as a PDF without text.
    head = bytes(data[:_MAGIC_WINDOW])
    if _PDF_MAGIC not in head:
        raise InvoiceFailure(
            "not_a_pdf",
            f"the file is not a PDF: no '%PDF-' header in its first {_MAGIC_WINDOW} bytes "
            f"({_size(size)}, starts with {head[:16]!r})",
        )

    # MuPDF reports what it repaired only through this global store; reset it so the message
    # names this file's problems (safe: callers serialize PyMuPDF use, see above).
    pymupdf.TOOLS.reset_mupdf_warnings()
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except pymupdf.EmptyFileError:  # a subclass of FileDataError; unreachable after the check above
        raise InvoiceFailure("empty_file", "the file is empty (0 bytes)") from None
    except pymupdf.FileDataError as exc:
        # It starts like a PDF, so "damaged" says more than "not a PDF" (e.g. a cut download).
        raise InvoiceFailure(
            "pdf_damaged",
            f"the file has a PDF header but PyMuPDF cannot open it ({_size(size)}): {exc}"
            f"{_mupdf_details()}",
        ) from None

    with doc:
        page_count = _page_count(doc, size)
        if doc.needs_pass:
            # MuPDF already tried the empty password (owner-password-only files open fine);
            # guessing others is not our business.
            raise InvoiceFailure(
                "pdf_encrypted",
                f"the PDF is password-protected ({_pages(page_count)}, {_size(size)}); "
                "passwords are not tried",
            )
        _refuse_repaired(doc, size)

        if page_count == 0:
            raise InvoiceFailure("no_text_layer", f"the PDF has no pages ({_size(size)})")
        if max_pages is not None and page_count > max_pages:
            raise InvoiceFailure(
                "too_many_pages",
                f"the PDF has {_pages(page_count)}, more than the limit of {max_pages} "
                f"({_size(size)})",
            )

        try:
            pages = []
            words = []
            for page in doc:
                # One text page gives both: the word boxes (for the table readers; 12 bytes
                # per word plus its text when pickled) and the reading-order text.
                page_words = page.get_textpage(flags=pymupdf.TEXTFLAGS_WORDS).extractWORDS()
                pages.append(sorted_text(page_words))
                words.append(pack_words(page_words))
        except (RuntimeError, pymupdf.mupdf.FzErrorBase) as exc:
            raise InvoiceFailure(
                "pdf_damaged",
                f"text extraction failed ({_pages(page_count)}, {_size(size)}): {exc}"
                f"{_mupdf_details()}",
            ) from None
        # Repair can also happen lazily, when a page's objects are first loaded.
        _refuse_repaired(doc, size)
        from tasks.pdf.embedded_xml import find_embedded_einvoice

        einvoice = find_embedded_einvoice(doc)

    if not any(page.strip() for page in pages) and einvoice is None:
        raise InvoiceFailure(
            "no_text_layer",
            f"no text could be extracted from its {_pages(page_count)} (a scanned image?); "
            "OCR is not configured, so the invoice cannot be read",
        )
    return ParsedDocument(pages=pages, words=tuple(words), einvoice=einvoice)


def _union(a: tuple, b: tuple) -> tuple:
    # pymupdf.Rect.include_rect: an empty rect (x0 >= x1 or y0 >= y1) adds nothing.
    if b[0] >= b[2] or b[1] >= b[3]:
        return a
    if a[0] >= a[2] or a[1] >= a[3]:
        return b
    return (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))


def _reading_order(words: list[tuple], tolerance: float) -> list[tuple]:
    # pymupdf.utils.get_text_words(sort=True): by bottom then left, then words whose top or
    # bottom is within `tolerance` of the line's are one line, read left to right.
    words = sorted(words, key=lambda w: (w[3], w[0]))
    ordered, line, lrect = [], [words[0]], words[0][:4]
    for w in words[1:]:
        box = w[:4]
        if abs(box[1] - lrect[1]) <= tolerance or abs(box[3] - lrect[3]) <= tolerance:
            line.append(w)
            lrect = _union(lrect, box)
        else:
            line.sort(key=lambda w: w[0])
            ordered.extend(line)
            line, lrect = [w], box
    line.sort(key=lambda w: w[0])
    ordered.extend(line)
    return ordered


def _line_text(left: float, line: list[tuple]) -> str:
    line.sort(key=lambda w: w[0])
    text, x1 = "", left
    for w in line:
        x0, width, word = w[0], max(0.0, w[2] - w[0]), w[4]
        gap = int(round((x0 - x1) / width * len(word))) if width else 0
        text += " " * max(gap, 0 if (x1 == left or x0 <= x1) else 1) + word
        x1 = w[2]
    return text


def sorted_text(words: list[tuple], tolerance: float = 3) -> str:
    """`page.get_text("text", sort=True)` computed from the page's words: the same text
    (reading order, words on one visual line joined, gaps kept as spaces), without the
    per-word `pymupdf.Rect` objects that make PyMuPDF's pure-Python version cost 10-20 ms a
    page. tests/test_parse.py checks it against PyMuPDF's own on every kind of page we make."""
    if not words:
        return ""
    words = [(float(w[0]), float(w[1]), float(w[2]), float(w[3]), w[4]) for w in words]
    words = _reading_order(words, tolerance)
    total = (float("inf"), float("inf"), float("-inf"), float("-inf"))  # EMPTY_RECT
    for w in words:
        total = _union(total, w[:4])
    lines, line, lrect = [], [words[0]], words[0][:4]
    for w in words[1:]:
        box = w[:4]
        if abs(lrect[1] - box[1]) <= tolerance or abs(lrect[3] - box[3]) <= tolerance:
            line.append(w)
            lrect = _union(lrect, box)
        else:
            lines.append((lrect, _line_text(total[0], line)))
            line, lrect = [w], box
    lines.append((lrect, _line_text(total[0], line)))
    lines.sort(key=lambda l: l[0][3])
    text, y1 = lines[0][1], lines[0][0][3]
    for lrect, ltext in lines[1:]:
        height = max(0.0, lrect[3] - lrect[1])
        distance = min(int(round((lrect[1] - y1) / height)), 5) if height else 0
        text += "\n" * (distance + 1) + ltext
        y1 = lrect[3]
    return text


def _page_count(doc: pymupdf.Document, size: int) -> int:
    """The page count, or `pdf_damaged` when the page tree's /Count is impossible.

    MuPDF refuses a /Count that is negative or not below the file's number of objects (every
    page needs an object of its own), e.g. a forged 2,000,000,000, with a RuntimeError before
    allocating anything; a smaller lie is corrected as the pages are loaded."""
    import pymupdf

    try:
        return doc.page_count
    except (RuntimeError, pymupdf.mupdf.FzErrorBase) as exc:
        declared = _declared_page_count(doc)
        claim = f"declares {declared} pages" if declared is not None else "is invalid"
        raise InvoiceFailure(
            "pdf_damaged",
            f"the PDF's page tree {claim}, which the file cannot hold ({_size(size)}, "
            f"{doc.xref_length()} objects): it is damaged or forged [MuPDF: {exc}]",
        ) from None


def _declared_page_count(doc: pymupdf.Document) -> str | None:
    import pymupdf

    try:
        kind, value = doc.xref_get_key(doc.pdf_catalog(), "Pages/Count")
    except (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase):
        return None  # a catalog too broken to read: the message says "invalid" instead
    return value[:20] if kind == "int" else None


def _refuse_repaired(doc: pymupdf.Document, size: int) -> None:
    # A repaired file opens "fine" with whatever text survived: returning that would be silent
    # garbage (missing pages, missing totals), so repair is a failure.
    if doc.is_repaired:
        raise InvoiceFailure(
            "pdf_damaged",
            f"the PDF is damaged (truncated or corrupt, {_size(size)}); PyMuPDF could only "
            f"repair it, so its text may be incomplete{_mupdf_details()}",
        )


def _mupdf_details() -> str:
    import pymupdf

    lines = [line for line in pymupdf.TOOLS.mupdf_warnings().splitlines() if line.strip()]
    return f" [MuPDF: {'; '.join(lines[:3])}]" if lines else ""


def _pages(n: int) -> str:
    return "1 page" if n == 1 else f"{n} pages"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


# --------------------------------------------------------------------------------------------
# Running it off the event loop
# --------------------------------------------------------------------------------------------

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
    # threads can deadlock the child on a lock some other thread held. Measured here (2 cores,
    # 2 workers, first parse done): spawn 0.16-0.20 s per pool start; forkserver 0.16-0.19 s
    # for the first pool (it starts the server) and 0.11-0.13 s after; forkserver with pymupdf
    # preloaded 0.02-0.03 s after the first. Pools are rebuilt after a timeout or crash, so
    # forkserver with preload. The preload list is process-wide and only takes effect if the
    # forkserver has not started yet; preloading pymupdf is harmless for any other user, and
    # any other user's processes are batch work too. What a parse imports (this module,
    # tasks.pdf.embedded_xml to look for an e-invoice attachment) is imported once in the
    # forkserver, not in every new worker. Not tasks.extract.einvoice: with the offline extractor
    # and the invoice models it cost ~0.25 s more, and each run's first parse waits for the
    # forkserver's start (0.43 s, now 0.20 s, until both workers answer; measured). A run
    # that extracts in the pool adds them through `PdfParser.preload`.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(_PRELOAD))
    return ctx


# What the forkserver imports when it starts: see _process_context and PdfParser.preload.
_PRELOAD = ["tasks.pdf.forkserver_preload", "pymupdf", "tasks.pdf.parse", "tasks.pdf.embedded_xml"]


class _Pool:
    """One executor plus the bookkeeping needed to retire it safely."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.active = 0  # calls (parse() and run()) awaiting a result from this executor
        self.retired = False

    def stop(self) -> None:
        """Shut the executor down; in a process pool, kill workers still busy (abandoned work)."""
        executor = self.executor
        if isinstance(executor, ProcessPoolExecutor):
            # `_processes` is private, but ProcessPoolExecutor has no public way to end a busy
            # worker before Python 3.14 (`terminate_workers`). Snapshot it first: shutdown()
            # may drop it.
            processes = list((getattr(executor, "_processes", None) or {}).values())
            if self.active == 0 and not self.retired:
                executor.shutdown(wait=True, cancel_futures=True)  # idle: quick and clean
                return
            executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.kill()
        else:
            # Threads cannot be killed: a running parse finishes in the background.
            executor.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _workers_skip_main() -> Iterator[None]:
    """While worker processes start: make them skip re-importing the parent's __main__.

    multiprocessing's non-fork start methods import the parent's main module in every
    worker ("prepare"): under `python -m prefect.engine` (a Prefect worker's flow run) or a
    bench script that is ~2 s per worker, measured here, for nothing: workers only need
    tasks.pdf.parse. A main-module spec whose name ends in `.__main__` is the documented case
    in which multiprocessing skips that import. Workers are started synchronously inside
    executor.submit, so the swap is scoped to that call.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_SWAP:  # start() swaps from a thread: never interleave two swaps
        saved = main.__dict__.get("__spec__")
        main.__spec__ = _SKIP_MAIN_SPEC
        try:
            yield
        finally:
            main.__spec__ = saved


_MAIN_SWAP = threading.Lock()


_SKIP_MAIN_SPEC = importlib.machinery.ModuleSpec("invoice_pdf_worker.__main__", None)


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
    the only way to parse in parallel and keep the event loop responsive. With the forkserver
    start method, workers import the running `__main__` module (as `__mp_main__`), so a script
    that creates a PdfParser needs the usual `if __name__ == "__main__":` guard.

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
        # the event loop (one call per worker left them idle half the time under load,
        # measured). It stays short so that a crash hits few calls and the deadline still
        # measures parsing plus at most PIPELINE - 1 parses queued ahead.
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
                max_workers=self.max_workers, mp_context=self._context,
                initializer=_init_worker, initargs=(lowered(os.getpriority(os.PRIO_PROCESS, 0)),),
            )
        )

    def preload(self, *modules: str) -> None:
        """Have the workers import `modules` (what the functions given to `run` live in)
        before their first call. Process mode only, and only until this process's forkserver
        has started (it reads the list once; `async with` starts it): it then imports them
        once, and every worker forked from it, also in the pools that replace a retired one,
        has them. Otherwise a worker imports a module on its first call that needs it, and
        every fresh pool's first calls pay for that again (tasks.extract.rules: ~0.3 s a worker)."""
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
            with _workers_skip_main():
                return [executor.submit(_ping) for _ in range(self.max_workers)]

        # One call per worker, submitted together: each submit finds no idle worker and spawns
        # one, and blocks until that process exists (the first time, until the forkserver has
        # imported pymupdf: up to 2 s measured under load), so it runs off the event loop.
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
        `preload` named it. Exceptions `fn` raises come back as they are. Failures of the pool itself are retryable `InvoiceFailure`s named after
        `stage`: `<stage>_timeout` (the deadline passed), `<stage>_crashed` (a worker died, or
        the parser was closed meanwhile), and `parser_unavailable` (workers did not start).
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
            with _workers_skip_main():
                future = loop.run_in_executor(pool.executor, fn)
        except BrokenProcessPool:
            # The pool broke before this call reached it (a crash nobody awaited yet): not this
            # call's fault, so rebuild and submit once more.
            self._retire(pool)
            self._reap(pool)
            pool = self._pool
            with _workers_skip_main():
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
        # and downloads meanwhile: the pool's start was 0.6-1.1 s of a 100-invoice run's
        # set-up, bench/manifest_lock.py); the first parse waits for them. `await start()`
        # waits now.
        if self.kind == "process":
            self._begin_start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
