"""The checks that make an extraction safe to pay from: single fields (IBAN, BIC, VAT id,
currency code, dates) and the whole invoice (`check_invoice`).

An extraction is only safe to pay from when the numbers a payment is built from are the ones
the issuer printed. A misread digit in an IBAN, a VAT id lifted from the wrong block or a date
parsed in the wrong order all look like perfectly good strings, so every check here asks
"could this value exist at all?", with no network look-up: the IBAN's mod-97 check digits,
the official per-country VAT id formats (as VIES publishes them), the ISO 4217 list and a
sanity window for dates. A value that fails is not necessarily fraud, only not trustworthy
enough to pay without a human look.

All functions are pure. The `*_problem` functions return a short human reason (or None when
the value passes); the `*_is_valid` functions are their boolean forms. `check_invoice` runs them
all, with the invoice-level checks (arithmetic, dates, ids), over one extracted `Invoice` and
lists every reason it needs a human look before it is paid, each as "code: message" with a
stable code (the pipeline records them as the needs_review reasons). Amounts may be negative
(credit notes carry negative subtotal, tax, total and line amounts): every check is a signed
comparison, so a credit note whose signs agree passes.

This module is the only copy of these tables and checks: the rule-based extractor
(`tasks.extract.rules`) reads IBAN lengths, the mod-97 check, the BIC shape and the VAT id
formats from here, so what it finds and what is validated cannot disagree. It imports nothing
from the project at run time (the `Invoice` import is for type annotations only).
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.invoice import Invoice

# --------------------------------------------------------------------------------------------
# IBAN (ISO 13616)
# --------------------------------------------------------------------------------------------

# Total IBAN length per country, from the SWIFT IBAN registry: every SEPA country plus the
# other registered ones. A country missing here has no IBAN, so its "IBAN" cannot be valid.
IBAN_LENGTHS: dict[str, int] = {
    "AD": 24,
    "AE": 23,
    "AL": 28,
    "AT": 20,
    "AZ": 28,
    "BA": 20,
    "BE": 16,
    "BG": 22,
    "BH": 22,
    "BI": 27,
    "BR": 29,
    "BY": 28,
    "CH": 21,
    "CR": 22,
    "CY": 28,
    "CZ": 24,
    "DE": 22,
    "DJ": 27,
    "DK": 18,
    "DO": 28,
    "EE": 20,
    "EG": 29,
    "ES": 24,
    "FI": 18,
    "FK": 18,
    "FO": 18,
    "FR": 27,
    "GB": 22,
    "GE": 22,
    "GI": 23,
    "GL": 18,
    "GR": 27,
    "GT": 28,
    "HN": 28,
    "HR": 21,
    "HU": 28,
    "IE": 22,
    "IL": 23,
    "IQ": 23,
    "IS": 26,
    "IT": 27,
    "JO": 30,
    "KW": 30,
    "KZ": 20,
    "LB": 28,
    "LC": 32,
    "LI": 21,
    "LT": 20,
    "LU": 20,
    "LV": 21,
    "LY": 25,
    "MC": 27,
    "MD": 24,
    "ME": 22,
    "MK": 19,
    "MN": 20,
    "MR": 27,
    "MT": 31,
    "MU": 30,
    "NI": 28,
    "NL": 18,
    "NO": 15,
    "OM": 23,
    "PK": 24,
    "PL": 28,
    "PS": 29,
    "PT": 25,
    "QA": 29,
    "RO": 24,
    "RS": 22,
    "RU": 33,
    "SA": 24,
    "SC": 31,
    "SD": 18,
    "SE": 24,
    "SI": 19,
    "SK": 24,
    "SM": 27,
    "SO": 23,
    "ST": 25,
    "SV": 28,
    "TL": 23,
    "TN": 24,
    "TR": 26,
    "UA": 29,
    "VA": 22,
    "VG": 24,
    "XK": 20,
    "YE": 30,
}


def normalize_iban(iban: str) -> str:
    """The IBAN as stored and compared: whitespace removed, upper-cased.

    IBANs are printed in groups of four ("DE89 3704 ..."), sometimes with non-breaking spaces
    from a PDF's text layer; none of that is part of the number.
    """
    return "".join(iban.split()).upper()


def _mod97(alnum: str) -> int:
    """ISO 7064 MOD 97-10 over an alphanumeric string (A=10 ... Z=35), as IBANs use it."""
    return int("".join(str(int(ch, 36)) for ch in alnum)) % 97


def iban_problem(iban: str) -> str | None:
    """Why `iban` cannot be a valid IBAN, or None if it passes.

    Checks, in order: only letters and digits, a known country prefix, that country's exact
    length, and the mod-97 check digits (which catch every single-character misread and
    almost every swap of two neighbours, the errors OCR and manual copying make).
    """
    value = normalize_iban(iban)
    if not value:
        return "empty IBAN"
    if not re.fullmatch(r"[A-Z0-9]+", value):
        return f"{value!r} has characters other than letters and digits"
    country = value[:2]
    if not re.fullmatch(r"[A-Z]{2}", country):
        return f"{value!r} does not start with a country code"
    if country not in IBAN_LENGTHS:
        return f"{value!r}: no IBANs are issued for country code {country}"
    if len(value) != IBAN_LENGTHS[country]:
        return (
            f"{value!r} has {len(value)} characters, {country} IBANs have {IBAN_LENGTHS[country]}"
        )
    if not value[2:4].isdigit():
        return f"{value!r}: check digits {value[2:4]!r} are not digits"
    if _mod97(value[4:] + value[:4]) != 1:
        return f"{value!r}: check digits do not match (mod 97)"
    return None


def iban_is_valid(iban: str) -> bool:
    """True when `iban` (spaces allowed, any case) has its country's length and passes mod 97."""
    return iban_problem(iban) is None


