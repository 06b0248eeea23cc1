"""Embedded e-invoices: CII round trips through real PDFs, UBL parsing, hostile XML, cross-checks.

Everything is built here (PDFs with PyMuPDF, XML from literals or `build_cii_xml`); nothing is
read from outside the test. The network-facing attacks point at a real HTTP server on 127.0.0.1
that records every request, so "nothing was fetched" is observed, not assumed.
"""

from __future__ import annotations

import http.server
import re
import threading
from datetime import date
from decimal import Decimal as D
from pathlib import Path

import pymupdf
import pytest
from lxml import etree

from tasks.errors import InvoiceFailure
from tasks.extract import einvoice
from tasks.extract.einvoice import cross_check, parse_einvoice
from tasks.invoice import Invoice, LineItem
from tasks.pdf import embedded_xml
from tasks.pdf.embedded_xml import EmbeddedXml, find_embedded_einvoice
from testing.einvoice_xml import attach_einvoice, build_cii_xml

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def make_pdf(text: str = "Invoice") -> bytes:
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 72), text)
    return doc.tobytes()


def pdf_with(*attachments: tuple[str, bytes]) -> bytes:
    doc = pymupdf.open(stream=make_pdf(), filetype="pdf")
    for name, data in attachments:
        doc.embfile_add(name, data)
    return doc.tobytes(deflate=True)


def find_in(pdf: bytes, **kwargs) -> EmbeddedXml | None:
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        return find_embedded_einvoice(doc, **kwargs)


def line(description: str, quantity: str, unit_price: str, amount: str) -> LineItem:
    return LineItem(
        description=description, quantity=D(quantity), unit_price=D(unit_price), amount=D(amount)
    )


def failure(data: bytes) -> InvoiceFailure:
    with pytest.raises(InvoiceFailure) as info:
        parse_einvoice(data)
    return info.value


MULTI_LINE = Invoice(
    vendor_name="ACME Bürobedarf GmbH",
    vendor_tax_id="DE123456789",
    iban="DE89370400440532013000",
    bic="COBADEFFXXX",
    customer_name="Beispiel AG",
    invoice_number="RE-2024-0042",
    issue_date=date(2024, 3, 15),
    due_date=date(2024, 4, 14),
    currency="EUR",
    subtotal=D("187.50"),
    tax=D("35.63"),
    total=D("223.13"),
    line_items=[
        line("Druckerpapier A4, 500 Blatt", "10", "4.95", "49.50"),
        line("Toner schwarz", "2", "59.00", "118.00"),
        line("Versand", "1", "20.00", "20.00"),
    ],
)
NO_LINES = Invoice(
    vendor_name="Consulting SARL",
    invoice_number="F 2024/7",
    issue_date=date(2024, 2, 29),
    currency="EUR",
    subtotal=D("1000"),
    tax=D("200"),
    total=D("1200"),
)
CREDIT_NOTE = Invoice(
    vendor_name="ACME Bürobedarf GmbH",
    vendor_tax_id="DE123456789",
    iban="DE89370400440532013000",
    customer_name="Beispiel AG",
    invoice_number="GS-2024-0007",
    issue_date=date(2024, 3, 20),
    currency="EUR",
    subtotal=D("-118.00"),
    tax=D("-22.42"),
    total=D("-140.42"),
    line_items=[
        line("Toner schwarz (Rücksendung)", "-2", "59.00", "-118.00"),
    ],
)
UNICODE = Invoice(
    vendor_name="Ærøskøbing Café — „Zoë“ & Søn ApS 東京",
    vendor_tax_id="12/345/67890",  # a national tax number, not a VAT id: written as FC
    customer_name="Société Générale d’Électricité <Ouest> & Cie",
    invoice_number="Ñ-ÄÖÜ-ß-001",
    issue_date=date(2023, 12, 31),
    due_date=date(2024, 1, 31),
    currency="DKK",
    subtotal=D("0.00"),
    tax=D("0.00"),
    total=D("0.00"),
    line_items=[line("Smørrebrød 🥪 «spécial»", "1.5", "0.00", "0.00")],
)
SPARSE = Invoice(invoice_number="X1", total=D("10"))


