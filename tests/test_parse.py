"""PDF parsing: every outcome code, both executor kinds, deadlines, crashes, concurrency.

Every PDF is built here with PyMuPDF; there are no binary fixtures.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pymupdf
import pytest

from tasks.errors import InvoiceFailure
from tasks.pdf.parse import ParsedDocument, Word, parse_pdf_bytes
from tasks.pdf.pool import PdfParser
from tasks.pdf.priority import lowered

KINDS = ["process", "thread"]


# --- building PDFs ---------------------------------------------------------------------------


def make_pdf(pages: list[str]) -> bytes:
    doc = pymupdf.open()
    for text in pages:
        doc.new_page().insert_text((72, 72), text, fontsize=11)
    return doc.tobytes()


def dense_pdf(page_count: int) -> bytes:
    """Many lines per page: reading-order extraction of it is slow (~10-20 ms per page)."""
    doc = pymupdf.open()
    for i in range(page_count):
        lines = "\n".join(f"item {j} on page {i}: 1 x widget at 9.99 EUR" for j in range(40))
        doc.new_page().insert_text((72, 72), lines, fontsize=8)
    return doc.tobytes()


def encrypted_pdf() -> bytes:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), "Invoice 7 - secret")
    return doc.tobytes(
        encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user-pw", owner_pw="owner-pw"
    )


def image_only_pdf() -> bytes:
    """A 'scanned' page: one image, no text layer."""
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 64, 64), False)
    pix.set_rect(pix.irect, (40, 40, 40))
    doc = pymupdf.open()
    doc.new_page().insert_image(pymupdf.Rect(72, 72, 400, 400), pixmap=pix)
    return doc.tobytes()


def truncated_pdf() -> bytes:
    """A real 3-page PDF cut short, at a point where PyMuPDF silently repairs it and still
    returns some (partial) text: exactly the case that must not pass as a good parse."""
    whole = make_pdf(["Invoice 1 page one", "page two", "page three TOTAL 100.00"])
    for cut in range(len(whole) // 2, len(whole) // 4, -16):
        data = whole[:cut]
        try:
            doc = pymupdf.open(stream=data, filetype="pdf")
        except pymupdf.FileDataError:
            continue
        text = [page.get_text() for page in doc]
        if doc.is_repaired and any(t.strip() for t in text):
            return data
    raise AssertionError("no cut point made PyMuPDF repair the file")


def forged_page_count_pdf(count: int = 2_000_000_000) -> bytes:
    """A one-page PDF whose page tree declares `count` pages. Written by hand: PyMuPDF will
    not save a document whose page count it rejects."""
    content = b"BT /F1 12 Tf 72 720 Td (Invoice 1 Total 10.00 EUR) Tj ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count %d >>" % count,
        (
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>"
        ),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


ONE_PAGE = ["Invoice INV-001\nTotal: 42.00 EUR"]
THREE_PAGES = ["Invoice INV-003 page one", "Line items page two", "Total 99.50 EUR page three"]
MAX_PAGES = 5  # the limit used by the cases below

# name -> (bytes builder, expected pages or expected failure code)
CASES: dict[str, tuple[Callable[[], bytes], list[str] | str]] = {
    "one_page": (lambda: make_pdf(ONE_PAGE), ONE_PAGE),
    "three_pages": (lambda: make_pdf(THREE_PAGES), THREE_PAGES),
    "empty": (lambda: b"", "empty_file"),
    "random_bytes": (lambda: random.Random(1).randbytes(4096), "not_a_pdf"),
    "text_file": (lambda: b"Invoice 42\nTotal: 100 EUR\n" * 20, "not_a_pdf"),
    "png_bytes": (lambda: image_only_pdf_png(), "not_a_pdf"),
    "encrypted": (encrypted_pdf, "pdf_encrypted"),
    "truncated": (truncated_pdf, "pdf_damaged"),
    "header_only": (lambda: make_pdf(ONE_PAGE)[:120], "pdf_damaged"),  # repaired, 0 pages
    "pdf_header_garbage": (lambda: b"%PDF-1.7\n" + random.Random(2).randbytes(512), "pdf_damaged"),
    "image_only": (image_only_pdf, "no_text_layer"),
    "too_many_pages": (
        lambda: make_pdf([f"page {i}" for i in range(MAX_PAGES + 1)]),
        "too_many_pages",
    ),
    "forged_page_count": (forged_page_count_pdf, "pdf_damaged"),
}


def image_only_pdf_png() -> bytes:
    # PyMuPDF sniffs content even with filetype="pdf" and would open this as a 1-page document.
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 8, 8), False)
    return pix.tobytes("png")


def outcome(fn: Callable[[], ParsedDocument]) -> tuple[str, object]:
    try:
        return ("ok", fn().pages)
    except InvoiceFailure as failure:
        return (failure.code, failure.message)


def strip_pages(pages: list[str]) -> list[str]:
    return [page.strip() for page in pages]


# --- the synchronous parser ------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_parse_pdf_bytes_outcomes(name: str) -> None:
    build, expected = CASES[name]
    data = build()
    if isinstance(expected, list):
        doc = parse_pdf_bytes(data, max_pages=MAX_PAGES)
        assert strip_pages(doc.pages) == expected  # every page, in order
        assert doc.page_count == len(expected)
        assert doc.text == "\n\f".join(doc.pages)
    else:
        with pytest.raises(InvoiceFailure) as info:
            parse_pdf_bytes(data, max_pages=MAX_PAGES)
        assert info.value.code == expected
        assert info.value.message  # a human sentence, not just the code
        assert str(info.value).startswith(f"{expected}: ")


def test_truncated_pdf_is_one_pymupdf_silently_repairs() -> None:
    data = truncated_pdf()
    doc = pymupdf.open(stream=data, filetype="pdf")  # no exception: that is the danger
    assert doc.is_repaired
    with pytest.raises(InvoiceFailure, match="damaged") as info:
        parse_pdf_bytes(data)
    assert info.value.code == "pdf_damaged"


def test_messages_carry_sizes_and_counts() -> None:
    with pytest.raises(InvoiceFailure) as info:
        parse_pdf_bytes(make_pdf(["a", "b", "c"]), max_pages=2)
    assert "3 pages" in info.value.message and "limit of 2" in info.value.message
    with pytest.raises(InvoiceFailure) as info:
        parse_pdf_bytes(image_only_pdf())
    assert "OCR is not configured" in info.value.message and "its 1 page " in info.value.message
    with pytest.raises(InvoiceFailure) as info:
        parse_pdf_bytes(b"hello, not a pdf")
    assert "16 bytes" in info.value.message


def test_page_limit_is_checked_before_extracting_text() -> None:
    data = dense_pdf(20)
    started = time.perf_counter()
    parse_pdf_bytes(data, max_pages=None)
    full = time.perf_counter() - started
    started = time.perf_counter()
    with pytest.raises(InvoiceFailure, match="too_many_pages"):
        parse_pdf_bytes(data, max_pages=10)
    assert time.perf_counter() - started < full / 5


def test_a_page_count_the_file_cannot_hold_is_pdf_damaged_at_once() -> None:
    """2,000,000,000 declared pages in a 600-byte file: MuPDF refuses the count (RuntimeError,
    which ended as `internal_error`, retried on every run); it is a damaged file, said so."""
    assert forged_page_count_pdf(1) != forged_page_count_pdf()
    assert strip_pages(parse_pdf_bytes(forged_page_count_pdf(1)).pages) == [
        "Invoice 1 Total 10.00 EUR"
    ]
    for max_pages in (500, None):
        started = time.perf_counter()
        with pytest.raises(InvoiceFailure) as info:
            parse_pdf_bytes(forged_page_count_pdf(), max_pages=max_pages)
        assert time.perf_counter() - started < 1.0
        assert info.value.code == "pdf_damaged" and not info.value.retryable
        assert "declares 2000000000 pages" in info.value.message, info.value.message
    # A smaller lie (3 declared, 1 there) is one MuPDF corrects as it loads the pages.
    assert parse_pdf_bytes(forged_page_count_pdf(3)).page_count == 1


def test_invoice_failure_survives_pickling() -> None:
    failure = InvoiceFailure("pdf_encrypted", "the PDF is password-protected", retryable=True)
    copy = pickle.loads(pickle.dumps(failure))
    assert type(copy) is InvoiceFailure
    assert (copy.code, copy.message, copy.retryable) == ("pdf_encrypted", failure.message, True)
    assert str(copy) == str(failure)


# --- PdfParser: both kinds -------------------------------------------------------------------


async def test_process_and_thread_kinds_give_identical_results() -> None:
    inputs = {name: build() for name, (build, _) in CASES.items()}
    direct = {
        name: outcome(lambda d=d: parse_pdf_bytes(d, max_pages=MAX_PAGES))
        for name, d in inputs.items()
    }
    for name, (_, expected) in CASES.items():
        assert direct[name][0] == ("ok" if isinstance(expected, list) else expected), name
    for kind in KINDS:
        async with PdfParser(kind, max_pages=MAX_PAGES, timeout=30) as parser:
            results = {}
            for name, data in inputs.items():
                try:
                    results[name] = ("ok", (await parser.parse(data)).pages)
                except InvoiceFailure as failure:
                    results[name] = (failure.code, failure.message)
        assert results == direct, kind


async def test_batch_of_20_concurrent_parses_all_succeed() -> None:
    documents = [make_pdf([f"Invoice {i:03d}", f"Total {i}.00 EUR"]) for i in range(20)]
    async with PdfParser("process", timeout=60) as parser:
        parsed = await asyncio.gather(*(parser.parse(data) for data in documents))
    for i, doc in enumerate(parsed):
        assert strip_pages(doc.pages) == [f"Invoice {i:03d}", f"Total {i}.00 EUR"]


async def test_event_loop_stays_responsive_while_parsing() -> None:
    data = dense_pdf(20)
    async with PdfParser("process", max_workers=1, timeout=60) as parser:
        task = asyncio.create_task(parser.parse(data))
        worst = 0.0
        while not task.done():
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - started)
        assert (await task).page_count == 20
    assert worst < 0.2  # a thread holding the GIL would stall it for the whole parse


# --- deadlines and crashes --------------------------------------------------------------------


def pool_children(before: set[int]) -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p.pid not in before]


async def wait_dead(process: multiprocessing.Process, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while process.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return not process.is_alive()


@pytest.mark.parametrize("kind", KINDS)
async def test_timeout_then_next_parse_succeeds(kind: str) -> None:
    slow = dense_pdf(30)  # ~0.5 s of extraction: 25x the deadline
    # Built now: in thread mode the abandoned parse keeps using PyMuPDF in the background, and
    # PyMuPDF must not run in two threads at once.
    good = make_pdf(ONE_PAGE)
    before = {p.pid for p in multiprocessing.active_children()}
    async with PdfParser(kind, max_workers=1, timeout=0.02, max_pages=None) as parser:
        await parser.start()
        workers = pool_children(before)
        with pytest.raises(InvoiceFailure) as info:
            await parser.parse(slow)
        assert info.value.code == "parse_timeout"
        assert info.value.retryable
        assert "0.02 s" in info.value.message
        if kind == "process":
            # The abandoned worker is killed rather than left to finish in the background.
            assert len(workers) == 1
            assert await wait_dead(workers[0])
        parser.timeout = 30  # an honest deadline for the file that should parse
        doc = await parser.parse(good)  # in thread mode: after the abandoned parse ends
        assert strip_pages(doc.pages) == ONE_PAGE


async def test_flood_of_timeouts_does_not_wedge_the_parser() -> None:
    slow = dense_pdf(30)
    before = {p.pid for p in multiprocessing.active_children()}
    async with PdfParser("process", max_workers=2, timeout=0.02, max_pages=None) as parser:
        results = await asyncio.gather(
            *(parser.parse(slow) for _ in range(8)), return_exceptions=True
        )
        assert all(isinstance(r, InvoiceFailure) and r.code == "parse_timeout" for r in results)
        parser.timeout = 30
        docs = await asyncio.gather(*(parser.parse(make_pdf(ONE_PAGE)) for _ in range(4)))
        assert all(strip_pages(d.pages) == ONE_PAGE for d in docs)
        # Retired pools do not pile up: their workers are killed, only the current pool's
        # (at most 2) are left.
        deadline = time.monotonic() + 5
        while len(pool_children(before)) > 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(pool_children(before)) <= 2


async def test_killed_worker_is_parse_crashed_and_the_next_parse_succeeds() -> None:
    before = {p.pid for p in multiprocessing.active_children()}
    async with PdfParser("process", max_workers=1, timeout=30, max_pages=None) as parser:
        await parser.start()
        (worker,) = pool_children(before)
        task = asyncio.create_task(parser.parse(dense_pdf(30)))
        await asyncio.sleep(0)  # the task submits its parse, then waits for the result
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(InvoiceFailure) as info:
            await task
        assert info.value.code == "parse_crashed"
        assert info.value.retryable
        doc = await parser.parse(make_pdf(THREE_PAGES))
        assert strip_pages(doc.pages) == THREE_PAGES


async def test_workers_run_at_lower_priority_than_the_event_loop() -> None:
    if os.getpriority(os.PRIO_PROCESS, 0) == 19:
        pytest.skip("this process already has the lowest priority")
    before = {p.pid for p in multiprocessing.active_children()}
    async with PdfParser("process", max_workers=2, timeout=30, max_pages=None) as parser:
        await asyncio.gather(*(parser.parse(make_pdf(ONE_PAGE)) for _ in range(4)))
        workers = pool_children(before)
        assert workers
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        for worker in workers:
            assert os.getpriority(os.PRIO_PROCESS, worker.pid) == lowered(ours) > ours


async def test_workers_that_cannot_start_fail_each_parse_with_the_reason(monkeypatch) -> None:
    # Workers that take 2 s to answer their start-up ping, against a 0.05 s start timeout.
    # (A bare 1e-9 s timeout was not enough: with the forkserver warm, the pings could be
    # answered before the wait began, and the start then succeeded.)
    monkeypatch.setattr("tasks.pdf.pool._ping", functools.partial(time.sleep, 2.0))
    monkeypatch.setattr("tasks.pdf.pool._START_TIMEOUT", 0.05)
    async with PdfParser("process", max_workers=1, timeout=30) as parser:
        for _ in range(2):  # the start is tried once; each parse reports its failure
            with pytest.raises(InvoiceFailure) as info:
                await parser.parse(make_pdf(ONE_PAGE))
            assert info.value.code == "parser_unavailable" and info.value.retryable
            assert "did not start within" in info.value.message
    parser = PdfParser("process", max_workers=1)
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            await parser.start()
    finally:
        parser.close()


async def test_close_is_idempotent_and_refuses_new_work() -> None:
    parser = PdfParser("process", max_workers=1)
    assert (await parser.parse(make_pdf(ONE_PAGE))).page_count == 1
    parser.close()
    parser.close()
    with pytest.raises(RuntimeError, match="closed"):
        await parser.parse(make_pdf(ONE_PAGE))


# --- word positions ---------------------------------------------------------------------------


def test_parsed_pdf_carries_word_boxes_cheaply() -> None:
    doc = parse_pdf_bytes(make_pdf(["Invoice INV-001\nTotal: 42.00 EUR", "page two"]))
    assert doc.has_words and len(doc.words) == doc.page_count == 2
    words = doc.page_words(0)
    assert [w.text for w in words] == ["Invoice", "INV-001", "Total:", "42.00", "EUR"]
    first, second = words[0], words[1]
    assert isinstance(first, Word) and first.x0 < first.x1 <= second.x0 and first.y0 < first.y1
    assert (first.block, first.line) == (second.block, second.line)  # one run of text
    assert doc.page_words(5) == [] and ParsedDocument(["text only"]).page_words(0) == []
    # equality and repr are by the text; words add little to what crosses a process boundary
    assert doc == ParsedDocument(doc.pages) and "words" not in repr(doc)
    copy = pickle.loads(pickle.dumps(doc))
    assert copy.page_words(0) == words
    dense = parse_pdf_bytes(dense_pdf(3))
    n_words = sum(len(dense.page_words(n)) for n in range(dense.page_count))
    extra = len(pickle.dumps(dense)) - len(pickle.dumps(ParsedDocument(dense.pages)))
    assert extra < 14 * n_words + sum(
        len(page) for page in dense.pages
    )  # 12-byte boxes + the words


async def test_words_survive_the_process_pool() -> None:
    data = make_pdf(ONE_PAGE)
    async with PdfParser("process", max_workers=1, timeout=30) as parser:
        doc = await parser.parse(data)
    assert doc.page_words(0) == parse_pdf_bytes(data).page_words(0) != []


def test_sorted_text_is_pymupdfs_reading_order_text_on_every_layout():
    import glob

    from tasks.pdf.parse import sorted_text
    from testing.samples import LAYOUTS, make_invoice

    pdfs = [make_invoice(seed, pages=1 + seed % 3)[0] for seed in range(2 * len(LAYOUTS))]
    pdfs += [
        open(p, "rb").read() for p in sorted(glob.glob("../shared/eval/invoice2data/compare/*.pdf"))
    ]
    pages = 0
    for data in pdfs:
        with pymupdf.open(stream=data, filetype="pdf") as doc:
            for page in doc:
                words = page.get_textpage(flags=pymupdf.TEXTFLAGS_WORDS).extractWORDS()
                assert sorted_text(words) == page.get_text("text", sort=True)
                pages += 1
    assert pages >= 2 * len(LAYOUTS)


def test_parsing_needs_neither_the_invoice_models_nor_the_extractors(tmp_path):
    """What the parser's forkserver preloads (tasks.pdf.parse, tasks.pdf.embedded_xml) is all a parse
    imports, also of a PDF with an e-invoice: importing the extractors there doubled the
    forkserver's start, which every run's first parse waits for."""
    from testing.einvoice_xml import attach_einvoice, build_cii_xml
    from testing.samples import make_invoice

    pdf, truth = make_invoice(5)
    path = tmp_path / "factur-x.pdf"
    path.write_bytes(attach_einvoice(pdf, build_cii_xml(truth)))
    code = (
        "import sys, tasks.pdf.parse, tasks.pdf.embedded_xml\n"
        f"doc = tasks.pdf.parse.parse_pdf_bytes(open({str(path)!r}, 'rb').read())\n"
        "assert doc.einvoice is not None\n"
        "print(sorted(m for m in sys.modules if m.startswith('tasks.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    ).stdout
    assert {"tasks.extract.einvoice", "tasks.extract.rules", "tasks.invoice"}.isdisjoint(
        eval(out)
    ), out


def test_an_embedded_e_invoice_travels_with_the_parsed_document():
    from testing.einvoice_xml import attach_einvoice, build_cii_xml
    from testing.samples import make_invoice

    pdf, truth = make_invoice(5)
    parsed = parse_pdf_bytes(attach_einvoice(pdf, build_cii_xml(truth)))
    assert parsed.einvoice is not None and parsed.einvoice.name == "factur-x.xml"
    assert parse_pdf_bytes(pdf).einvoice is None
    # a scan (no text layer) that carries its XML is still readable
    doc = pymupdf.open()
    doc.new_page()
    scanned = attach_einvoice(doc.tobytes(), build_cii_xml(truth))
    assert parse_pdf_bytes(scanned).einvoice is not None
