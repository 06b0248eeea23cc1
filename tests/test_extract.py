"""The offline rules extractor: exact on every generated layout, general on hand-written text."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pymupdf
import pytest

from tasks.extract import (
    Extraction,
    OfflineExtractor,
    decimal_separator,
    extract_fields,
    find_amount,
    header_roles,
    line_items_from_rows,
    match_label,
    parse_date,
    parse_number,
)
from tasks.invoice import Invoice, LineItem, check_invoice
from tasks.parse import ParsedDocument, parse_pdf_bytes
from tasks.samples import LAYOUTS, make_invoice

ROOT = Path(__file__).resolve().parents[1]


def sorted_text(data: bytes) -> str:
    """What the pipeline extracts from: tasks.parse (PyMuPDF, sorted reading order)."""
    return parse_pdf_bytes(data).text


def plain_text(data: bytes) -> str:
    """PyMuPDF's plain text in content-stream order: one cell per line."""
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        return ParsedDocument([page.get_text() for page in doc]).text


# 60 invoices: ten seeds of every layout; seeds 8 and 9 run over 2 and 3 pages.
CORPUS = [(seed, layout, {8: 2, 9: 3}.get(seed)) for seed in range(10) for layout in LAYOUTS]


@pytest.fixture(scope="module")
def corpus():
    return {key: make_invoice(key[0], key[1], pages=key[2]) for key in CORPUS}


@pytest.mark.parametrize("text_of", [sorted_text, plain_text], ids=["sorted", "plain"])
def test_every_field_of_60_generated_invoices_is_read_exactly(corpus, text_of):
    wrong = {}
    for key, (data, truth) in corpus.items():
        got = extract_fields(text_of(data)).model_dump()
        expected = truth.model_dump()
        diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
        if diff:
            wrong[key] = diff
    assert len(corpus) == 60
    assert sum(len(truth.line_items) for _, truth in corpus.values()) > 400
    assert {pages for _, _, pages in corpus} == {None, 2, 3}
    assert wrong == {}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_defect_invoice_is_read_as_printed_and_flagged(layout):
    data, truth = make_invoice(21, layout, defect="total_mismatch")
    got = extract_fields(sorted_text(data))
    assert got == truth
    problems = check_invoice(got)
    assert [p.split(":")[0] for p in problems] == ["total_mismatch"]


def test_bundled_samples_extract_to_their_expected_json():
    for pdf in sorted((ROOT / "samples" / "invoices").glob("*.pdf")):
        expected = Invoice.model_validate_json((ROOT / "samples" / "expected" / f"{pdf.stem}.json").read_text())
        assert extract_fields(sorted_text(pdf.read_bytes())) == expected, pdf.name


async def test_offline_extractor_satisfies_the_extractor_protocol():
    data, truth = make_invoice(4, "german")
    extractor = OfflineExtractor()
    assert extractor.name == "offline"
    result = await extractor.extract(parse_pdf_bytes(data))
    assert isinstance(result, Extraction)
    assert result.source == "text"
    assert (result.prompt_tokens, result.completion_tokens, result.truncated) == (0, 0, False)
    assert result.invoice == truth