# --------------------------------------------------------------------------------------------
# CII round trip through a real PDF
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "invoice",
    [MULTI_LINE, NO_LINES, CREDIT_NOTE, UNICODE, SPARSE],
    ids=["multi", "nolines", "credit", "unicode", "sparse"],
)
def test_cii_round_trip_through_pdf(invoice: Invoice) -> None:
    pdf = attach_einvoice(make_pdf(f"Invoice {invoice.invoice_number}"), build_cii_xml(invoice))

    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        assert "Invoice" in doc[0].get_text()
        found = find_embedded_einvoice(doc)

    assert found is not None and found.name == "factur-x.xml"
    assert parse_einvoice(found.data) == invoice


def test_parsed_amounts_add_up_with_either_sign() -> None:
    """Credit notes are negated as a whole: lines sum to the subtotal, subtotal + tax = total."""
    for invoice in (MULTI_LINE, NO_LINES, CREDIT_NOTE, UNICODE):
        parsed = parse_einvoice(build_cii_xml(invoice))
        assert parsed.subtotal + parsed.tax == parsed.total
        if parsed.line_items:
            assert sum(line.amount for line in parsed.line_items) == parsed.subtotal
            assert all(line.unit_price >= 0 for line in parsed.line_items)


def test_credit_note_is_written_as_381_with_positive_amounts() -> None:
    root = etree.fromstring(build_cii_xml(CREDIT_NOTE))
    ns = {"rsm": einvoice.RSM_NS, "ram": einvoice.RAM_NS}
    assert root.findtext("rsm:ExchangedDocument/ram:TypeCode", namespaces=ns) == "381"
    summation = (
        "rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeSettlement/"
        "ram:SpecifiedTradeSettlementHeaderMonetarySummation"
    )
    assert root.findtext(f"{summation}/ram:GrandTotalAmount", namespaces=ns) == "140.42"
    assert root.findtext(f"{summation}/ram:TaxTotalAmount", namespaces=ns) == "22.42"
    numbers = [e.text for e in root.iter() if re.search(r"(Amount|Quantity)$", e.tag)]
    assert len(numbers) == 10 and all(not text.startswith("-") for text in numbers)
    assert root.findtext(".//ram:BilledQuantity", namespaces=ns) == "2"
    assert (
        etree.fromstring(build_cii_xml(MULTI_LINE)).findtext(
            "rsm:ExchangedDocument/ram:TypeCode", namespaces=ns
        )
        == "380"
    )


def test_attach_marks_the_file_as_associated_xml() -> None:
    pdf = attach_einvoice(make_pdf(), build_cii_xml(SPARSE))
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        kind, value = doc.xref_get_key(doc.pdf_catalog(), "AF")
        assert kind == "array"
        filespec = int(re.match(r"\[(\d+) 0 R\]", value)[1])
        assert doc.xref_get_key(filespec, "AFRelationship") == ("name", "/Data")
        assert doc.embfile_names() == ["factur-x.xml"]
    with pytest.raises(ValueError):
        attach_einvoice(attach_einvoice(make_pdf(), b"<a/>"), b"<b/>")


