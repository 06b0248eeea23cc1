"""PDF text extraction with PyMuPDF.

`parse_pdf_bytes` is the plain, synchronous parser: bytes in, `ParsedDocument` out, or an
`InvoiceFailure` with a stable code for every way a file can be unreadable. The flow runs it
through `tasks.pdf.pool.PdfParser`: in worker processes, off the event loop, under a deadline.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from tasks.errors import InvoiceFailure

if TYPE_CHECKING:
    import pymupdf

    from tasks.pdf.embedded_xml import EmbeddedXml


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
        Word(
            n[6 * i] / q,
            n[6 * i + 1] / q,
            n[6 * i + 2] / q,
            n[6 * i + 3] / q,
            text,
            n[6 * i + 4],
            n[6 * i + 5],
        )
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
    # Imported here, not at module level: processes that import this module only for
    # ParsedDocument (the flow's, with a process pool) never load PyMuPDF, a large import.
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
            # Iterating the document (its __getitem__) ends at the pages MuPDF finds as it
            # loads them; doc.pages() would trust a declared page count the file cannot hold.
            for page in doc:  # type: ignore[attr-defined]  # iterable by __getitem__
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
        gap = round((x0 - x1) / width * len(word)) if width else 0
        text += " " * max(gap, 0 if (x1 == left or x0 <= x1) else 1) + word
        x1 = w[2]
    return text


def sorted_text(words: list[tuple], tolerance: float = 3) -> str:
    """`page.get_text("text", sort=True)` computed from the page's words: the same text
    (reading order, words on one visual line joined, gaps kept as spaces), without the
    per-word `pymupdf.Rect` objects that make PyMuPDF's pure-Python version slow on dense
    pages. tests/test_parse.py checks it against PyMuPDF's own on every kind of page we make."""
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
    lines.sort(key=lambda entry: entry[0][3])
    text, y1 = lines[0][1], lines[0][0][3]
    for lrect, ltext in lines[1:]:
        height = max(0.0, lrect[3] - lrect[1])
        distance = min(round((lrect[1] - y1) / height), 5) if height else 0
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