def iban_checksum_ok(iban: str) -> bool:
    """The check digits alone: an IBAN's shape (country letters, two check digits, 11 to 30
    letters or digits) whose mod 97 leaves 1, with no country or length check.

    What the extractor asks of an IBAN found in running text (it checks the country's length
    itself, where IBAN_LENGTHS knows the country); `iban_problem` is the whole check.
    """
    value = normalize_iban(iban)
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", value):
        return False
    return _mod97(value[4:] + value[:4]) == 1


def iban_from_bban(country: str, bban: str) -> str:
    """Build the IBAN for a national account number (BBAN): compute the two check digits.

    Used by the sample generator (and tests) to make IBANs that are valid by construction.
    """
    country, bban = country.upper(), normalize_iban(bban)
    check = 98 - _mod97(bban + country + "00")
    return f"{country}{check:02d}{bban}"


def format_iban(iban: str) -> str:
    """Print form: groups of four ("DE89 3704 0044 0532 0130 00")."""
    value = normalize_iban(iban)
    return " ".join(value[i : i + 4] for i in range(0, len(value), 4))


# BIC (ISO 9362): 4 bank letters, 2 country letters, 2 location characters, optional 3-char branch.
BIC_RE = re.compile(r"[A-Z]{4}[A-Z]{2}[A-Z0-9]{2}(?:[A-Z0-9]{3})?")


def bic_is_valid(bic: str) -> bool:
    """True when `bic` has the ISO 9362 shape (8 or 11 characters). Format only: whether the
    bank exists needs the SWIFT directory."""
    return bool(BIC_RE.fullmatch("".join(bic.split()).upper()))


# --------------------------------------------------------------------------------------------
# VAT ids
# --------------------------------------------------------------------------------------------

