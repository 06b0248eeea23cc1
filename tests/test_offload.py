"""CPU-bound work off the event loop: `PdfParser.run` (result, deadline, cancellation, crash,
on a real process pool) and the extractors built with a parser, down to a text-heavy invoice
through `process_invoice` whose extraction outlasts the invoice's timeout."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pymupdf
import pytest

from flows.extractors import build_extractor
from tasks.errors import InvoiceFailure
from tasks.extract.base import Extraction, Extractor
from tasks.extract.einvoice import EmbeddedFirstExtractor, parse_einvoice
from tasks.extract.rules import OfflineExtractor
from tasks.pdf.parse import ParsedDocument, parse_pdf_bytes
from tasks.pdf.pool import PdfParser
from tasks.pipeline import InvoiceContext, InvoiceJob, process_invoice
from tasks.storage import LocalStore
from testing.einvoice_xml import attach_einvoice, build_cii_xml
from testing.samples import make_invoice

# Pure C, holds the GIL and a core until it is killed: the shape of abandoned CPU work.
FOREVER = range(10**15)


def pool_process(pid: int) -> multiprocessing.Process:
    (process,) = [p for p in multiprocessing.active_children() if p.pid == pid]
    return process


async def wait_dead(process: multiprocessing.Process, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while process.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return not process.is_alive()


# --- PdfParser.run on the process pool ----------------------------------------------------------


async def test_run_returns_what_the_function_returns_in_a_worker() -> None:
    async with PdfParser("process", max_workers=1, timeout=30) as parser:
        pid = await parser.run(os.getpid)
        assert pid != os.getpid() and pool_process(pid).is_alive()
        assert await parser.run(divmod, 7, 2) == (3, 1)
        with pytest.raises(ValueError, match="invalid literal"):  # the function's own error
            await parser.run(int, "seven")
        with pytest.raises(InvoiceFailure) as info:  # ...also an InvoiceFailure, code and all
            await parser.run(parse_einvoice, b"<Invoice/>")
        assert info.value.code == "einvoice_invalid"
        assert await parser.run(os.getpid) == pid  # none of that cost the worker
        with pytest.raises(ValueError, match="stage"):
            await parser.run(os.getpid, stage="Extract step")


async def test_run_past_the_deadline_is_extract_timeout_and_its_worker_is_killed() -> None:
    async with PdfParser("process", max_workers=1, timeout=0.5) as parser:
        pid = await parser.run(os.getpid)
        worker = pool_process(pid)
        started = time.perf_counter()
        with pytest.raises(InvoiceFailure) as info:
            await parser.run(sum, FOREVER)
        assert time.perf_counter() - started < 2.0
        assert info.value.code == "extract_timeout" and info.value.retryable
        assert "0.5 s" in info.value.message and "sum" in info.value.message
        assert await wait_dead(worker)  # the abandoned sum no longer holds a core
        with pytest.raises(InvoiceFailure) as info:
            await parser.run(sum, FOREVER, stage="ocr")  # the stage names the code
        assert info.value.code == "ocr_timeout"
        assert await parser.run(divmod, 9, 4) == (2, 1)  # a fresh pool took over


async def test_cancelling_a_run_kills_its_busy_worker() -> None:
    async with PdfParser("process", max_workers=1, timeout=60) as parser:
        pid = await parser.run(os.getpid)
        worker = pool_process(pid)
        running = asyncio.create_task(parser.run(sum, FOREVER))
        await asyncio.sleep(0.3)  # the worker is summing
        assert not running.done() and worker.is_alive()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert await wait_dead(worker)
        assert await parser.run(os.getpid) != pid


async def test_a_worker_that_dies_is_extract_crashed_and_the_pool_recovers() -> None:
    async with PdfParser("process", max_workers=1, timeout=30) as parser:
        pid = await parser.run(os.getpid)
        with pytest.raises(InvoiceFailure) as info:
            await parser.run(os._exit, 3)
        assert info.value.code == "extract_crashed" and info.value.retryable
        assert "died" in info.value.message and "_exit" in info.value.message
        assert not pool_process_alive(pid)
        assert await parser.run(divmod, 7, 2) == (3, 1)


def pool_process_alive(pid: int) -> bool:
    return any(p.pid == pid for p in multiprocessing.active_children())


async def test_thread_mode_runs_one_call_at_a_time_under_the_same_deadline() -> None:
    async with PdfParser("thread", timeout=5) as parser:
        assert await parser.run(os.getpid) == os.getpid()
        started = time.perf_counter()
        await asyncio.gather(parser.run(time.sleep, 0.2), parser.run(time.sleep, 0.2))
        assert time.perf_counter() - started >= 0.4  # serialized, as PyMuPDF calls are
        parser.timeout = 0.1
        with pytest.raises(InvoiceFailure) as info:
            await parser.run(time.sleep, 0.5)
        assert info.value.code == "extract_timeout"


# --- the extractors with a parser ----------------------------------------------------------------


async def test_offline_extraction_in_the_pool_is_the_inline_one() -> None:
    pdfs = [make_invoice(seed)[0] for seed in range(4)]
    pdf, truth = make_invoice(5)
    pdfs.append(attach_einvoice(pdf, build_cii_xml(truth)))  # the e-invoice path too
    documents = [parse_pdf_bytes(data) for data in pdfs]
    inline = [await EmbeddedFirstExtractor(OfflineExtractor()).extract(d) for d in documents]
    parser = PdfParser("process", max_workers=2, timeout=30)
    # Built before the parser starts, as the flow does (both are set up concurrently).
    async with build_extractor("offline", parser=parser) as extractor, parser:
        pooled = await asyncio.gather(*(extractor.extract(d) for d in documents))
    assert pooled == inline
    assert pooled[-1].source == "embedded_xml" and pooled[0].source == "text"


class Recording:
    """Notes every document it is asked for, and gives them to the real extractor."""

    def __init__(self, inner: Extractor) -> None:
        self.inner = inner
        self.name = inner.name
        self.started: list[float] = []

    async def extract(self, document: ParsedDocument) -> Extraction:
        self.started.append(time.perf_counter())
        return await self.inner.extract(document)


async def test_a_pool_failure_on_the_embedded_xml_fails_the_invoice_not_the_xml() -> None:
    """A deadline or crash of the pool says nothing about the XML: the invoice fails
    (retryably) instead of being read from its text as if its XML were broken."""
    pdf, truth = make_invoice(5)
    document = parse_pdf_bytes(attach_einvoice(pdf, build_cii_xml(truth)))
    fallback = Recording(OfflineExtractor())
    async with PdfParser("process", max_workers=1, timeout=0.5) as parser:
        extractor = EmbeddedFirstExtractor(fallback, parser=parser)
        busy = asyncio.create_task(parser.run(sum, FOREVER))  # the XML queues behind it
        await asyncio.sleep(0.1)
        with pytest.raises(InvoiceFailure) as info:
            await extractor.extract(document)
        assert info.value.code == "extract_timeout"
        with pytest.raises(InvoiceFailure):
            await busy
        assert fallback.started == []
        parser.timeout = 30  # for a fresh worker, which imports the e-invoice reader first
        assert (await extractor.extract(document)).source == "embedded_xml"


# --- a text-heavy invoice through the pipeline ---------------------------------------------------


def text_heavy_pdf(pages: int = 100) -> bytes:
    """Pages crammed with labelled totals and dates, ~0.9 MB of text: parsing it takes ~1.3 s
    here, the offline rules ~20 s (they grow faster than the number of labelled values)."""
    rng = random.Random(7)
    labels = ["Total", "Subtotal", "VAT", "Amount due", "Invoice date", "Due date"]

    def value() -> str:
        if rng.random() < 0.6:
            return f"{rng.randint(1, 99999)}.{rng.randint(0, 99):02d}"
        return f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.20{rng.randint(10, 29)}"

    doc = pymupdf.open()
    for _ in range(pages):
        lines = ["   ".join(f"{rng.choice(labels)} {value()}" for _ in range(6)) for _ in range(80)]
        doc.new_page(width=612, height=792).insert_text((8, 8), "\n".join(lines), fontsize=3.2)
    return doc.tobytes(deflate=True)


class StallProbe:
    """The longest the event loop went without running this ticker (ideally ~0)."""

    def __init__(self, tick: float = 0.01) -> None:
        self.tick = tick
        self.worst = 0.0

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.tick)
            self.worst = max(self.worst, time.perf_counter() - started - self.tick)


async def test_a_text_heavy_invoice_times_out_in_extraction_without_stalling_the_loop(
    tmp_path: Path,
) -> None:
    data = text_heavy_pdf()
    normal, _ = make_invoice(1)
    async with LocalStore(tmp_path / "in") as source, LocalStore(tmp_path / "out") as output:
        heavy_etag = await source.put("heavy.pdf", data)
        normal_etag = await source.put("normal.pdf", normal)
        async with PdfParser("process", max_workers=1, max_pages=None) as parser:
            await parser.start()
            started = time.perf_counter()
            parsed = await parser.parse(data)
            parse_seconds = time.perf_counter() - started
            assert parsed.page_count == 100 and len(parsed.text) > 800_000
            async with build_extractor("offline", parser=parser) as offline:
                extractor = Recording(offline)
                # 3 s, or twice the parse if this machine is so busy that parsing alone would
                # take most of that: the extraction, not the parse, has to be what is cut short.
                timeout = max(3.0, 2 * parse_seconds)
                ctx = InvoiceContext(source, output, parser, extractor, invoice_timeout=timeout)
                worker = pool_process(await parser.run(os.getpid))
                probe = StallProbe()
                ticking = asyncio.create_task(probe.run())
                started = time.perf_counter()
                try:
                    heavy = await process_invoice(
                        ctx, InvoiceJob("heavy.pdf", heavy_etag, len(data))
                    )
                finally:
                    ticking.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticking
                elapsed = time.perf_counter() - started
                outcome = heavy.outcome
                assert (outcome.status, outcome.error_code) == ("failed", "invoice_timeout"), (
                    outcome
                )
                assert len(extractor.started) == 1  # it was cut short in the extraction
                assert elapsed < timeout + 2.0, elapsed
                assert probe.worst < 0.3, probe.worst
                assert await wait_dead(worker)  # the abandoned extraction lost its core
                done = await process_invoice(
                    ctx, InvoiceJob("normal.pdf", normal_etag, len(normal))
                )
                assert done.outcome.status == "done", done.outcome


PRELOAD_PROBE = """
import asyncio, sys
from tasks.pdf.pool import PdfParser

async def main():
    async with PdfParser("process", max_workers=1) as parser:
        if sys.argv[1:] == ["preload"]:
            parser.preload("tasks.extract.rules")
        print(await parser.run(eval, "'tasks.extract.rules' in __import__('sys').modules"))

asyncio.run(main())
"""


@pytest.mark.parametrize("preload", [True, False])
def test_preloaded_modules_are_in_every_worker_before_its_first_call(preload: bool) -> None:
    """Asked before the workers start (as build_extractor("offline") does), the forkserver
    imports the extraction rules once; otherwise a worker has only what parsing needs."""
    args = [sys.executable, "-c", PRELOAD_PROBE] + (["preload"] if preload else [])
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert out.split() == [str(preload)]