def test_cii_parsing_goes_by_namespace_not_prefix() -> None:
    """Other prefixes, a default namespace, a tax total in two currencies, a price per 10 units."""
    xml = """<?xml version="1.0" encoding="UTF-8"?>
<inv:CrossIndustryInvoice xmlns:inv="urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
    xmlns:u="urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100">
  <inv:ExchangedDocument xmlns="urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100">
    <ID> 471102 </ID><TypeCode>380</TypeCode>
    <IssueDateTime><u:DateTimeString format="102">20180305</u:DateTimeString></IssueDateTime>
  </inv:ExchangedDocument>
  <!-- comments are dropped -->
  <inv:SupplyChainTradeTransaction xmlns:x="urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100">
    <x:IncludedSupplyChainTradeLineItem>
      <x:SpecifiedTradeProduct><x:Name>Trennblätter A4</x:Name></x:SpecifiedTradeProduct>
      <x:SpecifiedLineTradeAgreement>
        <x:GrossPriceProductTradePrice><x:ChargeAmount>99.99</x:ChargeAmount></x:GrossPriceProductTradePrice>
        <x:NetPriceProductTradePrice><x:ChargeAmount>95.00</x:ChargeAmount><x:BasisQuantity unitCode="H87">10</x:BasisQuantity></x:NetPriceProductTradePrice>
      </x:SpecifiedLineTradeAgreement>
      <x:SpecifiedLineTradeDelivery><x:BilledQuantity unitCode="H87">20.0000</x:BilledQuantity></x:SpecifiedLineTradeDelivery>
      <x:SpecifiedLineTradeSettlement><x:SpecifiedTradeSettlementLineMonetarySummation><x:LineTotalAmount>190.00</x:LineTotalAmount></x:SpecifiedTradeSettlementLineMonetarySummation></x:SpecifiedLineTradeSettlement>
    </x:IncludedSupplyChainTradeLineItem>
    <x:ApplicableHeaderTradeAgreement>
      <x:SellerTradeParty><x:Name>Lieferant GmbH</x:Name>
        <x:SpecifiedTaxRegistration><x:ID schemeID="FC">201/113/40209</x:ID></x:SpecifiedTaxRegistration>
        <x:SpecifiedTaxRegistration><x:ID schemeID="VA">DE123456789</x:ID></x:SpecifiedTaxRegistration>
      </x:SellerTradeParty>
      <x:BuyerTradeParty><x:Name>Kunden AG Mitte</x:Name></x:BuyerTradeParty>
    </x:ApplicableHeaderTradeAgreement>
    <x:ApplicableHeaderTradeSettlement>
      <x:TaxCurrencyCode>USD</x:TaxCurrencyCode>
      <x:InvoiceCurrencyCode>EUR</x:InvoiceCurrencyCode>
      <x:SpecifiedTradeSettlementPaymentMeans><x:TypeCode>58</x:TypeCode>
        <x:PayeePartyCreditorFinancialAccount><x:IBANID>DE02 1203 0000 0000 2020 51</x:IBANID></x:PayeePartyCreditorFinancialAccount>
        <x:PayeeSpecifiedCreditorFinancialInstitution><x:BICID>BYLADEM1001</x:BICID></x:PayeeSpecifiedCreditorFinancialInstitution>
      </x:SpecifiedTradeSettlementPaymentMeans>
      <x:SpecifiedTradePaymentTerms><x:DueDateDateTime><u:DateTimeString format="102">20180404</u:DateTimeString></x:DueDateDateTime></x:SpecifiedTradePaymentTerms>
      <x:SpecifiedTradeSettlementHeaderMonetarySummation>
        <x:LineTotalAmount>190.00</x:LineTotalAmount>
        <x:TaxBasisTotalAmount>190.00</x:TaxBasisTotalAmount>
        <x:TaxTotalAmount currencyID="USD">40.00</x:TaxTotalAmount>
        <x:TaxTotalAmount currencyID="EUR">36.10</x:TaxTotalAmount>
        <x:GrandTotalAmount>226.10</x:GrandTotalAmount>
        <x:DuePayableAmount>226.10</x:DuePayableAmount>
      </x:SpecifiedTradeSettlementHeaderMonetarySummation>
    </x:ApplicableHeaderTradeSettlement>
  </inv:SupplyChainTradeTransaction>
</inv:CrossIndustryInvoice>"""
    assert parse_einvoice(xml.encode()) == Invoice(
        vendor_name="Lieferant GmbH",
        vendor_tax_id="DE123456789",
        iban="DE02120300000000202051",
        bic="BYLADEM1001",
        customer_name="Kunden AG Mitte",
        invoice_number="471102",
        issue_date=date(2018, 3, 5),
        due_date=date(2018, 4, 4),
        currency="EUR",
        subtotal=D("190.00"),
        tax=D("36.10"),
        total=D("226.10"),
        line_items=[line("Trennblätter A4", "20", "9.5", "190")],
    )


# --------------------------------------------------------------------------------------------
# UBL
# --------------------------------------------------------------------------------------------