# Country prefix -> (pattern of what follows the prefix, human description). EU formats as
# published for VIES (Greece uses EL, Northern Ireland XI), plus GB, CH and NO. Format only:
# whether the number is registered needs VIES / the national registers.
VAT_FORMATS: dict[str, tuple[str, str]] = {
    "AT": (r"U\d{8}", "U + 8 digits"),
    "BE": (r"[01]\d{9}", "0 or 1 + 9 digits"),
    "BG": (r"\d{9,10}", "9 or 10 digits"),
    "CY": (r"\d{8}[A-Z]", "8 digits + 1 letter"),
    "CZ": (r"\d{8,10}", "8, 9 or 10 digits"),
    "DE": (r"\d{9}", "9 digits"),
    "DK": (r"\d{8}", "8 digits"),
    "EE": (r"\d{9}", "9 digits"),
    "EL": (r"\d{9}", "9 digits"),
    "ES": (
        r"[A-Z]\d{7}[A-Z0-9]|\d{8}[A-Z]",
        "9 characters, first or last a letter, 7 digits between",
    ),
    "FI": (r"\d{8}", "8 digits"),
    "FR": (r"[0-9A-HJ-NP-Z]{2}\d{9}", "2 digits or letters (not I or O) + 9 digits"),
    "HR": (r"\d{11}", "11 digits"),
    "HU": (r"\d{8}", "8 digits"),
    "IE": (
        r"\d{7}[A-W][A-IW]?|\d[A-Z+*]\d{5}[A-W]",
        "7 digits + 1 or 2 letters, or digit, letter, 5 digits, letter",
    ),
    "IT": (r"\d{11}", "11 digits"),
    "LT": (r"\d{9}|\d{12}", "9 or 12 digits"),
    "LU": (r"\d{8}", "8 digits"),
    "LV": (r"\d{11}", "11 digits"),
    "MT": (r"\d{8}", "8 digits"),
    "NL": (r"\d{9}B\d{2}", "9 digits + B + 2 digits"),
    "PL": (r"\d{10}", "10 digits"),
    "PT": (r"\d{9}", "9 digits"),
    "RO": (r"\d{2,10}", "2 to 10 digits"),
    "SE": (r"\d{10}01", "12 digits ending in 01"),
    "SI": (r"\d{8}", "8 digits"),
    "SK": (r"\d{10}", "10 digits"),
    "XI": (
        r"\d{9}|\d{12}|GD[0-4]\d{2}|HA[5-9]\d{2}",
        "9 or 12 digits, GD + 3 digits or HA + 3 digits",
    ),
    "GB": (
        r"\d{9}|\d{12}|GD[0-4]\d{2}|HA[5-9]\d{2}",
        "9 or 12 digits, GD + 3 digits or HA + 3 digits",
    ),
    # Swiss UID "CHE-123.456.789" with the VAT register's suffix (MWST / TVA / IVA); the bare
    # UID (no suffix) identifies the same company and is accepted too.
    "CH": (r"E\d{9}(?:MWST|TVA|IVA)?", "CHE + 9 digits + MWST, TVA or IVA"),
    # Norwegian organisation number, "MVA" when VAT-registered.
    "NO": (r"\d{9}(?:MVA)?", "9 digits + MVA"),
}


# The table compiled once: prefix -> what follows it, matched whole.
_VAT_BODY_RES: dict[str, re.Pattern[str]] = {
    prefix: re.compile(pattern) for prefix, (pattern, _) in VAT_FORMATS.items()
}


def normalize_vat_id(vat_id: str) -> str:
    """The VAT id as compared: spaces, dots and dashes removed, upper-cased.

    "CHE-123.456.789 MWST" -> "CHE123456789MWST", "de 123 456 789" -> "DE123456789".
    """
    return re.sub(r"[\s.\-\u2010-\u2015]", "", vat_id).upper()


def vat_id_problem(vat_id: str) -> str | None:
    """Why `vat_id` does not have the format of its country's VAT ids, or None if it does.

    The id must start with a country prefix this module knows (all EU member states as VIES
    writes them, XI, GB, CH, NO); an unknown prefix is reported rather than passed, since a
    prefix we cannot check is as untrustworthy as one that fails.
    """
    value = normalize_vat_id(vat_id)
    if not value:
        return "empty VAT id"
    prefix = value[:2]
    if not re.fullmatch(r"[A-Z]{2}", prefix):
        return f"{vat_id!r} does not start with a country prefix"
    if prefix == "GR":
        return f"{vat_id!r}: Greek VAT ids use the prefix EL, not GR"
    if prefix not in VAT_FORMATS:
        return f"{vat_id!r}: unknown format (no VAT id format known for prefix {prefix})"
    if not _VAT_BODY_RES[prefix].fullmatch(value[2:]):
        return (
            f"{vat_id!r} does not match the {prefix} format ({prefix} + {VAT_FORMATS[prefix][1]})"
        )
    return None


def vat_id_is_valid(vat_id: str) -> bool:
    """True when `vat_id` has the official format for its country prefix."""
    return vat_id_problem(vat_id) is None


# A US Employer Identification Number as printed ("12-3456789"): a tax id, not a VAT id.
_US_EIN_RE = re.compile(r"\d{2}-\d{7}")


def tax_id_problem(tax_id: str) -> str | None:
    """Like `vat_id_problem`, but a US EIN ("12-3456789") passes.

    An invoice's issuer tax id is a VAT id wherever there is VAT; US vendors have none and
    print their EIN instead, which has a format of its own and no country prefix.
    """
    if _US_EIN_RE.fullmatch(tax_id.strip()):
        return None
    return vat_id_problem(tax_id)


# --------------------------------------------------------------------------------------------
# Currency
# --------------------------------------------------------------------------------------------