# -- numbers and dates -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "decimal", "expected"),
    [
        ("1,234.56", None, "1234.56"),
        ("1.234,56", None, "1234.56"),
        ("1 234,56", None, "1234.56"),
        ("1\u00a0234,56", None, "1234.56"),
        ("1\u202f234,56", None, "1234.56"),
        ("1'234.50", None, "1234.50"),
        ("1234.56", None, "1234.56"),
        ("1234,56", None, "1234.56"),
        ("1,234,567.89", None, "1234567.89"),
        ("1.234.567", None, "1234567"),
        ("0.045", None, "0.045"),
        ("12,5", None, "12.5"),
        ("42", None, "42"),
        ("EUR 1.234,56", None, "1234.56"),
        ("1.234,56 EUR", None, "1234.56"),
        ("£12.00", None, "12.00"),
        ("$1,200.00", None, "1200.00"),
        ("CHF 1'234.50", None, "1234.50"),
        ("-12.50", None, "-12.50"),
        ("(12.50)", None, "-12.50"),
        ("12.50-", None, "-12.50"),
        ("1,234", ".", "1234"),
        ("1,234", ",", "1.234"),
        ("1.200", ",", "1200"),
        ("5 000", None, "5000"),
        # refused: ambiguous without a hint, or not a number
        ("1,234", None, None),
        ("1.234", None, None),
        ("1,23,456", None, None),
        ("12.34.56", None, None),
        ("1.234.56,7", None, None),
        ("INV-2026", None, None),
        ("", None, None),
        ("20 1 234,56", None, None),
    ],
)
def test_parse_number(text, decimal, expected):
    value = parse_number(text, decimal)
    assert value == (None if expected is None else Decimal(expected))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("zzgl. 19 % MwSt. 190,00 EUR", "190.00"),
        ("(8%): $63.19", "63.19"),
        ("TVA 20 % : 1 200,00 €", "1200.00"),
        ("Net 30", None),  # not money: no cents
        ("30 days", None),
        ("Page 2", None),
    ],
)
def test_find_amount_skips_rates_and_needs_cents(text, expected):
    decimal = "," if "," in text else "."
    assert find_amount(text, decimal) == (None if expected is None else Decimal(expected))


def test_decimal_separator_from_the_documents_amounts():
    assert decimal_separator("Total 1,234.56\nTax 12.00\n23.11.2026") == "."
    assert decimal_separator("Summe 1.234,56\nMwSt 12,00\n23.11.2026") == ","
    assert decimal_separator("Datum 23.11.2026, Seite 1/2") is None


@pytest.mark.parametrize(
    ("text", "day_first", "expected"),
    [
        ("2026-11-23", None, date(2026, 11, 23)),
        ("23.11.2026", None, date(2026, 11, 23)),
        ("05.11.2026", None, date(2026, 11, 5)),
        ("23/11/2026", None, date(2026, 11, 23)),
        ("11/23/2026", None, date(2026, 11, 23)),
        ("23-11-2026", None, date(2026, 11, 23)),
        ("05/11/2026", True, date(2026, 11, 5)),
        ("05/11/2026", False, date(2026, 5, 11)),
        ("05/11/2026", None, None),  # ambiguous and no hint: not guessed
        ("23.11.26", None, date(2026, 11, 23)),
        ("23 Nov 2026", None, date(2026, 11, 23)),
        ("23 November 2026", None, date(2026, 11, 23)),
        ("23-Nov-2026", None, date(2026, 11, 23)),
        ("23. November 2026", None, date(2026, 11, 23)),
        ("3. März 2026", None, date(2026, 3, 3)),
        ("1er décembre 2026", None, date(2026, 12, 1)),
        ("23 novembre 2026", None, date(2026, 11, 23)),
        ("15 août 2026", None, date(2026, 8, 15)),
        ("23 mei 2026", None, date(2026, 5, 23)),
        ("November 23, 2026", None, date(2026, 11, 23)),
        ("Nov 23, 2026", None, date(2026, 11, 23)),
        ("Sept. 3rd, 2026", None, date(2026, 9, 3)),
        ("due 23.11.2026 (30 days)", None, date(2026, 11, 23)),
        ("31.02.2026", None, None),
        ("upon receipt", None, None),
        ("30 days net", None, None),
    ],
)
def test_parse_date(text, day_first, expected):
    assert parse_date(text, day_first) == expected


