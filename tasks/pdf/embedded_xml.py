"""The e-invoice XML embedded in a PDF: found among its attachments and parsed as hostile input.

Parsing a PDF (`tasks.pdf.parse`, in the parser's worker processes) looks for it in every file;
reading an `Invoice` out of it (`tasks.extract.einvoice`) happens later, at extraction. Kept
apart so the workers' forkserver need not import the invoice models and the offline extractor,
which would slow its start, and every run's first parse waits for that start.

The XML comes from whoever sent the PDF, so it is parsed as hostile input: size-capped, and any
document type declaration is refused outright (e-invoices never carry one). That rules out
entity expansion (billion laughs), external entities and DTD fetches by construction, and the
parser is configured so that none of them could happen even if the pre-scan missed one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lxml import etree

from tasks.errors import InvoiceFailure

if TYPE_CHECKING:
    import pymupdf

# Real e-invoices are tens of KiB; even thousands of lines stay well under a few MiB.
DEFAULT_MAX_BYTES = 5 * 1024 * 1024

# Names the standards prescribe for the embedded file, in order of preference (compared
# case-insensitively, so ZUGFeRD's "ZUGFeRD-invoice.xml" matches too). Order-X ("order-x.xml")
# is a purchase order, not an invoice, and is deliberately absent.
STANDARD_NAMES = ("factur-x.xml", "zugferd-invoice.xml", "xrechnung.xml")


@dataclass(frozen=True)
class EmbeddedXml:
    """An e-invoice found in a PDF: the attachment's name (for the record) and its bytes."""

    name: str
    data: bytes


CII_NS = "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
UBL_INVOICE_NS = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
UBL_CREDIT_NOTE_NS = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"

CII_ROOT = f"{{{CII_NS}}}CrossIndustryInvoice"
UBL_INVOICE_ROOT = f"{{{UBL_INVOICE_NS}}}Invoice"
UBL_CREDIT_NOTE_ROOT = f"{{{UBL_CREDIT_NOTE_NS}}}CreditNote"
KNOWN_ROOTS = {CII_ROOT: "cii", UBL_INVOICE_ROOT: "ubl", UBL_CREDIT_NOTE_ROOT: "ubl"}

# Markup declarations only exist inside a DOCTYPE; seeing any of them is reason enough to refuse.
_DECLARATION = re.compile(rb"<!\s*(?:DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)", re.IGNORECASE)

# Each candidate attachment is inflated and parsed; a PDF with thousands of small bombs named
# *.xml should cost a bounded amount of work, not thousands of 5 MB parses.
_MAX_CANDIDATES = 16


# --------------------------------------------------------------------------------------------
# Safe XML parsing
# --------------------------------------------------------------------------------------------


def _new_parser() -> etree.XMLParser:
    """A parser that can neither expand entities nor touch the file system or network.

    One per call: lxml serialises concurrent use of a shared parser instance.
    """
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
    )