UBL_INVOICE = """<?xml version="1.0" encoding="UTF-8"?>
<Invoice xmlns="urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
         xmlns:cac="urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
         xmlns:cbc="urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2">
  <cbc:CustomizationID>urn:cen.eu:en16931:2017#compliant#urn:xeinkauf.de:kosit:xrechnung_3.0</cbc:CustomizationID>
  <cbc:ID>123456XX</cbc:ID>
  <cbc:IssueDate>2016-04-04</cbc:IssueDate>
  <cbc:DueDate>2016-04-14</cbc:DueDate>
  <cbc:InvoiceTypeCode>380</cbc:InvoiceTypeCode>
  <cbc:DocumentCurrencyCode>EUR</cbc:DocumentCurrencyCode>
  <cac:AccountingSupplierParty><cac:Party>
    <cac:PartyName><cbc:Name>[Seller trading name]</cbc:Name></cac:PartyName>
    <cac:PartyTaxScheme><cbc:CompanyID>201/113/40209</cbc:CompanyID><cac:TaxScheme><cbc:ID>FC</cbc:ID></cac:TaxScheme></cac:PartyTaxScheme>
    <cac:PartyTaxScheme><cbc:CompanyID>DE123456789</cbc:CompanyID><cac:TaxScheme><cbc:ID>VAT</cbc:ID></cac:TaxScheme></cac:PartyTaxScheme>
    <cac:PartyLegalEntity><cbc:RegistrationName>[Seller name]</cbc:RegistrationName></cac:PartyLegalEntity>
  </cac:Party></cac:AccountingSupplierParty>
  <cac:AccountingCustomerParty><cac:Party>
    <cac:PartyLegalEntity><cbc:RegistrationName>[Buyer name]</cbc:RegistrationName></cac:PartyLegalEntity>
  </cac:Party></cac:AccountingCustomerParty>
  <cac:PaymentMeans>
    <cbc:PaymentMeansCode>58</cbc:PaymentMeansCode>
    <cac:PayeeFinancialAccount>
      <cbc:ID>DE75 5121 0800 1245 1261 99</cbc:ID>
      <cac:FinancialInstitutionBranch><cbc:ID>SOGEDEFFXXX</cbc:ID></cac:FinancialInstitutionBranch>
    </cac:PayeeFinancialAccount>
  </cac:PaymentMeans>
  <cac:TaxTotal><cbc:TaxAmount currencyID="EUR">22.04</cbc:TaxAmount></cac:TaxTotal>
  <cac:LegalMonetaryTotal>
    <cbc:LineExtensionAmount currencyID="EUR">314.86</cbc:LineExtensionAmount>
    <cbc:TaxExclusiveAmount currencyID="EUR">314.86</cbc:TaxExclusiveAmount>
    <cbc:TaxInclusiveAmount currencyID="EUR">336.90</cbc:TaxInclusiveAmount>
    <cbc:PrepaidAmount currencyID="EUR">36.90</cbc:PrepaidAmount>
    <cbc:PayableAmount currencyID="EUR">300.00</cbc:PayableAmount>
  </cac:LegalMonetaryTotal>
  <cac:InvoiceLine>
    <cbc:ID>1</cbc:ID>
    <cbc:InvoicedQuantity unitCode="XPP">1.0000</cbc:InvoicedQuantity>
    <cbc:LineExtensionAmount currencyID="EUR">288.79</cbc:LineExtensionAmount>
    <cac:Item><cbc:Description>long text</cbc:Description><cbc:Name>Kurzinfo Artikel 1</cbc:Name></cac:Item>
    <cac:Price><cbc:PriceAmount currencyID="EUR">288.79</cbc:PriceAmount></cac:Price>
  </cac:InvoiceLine>
  <cac:InvoiceLine>
    <cbc:ID>2</cbc:ID>
    <cbc:InvoicedQuantity unitCode="XPP">2</cbc:InvoicedQuantity>
    <cbc:LineExtensionAmount currencyID="EUR">26.07</cbc:LineExtensionAmount>
    <cac:Item><cbc:Name>Kurzinfo Artikel 2</cbc:Name></cac:Item>
    <cac:Price><cbc:PriceAmount currencyID="EUR">1303.50</cbc:PriceAmount><cbc:BaseQuantity unitCode="XPP">100</cbc:BaseQuantity></cac:Price>
  </cac:InvoiceLine>
</Invoice>"""