# -- labels and tables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "role"),
    [
        ("Invoice No:", "invoice_number"), ("Invoice Number", "invoice_number"), ("Invoice #", "invoice_number"),
        ("Rechnungsnummer:", "invoice_number"), ("Rechnungs-Nr.", "invoice_number"),
        ("Facture N° :", "invoice_number"), ("N° de facture", "invoice_number"),
        ("Factuurnummer:", "invoice_number"), ("Factuurnr.", "invoice_number"),
        ("Date:", "issue_date"), ("Invoice date", "issue_date"), ("Date of issue", "issue_date"),
        ("Rechnungsdatum:", "issue_date"), ("Date de facture :", "issue_date"), ("Factuurdatum", "issue_date"),
        ("Due:", "due_date"), ("Due date", "due_date"), ("Date due", "due_date"), ("Fällig am:", "due_date"),
        ("Échéance :", "due_date"), ("Date d'échéance", "due_date"), ("Vervaldatum:", "due_date"),
        ("Subtotal", "subtotal"), ("Net", "subtotal"), ("Zwischensumme", "subtotal"), ("Nettobetrag", "subtotal"),
        ("Sous-total", "subtotal"), ("Total HT", "subtotal"), ("Subtotaal", "subtotal"),
        ("Tax", "tax"), ("VAT 20%", "tax"), ("MwSt.", "tax"), ("zzgl. 19 % USt.", "tax"), ("TVA 20 %", "tax"),
        ("BTW 21%", "tax"), ("Sales tax (8.25%)", "tax"),
        ("Total", "total"), ("Total EUR", "total"), ("Gesamtbetrag", "total"), ("Total TTC", "total"),
        ("Totaal", "total"), ("Amount due", "amount_due"), ("Balance due", "amount_due"),
        ("VAT No:", "tax_id"), ("USt-IdNr.:", "tax_id"), ("N° TVA intracommunautaire :", "tax_id"),
        ("BTW-nummer:", "tax_id"), ("EIN", "tax_id"), ("Tax ID", "tax_id"),
        ("Ihre USt-IdNr.:", "customer_tax_id"),
        ("Bill To", "customer"), ("Rechnungsempfänger:", "customer"), ("Client :", "customer"), ("Klant:", "customer"),
        ("Customer No:", "ignore"), ("Kundennummer:", "ignore"), ("N° client :", "ignore"), ("Klantnummer:", "ignore"),
        ("Leistungsdatum:", "ignore"), ("Übertrag: 1.234,56 EUR", "ignore"), ("Payment terms: 30 days", "ignore"),
        ("Network cable", None), ("Totally", None), ("Invoice", None), ("Rechnung", None), ("Netherlands", None),
    ],
)
def test_label_synonyms_longest_wins(cell, role):
    match = match_label(cell)
    assert (match.role if match else None) == role


@pytest.mark.parametrize(
    ("cell", "roles"),
    [
        ("Description", ["desc"]), ("Qty", ["qty"]), ("Unit Price", ["unit"]), ("Amount (EUR)", ["amount"]),
        ("Pos.", ["pos"]), ("Bezeichnung", ["desc"]), ("Einzelpreis", ["unit"]), ("Désignation", ["desc"]),
        ("Prix unitaire HT", ["unit"]), ("Montant HT", ["amount"]), ("Omschrijving", ["desc"]), ("Aantal", ["qty"]),
        ("Item Description Qty Rate Amount", ["desc", "qty", "unit", "amount"]),
        ("DESCRIPTION QTY UNIT PRICE AMOUNT", ["desc", "qty", "unit", "amount"]),
        ("Pos. Artikel Menge Einzelpreis Gesamtpreis", ["pos", "desc", "qty", "unit", "amount"]),
        ("Consulting services", None), ("Subtotal", None),
    ],
)
def test_table_header_roles(cell, roles):
    assert header_roles(cell) == roles