# ISO 4217 list one: every active alphabetic code, funds and precious-metal codes included
# (178 codes; XCG replaced ANG in 2025, ZWG replaced ZWL in 2024, SLE replaced SLL, XAD added 2025).
ISO4217_CODES: frozenset[str] = frozenset(
    [
        "AED",
        "AFN",
        "ALL",
        "AMD",
        "AOA",
        "ARS",
        "AUD",
        "AWG",
        "AZN",
        "BAM",
        "BBD",
        "BDT",
        "BHD",
        "BIF",
        "BMD",
        "BND",
        "BOB",
        "BOV",
        "BRL",
        "BSD",
        "BTN",
        "BWP",
        "BYN",
        "BZD",
        "CAD",
        "CDF",
        "CHE",
        "CHF",
        "CHW",
        "CLF",
        "CLP",
        "CNY",
        "COP",
        "COU",
        "CRC",
        "CUP",
        "CVE",
        "CZK",
        "DJF",
        "DKK",
        "DOP",
        "DZD",
        "EGP",
        "ERN",
        "ETB",
        "EUR",
        "FJD",
        "FKP",
        "GBP",
        "GEL",
        "GHS",
        "GIP",
        "GMD",
        "GNF",
        "GTQ",
        "GYD",
        "HKD",
        "HNL",
        "HTG",
        "HUF",
        "IDR",
        "ILS",
        "INR",
        "IQD",
        "IRR",
        "ISK",
        "JMD",
        "JOD",
        "JPY",
        "KES",
        "KGS",
        "KHR",
        "KMF",
        "KPW",
        "KRW",
        "KWD",
        "KYD",
        "KZT",
        "LAK",
        "LBP",
        "LKR",
        "LRD",
        "LSL",
        "LYD",
        "MAD",
        "MDL",
        "MGA",
        "MKD",
        "MMK",
        "MNT",
        "MOP",
        "MRU",
        "MUR",
        "MVR",
        "MWK",
        "MXN",
        "MXV",
        "MYR",
        "MZN",
        "NAD",
        "NGN",
        "NIO",
        "NOK",
        "NPR",
        "NZD",
        "OMR",
        "PAB",
        "PEN",
        "PGK",
        "PHP",
        "PKR",
        "PLN",
        "PYG",
        "QAR",
        "RON",
        "RSD",
        "RUB",
        "RWF",
        "SAR",
        "SBD",
        "SCR",
        "SDG",
        "SEK",
        "SGD",
        "SHP",
        "SLE",
        "SOS",
        "SRD",
        "SSP",
        "STN",
        "SVC",
        "SYP",
        "SZL",
        "THB",
        "TJS",
        "TMT",
        "TND",
        "TOP",
        "TRY",
        "TTD",
        "TWD",
        "TZS",
        "UAH",
        "UGX",
        "USD",
        "USN",
        "UYI",
        "UYU",
        "UYW",
        "UZS",
        "VED",
        "VES",
        "VND",
        "VUV",
        "WST",
        "XAD",
        "XAF",
        "XAG",
        "XAU",
        "XBA",
        "XBB",
        "XBC",
        "XBD",
        "XCD",
        "XCG",
        "XDR",
        "XOF",
        "XPD",
        "XPF",
        "XPT",
        "XSU",
        "XTS",
        "XUA",
        "XXX",
        "YER",
        "ZAR",
        "ZMW",
        "ZWG",
    ]
)


def is_iso4217(code: str) -> bool:
    """True when `code` is an active ISO 4217 alphabetic code, exactly (upper case, no spaces).

    The currency field is stored as the code, so "eur" or "€" is not a stored-form currency
    and a payment in a withdrawn currency (DEM, HRK) cannot be made.
    """
    return code in ISO4217_CODES


# --------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------

# Before this, a date is a misread (a year like 1925 or 0203), not an invoice still to pay.
EARLIEST_DATE = date(1990, 1, 1)
# An issue date may be tomorrow (the issuer's time zone), not later.
ISSUE_DATE_LEEWAY = timedelta(days=1)
# Payment terms beyond this (about 13 months) are a misread date, not a term.
MAX_PAYMENT_TERM = timedelta(days=400)


def issue_date_problem(issue: date, today: date) -> str | None:
    """Why `issue` is not a plausible issue date as of `today`, or None.

    A real invoice was issued between 1990-01-01 and today (one day of leeway for time zones);
    anything else is a misread date (day and month swapped, a wrong year, a delivery date
    years ahead).
    """
    if issue < EARLIEST_DATE:
        return f"issue date {issue} is before {EARLIEST_DATE}"
    if issue > today + ISSUE_DATE_LEEWAY:
        return f"issue date {issue} is in the future (today is {today})"
    return None