UBL_CREDIT_NOTE = """<?xml version="1.0" encoding="UTF-8"?>
<ubl:CreditNote xmlns:ubl="urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"
    xmlns:a="urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
    xmlns:b="urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2">
  <b:ID>CN-77</b:ID>
  <b:IssueDate>2024-05-02</b:IssueDate>
  <b:CreditNoteTypeCode>381</b:CreditNoteTypeCode>
  <b:DocumentCurrencyCode>SEK</b:DocumentCurrencyCode>
  <a:AccountingSupplierParty><a:Party>
    <a:PartyName><b:Name>Leverantör AB</b:Name></a:PartyName>
    <a:PartyTaxScheme><b:CompanyID>SE556677889901</b:CompanyID><a:TaxScheme><b:ID>VAT</b:ID></a:TaxScheme></a:PartyTaxScheme>
  </a:Party></a:AccountingSupplierParty>
  <a:AccountingCustomerParty><a:Party><a:PartyName><b:Name>Köpare AB</b:Name></a:PartyName></a:Party></a:AccountingCustomerParty>
  <a:PaymentMeans>
    <b:PaymentMeansCode>30</b:PaymentMeansCode>
    <b:PaymentDueDate>2024-06-01</b:PaymentDueDate>
    <a:PayeeFinancialAccount><b:ID>SE4550000000058398257466</b:ID>
      <a:FinancialInstitutionBranch><a:FinancialInstitution><b:ID>ESSESESS</b:ID></a:FinancialInstitution></a:FinancialInstitutionBranch>
    </a:PayeeFinancialAccount>
  </a:PaymentMeans>
  <a:TaxTotal><b:TaxAmount currencyID="SEK">25.00</b:TaxAmount></a:TaxTotal>
  <a:TaxTotal><b:TaxAmount currencyID="EUR">2.20</b:TaxAmount></a:TaxTotal>
  <a:LegalMonetaryTotal>
    <b:LineExtensionAmount currencyID="SEK">100.00</b:LineExtensionAmount>
    <b:TaxExclusiveAmount currencyID="SEK">100.00</b:TaxExclusiveAmount>
    <b:PayableAmount currencyID="SEK">125.00</b:PayableAmount>
  </a:LegalMonetaryTotal>
  <a:CreditNoteLine>
    <b:ID>1</b:ID>
    <b:CreditedQuantity unitCode="C62">4</b:CreditedQuantity>
    <b:LineExtensionAmount currencyID="SEK">100.00</b:LineExtensionAmount>
    <a:Item><b:Name>Returnerade koppar</b:Name></a:Item>
    <a:Price><b:PriceAmount currencyID="SEK">25.00</b:PriceAmount></a:Price>
  </a:CreditNoteLine>
</ubl:CreditNote>"""


def test_ubl_invoice() -> None:
    assert parse_einvoice(UBL_INVOICE.encode()) == Invoice(
        vendor_name="[Seller name]",  # the legal name (BT-27), not the trading name
        vendor_tax_id="DE123456789",  # the VAT scheme wins over the tax number
        iban="DE75512108001245126199",
        bic="SOGEDEFFXXX",
        customer_name="[Buyer name]",
        invoice_number="123456XX",
        issue_date=date(2016, 4, 4),
        due_date=date(2016, 4, 14),
        currency="EUR",
        subtotal=D("314.86"),
        tax=D("22.04"),
        total=D("336.90"),  # tax inclusive, not the payable amount after prepayment
        line_items=[
            line("Kurzinfo Artikel 1", "1", "288.79", "288.79"),
            line("Kurzinfo Artikel 2", "2", "13.035", "26.07"),  # 1303.50 per 100 units
        ],
    )


def test_ubl_credit_note_is_negative() -> None:
    parsed = parse_einvoice(UBL_CREDIT_NOTE.encode())
    assert parsed == Invoice(
        vendor_name="Leverantör AB",
        vendor_tax_id="SE556677889901",
        iban="SE4550000000058398257466",
        bic="ESSESESS",
        customer_name="Köpare AB",
        invoice_number="CN-77",
        issue_date=date(2024, 5, 2),
        due_date=date(2024, 6, 1),
        currency="SEK",
        subtotal=D("-100.00"),
        tax=D("-25.00"),  # the SEK tax total, not the EUR one
        total=D("-125.00"),  # no TaxInclusiveAmount: the payable amount
        line_items=[line("Returnerade koppar", "-4", "25.00", "-100.00")],
    )
    assert parsed.line_items[0].amount == parsed.subtotal
    assert parsed.subtotal + parsed.tax == parsed.total


