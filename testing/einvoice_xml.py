"""Factur-X e-invoices for tests, the sample generator and benches: CII XML stating an
`Invoice` (`build_cii_xml`, the inverse of `tasks.extract.einvoice.parse_einvoice`) and a PDF
with such XML embedded (`attach_einvoice`). Production reads e-invoices; it never writes them.

Sign convention as in `tasks.extract.einvoice`: an invoice with negative totals is a credit
note, written with TypeCode 381 and its amounts and quantities made positive, as CII states them.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from lxml import etree

from tasks.checks import vat_id_is_valid
from tasks.extract.einvoice import RAM_NS, RSM_NS, UDT_NS
from tasks.invoice import Invoice
from tasks.pdf.embedded_xml import embedded_files

__all__ = ["attach_einvoice", "build_cii_xml"]

_QDT = "urn:un:unece:uncefact:data:standard:QualifiedDataType:100"

_CENT = Decimal("0.01")


def attach_einvoice(pdf: bytes, xml: bytes, name: str = "factur-x.xml") -> bytes:
    """`pdf` with `xml` embedded the way Factur-X readers look for it.

    Besides the EmbeddedFiles entry this sets the file's MIME subtype and the catalog's /AF
    (associated files, relationship Data), which stricter readers use to find the invoice.
    It does not make the file PDF/A-3 (no XMP metadata), so validators will not call it a
    conformant Factur-X file; it is for samples and tests. Raises ValueError if `name` is taken.
    """
    import pymupdf

    mupdf = pymupdf.mupdf
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        stream_xref = doc.embfile_add(
            name, xml, filename=name, ufilename=name, desc="Factur-X invoice"
        )
        doc.xref_set_key(stream_xref, "Subtype", "/text#2Fxml")

        pdf_doc = mupdf.pdf_document_from_fz_document(doc.this)
        names = embedded_files(doc)
        position = 2 * doc.embfile_names().index(name) + 1
        filespec = mupdf.pdf_array_get(names, position)
        mupdf.pdf_dict_puts(filespec, "AFRelationship", mupdf.pdf_new_name("Data"))
        if not mupdf.pdf_is_indirect(filespec):  # /AF must share it with the name tree
            filespec = mupdf.pdf_add_object(pdf_doc, filespec)
            mupdf.pdf_array_put(names, position, filespec)
        catalog = mupdf.pdf_dict_gets(mupdf.pdf_trailer(pdf_doc), "Root")
        associated = mupdf.pdf_dict_gets(catalog, "AF")
        if not mupdf.pdf_is_array(associated):
            associated = mupdf.pdf_new_array(pdf_doc, 1)
            mupdf.pdf_dict_puts(catalog, "AF", associated)
        mupdf.pdf_array_push(associated, filespec)
        return doc.tobytes(garbage=1, deflate=True)


# --------------------------------------------------------------------------------------------
# Writing CII
# --------------------------------------------------------------------------------------------


def _is_credit_note(invoice: Invoice) -> bool:
    """Negative totals mean money back to the buyer: a credit note (381), not an invoice."""
    for value in (invoice.total, invoice.subtotal):
        if value is not None:
            return value < 0
    return False


def _fmt(value: Decimal) -> str:
    """Plain notation (never 1E+2) and no "-0" from flipping the sign of a zero."""
    return format(abs(value) if value == 0 else value, "f")


def _add(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    """Append `ram:<tag>` (or `ns:<tag>` when `tag` is already `{ns}local`)."""
    child = etree.SubElement(parent, tag if tag.startswith("{") else f"{{{RAM_NS}}}{tag}", attrs)
    if text is not None:
        child.text = text
    return child


def _add_date(parent: etree._Element, tag: str, value: date) -> None:
    _add(_add(parent, tag), f"{{{UDT_NS}}}DateTimeString", value.strftime("%Y%m%d"), format="102")


def build_cii_xml(invoice: Invoice) -> bytes:
    """A Factur-X (EN 16931 profile) CII document stating `invoice`; inverse of `parse_einvoice`.

    Negative totals make a credit note (TypeCode 381) with the signs flipped, as CII states
    credit-note amounts positive. Fields the invoice lacks are left out even where EN 16931
    requires them, so the document is only schema-complete for a complete invoice. The VAT
    breakdown is a single category whose rate is derived from tax / subtotal: the `Invoice`
    model does not carry per-rate breakdowns.
    """
    credit = _is_credit_note(invoice)

    def amount(value: Decimal) -> str:
        return _fmt(-value if credit else value)

    zero_rated = invoice.tax is not None and invoice.tax == 0
    rate = None
    if zero_rated:
        rate = Decimal(0)
    elif invoice.tax is not None and invoice.subtotal:
        rate = (abs(invoice.tax) * 100 / abs(invoice.subtotal)).quantize(_CENT)

    def trade_tax(parent: etree._Element, calculated: Decimal | None, basis: Decimal | None):
        tax = _add(parent, "ApplicableTradeTax")
        if calculated is not None:
            _add(tax, "CalculatedAmount", amount(calculated))
        _add(tax, "TypeCode", "VAT")
        if basis is not None:
            _add(tax, "BasisAmount", amount(basis))
        _add(tax, "CategoryCode", "Z" if zero_rated else "S")
        if rate is not None:
            _add(tax, "RateApplicablePercent", _fmt(rate))

    root = etree.Element(
        f"{{{RSM_NS}}}CrossIndustryInvoice",
        nsmap={"rsm": RSM_NS, "ram": RAM_NS, "udt": UDT_NS, "qdt": _QDT},
    )
    context = _add(root, f"{{{RSM_NS}}}ExchangedDocumentContext")
    guideline = _add(context, "GuidelineSpecifiedDocumentContextParameter")
    _add(guideline, "ID", "urn:cen.eu:en16931:2017")  # the EN 16931 profile of Factur-X

    document = _add(root, f"{{{RSM_NS}}}ExchangedDocument")
    if invoice.invoice_number is not None:
        _add(document, "ID", invoice.invoice_number)
    _add(document, "TypeCode", "381" if credit else "380")
    if invoice.issue_date is not None:
        _add_date(document, "IssueDateTime", invoice.issue_date)

    transaction = _add(root, f"{{{RSM_NS}}}SupplyChainTradeTransaction")
    for number, line in enumerate(invoice.line_items, start=1):
        item = _add(transaction, "IncludedSupplyChainTradeLineItem")
        _add(_add(item, "AssociatedDocumentLineDocument"), "LineID", str(number))
        _add(_add(item, "SpecifiedTradeProduct"), "Name", line.description)
        agreement = _add(item, "SpecifiedLineTradeAgreement")
        if line.unit_price is not None:  # a price, not an amount: never sign-flipped
            price = _add(agreement, "NetPriceProductTradePrice")
            _add(price, "ChargeAmount", _fmt(line.unit_price))
        delivery = _add(item, "SpecifiedLineTradeDelivery")
        if line.quantity is not None:
            _add(delivery, "BilledQuantity", amount(line.quantity), unitCode="C62")  # C62: piece
        line_settlement = _add(item, "SpecifiedLineTradeSettlement")
        trade_tax(line_settlement, None, None)
        if line.amount is not None:
            line_sum = _add(line_settlement, "SpecifiedTradeSettlementLineMonetarySummation")
            _add(line_sum, "LineTotalAmount", amount(line.amount))

    header_agreement = _add(transaction, "ApplicableHeaderTradeAgreement")
    seller = _add(header_agreement, "SellerTradeParty")
    if invoice.vendor_name is not None:
        _add(seller, "Name", invoice.vendor_name)
    if invoice.vendor_tax_id is not None:
        # VA: a VAT id (country prefix); FC: a national tax number such as "12/345/67890".
        scheme = "VA" if vat_id_is_valid(invoice.vendor_tax_id) else "FC"
        registration = _add(seller, "SpecifiedTaxRegistration")
        _add(registration, "ID", invoice.vendor_tax_id, schemeID=scheme)
    buyer = _add(header_agreement, "BuyerTradeParty")
    if invoice.customer_name is not None:
        _add(buyer, "Name", invoice.customer_name)
    _add(transaction, "ApplicableHeaderTradeDelivery")

    settlement = _add(transaction, "ApplicableHeaderTradeSettlement")
    if invoice.currency is not None:
        _add(settlement, "InvoiceCurrencyCode", invoice.currency)
    if invoice.iban is not None or invoice.bic is not None:
        means = _add(settlement, "SpecifiedTradeSettlementPaymentMeans")
        _add(means, "TypeCode", "58" if invoice.iban is not None else "30")  # SEPA / transfer
        if invoice.iban is not None:
            _add(_add(means, "PayeePartyCreditorFinancialAccount"), "IBANID", invoice.iban)
        if invoice.bic is not None:
            institution = _add(means, "PayeeSpecifiedCreditorFinancialInstitution")
            _add(institution, "BICID", invoice.bic)
    trade_tax(settlement, invoice.tax, invoice.subtotal)
    if invoice.due_date is not None:
        terms = _add(settlement, "SpecifiedTradePaymentTerms")
        _add_date(terms, "DueDateDateTime", invoice.due_date)

    summation = _add(settlement, "SpecifiedTradeSettlementHeaderMonetarySummation")
    line_amounts = [line.amount for line in invoice.line_items if line.amount is not None]
    if invoice.line_items and len(line_amounts) == len(invoice.line_items):  # all have amounts
        _add(summation, "LineTotalAmount", amount(sum(line_amounts, Decimal(0))))
    elif invoice.subtotal is not None:
        _add(summation, "LineTotalAmount", amount(invoice.subtotal))
    if invoice.subtotal is not None:
        _add(summation, "TaxBasisTotalAmount", amount(invoice.subtotal))
    if invoice.tax is not None:
        currency = {"currencyID": invoice.currency} if invoice.currency is not None else {}
        _add(summation, "TaxTotalAmount", amount(invoice.tax), **currency)
    if invoice.total is not None:
        _add(summation, "GrandTotalAmount", amount(invoice.total))
        _add(summation, "DuePayableAmount", amount(invoice.total))

    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