def test_line_items_from_rows_found_elsewhere():
    """The hook for a position-based table reader: rows of cells plus column roles."""
    rows = [["1", "Beratung", "2 Std.", "150,00", "300,00"], ["", "Hardware", "", "", ""],
            ["2", "Anfahrt", "", "", "45,00"], ["3", "Tippfehler", "zwei", "1,00", "2,00"], ["", "", "", "", ""]]
    items = line_items_from_rows(rows, ["pos", "desc", "qty", "unit", "amount"], decimal=",")
    assert items == [
        LineItem(description="Beratung", quantity=Decimal(2), unit_price=Decimal("150.00"), amount=Decimal("300.00")),
        LineItem(description="Anfahrt", amount=Decimal("45.00")),
    ]


# -- hand-written invoices: the rules are not the generator's -----------------------------

ENGLISH = """ACME Widgets Inc.
500 Industrial Way, Springfield, IL 62701
Tax ID: 12-3456789

INVOICE
Invoice Number: 2026-001
Invoice Date: 11/05/2026
Due Date: 12/05/2026

Bill To:
Globex Corporation
42 Elm Street

Item Description Qty Rate Amount
Widget A 2 250.00 500.00
Widget B, box of 500 10 4.99 49.90
Installation 3 80.00 240.00

Subtotal: $789.90
Sales Tax (8%): $63.19
Total Due: $853.09
Thank you!
"""

GERMAN = """Musterfirma GmbH
Musterstraße 1, 12345 Musterstadt
Steuernummer 12/345/67890 · USt-IdNr. DE 123 456 789

Kunde: Beispiel AG
Rechnung Nr. 4711
Datum: 3. November 2026
Fällig: 17.11.2026

Pos. Artikel Menge Einzelpreis Gesamtpreis
1 Beratung 10 95,00 950,00
2 Reisekosten 1 50,00 50,00

Nettobetrag 1.000,00 €
USt. 19 % 190,00 €
Gesamtbetrag 1.190,00 €
"""

FRENCH = """SARL Dupont et Fils
12 rue des Lilas 75011 Paris
N° TVA : FR 12 345678901

Facturé à : Martin SAS
Facture N° F-12
Date de facture : 23 novembre 2026
Échéance : 23/12/2026

Désignation     Qté     Prix unitaire     Montant
Maintenance     1     1 000,00     1 000,00

Sous-total     1 000,00 €
TVA (20 %)     200,00 €
Total TTC     1 200,00 €
"""

DUTCH = """Bakker Techniek BV
Dorpsstraat 5, 1234 AB Dorp
BTW-nr: NL123456789B01

Factuur aan: De Vries Holding
Factuurnummer: 2026-17
Factuurdatum: 23 nov 2026
Vervaldatum: 23-12-2026
Omschrijving   Aantal   Prijs   Bedrag
Onderhoud   1   100,00   100,00
Subtotaal € 100,00
BTW 21% € 21,00
Totaal € 121,00
"""


def _invoice(vendor, tax_id, customer, number, issue, due, currency, subtotal, tax, total, lines):
    return Invoice(
        vendor_name=vendor, vendor_tax_id=tax_id, customer_name=customer, invoice_number=number,
        issue_date=issue, due_date=due, currency=currency, subtotal=Decimal(subtotal), tax=Decimal(tax),
        total=Decimal(total),
        line_items=[LineItem(description=d, quantity=Decimal(q), unit_price=Decimal(u), amount=Decimal(a))
                    for d, q, u, a in lines],
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ENGLISH, _invoice("ACME Widgets Inc.", "12-3456789", "Globex Corporation", "2026-001",
                           date(2026, 11, 5), date(2026, 12, 5), "USD", "789.90", "63.19", "853.09",
                           [("Widget A", "2", "250.00", "500.00"), ("Widget B, box of 500", "10", "4.99", "49.90"),
                            ("Installation", "3", "80.00", "240.00")])),
        (GERMAN, _invoice("Musterfirma GmbH", "DE123456789", "Beispiel AG", "4711", date(2026, 11, 3),
                          date(2026, 11, 17), "EUR", "1000.00", "190.00", "1190.00",
                          [("Beratung", "10", "95.00", "950.00"), ("Reisekosten", "1", "50.00", "50.00")])),
        (FRENCH, _invoice("SARL Dupont et Fils", "FR12345678901", "Martin SAS", "F-12", date(2026, 11, 23),
                          date(2026, 12, 23), "EUR", "1000.00", "200.00", "1200.00",
                          [("Maintenance", "1", "1000.00", "1000.00")])),
        (DUTCH, _invoice("Bakker Techniek BV", "NL123456789B01", "De Vries Holding", "2026-17",
                         date(2026, 11, 23), date(2026, 12, 23), "EUR", "100.00", "21.00", "121.00",
                         [("Onderhoud", "1", "100.00", "100.00")])),
    ],
    ids=["english-us", "german", "french", "dutch"],
)
def test_hand_written_invoices_in_four_languages(text, expected):
    assert extract_fields(text) == expected