# --------------------------------------------------------------------------------------------
# Hostile XML
# --------------------------------------------------------------------------------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:  # serve something that would expand, were it ever fetched
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/xml-dtd")
        self.end_headers()
        self.wfile.write(b'<!ENTITY ext "FETCHED-FROM-SERVER">')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def _recording_server():
    hits: list[str] = []
    handler = type("Handler", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def recorder(_recording_server):
    """(base URL, list of requested paths, empty at the start) of an HTTP server on 127.0.0.1."""
    base, hits = _recording_server
    hits.clear()
    yield base, hits


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""


def _cii_with_number(number: str) -> str:
    """A minimal CII invoice whose number is `number` (an entity reference in the attacks)."""
    return (
        "<rsm:CrossIndustryInvoice"
        ' xmlns:rsm="urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"'
        ' xmlns:ram="urn:un:unece:uncefact:data:standard:'
        'ReusableAggregateBusinessInformationEntity:100">'
        f"<rsm:ExchangedDocument><ram:ID>{number}</ram:ID></rsm:ExchangedDocument>"
        "<rsm:SupplyChainTradeTransaction/></rsm:CrossIndustryInvoice>"
    )


def _attacks(base: str) -> dict[str, bytes]:
    passwd = '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + _cii_with_number("&x;")
    external_dtd = f'<!DOCTYPE r SYSTEM "{base}/invoice.dtd">' + _cii_with_number("&ext;")
    http_entity = f'<!DOCTYPE r [<!ENTITY x SYSTEM "{base}/entity">]>' + _cii_with_number("&x;")
    parameter = f'<!DOCTYPE r [<!ENTITY % p SYSTEM "{base}/p.dtd"> %p;]>'
    parameter += _cii_with_number("&ext;")
    return {
        "billion_laughs": BILLION_LAUGHS,
        "file_entity": passwd.encode(),
        "external_dtd": external_dtd.encode(),
        "http_entity": http_entity.encode(),
        "parameter_entity": parameter.encode(),
        # UTF-16 hides "<!DOCTYPE" from a naive byte search.
        "utf16_file_entity": ('<?xml version="1.0" encoding="UTF-16"?>' + passwd).encode("utf-16"),
        "lowercase_doctype_in_utf32": ("<!doctype r>" + _cii_with_number("1")).encode("utf-32"),
    }


def _passwd_markers() -> list[str]:
    try:
        lines = Path("/etc/passwd").read_text().splitlines()
    except OSError:
        return ["root:x:0:0"]
    return [line for line in lines[:3] if line] or ["root:x:0:0"]


PARSED_ATTACKS = [
    "billion_laughs",
    "file_entity",
    "external_dtd",
    "http_entity",
    "parameter_entity",
    "utf16_file_entity",
]


@pytest.mark.parametrize("attack", [*PARSED_ATTACKS, "lowercase_doctype_in_utf32"])
def test_hostile_xml_is_refused_without_side_effects(attack: str, recorder) -> None:
    base, hits = recorder
    error = failure(_attacks(base)[attack])

    assert error.code == "einvoice_unsafe"
    assert not error.retryable
    for marker in _passwd_markers():
        assert marker not in str(error)
    assert "FETCHED" not in str(error)
    assert hits == []


@pytest.mark.parametrize("attack", PARSED_ATTACKS)
def test_the_parser_alone_neither_expands_nor_fetches(attack: str, recorder, monkeypatch) -> None:
    """Defence in depth: with the byte pre-scan disabled, the parser and the post-parse check
    still refuse, and nothing was read from disk or network on the way."""
    base, hits = recorder
    data = _attacks(base)[attack]

    try:
        root = etree.fromstring(data, embedded_xml._new_parser())
    except etree.XMLSyntaxError as exc:  # libxml2's own amplification guard (billion laughs)
        assert attack == "billion_laughs", exc
        expected = {"einvoice_invalid"}
    else:
        serialized = etree.tostring(root, encoding="unicode")
        assert len(serialized) < 1000
        for marker in [*_passwd_markers(), "FETCHED", "lollol"]:
            assert marker not in serialized
        expected = {"einvoice_unsafe"}

    monkeypatch.setattr(embedded_xml, "_DECLARATION", re.compile(rb"(?!)"))  # matches nothing
    assert failure(data).code in expected
    assert hits == []


def test_hostile_attachment_is_skipped_without_side_effects(recorder) -> None:
    base, hits = recorder
    attacks = _attacks(base)
    pdf = pdf_with(
        ("factur-x.xml", attacks["file_entity"]),
        *((f"{name}.xml", data) for name, data in attacks.items()),
    )
    assert find_in(pdf) is None
    assert hits == []


def test_oversize_xml_is_unsafe() -> None:
    data = build_cii_xml(MULTI_LINE)
    assert parse_einvoice(data, max_bytes=len(data)) == MULTI_LINE
    with pytest.raises(InvoiceFailure) as info:
        parse_einvoice(data, max_bytes=len(data) - 1)
    assert info.value.code == "einvoice_unsafe"
    tag = b"<rsm:ExchangedDocument>"
    padded = data.replace(tag, b" " * 5 * 1024 * 1024 + tag)
    assert failure(padded).code == "einvoice_unsafe"


# --------------------------------------------------------------------------------------------
# Invalid XML
# --------------------------------------------------------------------------------------------

_GOOD = build_cii_xml(MULTI_LINE).decode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not xml at all",
        b"<rsm:CrossIndustryInvoice>",  # unbound prefix, unclosed
        _GOOD[:-40].encode(),  # truncated
        b"<Invoice><ID>1</ID></Invoice>",  # UBL's local name without its namespace
        b'<order xmlns="urn:example:order"/>',
        b"<r>&undefined;</r>",
        _GOOD.replace("223.13", "223,13").encode(),
        _GOOD.replace("<ram:GrandTotalAmount>223.13", "<ram:GrandTotalAmount>NaN").encode(),
        _GOOD.replace('"EUR">35.63</ram:TaxTotal', '"EUR">1E+3</ram:TaxTotal').encode(),
        _GOOD.replace('"C62">10</ram:BilledQuantity>', '"C62">ten</ram:BilledQuantity>').encode(),
        _GOOD.replace("20240315", "20240231").encode(),  # no 31 February
        _GOOD.replace("20240315", "2024-03-15").encode(),
        _GOOD.replace('format="102">20240315', 'format="610">202403').encode(),
        UBL_INVOICE.replace("2016-04-04", "04.04.2016").encode(),
        UBL_INVOICE.replace(">314.86</cbc:TaxExclusive", ">314.86 EUR</cbc:TaxExclusive").encode(),
    ],
)
def test_invalid_xml(data: bytes) -> None:
    assert failure(data).code == "einvoice_invalid"