def parse_xml(data: bytes, max_bytes: int) -> etree._Element:
    """The root element of `data`, refusing anything an e-invoice never needs (a DTD).

    Three layers, so no single oversight can let an entity through: a byte scan before lxml
    sees the document (also with NULs dropped, which catches UTF-16/32 encodings), a parser that
    resolves nothing and fetches nothing, and a check of what the parser recorded.
    """
    if len(data) > max_bytes:
        raise InvoiceFailure(
            "einvoice_unsafe", f"the XML is {len(data)} bytes, over the {max_bytes}-byte limit"
        )
    for view in (data, data.replace(b"\x00", b"")):
        if _DECLARATION.search(view):
            raise InvoiceFailure(
                "einvoice_unsafe", "the XML carries a DOCTYPE or markup declarations; refused"
            )
    try:
        root = etree.fromstring(data, _new_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise InvoiceFailure("einvoice_invalid", f"the XML is not well-formed: {exc}") from None
    docinfo = root.getroottree().docinfo
    if (
        docinfo.doctype
        or docinfo.internalDTD is not None
        or docinfo.externalDTD is not None
        or docinfo.system_url
        or docinfo.public_id
        or next(root.iter(etree.Entity), None) is not None
    ):
        raise InvoiceFailure("einvoice_unsafe", "the XML carries a DTD or entities; refused")
    return root


# --------------------------------------------------------------------------------------------
# Finding the XML in a PDF
# --------------------------------------------------------------------------------------------


def find_embedded_einvoice(
    doc: pymupdf.Document, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> EmbeddedXml | None:
    """The PDF's embedded e-invoice, or None when there is none worth parsing.

    Standard names win over other `.xml` attachments, which are taken only if their root is a
    CII or UBL invoice. Attachments are sender-controlled, so anything odd (over-size, a
    compression bomb behind a false declared size, unsafe or malformed XML, an unreadable
    stream) is skipped rather than raised: the text extraction still handles the invoice.
    """
    try:
        names = doc.embfile_names() if doc.embfile_count() else []
    except Exception:  # not a PDF, damaged name tree: no attachments we can trust
        return None
    candidates: list[tuple[int, int, str]] = []
    for index, name in enumerate(names):
        try:
            info = doc.embfile_info(index)
        except Exception:
            continue
        rank = _attachment_rank(name, info.get("filename"), info.get("ufilename"))
        if rank is not None:
            candidates.append((rank, index, name))
    for _rank, index, name in sorted(candidates)[:_MAX_CANDIDATES]:
        try:
            data = _read_attachment(doc, index, max_bytes)
            if data is None or parse_xml(data, max_bytes).tag not in KNOWN_ROOTS:
                continue
        except Exception:  # InvoiceFailure (unsafe/malformed) or a MuPDF error: not this one
            continue
        return EmbeddedXml(name=name, data=data)
    return None


def _attachment_rank(*names: object) -> int | None:
    """0.. for the standard names in preference order, after them any `.xml`, else None."""
    basenames = {
        re.split(r"[\\/]", name.strip())[-1].lower() for name in names if isinstance(name, str)
    }
    for rank, standard in enumerate(STANDARD_NAMES):
        if standard in basenames:
            return rank
    if any(name.endswith(".xml") for name in basenames):
        return len(STANDARD_NAMES)
    return None


def _read_attachment(doc: pymupdf.Document, index: int, max_bytes: int) -> bytes | None:
    """The attachment's bytes if its decoded size is within `max_bytes`.

    The size a PDF declares for an attachment is just another sender-controlled number, and
    `embfile_get` inflates the whole stream, so the decoded size is measured first by reading
    (and discarding) at most `max_bytes + 1` bytes: a small flate bomb stays small.
    """
    import pymupdf

    mupdf = pymupdf.mupdf
    filespec = mupdf.pdf_array_get(embedded_files(doc), 2 * index + 1)
    stream = mupdf.pdf_dict_gets(mupdf.pdf_dict_gets(filespec, "EF"), "F")
    if not mupdf.pdf_is_stream(stream):
        return None
    if mupdf.fz_skip(mupdf.pdf_open_stream(stream), max_bytes + 1) > max_bytes:
        return None
    data = doc.embfile_get(index)
    return data if len(data) <= max_bytes else None


def embedded_files(doc: pymupdf.Document) -> pymupdf.mupdf.PdfObj:
    """The catalog's flat /EmbeddedFiles name array (name, filespec, ...), as PyMuPDF reads it.

    PyMuPDF has no call for a bounded read or for /AF, so those go through its MuPDF bindings;
    the indices match `embfile_names()` because both walk this same array.
    """
    import pymupdf

    mupdf = pymupdf.mupdf
    names = mupdf.pdf_trailer(mupdf.pdf_document_from_fz_document(doc.this))
    for key in ("Root", "Names", "EmbeddedFiles", "Names"):
        names = mupdf.pdf_dict_gets(names, key)
    return names
