"""Field validation (IBAN, VAT id, currency, dates) and check_invoice's reasons, both ways."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest

from tasks.checks import (
    ISO4217_CODES,
    TOLERANCE,
    VAT_FORMATS,
    bic_is_valid,
    check_invoice,
    due_date_problem,
    format_iban,
    iban_from_bban,
    iban_is_valid,
    iban_problem,
    is_iso4217,
    issue_date_problem,
    tax_id_problem,
    vat_id_is_valid,
    vat_id_problem,
)
from tasks.invoice import Invoice, LineItem
from testing.samples import LAYOUTS, make_invoice

TODAY = date(2026, 11, 23)
D = Decimal

# -- IBAN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 00",
        "GB82 WEST 1234 5698 7654 32",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91 ABNA 0417 1643 00",
        "BE68 5390 0754 7034",
        "AT61 1904 3002 3457 3201",
        "CH93 0076 2011 6238 5295 7",
        "IE29 AIBK 9311 5212 3456 78",
        "ES91 2100 0418 4502 0005 1332",
        "IT60 X054 2811 1010 0000 0123 456",
        "NO93 8601 1117 947",
        "DE89370400440532013000",  # no spaces
        "de89 3704 0044 0532 0130 00",  # lower case
        "DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000",  # non-breaking spaces from a PDF
    ],
)
def test_valid_ibans_pass(iban):
    assert iban_is_valid(iban)
    assert iban_problem(iban) is None


@pytest.mark.parametrize(
    ("iban", "why"),
    [
        ("DE88 3704 0044 0532 0130 00", "check digits"),  # wrong check digits
        ("DE89 3704 0044 0532 0103 00", "check digits"),  # two neighbours swapped
        ("DE89 3704 0044 0532 0130 08", "check digits"),  # one digit misread
        ("GB82 WEST 1234 5698 7654 33", "check digits"),
        ("DE89 3704 0044 0532 0130 0", "21 characters, DE IBANs have 22"),  # too short
        ("NL91 ABNA 0417 1643 001", "19 characters, NL IBANs have 18"),  # too long
        ("BE68 5390 0754 70", "BE IBANs have 16"),
        ("XX89 3704 0044 0532 0130 00", "country code XX"),  # unknown country
        ("US12 3456 7890 1234 5678 90", "country code US"),  # no IBANs in the US
        ("", "empty"),
        ("not an iban", "9 characters, NO IBANs have 15"),  # spaces go, "NO" is Norway
        ("n/a", "letters and digits"),
        ("DE89-3704-0044-0532-0130-00", "letters and digits"),
        ("12345678901234567890", "country code"),
        ("DEAB 3704 0044 0532 0130 00", "check digits"),
    ],
)
def test_invalid_ibans_fail_with_a_reason(iban, why):
    assert not iban_is_valid(iban)
    assert why in iban_problem(iban)


@pytest.mark.parametrize(
    ("country", "bban", "iban"),
    [
        ("DE", "370400440532013000", "DE89370400440532013000"),
        ("GB", "WEST12345698765432", "GB82WEST12345698765432"),
        ("BE", "539007547034", "BE68539007547034"),
        ("NL", "ABNA0417164300", "NL91ABNA0417164300"),
    ],
)
def test_iban_from_bban_computes_the_check_digits(country, bban, iban):
    assert iban_from_bban(country, bban) == iban
    assert format_iban(iban) in (
        "DE89 3704 0044 0532 0130 00",
        "GB82 WEST 1234 5698 7654 32",
        "BE68 5390 0754 7034",
        "NL91 ABNA 0417 1643 00",
    )


@pytest.mark.parametrize(
    ("bic", "ok"),
    [
        ("COBADEFFXXX", True),
        ("ABNANL2A", True),
        ("DEUT DE FF", True),
        ("COBADEFF12", False),
        ("COBA1EFF", False),
        ("", False),
    ],
)
def test_bic_shape(bic, ok):
    assert bic_is_valid(bic) is ok


# -- VAT ids ---------------------------------------------------------------------------------


VALID_VAT_IDS = [
    "ATU12345678",
    "BE0123456789",
    "BE1234567890",
    "BG123456789",
    "BG1234567890",
    "CY12345678L",
    "CZ12345678",
    "CZ1234567890",
    "DE123456789",
    "DK12345678",
    "EE123456789",
    "EL123456789",
    "ESA1234567B",
    "ESX12345678",
    "ES12345678Z",
    "FI12345678",
    "FR12345678901",
    "FRAB123456789",
    "HR12345678901",
    "HU12345678",
    "IE1234567T",
    "IE1234567WA",
    "IE8Z49289F",
    "IT12345678901",
    "LT123456789",
    "LT123456789012",
    "LU12345678",
    "LV12345678901",
    "MT12345678",
    "NL123456789B01",
    "PL1234567890",
    "PT123456789",
    "RO12",
    "RO1234567890",
    "SE123456789001",
    "SI12345678",
    "SK1234567890",
    "XI123456789",
    "GB123456789",
    "GB123456789012",
    "GBGD123",
    "GBHA567",
    "CHE-123.456.789 MWST",
    "CHE-123.456.789 TVA",
    "CHE-123.456.789 IVA",
    "CHE-123.456.789",
    "NO123456789MVA",
    "NO123456789",
    # as printed: spaces, dots, dashes, lower case
    "DE 123 456 789",
    "nl 1234.56789 b01",
    "FR 12 345 678 901",
    "AT U12345678",
    "BE 0123.456.789",
]


@pytest.mark.parametrize("vat_id", VALID_VAT_IDS)
def test_valid_vat_ids_pass(vat_id):
    assert vat_id_problem(vat_id) is None
    assert vat_id_is_valid(vat_id)


@pytest.mark.parametrize(
    ("vat_id", "why"),
    [
        ("ATU1234567", "AT format"),
        ("AT12345678", "AT format"),
        ("BE2123456789", "BE format"),
        ("BE123456789", "BE format"),
        ("BG12345678", "BG format"),
        ("CY123456789", "CY format"),
        ("CZ1234567", "CZ format"),
        ("DE12345678", "DE format"),
        ("DE1234567890", "DE format"),
        ("DEX23456789", "DE format"),
        ("DK1234567", "DK format"),
        ("EE12345678", "EE format"),
        ("ES123456789", "ES format"),
        ("ES12345678", "ES format"),
        ("FI123456789", "FI format"),
        ("FR1234567890", "FR format"),
        ("FRIO123456789", "FR format"),
        ("HR1234567890", "HR format"),
        ("HU1234567", "HU format"),
        ("IE1234567Z", "IE format"),
        ("IE123456T", "IE format"),
        ("IT1234567890", "IT format"),
        ("LT1234567890", "LT format"),
        ("LU123456789", "LU format"),
        ("LV1234567890", "LV format"),
        ("MT1234567", "MT format"),
        ("NL123456789A01", "NL format"),
        ("NL123456789B1", "NL format"),
        ("NL12345678B01", "NL format"),
        ("PL123456789", "PL format"),
        ("PT12345678", "PT format"),
        ("RO1", "RO format"),
        ("RO12345678901", "RO format"),
        ("SE123456789012", "SE format"),
        ("SI123456789", "SI format"),
        ("SK123456789", "SK format"),
        ("XI12345678", "XI format"),
        ("GB12345678", "GB format"),
        ("GBGD567", "GB format"),
        ("GBHA123", "GB format"),
        ("CHE-123.456.78 MWST", "CH format"),
        ("CHE-123.456.789 VAT", "CH format"),
        ("CH123456789", "CH format"),
        ("NO12345678MVA", "NO format"),
        ("NO123456789VAT", "NO format"),
        ("GR123456789", "prefix EL"),
        ("US123456789", "unknown format"),
        ("XX123", "unknown format"),
        ("JP1234567890123", "unknown format"),
        ("123456789", "country prefix"),
        ("", "empty"),
    ],
)
def test_invalid_vat_ids_fail_with_a_reason(vat_id, why):
    assert not vat_id_is_valid(vat_id)
    assert why in vat_id_problem(vat_id)


def test_every_eu_member_state_has_a_format():
    eu = {
        "AT",
        "BE",
        "BG",
        "CY",
        "CZ",
        "DE",
        "DK",
        "EE",
        "EL",
        "ES",
        "FI",
        "FR",
        "HR",
        "HU",
        "IE",
        "IT",
        "LT",
        "LU",
        "LV",
        "MT",
        "NL",
        "PL",
        "PT",
        "RO",
        "SE",
        "SI",
        "SK",
    }
    assert eu | {"XI", "GB", "CH", "NO"} == set(VAT_FORMATS)


@pytest.mark.parametrize(
    ("tax_id", "ok"),
    [
        ("12-3456789", True),  # US EIN: a tax id, no VAT
        ("DE123456789", True),
        ("123456789", False),
        ("12-345678", False),
        ("DE12345678", False),
    ],
)
def test_issuer_tax_id_accepts_a_us_ein(tax_id, ok):
    assert (tax_id_problem(tax_id) is None) is ok


# -- currency --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["EUR", "USD", "GBP", "CHF", "JPY", "SEK", "PLN", "XCG", "ZWG", "SLE", "XAF", "XAU"]
)
def test_iso4217_codes_pass(code):
    assert is_iso4217(code)


@pytest.mark.parametrize(
    "code", ["eur", "EURO", "€", " EUR", "EU", "DEM", "FRF", "HRK", "ANG", "ZWL", "XYZ", "", "US$"]
)
def test_non_codes_and_withdrawn_codes_fail(code):
    assert not is_iso4217(code)


def test_the_iso4217_list_is_complete_and_well_formed():
    assert len(ISO4217_CODES) == 178
    assert all(len(c) == 3 and c.isalpha() and c.isupper() for c in ISO4217_CODES)


# -- dates -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("issue", "ok"),
    [
        (date(1990, 1, 1), True),
        (date(2024, 6, 30), True),
        (TODAY, True),
        (TODAY + timedelta(days=1), True),  # tomorrow: the issuer's time zone
        (date(1989, 12, 31), False),
        (date(1925, 3, 12), False),
        (TODAY + timedelta(days=2), False),
        (date(2062, 11, 23), False),
    ],
)
def test_issue_date_window(issue, ok):
    assert (issue_date_problem(issue, TODAY) is None) is ok


@pytest.mark.parametrize(
    ("due", "issue", "ok"),
    [
        (date(2026, 1, 31), date(2026, 1, 1), True),
        (date(2026, 1, 1) + timedelta(days=400), date(2026, 1, 1), True),
        (date(2026, 1, 1) + timedelta(days=401), date(2026, 1, 1), False),
        (date(2025, 12, 1), date(2026, 1, 1), True),  # before issue: due_before_issue's business
        (date(2026, 12, 1), None, True),
        (TODAY + timedelta(days=401), None, True),
        (TODAY + timedelta(days=402), None, False),
        (date(1989, 12, 31), None, False),
    ],
)
def test_due_date_window(due, issue, ok):
    assert (due_date_problem(due, issue, TODAY) is None) is ok


# -- check_invoice ---------------------------------------------------------------------------


def invoice(**changes) -> Invoice:
    """A correct invoice (every check passes), with `changes` applied."""
    fields = dict(
        vendor_name="Müller Beratung GmbH",
        vendor_tax_id="DE123456789",
        iban="DE89370400440532013000",
        bic="COBADEFFXXX",
        customer_name="Contoso Ltd",
        invoice_number="RE-2026-0042",
        issue_date=date(2026, 10, 1),
        due_date=date(2026, 10, 31),
        currency="EUR",
        subtotal=D("150.00"),
        tax=D("28.50"),
        total=D("178.50"),
        line_items=[
            LineItem(
                description="Beratung", quantity=D(1), unit_price=D("100.00"), amount=D("100.00")
            ),
            LineItem(
                description="Anfahrt", quantity=D(1), unit_price=D("50.00"), amount=D("50.00")
            ),
        ],
    )
    fields.update(changes)
    return Invoice(**fields)


def codes(problems: list[str]) -> list[str]:
    return [p.split(":")[0] for p in problems]


def test_a_correct_invoice_passes():
    assert check_invoice(invoice(), today=TODAY) == []


def test_optional_fields_are_only_checked_when_present():
    bare = Invoice(invoice_number="1", total=D("10.00"))
    assert check_invoice(bare, today=TODAY) == []
    assert (
        check_invoice(
            invoice(
                iban=None,
                bic=None,
                vendor_tax_id=None,
                currency=None,
                issue_date=None,
                due_date=None,
            ),
            today=TODAY,
        )
        == []
    )


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"total": None}, ["missing_total"]),
        ({"invoice_number": None}, ["missing_invoice_number"]),
        ({"subtotal": D("149.00"), "total": D("177.50")}, ["lines_sum_mismatch"]),
        ({"total": D("178.60")}, ["total_mismatch"]),
        ({"due_date": date(2026, 9, 30)}, ["due_before_issue"]),
        (
            {"issue_date": date(1989, 12, 31), "due_date": date(1990, 1, 30)},
            ["issue_date_implausible"],
        ),
        ({"issue_date": date(1989, 12, 31)}, ["issue_date_implausible", "due_date_implausible"]),
        (
            {"issue_date": TODAY + timedelta(days=2), "due_date": TODAY + timedelta(days=32)},
            ["issue_date_implausible"],
        ),
        ({"due_date": date(2026, 10, 1) + timedelta(days=401)}, ["due_date_implausible"]),
        ({"issue_date": None, "due_date": date(1970, 1, 1)}, ["due_date_implausible"]),
        ({"currency": "EURO"}, ["unknown_currency"]),
        ({"currency": "€"}, ["unknown_currency"]),
        ({"iban": "DE88370400440532013000"}, ["iban_invalid"]),
        ({"iban": "DE8937040044053201300"}, ["iban_invalid"]),
        ({"iban": "XX89370400440532013000"}, ["iban_invalid"]),
        ({"vendor_tax_id": "DE12345678"}, ["vat_id_invalid"]),
        ({"vendor_tax_id": "US123456789"}, ["vat_id_invalid"]),
        ({"vendor_tax_id": "12-3456789"}, []),  # a US EIN
        ({"vendor_tax_id": "CHE-123.456.789 MWST", "currency": "CHF"}, []),
        ({"iban": "DE89 3704 0044 0532 0130 00"}, []),  # as printed, spaces and all
    ],
)
def test_each_check_fails_on_its_own(changes, expected):
    assert codes(check_invoice(invoice(**changes), today=TODAY)) == expected


def test_reasons_are_code_colon_message():
    (reason,) = check_invoice(invoice(iban="DE88370400440532013000"), today=TODAY)
    assert reason.startswith("iban_invalid: ") and "DE88370400440532013000" in reason


@pytest.mark.parametrize(
    ("drift", "flagged"),
    [
        (D("0"), False),
        (TOLERANCE, False),
        (-TOLERANCE, False),
        (TOLERANCE + D("0.01"), True),
        (-TOLERANCE - D("0.01"), True),
    ],
)
def test_totals_and_line_sums_allow_rounding(drift, flagged):
    total_drift = invoice(total=D("178.50") + drift)
    assert ("total_mismatch" in codes(check_invoice(total_drift, today=TODAY))) is flagged
    lines_drift = invoice(subtotal=D("150.00") + drift, total=D("178.50") + drift)
    assert ("lines_sum_mismatch" in codes(check_invoice(lines_drift, today=TODAY))) is flagged


def test_rounded_lines_within_tolerance_pass():
    # three lines of 1/3 each, rounded per line: 0.33 * 3 = 0.99, printed subtotal 1.00
    lines = [
        LineItem(description=f"Item {k}", quantity=D(1), unit_price=D("0.33"), amount=D("0.33"))
        for k in range(3)
    ]
    assert (
        check_invoice(
            invoice(line_items=lines, subtotal=D("1.00"), tax=D("0.19"), total=D("1.19")),
            today=TODAY,
        )
        == []
    )


def test_a_credit_note_with_negative_amounts_passes():
    credit = invoice(
        invoice_number="GS-2026-0007",
        subtotal=D("-150.00"),
        tax=D("-28.50"),
        total=D("-178.50"),
        line_items=[
            LineItem(
                description="Gutschrift Beratung",
                quantity=D(-1),
                unit_price=D("100.00"),
                amount=D("-100.00"),
            ),
            LineItem(
                description="Gutschrift Anfahrt",
                quantity=D(1),
                unit_price=D("-50.00"),
                amount=D("-50.00"),
            ),
        ],
    )
    assert check_invoice(credit, today=TODAY) == []
    # a credit note's rounding tolerance works both ways too
    assert check_invoice(credit.model_copy(update={"total": D("-178.52")}), today=TODAY) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"total": D("178.50")}, ["total_mismatch"]),  # the minus sign of the total lost
        ({"tax": D("28.50")}, ["total_mismatch"]),  # ... or of the tax
        (
            {"subtotal": D("150.00")},
            ["lines_sum_mismatch", "total_mismatch"],
        ),  # ... or of the subtotal
    ],
)
def test_a_credit_note_with_a_lost_minus_sign_is_flagged(changes, expected):
    credit = invoice(
        subtotal=D("-150.00"),
        tax=D("-28.50"),
        total=D("-178.50"),
        line_items=[
            LineItem(
                description="Gutschrift",
                quantity=D(1),
                unit_price=D("-150.00"),
                amount=D("-150.00"),
            )
        ],
    )
    assert check_invoice(credit, today=TODAY) == []
    assert codes(check_invoice(credit.model_copy(update=changes), today=TODAY)) == expected


def test_every_problem_is_listed_not_just_the_first():
    bad = invoice(
        invoice_number=None,
        subtotal=D("140.00"),
        total=D("200.00"),
        issue_date=date(2031, 1, 1),
        due_date=date(2032, 6, 1),
        currency="EURO",
        iban="DE00370400440532013000",
        vendor_tax_id="DE1234",
    )
    problems = check_invoice(bad, today=TODAY)
    assert codes(problems) == [
        "missing_invoice_number",
        "lines_sum_mismatch",
        "total_mismatch",
        "issue_date_implausible",
        "due_date_implausible",
        "unknown_currency",
        "iban_invalid",
        "vat_id_invalid",
    ]
    assert all(": " in p for p in problems)
    assert codes(check_invoice(invoice(total=None, due_date=date(2026, 1, 1)), today=TODAY)) == [
        "missing_total",
        "due_before_issue",
    ]


def test_today_defaults_to_the_real_date():
    tomorrow_plus_one = date.today() + timedelta(days=2)
    future = invoice(issue_date=tomorrow_plus_one, due_date=tomorrow_plus_one + timedelta(days=30))
    assert codes(check_invoice(future)) == ["issue_date_implausible"]
    assert check_invoice(future, today=tomorrow_plus_one) == []


# -- the sample generator's invoices pass ----------------------------------------------------


def test_sixty_generated_invoices_pass_every_check():
    with_bank = set()
    for seed in range(60):
        _data, truth = make_invoice(seed)  # cycles through every layout
        assert check_invoice(truth) == [], (seed, check_invoice(truth))
        assert check_invoice(truth, today=TODAY) == []
        assert tax_id_problem(truth.vendor_tax_id) is None, truth.vendor_tax_id
        assert is_iso4217(truth.currency)
        if truth.iban is not None:
            assert iban_is_valid(truth.iban) and truth.iban == truth.iban.replace(" ", "").upper()
            assert truth.bic is not None and bic_is_valid(truth.bic)
            assert truth.bic[4:6] == truth.iban[:2]  # the bank is in the IBAN's country
            with_bank.add(LAYOUTS[seed % len(LAYOUTS)])
    assert with_bank == {"german", "dutch"}