def test_invalid_values_say_which_field() -> None:
    message = failure(_GOOD.replace("20240315", "20241315").encode()).message
    assert "issue date" in message and "20241315" in message


# --------------------------------------------------------------------------------------------
# Finding the attachment
# --------------------------------------------------------------------------------------------


def test_pdf_without_attachments() -> None:
    assert find_in(make_pdf()) is None


def test_unrelated_and_non_xml_attachments_are_ignored() -> None:
    pdf = pdf_with(
        ("notes.xml", b'<?xml version="1.0"?><notes><note>hello</note></notes>'),
        ("photo.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256))),
        ("data.xml", b"\x00\x01 binary, not xml"),
        ("invoice.txt", build_cii_xml(MULTI_LINE)),  # not named .xml: not looked at
        (
            "order-x.xml",
            b'<o:SCRDMCCBDACIOMessageStructure xmlns:o="urn:un:unece:uncefact:'
            b'data:SCRDMCCBDACIOMessageStructure:100"/>',
        ),
    )
    assert find_in(pdf) is None


def test_standard_name_wins_over_other_xml() -> None:
    pdf = pdf_with(
        ("readme.xml", b"<readme/>"),
        ("copy.xml", UBL_INVOICE.encode()),
        ("ZUGFeRD-invoice.xml", build_cii_xml(MULTI_LINE)),
    )
    found = find_in(pdf)
    assert found is not None and found.name == "ZUGFeRD-invoice.xml"
    assert parse_einvoice(found.data) == MULTI_LINE


def test_any_xml_with_an_invoice_root_is_found() -> None:
    found = find_in(pdf_with(("notes.xml", b"<notes/>"), ("INV-123.XML", UBL_CREDIT_NOTE.encode())))
    assert found == EmbeddedXml(name="INV-123.XML", data=UBL_CREDIT_NOTE.encode())


def test_broken_standard_attachment_falls_back_to_a_good_one() -> None:
    pdf = pdf_with(("factur-x.xml", b"<broken"), ("xrechnung.xml", UBL_INVOICE.encode()))
    found = find_in(pdf)
    assert found is not None and found.name == "xrechnung.xml"


def test_oversize_attachment_is_skipped() -> None:
    xml = build_cii_xml(MULTI_LINE)
    pdf = pdf_with(("factur-x.xml", xml))
    assert find_in(pdf, max_bytes=len(xml)) is not None
    assert find_in(pdf, max_bytes=len(xml) - 1) is None


def test_attachment_lying_about_its_size_is_skipped() -> None:
    """A flate bomb declaring a tiny size: measured by decoding at most max_bytes + 1 bytes."""
    tag = b"<rsm:ExchangedDocument>"
    bomb = build_cii_xml(SPARSE).replace(tag, b" " * 8 * 1024 * 1024 + tag)
    doc = pymupdf.open(stream=make_pdf(), filetype="pdf")
    xref = doc.embfile_add("factur-x.xml", bomb)
    for key in ("DL", "Params/Size"):
        doc.xref_set_key(xref, key, "100")
    pdf = doc.tobytes(deflate=True)
    assert len(pdf) < 100_000

    with pymupdf.open(stream=pdf, filetype="pdf") as reopened:
        assert reopened.embfile_info(0)["size"] == 100
        assert find_embedded_einvoice(reopened) is None
        assert find_embedded_einvoice(reopened, max_bytes=10 * 1024 * 1024) is not None


def test_odd_documents_do_not_raise() -> None:
    image = pymupdf.open(stream=b"P1\n1 1\n0\n", filetype="pbm")  # not a PDF at all
    assert find_embedded_einvoice(image) is None


# --------------------------------------------------------------------------------------------
# Cross-check
# --------------------------------------------------------------------------------------------


def test_cross_check_agreeing_text() -> None:
    text = Invoice(
        invoice_number=" re-2024- 0042",
        issue_date=date(2024, 3, 15),
        currency="eur",
        subtotal=D("187.5"),
        tax=D("35.64"),  # within a cent
        total=D("223.13"),
        iban="DE89 3704 0044 0532 0130 00",
        vendor_name="something else entirely",  # not cross-checked
    )
    assert cross_check(MULTI_LINE, text) == []
    assert cross_check(MULTI_LINE, Invoice()) == []  # found nothing: nothing to contradict


def test_cross_check_credit_note_signs_are_ignored() -> None:
    printed = Invoice(
        invoice_number="GS-2024-0007", subtotal=D("118.00"), tax=D("22.42"), total=D("140.42")
    )
    assert cross_check(CREDIT_NOTE, printed) == []
    assert cross_check(CREDIT_NOTE, printed.model_copy(update={"total": D("-140.42")})) == []


def test_cross_check_disagreeing_text() -> None:
    text = Invoice(
        invoice_number="RE-2024-0043",
        issue_date=date(2024, 3, 16),
        currency="USD",
        subtotal=D("187.52"),
        tax=D("35.63"),
        total=D("232.13"),
        iban="DE02120300000000202051",
    )
    reasons = cross_check(MULTI_LINE, text)
    assert all(reason.startswith("einvoice_mismatch: ") for reason in reasons)
    fields = [reason.split(": ")[1] for reason in reasons]
    assert fields == ["invoice_number", "subtotal", "total", "currency", "issue_date", "iban"]
    assert "232.13" in reasons[2] and "223.13" in reasons[2]


def test_cross_check_value_missing_from_xml_is_a_mismatch() -> None:
    assert cross_check(SPARSE, Invoice(currency="EUR", tax=D("1.00"))) == [
        "einvoice_mismatch: tax: XML says None, the page says 1.00",
        "einvoice_mismatch: currency: XML says None, the page says 'EUR'",
    ]