def due_date_problem(due: date, issue: date | None, today: date) -> str | None:
    """Why `due` is not a plausible due date, or None. A due date before the issue date is
    reported separately (`due_before_issue`) and passes here.

    With an issue date: at most 400 days after it. Without one: not before 1990-01-01 and at
    most 400 days after tomorrow.
    """
    if issue is not None:
        if due - issue > MAX_PAYMENT_TERM:
            return (
                f"due date {due} is {(due - issue).days} days after the issue date {issue} "
                f"(at most {MAX_PAYMENT_TERM.days})"
            )
        return None
    if due < EARLIEST_DATE:
        return f"due date {due} is before {EARLIEST_DATE}"
    latest = today + ISSUE_DATE_LEEWAY + MAX_PAYMENT_TERM
    if due > latest:
        return (
            f"due date {due} is after {latest}, more than {MAX_PAYMENT_TERM.days} days from today"
        )
    return None


# --------------------------------------------------------------------------------------------
# The whole invoice
# --------------------------------------------------------------------------------------------

# Amounts are printed to the cent; sums of rounded line amounts may drift by a cent or two.
TOLERANCE = Decimal("0.02")


def check_invoice(invoice: Invoice, *, today: date | None = None) -> list[str]:
    """Return the reasons this invoice needs a human look; empty means every check passed.

    Every failing check is listed (not just the first), each as "code: message":

    - missing_total, missing_invoice_number: nothing to pay, or nothing to quote with it.
    - lines_sum_mismatch: the line amounts do not add up to the subtotal (a line misread or
      missed), within TOLERANCE for per-line rounding.
    - total_mismatch: subtotal + tax is not the total, within TOLERANCE.
    - due_before_issue: the due date precedes the issue date.
    - issue_date_implausible: issued before 1990-01-01 or after tomorrow (`today` + 1 day).
    - due_date_implausible: due more than 400 days after issue (or, with no issue date,
      outside 1990-01-01 .. today + 401 days).
    - unknown_currency: the currency is not an active ISO 4217 code.
    - iban_invalid: wrong length for its country, unknown country or failed mod-97 check.
    - vat_id_invalid: the issuer's VAT id does not have its country's format, or has an
      unknown prefix (a US EIN such as 12-3456789 passes).

    Checks on optional fields (dates, currency, IBAN, VAT id) run only when the field is
    present. `today` defaults to `date.today()`; tests pass a fixed date.
    """
    today = today or date.today()
    problems: list[str] = []
    if invoice.total is None:
        problems.append("missing_total: no total amount found")
    if invoice.invoice_number is None:
        problems.append("missing_invoice_number: no invoice number found")
    amounts = [line.amount for line in invoice.line_items if line.amount is not None]
    if (
        invoice.line_items
        and invoice.subtotal is not None
        and len(amounts) == len(invoice.line_items)  # every line has an amount
    ):
        line_sum = sum(amounts, Decimal(0))
        if abs(line_sum - invoice.subtotal) > TOLERANCE:
            problems.append(
                f"lines_sum_mismatch: line amounts sum to {line_sum}, subtotal is {invoice.subtotal}"
            )
    if invoice.subtotal is not None and invoice.tax is not None and invoice.total is not None:
        expected = invoice.subtotal + invoice.tax
        if abs(expected - invoice.total) > TOLERANCE:
            problems.append(
                f"total_mismatch: subtotal {invoice.subtotal} + tax {invoice.tax} = {expected}, "
                f"total is {invoice.total}"
            )
    if invoice.issue_date and invoice.due_date and invoice.due_date < invoice.issue_date:
        problems.append(
            f"due_before_issue: due date {invoice.due_date} is before issue date {invoice.issue_date}"
        )
    if invoice.issue_date is not None:
        reason = issue_date_problem(invoice.issue_date, today)
        if reason:
            problems.append(f"issue_date_implausible: {reason}")
    if invoice.due_date is not None:
        reason = due_date_problem(invoice.due_date, invoice.issue_date, today)
        if reason:
            problems.append(f"due_date_implausible: {reason}")
    if invoice.currency is not None and not is_iso4217(invoice.currency):
        problems.append(f"unknown_currency: {invoice.currency!r} is not an ISO 4217 currency code")
    if invoice.iban is not None:
        reason = iban_problem(invoice.iban)
        if reason:
            problems.append(f"iban_invalid: {reason}")
    if invoice.vendor_tax_id is not None:
        reason = tax_id_problem(invoice.vendor_tax_id)
        if reason:
            problems.append(f"vat_id_invalid: {reason}")
    return problems