def test_missing_fields_stay_none_rather_than_wrong():
    text = """Some Company Ltd
Invoice No: A-17
Payment terms: Net 30
Due: upon receipt
Date: 05/06/2026
Description   Qty   Price   Total
Widget   1   5.00   5.00
Page 2 of 3
"""
    got = extract_fields(text)
    assert got.vendor_name == "Some Company Ltd"
    assert got.invoice_number == "A-17"
    assert got.line_items == [LineItem(description="Widget", quantity=Decimal(1), unit_price=Decimal("5.00"),
                                       amount=Decimal("5.00"))]
    # no totals block: the "Total" column header is not a total; "Net 30" is not a subtotal
    assert (got.subtotal, got.tax, got.total) == (None, None, None)
    # "upon receipt" is no date; 05/06/2026 is ambiguous with no currency or language to decide
    assert (got.issue_date, got.due_date) == (None, None)
    assert (got.customer_name, got.vendor_tax_id, got.currency) == (None, None, None)
    assert "missing_total" in " ".join(check_invoice(got))


def test_a_text_without_an_invoice_gives_an_empty_invoice():
    assert extract_fields("") == Invoice()
    assert extract_fields("Dear customer,\nthank you for your order.\n") .model_dump(exclude={"vendor_name"}) == \
        Invoice().model_dump(exclude={"vendor_name"})


def test_customer_vat_id_is_not_the_vendors():
    text = """Northwind Ltd
1 High Street, London
Bill To
Contoso GmbH
Hauptstraße 1, 10115 Berlin
VAT: DE987654321
Invoice No: 77
Total: GBP 10.00
Northwind Ltd · VAT No GB123456789
"""
    got = extract_fields(text)
    assert (got.vendor_name, got.customer_name, got.vendor_tax_id) == ("Northwind Ltd", "Contoso GmbH", "GB123456789")
    assert got.tax is None  # "VAT: DE987654321" is an id, not an amount


def test_several_tax_lines_add_up():
    text = """Kiosk AG
Rechnungsnummer: 12
Nettobetrag 150,00 EUR
zzgl. 7 % MwSt. 3,50 EUR
zzgl. 19 % MwSt. 19,00 EUR
Gesamtbetrag 172,50 EUR
"""
    got = extract_fields(text)
    assert (got.subtotal, got.tax, got.total) == (Decimal("150.00"), Decimal("22.50"), Decimal("172.50"))


@pytest.mark.slow
@pytest.mark.parametrize("text_of", [sorted_text, plain_text], ids=["sorted", "plain"])
def test_accuracy_sweep(text_of):
    """300 more invoices (50 seeds of every layout, one in five over 2-4 pages): all exact."""
    wrong = []
    for seed in range(100, 150):
        for layout in LAYOUTS:
            pages = 2 + seed % 3 if seed % 5 == 0 else None
            data, truth = make_invoice(seed, layout, pages=pages)
            if extract_fields(text_of(data)) != truth:
                wrong.append((seed, layout, pages))
    assert wrong == []
