"""Structured e-invoices (Factur-X / ZUGFeRD, XRechnung, UBL) embedded in PDF invoices.

A Factur-X or ZUGFeRD PDF carries the invoice twice: once printed, once as XML in an embedded
file (UN/CEFACT CII `CrossIndustryInvoice`; some senders embed UBL 2.1 `Invoice`/`CreditNote`).
The XML is what the seller's system actually issued, so the pipeline prefers it over anything
read from the page and keeps the text extraction only as a cross-check (`cross_check`).

Finding the XML in a PDF and parsing it as the hostile input it is are `tasks.pdf.embedded_xml`'s
(the parser's workers need them and nothing else of this module); this module reads the
invoice out of the parsed XML and cross-checks it against the page. Writing such XML is for
tests and samples only: `testing.einvoice_xml`.

Sign convention: credit notes come back with negative amounts, quantities, subtotal, tax and
total (unit prices stay positive), so lines still sum to the subtotal and subtotal + tax = total,
exactly as for an invoice; `testing.einvoice_xml.build_cii_xml` applies the inverse.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import date
from decimal import Decimal, InvalidOperation

from lxml import etree

from tasks.errors import InvoiceFailure
from tasks.extract.base import Extraction, Extractor
from tasks.extract.rules import OfflineExtractor
from tasks.invoice import Invoice, LineItem
from tasks.pdf.embedded_xml import (
    CII_NS,
    DEFAULT_MAX_BYTES,
    KNOWN_ROOTS,
    UBL_CREDIT_NOTE_ROOT,
    parse_xml,
)
from tasks.pdf.parse import ParsedDocument
from tasks.pdf.pool import PdfParser

__all__ = [
    "cross_check",
    "parse_einvoice",
]

RSM_NS = CII_NS
RAM_NS = "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100"
UDT_NS = "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100"
_CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
_CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"

# Prefixes used only in this module's own paths; documents may use any prefix (or none).
_NS = {"rsm": RSM_NS, "ram": RAM_NS, "udt": UDT_NS, "cac": _CAC, "cbc": _CBC}

# UNTDID 1001 document types that are credit notes (EN 16931 code list); 381 is the usual one.
_CREDIT_NOTE_TYPES = frozenset(
    {"81", "83", "261", "262", "296", "308", "381", "396", "420", "458", "532"}
)

# xsd:decimal: no exponent, no NaN/Infinity (Decimal() would accept all of those).
_DECIMAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_ISO_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:Z|[+-]\d{2}:\d{2})?")
_CII_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")

_CROSS_CHECK_TOLERANCE = Decimal("0.01")


# --------------------------------------------------------------------------------------------
# Reading values
# --------------------------------------------------------------------------------------------


def _text(element: etree._Element | None) -> str | None:
    if element is None:
        return None
    text = "".join(element.itertext()).strip()
    return text or None


def _first_text(parent: etree._Element | None, *paths: str) -> str | None:
    """The first non-empty value among `paths`: standards allow several places for one field."""
    if parent is None:
        return None
    for path in paths:
        for element in parent.iterfind(path, _NS):
            text = _text(element)
            if text is not None:
                return text
    return None


def _number(parent: etree._Element | None, field: str, *paths: str) -> Decimal | None:
    return _decimal(_first_text(parent, *paths), field)


def _decimal(text: str | None, field: str) -> Decimal | None:
    if text is None:
        return None
    if not _DECIMAL.fullmatch(text):
        raise InvoiceFailure("einvoice_invalid", f"{field}: not a decimal number: {text[:40]!r}")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid literals
        raise InvoiceFailure(
            "einvoice_invalid", f"{field}: not a decimal number: {text[:40]!r}"
        ) from None


def _date(match: re.Match[str] | None, text: str, field: str) -> date:
    if match is None:
        raise InvoiceFailure("einvoice_invalid", f"{field}: not a date: {text[:40]!r}")
    try:
        return date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        raise InvoiceFailure("einvoice_invalid", f"{field}: not a date: {text[:40]!r}") from None


def _cii_date(parent: etree._Element | None, path: str, field: str) -> date | None:
    """A CII `udt:DateTimeString`; EN 16931 allows only format 102 (YYYYMMDD) for these dates."""
    element = _find(parent, f"{path}/udt:DateTimeString")
    text = _text(element)
    if element is None or text is None:  # no element gives no text
        return None
    fmt = element.get("format")
    if fmt is not None and fmt.strip() != "102":
        raise InvoiceFailure("einvoice_invalid", f"{field}: unsupported date format {fmt[:10]!r}")
    return _date(_CII_DATE.fullmatch(text), text, field)


def _iso_date(text: str | None, field: str) -> date | None:
    if text is None:
        return None
    return _date(_ISO_DATE.fullmatch(text), text, field)


def _in_currency(parent: etree._Element | None, path: str, currency: str | None) -> str | None:
    """The amount in the invoice currency among amounts that may also be in the tax currency.

    When VAT is accounted in another currency, CII and UBL carry the tax total twice; taking
    the wrong one would silently mix currencies, so anything ambiguous yields None instead.
    """
    candidates = [e for e in _iterfind(parent, path) if _text(e) is not None]
    if currency is not None:
        for element in candidates:
            if (element.get("currencyID") or "").strip().upper() == currency.upper():
                return _text(element)
    unmarked = [e for e in candidates if not (e.get("currencyID") or "").strip()]
    if unmarked:
        return _text(unmarked[0])
    if currency is None and len(candidates) == 1:
        return _text(candidates[0])
    return None


def _unit_price(price: Decimal | None, basis: Decimal | None) -> Decimal | None:
    """Price of one unit: both standards allow a price per N units (base quantity)."""
    if price is None or basis is None or basis in (0, 1):
        return price
    return price / basis


def _find(parent: etree._Element | None, path: str) -> etree._Element | None:
    return None if parent is None else parent.find(path, _NS)


def _iterfind(parent: etree._Element | None, path: str) -> Iterator[etree._Element]:
    return iter(()) if parent is None else parent.iterfind(path, _NS)


def _negate(value: Decimal | None) -> Decimal | None:
    return None if value is None else -value


def _keep(value: Decimal | None) -> Decimal | None:
    return value


def _compact(value: str | None) -> str | None:
    """IBAN / BIC as stored and compared: printed in groups, but the spaces are not the number."""
    return None if value is None else re.sub(r"\s+", "", value).upper() or None


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def parse_einvoice(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Invoice:
    """The invoice an embedded CII or UBL document states, with credit notes made negative.

    Raises `InvoiceFailure`: `einvoice_unsafe` for anything that could make the parser expand
    or fetch (and for over-size input), `einvoice_invalid` for malformed XML, a document that
    is not an invoice, or values that are not numbers / dates. Missing fields are None: the
    invoice checks downstream judge completeness, as for any other extraction.
    """
    root = parse_xml(bytes(data), max_bytes)
    kind = KNOWN_ROOTS.get(root.tag)
    if kind == "cii":
        return _parse_cii(root)
    if kind == "ubl":
        return _parse_ubl(root)
    raise InvoiceFailure("einvoice_invalid", f"not a CII or UBL invoice: root is {root.tag[:200]}")


def _parse_cii(root: etree._Element) -> Invoice:
    document = root.find("rsm:ExchangedDocument", _NS)
    transaction = root.find("rsm:SupplyChainTradeTransaction", _NS)
    if document is None or transaction is None:
        raise InvoiceFailure(
            "einvoice_invalid",
            "CII document without ExchangedDocument or SupplyChainTradeTransaction",
        )
    credit = _first_text(document, "ram:TypeCode") in _CREDIT_NOTE_TYPES
    sign = _negate if credit else _keep

    agreement = transaction.find("ram:ApplicableHeaderTradeAgreement", _NS)
    seller = _find(agreement, "ram:SellerTradeParty")
    settlement = transaction.find("ram:ApplicableHeaderTradeSettlement", _NS)
    summation = _find(settlement, "ram:SpecifiedTradeSettlementHeaderMonetarySummation")
    means = "ram:SpecifiedTradeSettlementPaymentMeans"
    currency = _first_text(settlement, "ram:InvoiceCurrencyCode")

    registrations = [
        ((element.get("schemeID") or "").strip().upper(), _text(element))
        for element in _iterfind(seller, "ram:SpecifiedTaxRegistration/ram:ID")
    ]
    # The VAT id first (what the page prints and the text path finds); the tax number else.
    vendor_tax_id = next((v for s, v in registrations if s == "VA" and v), None) or next(
        (v for s, v in registrations if s == "FC" and v), None
    )

    lines = []
    for item in transaction.iterfind("ram:IncludedSupplyChainTradeLineItem", _NS):
        price = item.find("ram:SpecifiedLineTradeAgreement/ram:NetPriceProductTradePrice", _NS)
        product = item.find("ram:SpecifiedTradeProduct", _NS)
        delivery = item.find("ram:SpecifiedLineTradeDelivery", _NS)
        line_sum = _find(
            item.find("ram:SpecifiedLineTradeSettlement", _NS),
            "ram:SpecifiedTradeSettlementLineMonetarySummation",
        )
        lines.append(
            LineItem(
                description=_first_text(product, "ram:Name", "ram:Description") or "",
                quantity=sign(_number(delivery, "line quantity", "ram:BilledQuantity")),
                unit_price=_unit_price(
                    _number(price, "line net price", "ram:ChargeAmount"),
                    _number(price, "line price base quantity", "ram:BasisQuantity"),
                ),
                amount=sign(_number(line_sum, "line amount", "ram:LineTotalAmount")),
            )
        )

    return Invoice(
        vendor_name=_first_text(seller, "ram:Name"),
        vendor_tax_id=vendor_tax_id,
        iban=_compact(
            _first_text(settlement, f"{means}/ram:PayeePartyCreditorFinancialAccount/ram:IBANID")
        ),
        bic=_compact(
            _first_text(
                settlement, f"{means}/ram:PayeeSpecifiedCreditorFinancialInstitution/ram:BICID"
            )
        ),
        customer_name=_first_text(agreement, "ram:BuyerTradeParty/ram:Name"),
        invoice_number=_first_text(document, "ram:ID"),
        issue_date=_cii_date(document, "ram:IssueDateTime", "issue date"),
        due_date=_cii_date(
            settlement, "ram:SpecifiedTradePaymentTerms/ram:DueDateDateTime", "due date"
        ),
        currency=currency,
        subtotal=sign(_number(summation, "subtotal", "ram:TaxBasisTotalAmount")),
        tax=sign(_decimal(_in_currency(summation, "ram:TaxTotalAmount", currency), "tax total")),
        total=sign(_number(summation, "grand total", "ram:GrandTotalAmount")),
        line_items=lines,
    )


def _parse_ubl(root: etree._Element) -> Invoice:
    is_credit_note = root.tag == UBL_CREDIT_NOTE_ROOT
    type_code = _first_text(root, "cbc:CreditNoteTypeCode", "cbc:InvoiceTypeCode")
    # A CreditNote states positive amounts that mean money going back to the buyer.
    credit = is_credit_note or type_code in _CREDIT_NOTE_TYPES
    sign = _negate if credit else _keep
    currency = _first_text(root, "cbc:DocumentCurrencyCode")

    supplier = root.find("cac:AccountingSupplierParty/cac:Party", _NS)
    customer = root.find("cac:AccountingCustomerParty/cac:Party", _NS)
    # The legal name (EN 16931 BT-27, what CII's Name holds) before the trading name.
    party_name = ("cac:PartyLegalEntity/cbc:RegistrationName", "cac:PartyName/cbc:Name")
    account = root.find("cac:PaymentMeans/cac:PayeeFinancialAccount", _NS)
    totals = root.find("cac:LegalMonetaryTotal", _NS)

    schemes = list(_iterfind(supplier, "cac:PartyTaxScheme"))
    # The VAT registration first (what the page prints and the text path finds); any other else.
    schemes.sort(key=lambda s: (_first_text(s, "cac:TaxScheme/cbc:ID") or "").upper() != "VAT")
    vendor_tax_id = next((v for v in (_first_text(s, "cbc:CompanyID") for s in schemes) if v), None)

    line_tag, quantity_tag = (
        ("cac:CreditNoteLine", "cbc:CreditedQuantity")
        if is_credit_note
        else ("cac:InvoiceLine", "cbc:InvoicedQuantity")
    )
    lines = [
        LineItem(
            description=_first_text(line, "cac:Item/cbc:Name", "cac:Item/cbc:Description") or "",
            quantity=sign(_number(line, "line quantity", quantity_tag)),
            unit_price=_unit_price(
                _number(line, "line net price", "cac:Price/cbc:PriceAmount"),
                _number(line, "line price base quantity", "cac:Price/cbc:BaseQuantity"),
            ),
            amount=sign(_number(line, "line amount", "cbc:LineExtensionAmount")),
        )
        for line in root.iterfind(line_tag, _NS)
    ]

    return Invoice(
        vendor_name=_first_text(supplier, *party_name),
        vendor_tax_id=vendor_tax_id,
        iban=_compact(_first_text(account, "cbc:ID")),
        bic=_compact(
            _first_text(
                account,
                "cac:FinancialInstitutionBranch/cbc:ID",
                "cac:FinancialInstitutionBranch/cac:FinancialInstitution/cbc:ID",  # UBL 2.0 style
            )
        ),
        customer_name=_first_text(customer, *party_name),
        invoice_number=_first_text(root, "cbc:ID"),
        issue_date=_iso_date(_first_text(root, "cbc:IssueDate"), "issue date"),
        due_date=_iso_date(
            _first_text(root, "cbc:DueDate", "cac:PaymentMeans/cbc:PaymentDueDate"), "due date"
        ),
        currency=currency,
        subtotal=sign(_number(totals, "subtotal", "cbc:TaxExclusiveAmount")),
        tax=sign(_decimal(_in_currency(root, "cac:TaxTotal/cbc:TaxAmount", currency), "tax total")),
        total=sign(_number(totals, "total", "cbc:TaxInclusiveAmount", "cbc:PayableAmount")),
        line_items=lines,
    )


# --------------------------------------------------------------------------------------------
# Cross-check against the text extraction
# --------------------------------------------------------------------------------------------


def cross_check(embedded: Invoice, text: Invoice) -> list[str]:
    """Reasons (`einvoice_mismatch: ...`) where the printed invoice contradicts its XML.

    The XML is what gets paid from, so a page that says something else is either a broken
    generator or a tampered file, and a human should look. Only fields the text path found
    count: a value it missed is not evidence of anything. A value the XML lacks but the page
    shows does count (EN 16931 makes all of these mandatory).
    """
    return [f"einvoice_mismatch: {reason}" for reason in _mismatches(embedded, text)]


def _mismatches(xml: Invoice, text: Invoice) -> Iterator[str]:
    def same_id(printed: str, stated: str | None) -> bool:
        """Equal up to case and spacing, which OCR and layouts change freely."""
        if stated is None:
            return False
        return re.sub(r"\s+", "", printed).casefold() == re.sub(r"\s+", "", stated).casefold()

    def says(field: str, stated: object, printed: object) -> str:
        return f"{field}: XML says {stated!r}, the page says {printed!r}"

    if text.invoice_number is not None and not same_id(text.invoice_number, xml.invoice_number):
        yield says("invoice_number", xml.invoice_number, text.invoice_number)
    for field in ("subtotal", "tax", "total"):
        printed: Decimal | None = getattr(text, field)
        stated: Decimal | None = getattr(xml, field)
        # Absolute values: printed credit notes show the amounts with either sign.
        if printed is not None and (
            stated is None or abs(abs(printed) - abs(stated)) > _CROSS_CHECK_TOLERANCE
        ):
            yield f"{field}: XML says {stated}, the page says {printed}"
    if text.currency is not None and not same_id(text.currency, xml.currency):
        yield says("currency", xml.currency, text.currency)
    if text.issue_date is not None and text.issue_date != xml.issue_date:
        yield f"issue_date: XML says {xml.issue_date}, the page says {text.issue_date}"
    # The IBAN too: it is where the money goes, so it is what a tampered PDF would change.
    if text.iban is not None and _compact(text.iban) != _compact(xml.iban):
        yield says("iban", xml.iban, text.iban)


# --------------------------------------------------------------------------------------------
# The extractor: the XML when there is one
# --------------------------------------------------------------------------------------------


class EmbeddedFirstExtractor:
    """Reads the invoice's own XML when the PDF carries one, else asks `fallback`.

    The XML is exact and costs no LLM call. The page is still read by the offline rules as a
    cross-check: where the printed invoice contradicts its XML, the result goes to review.
    An embedded XML that cannot be parsed is noted and the fallback extracts from the text.

    Given a `parser`, the CPU-bound steps (parsing the XML, and the offline read of the page
    unless `printed` is given) run in its pool (`PdfParser.run`, stage "extract"); a failure
    of the pool itself (`extract_timeout`, `extract_crashed`, `parser_unavailable`) fails the
    invoice, retryably, instead of passing for a bad XML.
    """

    def __init__(
        self,
        fallback: Extractor,
        printed: Extractor | None = None,
        *,
        parser: PdfParser | None = None,
    ) -> None:
        self.fallback = fallback
        self.printed = printed or OfflineExtractor(parser)
        self.parser = parser
        self.name = fallback.name

    async def extract(self, document: ParsedDocument) -> Extraction:
        embedded = document.einvoice
        if embedded is None:
            return await self.fallback.extract(document)
        try:
            if self.parser is None:
                invoice = parse_einvoice(embedded.data)
            else:
                invoice = await self.parser.run(parse_einvoice, embedded.data, stage="extract")
        except InvoiceFailure as exc:
            if not exc.code.startswith("einvoice_"):  # the pool's, not the XML's
                raise
            extraction = await self.fallback.extract(document)
            extraction.notes.append(
                f"embedded {embedded.name} not used ({exc.code}: {exc.message})"
            )
            return extraction
        printed = await self.printed.extract(document)
        return Extraction(
            invoice=invoice,
            source="embedded_xml",
            notes=[f"read from the embedded {embedded.name}"],
            problems=cross_check(invoice, printed.invoice),
        )
