"""The sample invoice generator: deterministic, realistic, every layout, multi-page, bundled set."""

from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pymupdf
import pytest

from tasks.checks import bic_is_valid, check_invoice, format_iban, iban_is_valid, tax_id_problem
from tasks.invoice import Invoice
from testing.samples import (
    COUNTRIES,
    DEFECTS,
    LAYOUTS,
    _bank_account,
    main,
    make_invoice,
    write_samples,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "samples" / "invoices"
EXPECTED = ROOT / "samples" / "expected"
CENT = Decimal("0.01")


def page_texts(data: bytes) -> list[str]:
    with pymupdf.open(stream=data, filetype="pdf") as doc:
        return [page.get_text() for page in doc]


def test_layouts_are_the_advertised_ones():
    assert set(LAYOUTS) >= {"classic", "modern", "german", "compact"}
    assert len(set(LAYOUTS)) == len(LAYOUTS) >= 4
    assert DEFECTS == ("total_mismatch",)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_seed_same_invoice_bytes_and_truth(layout):
    first = make_invoice(7, layout)
    second = make_invoice(7, layout)
    assert first[0] == second[0]
    assert first[1] == second[1]
    other = make_invoice(8, layout)
    assert other[0] != first[0] and other[1] != first[1]


def test_default_layout_cycles_through_all_layouts():
    assert {
        make_invoice(seed)[0] == make_invoice(seed, LAYOUTS[seed % len(LAYOUTS)])[0]
        for seed in range(len(LAYOUTS))
    } == {True}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_renders_a_real_text_layer(layout):
    data, truth = make_invoice(3, layout)
    assert data.startswith(b"%PDF-") and len(data) < 8_000  # a few KB: base-14 fonts, not embedded
    (text,) = page_texts(data)
    for needle in (
        truth.invoice_number,
        truth.vendor_name,
        truth.customer_name,
        truth.line_items[0].description,
        truth.currency,
    ):
        assert needle in text, needle
    assert "·" not in text.replace(" · ", "")  # no glyph fell back to a bullet (e.g. a euro sign)
    assert check_invoice(truth) == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_truth_is_consistent_arithmetic_for_many_seeds(layout):
    for seed in range(25):
        _, truth = make_invoice(seed, layout)
        assert check_invoice(truth) == [], (seed, check_invoice(truth))
        assert truth.due_date is not None and truth.issue_date is not None
        assert (truth.due_date - truth.issue_date).days in (14, 30, 60)
        for line in truth.line_items:
            assert line.amount == (line.quantity * line.unit_price).quantize(CENT, ROUND_HALF_UP)
        assert truth.subtotal == sum(line.amount for line in truth.line_items)
        assert truth.total == truth.subtotal + truth.tax
        assert truth.currency in ("EUR", "USD", "GBP", "CHF")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bank_details_are_valid_and_in_the_truth_where_the_layout_prints_them(layout):
    for seed in range(12):
        data, truth = make_invoice(seed, layout, pages=2 if seed == 11 else None)
        text = "\n".join(page_texts(data))
        assert tax_id_problem(truth.vendor_tax_id) is None, truth.vendor_tax_id
        if layout in ("german", "dutch"):
            assert truth.iban == truth.iban.replace(" ", "").upper() and iban_is_valid(truth.iban)
            assert bic_is_valid(truth.bic) and truth.bic[4:6] == truth.iban[:2]
            assert f"IBAN {format_iban(truth.iban)}" in text and f"BIC {truth.bic}" in text
        else:
            assert (truth.iban, truth.bic) == (None, None)
            assert "IBAN" not in text and "BIC" not in text


@pytest.mark.parametrize("code", sorted(COUNTRIES))
def test_every_vendor_country_gets_a_valid_iban_and_bic(code):
    for k in range(50):
        digits = f"{k * 7919 + 12345:020d}"[::-1]
        account = _bank_account(
            code, COUNTRIES[code].cities[k % len(COUNTRIES[code].cities)], digits
        )
        if code == "US":  # no IBANs in the US
            assert account is None
            continue
        iban, bic = account
        assert (
            iban_is_valid(iban) and iban.startswith(code) and bic_is_valid(bic) and bic[4:6] == code
        )


def test_pound_and_dollar_signs_extract_back_unchanged():
    seen = set()
    for seed in range(40):
        data, truth = make_invoice(seed, "classic")
        text = page_texts(data)[0]
        if truth.currency == "GBP":
            assert f"£{truth.total:,.2f}" in text
            seen.add("GBP")
        elif truth.currency == "USD":
            assert f"${truth.total:,.2f}" in text
            seen.add("USD")
    assert seen == {"GBP", "USD"}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_total_mismatch_defect_prints_a_wrong_total(layout):
    data, truth = make_invoice(5, layout, defect="total_mismatch")
    _, clean = make_invoice(5, layout)
    assert truth.subtotal == clean.subtotal and truth.tax == clean.tax
    assert truth.total != clean.total
    problems = check_invoice(truth)
    assert len(problems) == 1 and problems[0].startswith("total_mismatch")
    printed = page_texts(data)[-1]
    assert (
        f"{truth.total:.2f}"[-5:].replace(".", ",") in printed
        or f"{truth.total:.2f}"[-5:] in printed
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pages", [1, 2, 5])
def test_pages_gives_the_requested_page_count(layout, pages):
    data, truth = make_invoice(11, layout, pages=pages)
    texts = page_texts(data)
    assert len(texts) == pages
    assert check_invoice(truth) == []
    # every page carries line items, the totals are on the last page only
    first_item, last_item = truth.line_items[0].description, truth.line_items[-1].description
    assert first_item in texts[0] and last_item in texts[-1]
    for k, text in enumerate(texts, 1):
        assert any(
            f"{k} {word} {pages}" in text or f"{k}/{pages}" in text or f"{k} / {pages}" in text
            for word in ("of", "von", "van")
        ), text[-200:]


@pytest.mark.parametrize("layout", ["classic", "german", "compact"])
def test_twenty_plus_pages(layout):
    data, truth = make_invoice(2, layout, pages=22)
    assert len(page_texts(data)) == 22
    assert len(truth.line_items) > 300
    assert check_invoice(truth) == []


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="layout"):
        make_invoice(1, "baroque")
    with pytest.raises(ValueError, match="defect"):
        make_invoice(1, defect="coffee_stain")
    with pytest.raises(ValueError, match="pages"):
        make_invoice(1, pages=0)


def test_write_samples_names_truth_and_one_defect(tmp_path):
    paths = write_samples(tmp_path / "pdf", 8, seed=40, expected_folder=tmp_path / "truth")
    assert [p.name for p in paths] == [
        "invoice-0001-classic.pdf",
        "invoice-0002-modern.pdf",
        "invoice-0003-german.pdf",
        "invoice-0004-compact-total-mismatch.pdf",
        "invoice-0005-french.pdf",
        "invoice-0006-dutch.pdf",
        "invoice-0007-classic.pdf",
        "invoice-0008-modern.pdf",
    ]
    flagged = []
    for path in paths:
        truth = Invoice.model_validate_json((tmp_path / "truth" / f"{path.stem}.json").read_text())
        if check_invoice(truth):
            flagged.append(path.name)
    assert flagged == ["invoice-0004-compact-total-mismatch.pdf"]
    assert write_samples(tmp_path / "again", 8, seed=40)[3].read_bytes() == paths[3].read_bytes()


def test_command_line_regenerates_a_set(tmp_path, capsys):
    assert (
        main(
            [
                str(tmp_path / "out"),
                "--count",
                "3",
                "--seed",
                "9",
                "--expected",
                str(tmp_path / "exp"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "out").glob("*.pdf"))) == 3
    assert len(list((tmp_path / "exp").glob("*.json"))) == 3
    assert "wrote 3 invoices" in capsys.readouterr().out


# -- the bundled demo set -------------------------------------------------------------------


def test_bundled_set_is_present_and_covers_every_layout():
    pdfs = sorted(BUNDLED.glob("*.pdf"))
    truths = sorted(EXPECTED.glob("*.json"))
    assert len(pdfs) == 12
    assert [p.stem for p in pdfs] == [t.stem for t in truths]
    assert {layout for layout in LAYOUTS if any(f"-{layout}" in p.stem for p in pdfs)} == set(
        LAYOUTS
    )
    assert [p.name for p in pdfs if "mismatch" in p.name] == [
        "invoice-0004-compact-total-mismatch.pdf"
    ]
    for pdf in pdfs:
        assert pdf.stat().st_size < 8_000


def test_bundled_set_is_readable_and_its_truth_checks_out():
    flagged = []
    for pdf in sorted(BUNDLED.glob("*.pdf")):
        data = pdf.read_bytes()
        texts = page_texts(data)
        assert texts and all(t.strip() for t in texts)
        truth = Invoice.model_validate_json((EXPECTED / f"{pdf.stem}.json").read_text())
        assert truth.invoice_number in texts[0]
        problems = check_invoice(truth)
        if problems:
            flagged.append((pdf.name, [p.split(":")[0] for p in problems]))
    assert flagged == [("invoice-0004-compact-total-mismatch.pdf", ["total_mismatch"])]


def test_bundled_set_is_what_the_generator_makes(tmp_path):
    """`python -m testing.samples samples/invoices --count 12 --seed 0 --expected samples/expected`
    regenerates the committed set (compared by truth and text, not bytes, so a PyMuPDF
    patch release that serializes differently does not fail this)."""
    paths = write_samples(tmp_path / "pdf", 12, seed=0, expected_folder=tmp_path / "exp")
    for path in paths:
        assert json.loads((EXPECTED / f"{path.stem}.json").read_text()) == json.loads(
            (tmp_path / "exp" / f"{path.stem}.json").read_text()
        )
        assert page_texts((BUNDLED / path.name).read_bytes()) == page_texts(path.read_bytes())
