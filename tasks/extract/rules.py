"""The offline extractor (`extract_fields`, `extract_document`, `OfflineExtractor`) reads an
invoice from its text layer with general rules, no per-vendor templates:

1. The text is cut into *cells*: lines, split further where a layout puts columns side by side
   (two or more spaces, a tab, " · ", " | "). This works both for PyMuPDF's plain text (one
   cell per line) and for its sorted, layout-preserving text (several cells per line).
2. Cells that start with a known *label* (English, German, French, Dutch and Polish synonyms,
   the longest match wins) take their value from the rest of the cell or from the following
   cell(s); a run of labels followed by a run of values (a label column printed before its
   value column) is paired in order. Every value is validated for its field (a date must
   parse as a date, an amount must look like money, a tax id like a tax id, an IBAN must have
   its country's length), otherwise it is not used. A totals line with several columns
   ("Total  24.99  5.00  29.99") gives net, tax and gross when they add up.
3. Line items come from the table under a header row whose cells are column names (Pos.,
   Description, Qty, Unit price, Amount and their synonyms), down to the totals; a row is a
   description followed by its numbers, or one line "description qty price amount".
4. A second table reader works on *positions* (`table_items_by_position`): the words of a
   parsed PDF with their boxes (`ParsedDocument.page_words`), or, for plain text, the
   characters' columns. It finds the header's columns and puts each row's numbers under them
   in order, so tables whose rows the text reader cannot cut (sub-lines, notes, discount
   columns, several pages) are read too. Its items are used when only they add up to the
   subtotal or total, or when the text reader found none. The same rows give label rows with
   their values underneath ("Invoice date  Due date" over "03/20/2023  04/04/2023"), used for
   fields still missing.
5. Parties: the vendor is the first name-like cell on the first page (or a "From/Seller"
   label); the customer the first name-like cell after a "Bill to/Rechnungsempfänger/Client/
   Klant/Nabywca" label, or after a DIN 5008 return-address line. The vendor's tax id is a
   labelled one outside the customer's block, else an unlabelled VAT id in its country's
   format. The IBAN is a labelled one, else one anywhere that passes the mod-97 check.

Document-wide hints decide what single values cannot: the decimal separator (from the money
amounts in the text), day-first or month-first dates (from unambiguous dates, the language of
the labels and the currency). Nothing is guessed: a field that is not found stays None, and
so does a total when different totals are printed and neither subtotal + tax nor the amount
due says which one is meant (a review is better than a wrong total).

The pieces are plain functions (`parse_number`, `find_amounts`, `parse_date`, `find_iban`,
`line_items_from_rows`, `table_items_by_position`, ...) so they can be tested one by one.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Literal

from tasks.checks import BIC_RE, IBAN_LENGTHS, VAT_FORMATS, iban_checksum_ok, vat_id_is_valid
from tasks.extract.base import Extraction
from tasks.invoice import Invoice, LineItem
from tasks.pdf.parse import ParsedDocument
from tasks.pdf.pool import PdfParser

# ============================================================================================
# Numbers
# ============================================================================================

CURRENCY_CODES = frozenset(
    [
        "EUR",
        "USD",
        "GBP",
        "CHF",
        "JPY",
        "CAD",
        "AUD",
        "NZD",
        "SEK",
        "NOK",
        "DKK",
        "PLN",
        "CZK",
        "HUF",
        "RON",
        "BGN",
        "ISK",
        "TRY",
        "CNY",
        "HKD",
        "SGD",
        "INR",
        "ZAR",
        "BRL",
        "MXN",
        "AED",
        "SAR",
        "ILS",
        "KRW",
        "TWD",
        "THB",
        "MYR",
        "IDR",
        "PHP",
    ]
)
ZERO_DECIMAL_CURRENCIES = frozenset({"JPY", "KRW", "ISK", "HUF"})
# Longest first: "US$" before "$".
_SYMBOLS = (
    ("US$", "USD"),
    ("CA$", "CAD"),
    ("C$", "CAD"),
    ("AU$", "AUD"),
    ("A$", "AUD"),
    ("NZ$", "NZD"),
    ("HK$", "HKD"),
    ("S$", "SGD"),
    ("R$", "BRL"),
    ("SFr.", "CHF"),
    ("Fr.", "CHF"),
    ("€", "EUR"),
    ("£", "GBP"),
    ("¥", "JPY"),
    ("₹", "INR"),
    ("Rs.", "INR"),
    ("Rs", "INR"),
    ("zł", "PLN"),
    ("Kč", "CZK"),
    ("$", "USD"),
)
_SYMBOL_CHARS = "€£¥₹$"
# (Patterns that start with a lookbehind get a lookahead for their first character in front:
# it lets the regex engine skip quickly to where a match can start, ~3x faster here.)
_CODE_RE = re.compile(
    r"(?=[A-Z])(?<![A-Za-z])(" + "|".join(sorted(CURRENCY_CODES)) + r")(?![A-Za-z])"
)
# Symbols made of letters ("Rs", "zł", "Fr.") only count as whole words: "Rs" is no rupee in "MRs".
# (Each alternative starts with its literal first character, the word-boundary check comes
# after it, so the regex engine can scan for first characters quickly.)
_SYMBOL_RE = re.compile(
    "|".join(
        (
            re.escape(s[0])
            + r"(?<![^\W\d_]"
            + re.escape(s[0])
            + ")"
            + re.escape(s[1:])
            + (r"(?![^\W\d_])" if s[-1].isalpha() else "")
        )
        if s[0].isalpha()
        else re.escape(s)
        for s, _ in _SYMBOLS
    )
)
_STRIP_CURRENCY_RE = re.compile(
    r"^\s*(?:"
    + _CODE_RE.pattern
    + "|"
    + _SYMBOL_RE.pattern
    + r")\s*|\s*(?:"
    + _CODE_RE.pattern
    + "|"
    + _SYMBOL_RE.pattern
    + r")\s*$"
)
_GROUP_CHARS = " \u00a0\u202f\u2009'’"
_NUMBER_BODY_RE = re.compile(r"\d(?:[\d.,'’ \u00a0\u202f\u2009]*\d)?")
_MINUS = "-−–"


def _strip_currency(text: str) -> str:
    previous = None
    while previous != text:
        previous = text
        text = _STRIP_CURRENCY_RE.sub("", text, count=1)
    return text.strip()


@functools.lru_cache(maxsize=16384)
def parse_number(text: str, decimal: str | None = None) -> Decimal | None:
    """Parse "1,234.56", "1.234,56", "1 234,56", "1'234.50", "EUR 12.00", "(5.00)", "-3".

    `decimal` ("." or ",") is the document's decimal separator; it is only needed for a lone
    separator followed by exactly three digits ("1,234" is 1234 in English, 1.234 in German).
    Without it such a number is ambiguous and None is returned: never a guess.
    """
    s = _strip_currency(text.strip())
    negative = False
    if s.startswith("(") and s.endswith(")"):
        negative, s = True, s[1:-1].strip()
    if s[:1] and s[0] in _MINUS:
        negative, s = True, s[1:].strip()
    elif s.startswith("+"):
        s = s[1:].strip()
    if s.endswith("-"):
        negative, s = True, s[:-1].strip()
    s = _strip_currency(s)
    if not s or not _NUMBER_BODY_RE.fullmatch(s):
        return None
    parts = re.split(r"([.,'’ \u00a0\u202f\u2009])", s)
    groups, seps = parts[0::2], parts[1::2]
    if not seps:
        value = Decimal(s)
        return -value if negative else value
    if any(not g for g in groups):
        return None
    seps = [" " if sep in _GROUP_CHARS[:4] else ("'" if sep in "'’" else sep) for sep in seps]
    last = seps[-1]
    dec_sep: str | None = None
    if last in ".,":
        others = seps[:-1]
        if last in others:
            dec_sep = None  # 1.234.567 / 1,234,567
        elif any(o in ".," for o in others):
            dec_sep = last  # both present: the last one is the decimal separator
        elif len(groups[-1]) != 3 or others or groups[0] == "0":
            dec_sep = last  # 12,5 / 1'234.567 / 0.045
        elif decimal in (".", ","):
            dec_sep = last if decimal == last else None
        else:
            return None  # "1,234": thousands or decimals? the caller did not say
    int_groups = groups[:-1] if dec_sep else groups
    group_seps = seps[:-1] if dec_sep else seps
    if group_seps:
        if len(set(group_seps)) > 1 or (dec_sep and group_seps[0] == dec_sep):
            return None
        if not 1 <= len(int_groups[0]) <= 3 or any(len(g) != 3 for g in int_groups[1:]):
            return None
    number = "".join(int_groups) + ("." + groups[-1] if dec_sep else "")
    try:
        value = Decimal(number)
    except InvalidOperation:  # pragma: no cover - the regex admits digits only
        return None
    return -value if negative else value


# A money-looking token inside a longer string: digits with separators, maybe signed.
_MONEY_TOKEN_RE = re.compile(
    r"(?=[-−(€£¥$\d])(?<![\w.,])[-−(]?\s?(?:[€£¥$]\s?)?\d"
    r"(?:[\d.,'’\u00a0\u202f\u2009]|(?<=\d) (?=\d{3}(?!\d)))*\d?\)?-?(?![\w%])"
)
_PERCENT_RE = re.compile(r"[-+]?\d+(?:[.,]\d+)?\s*%")
# The base an amount of tax is computed on: "VAT 20 % on 1,000.00", "19 % MwSt. auf 1.000,00 €"
# (prepositions in lower case only: "DE 232 446 240" is a VAT id).
_BASE_RE = re.compile(
    r"(?=[a-z])\b(?:on|of|from|auf|von|sur|de|op|van|over|od)\s+(?:[A-Z]{3}\s?|[€£¥$₹]\s?)?"
    r"\d(?:[\d.,'’\u00a0]|(?<=\d) (?=\d{3}(?!\d)))*\d"
    r"(?:\s?(?:[A-Z]{3}|[€£¥$₹]))?"
)
_MARK_BEFORE_RE = re.compile(r"(?:[€£¥$₹]|(?<![A-Za-z])(?:Rs\.?|[A-Z]{3}))\s?[-−(]?\s?$")
_MARK_AFTER_RE = re.compile(r"^\s?(?:[€£¥$₹]|(?:Rs\.?|zł|[A-Z]{3})(?![A-Za-z]))")


def _has_cents(token: str) -> bool:
    return bool(re.search(r"\d[.,]\d{2}\)?-?\s*$", token.strip()))


def _blank(regex: re.Pattern[str], text: str) -> str:
    """`text` with every match of `regex` blanked out, offsets unchanged."""
    return regex.sub(lambda m: " " * len(m.group(0)), text)


def _with_currency(text: str, start: int, end: int) -> bool:
    """Is the number at text[start:end] printed with a currency ("$ 1939", "1939 EUR", "Rs 40")?"""
    before = _MARK_BEFORE_RE.search(text[max(0, start - 6) : start])
    after = _MARK_AFTER_RE.match(text[end : end + 5])
    for mark in (before, after):
        if mark:
            code = re.search(r"[A-Z]{3}", mark.group(0))
            if code is None or code.group(0) in CURRENCY_CODES:
                return True
    return False


def find_amounts(
    text: str, decimal: str | None = None, *, currency: str | None = None
) -> list[Decimal]:
    """Every money amount in `text`, in order, skipping percentages and the base of a tax
    ("VAT 20 % on 1,000.00: 200.00" -> [200.00]).

    Amounts are printed to the cent; a whole number counts only when a currency is printed
    with it ("Rs 1939", "1939 €") or for currencies without cents (JPY...), so "Net 30" or
    "Page 2" never pass as amounts.
    """
    cleaned = _blank(_BASE_RE, text)
    cleaned = _blank(_PERCENT_RE, cleaned)
    with_codes = cleaned
    cleaned = _blank(_CODE_RE, cleaned)
    values = []
    for match in _MONEY_TOKEN_RE.finditer(cleaned):
        token = match.group(0).strip()
        value = parse_number(token, decimal)
        if value is None:
            continue
        if (
            _has_cents(token)
            or currency in ZERO_DECIMAL_CURRENCIES
            or _with_currency(with_codes, match.start(), match.end())
        ):
            values.append(value)
    return values


def find_amount(
    text: str, decimal: str | None = None, *, currency: str | None = None
) -> Decimal | None:
    """The first money amount in `text` (see `find_amounts`)."""
    values = find_amounts(text, decimal, currency=currency)
    return values[0] if values else None


def decimal_separator(text: str) -> str | None:
    """The document's decimal separator, from its amounts printed to the cent; None if unsure."""
    counts = Counter(
        m.group(1)
        for m in re.finditer(r"(?<![\d.,])\d+(?:[.,' \u00a0]\d{3})*([.,])\d{2}(?![\d.,%])", text)
    )
    if counts["."] == counts[","]:
        return None
    return "." if counts["."] > counts[","] else ","


# ============================================================================================
# Dates
# ============================================================================================

_MONTHS = {
    # English
    "jan": 1,
    "january": 1,
    "feb": 2,
    "february": 2,
    "mar": 3,
    "march": 3,
    "apr": 4,
    "april": 4,
    "may": 5,
    "jun": 6,
    "june": 6,
    "jul": 7,
    "july": 7,
    "aug": 8,
    "august": 8,
    "sep": 9,
    "sept": 9,
    "september": 9,
    "oct": 10,
    "october": 10,
    "nov": 11,
    "november": 11,
    "dec": 12,
    "december": 12,
    # German
    "januar": 1,
    "jan.": 1,
    "jaenner": 1,
    "janner": 1,
    "februar": 2,
    "marz": 3,
    "maerz": 3,
    "mai": 5,
    "juni": 6,
    "juli": 7,
    "okt": 10,
    "oktober": 10,
    "dez": 12,
    "dezember": 12,
    # French (accents removed)
    "janvier": 1,
    "janv": 1,
    "fevrier": 2,
    "fevr": 2,
    "fev": 2,
    "mars": 3,
    "avril": 4,
    "avr": 4,
    "juin": 6,
    "juillet": 7,
    "juil": 7,
    "aout": 8,
    "septembre": 9,
    "octobre": 10,
    "novembre": 11,
    "decembre": 12,
    # Dutch
    "januari": 1,
    "februari": 2,
    "maart": 3,
    "mrt": 3,
    "mei": 5,
    "augustus": 8,
    # Polish (nominative and genitive, accents removed; "ł" has no decomposition)
    "styczen": 1,
    "stycznia": 1,
    "sty": 1,
    "luty": 2,
    "lutego": 2,
    "lut": 2,
    "marzec": 3,
    "marca": 3,
    "kwiecien": 4,
    "kwietnia": 4,
    "kwi": 4,
    "maj": 5,
    "maja": 5,
    "czerwiec": 6,
    "czerwca": 6,
    "cze": 6,
    "lipiec": 7,
    "lipca": 7,
    "lip": 7,
    "sierpien": 8,
    "sierpnia": 8,
    "sie": 8,
    "wrzesien": 9,
    "wrzesnia": 9,
    "wrz": 9,
    "pazdziernik": 10,
    "pazdziernika": 10,
    "paz": 10,
    "listopad": 11,
    "listopada": 11,
    "lis": 11,
    "grudzien": 12,
    "grudnia": 12,
    "gru": 12,
}

_ISO_DATE_RE = re.compile(r"(?=\d)(?<![\d.,/-])(\d{4})([-/.])(\d{1,2})\2(\d{1,2})(?![\d])")
_NUM_DATE_RE = re.compile(r"(?=\d)(?<![\d.,/-])(\d{1,2})([./-])(\d{1,2})\2(\d{4}|\d{2})(?![\d])")
_DMY_TEXT_RE = re.compile(
    r"(?=\d)(?<![\w])(\d{1,2})(?:st|nd|rd|th|er|\.)?[\s-]*(?:de\s+)?([^\W\d_]{3,12})\.?,?[\s-]+(\d{4})(?!\d)"
)
_MDY_TEXT_RE = re.compile(
    r"(?=[^\W\d_])(?<![\w])([^\W\d_]{3,12})\.?\s+(\d{1,2})(?:st|nd|rd|th)?\s*,?\s+(\d{4})(?!\d)"
)


def _fold(text: str) -> str:
    """Lower case without accents: "Août" -> "aout", "März" -> "marz"."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _make_date(year: int, month: int, day: int) -> date | None:
    if year < 100:
        year += 2000 if year < 70 else 1900
    try:
        return date(year, month, day)
    except ValueError:
        return None


def parse_date(text: str, day_first: bool | None = None) -> date | None:
    """The first date in `text`: 2026-11-23, 23.11.2026, 23/11/2026, 11/23/2026, 23-11-2026,
    23 Nov 2026, 23. November 2026, 23 novembre 2026, November 23, 2026, Nov 23, 2026.

    Numeric dates with "/" or "-" are read day-first or month-first by `day_first`; when it is
    None, only dates that cannot be misread (a part above 12, or dots: always day-first) are
    returned. Never a guess.
    """
    candidates: list[tuple[int, date]] = []
    for m in _ISO_DATE_RE.finditer(text):
        d = _make_date(int(m.group(1)), int(m.group(3)), int(m.group(4)))
        if d:
            candidates.append((m.start(), d))
    for m in _NUM_DATE_RE.finditer(text):
        a, sep, b, y = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        order: bool | None  # day-first, month-first, or ambiguous
        if a > 12 or sep == ".":
            order = True
        elif b > 12:
            order = False
        else:
            order = day_first
        if order is None:
            continue
        d = _make_date(y, b, a) if order else _make_date(y, a, b)
        if d:
            candidates.append((m.start(), d))
    for m in _DMY_TEXT_RE.finditer(text):
        month = _MONTHS.get(_fold(m.group(2)).rstrip("."))
        if month:
            d = _make_date(int(m.group(3)), month, int(m.group(1)))
            if d:
                candidates.append((m.start(), d))
    for m in _MDY_TEXT_RE.finditer(text):
        month = _MONTHS.get(_fold(m.group(1)).rstrip("."))
        if month:
            d = _make_date(int(m.group(3)), month, int(m.group(2)))
            if d:
                candidates.append((m.start(), d))
    if not candidates:
        return None
    return min(candidates, key=lambda c: c[0])[1]


# ============================================================================================
# Labels
# ============================================================================================

# (field, language, patterns). Patterns are regular expressions matched case-insensitively at
# the start of a cell; among all that match, the longest match wins ("Total HT" beats
# "Total", "USt-IdNr." beats "USt", "Kundennummer" is not "Kunde").
_LABEL_TABLE: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "invoice_number",
        "en",
        (
            r"invoice\s*(?:no\.?|number|num\.?|nr\.?|#|n[°o]\.?|id)",
            r"inv\.?\s*(?:no\.?|#)",
            r"bill\s*(?:no\.?|number|#)",
            r"receipt\s*(?:no\.?|number|#)",
        ),
    ),
    (
        "invoice_number",
        "de",
        (
            r"rechnungs\s*-?\s*(?:nummer|nr\.?|no\.?)",
            r"rechnung\s*(?:nr\.?|nummer|no\.?)",
            r"beleg\s*-?\s*(?:nummer|nr\.?)",
        ),
    ),
    (
        "invoice_number",
        "fr",
        (
            r"facture\s*n[°o]\.?",
            r"n[°o]\.?\s*(?:de\s*)?(?:la\s*)?facture",
            r"num[ée]ro\s*(?:de\s*)?(?:la\s*)?facture",
            r"facture\s*num[ée]ro",
        ),
    ),
    ("invoice_number", "nl", (r"factuur\s*-?\s*(?:nummer|nr\.?|no\.?)",)),
    (
        "invoice_number",
        "pl",
        (
            r"faktur[ay]\s*(?:vat\s*)?(?:nr\.?|numer|no\.?)",
            r"(?:nr|numer)\.?\s*faktury",
            r"rachunek\s*nr\.?",
        ),
    ),
    # A receipt's own reference, used only when no invoice number is labelled.
    (
        "alt_number",
        "xx",
        (r"booking\s*(?:id|no\.?|number|ref(?:erence)?)", r"reservation\s*(?:id|no\.?|number)"),
    ),
    (
        "issue_date",
        "en",
        (
            r"(?:invoice|issue|billing|bill|document)\s*date",
            r"date\s*of\s*(?:issue|invoice)",
            r"date\s*issued",
            r"issued(?:\s*on)?",
            r"date",
        ),
    ),
    ("issue_date", "de", (r"rechnungsdatum", r"ausstellungsdatum", r"belegdatum", r"datum")),
    (
        "issue_date",
        "fr",
        (
            r"date\s*(?:de\s*)?(?:la\s*)?facture",
            r"date\s*d['’]\s*[ée]mission",
            r"date\s*d['’]\s*[ée]dition",
        ),
    ),
    ("issue_date", "nl", (r"factuur\s*-?\s*datum",)),
    ("issue_date", "pl", (r"data\s*(?:wystawienia|faktury|dokumentu)",)),
    (
        "due_date",
        "en",
        (
            r"(?:payment\s*)?due(?:\s*(?:date|by|on))?",
            r"date\s*due",
            r"pay(?:ment)?\s*by",
            r"payable\s*(?:by|on|until)",
        ),
    ),
    (
        "due_date",
        "de",
        (
            r"f[äa]llig(?:keitsdatum|\s*am|\s*bis|\s*zum)?",
            r"zahlbar\s*(?:bis|am)(?:\s*zum)?",
            r"zahlungsziel",
            r"zahlungstermin",
        ),
    ),
    (
        "due_date",
        "fr",
        (
            r"(?:date\s*d['’]\s*)?[ée]ch[ée]ance",
            r"[àa]\s*payer\s*(?:avant\s*le|le|avant)",
            r"payable\s*(?:le|avant\s*le)",
            r"date\s*limite\s*de\s*paiement",
        ),
    ),
    (
        "due_date",
        "nl",
        (r"vervaldatum", r"vervaldag", r"te\s*betalen\s*v[óo]{1,2}r", r"uiterste\s*betaaldatum"),
    ),
    (
        "due_date",
        "pl",
        (r"termin\s*(?:p[łl]atno[śs]ci|zap[łl]aty)", r"zap[łl]ata\s*do", r"p[łl]atne\s*do"),
    ),
    (
        "subtotal",
        "en",
        (
            r"sub\s*-?\s*total",
            r"net(?:\s*(?:amount|total|value))?",
            r"total\s*net",
            r"total\s*(?:excl\.?|excluding|before|ex\.?)\s*(?:vat|tax|gst)",
            r"amount\s*(?:excl\.?|before)\s*(?:vat|tax)",
            r"(?:excl\.?|excluding)\s*(?:vat|tax|gst)",
        ),
    ),
    (
        "subtotal",
        "de",
        (
            r"zwischensumme",
            r"netto(?:\s*-?\s*(?:betrag|summe))?",
            r"nettobetrag",
            r"nettosumme",
            r"summe\s*netto",
            r"gesamt\s*netto",
            r"(?:rechnungs|gesamt)betrag\s*netto",
            r"warenwert",
            r"(?:summe\s*|betrag\s*)?(?:ohne|exkl\.?|zzgl\.?)\s*(?:mwst|ust)\.?",
        ),
    ),
    (
        "subtotal",
        "fr",
        (
            r"sous\s*-?\s*total",
            r"total\s*h\.?\s*t\.?",
            r"montant\s*h\.?\s*t\.?",
            r"total\s*hors\s*tax(?:e|es)?",
        ),
    ),
    (
        "subtotal",
        "nl",
        (
            r"subtotaal",
            r"totaal\s*excl\.?\s*btw",
            r"netto\s*bedrag",
            r"bedrag\s*excl\.?\s*btw",
            r"(?:exclusief|excl\.?)\s*btw",
            r"totaal\s*exclusief\s*btw",
        ),
    ),
    ("subtotal", "pl", (r"(?:warto[śs][ćc]|razem|suma)\s*netto", r"netto")),
    (
        "tax",
        "en",
        (
            r"(?:total\s*)?(?:vat|tax|sales\s*tax|gst|hst|pst)(?:\s*(?:amount|total))?",
            r"value\s*added\s*tax",
        ),
    ),
    ("tax", "de", (r"(?:mwst|ust|mehrwertsteuer|umsatzsteuer)\.?(?:\s*-?\s*betrag)?",)),
    ("tax", "fr", (r"(?:total\s*|montant\s*)?t\.?v\.?a\.?",)),
    ("tax", "nl", (r"(?:totaal\s*)?btw(?:\s*-?\s*bedrag)?",)),
    ("tax", "pl", (r"(?:kwota|warto[śs][ćc]|podatek|razem)\s*vat", r"podatek")),
    (
        "total",
        "en",
        (
            r"(?:grand\s*|invoice\s*)?total(?:\s*amount)?",
            r"total\s*(?:incl\.?|including|inc\.?)\s*(?:vat|tax|gst)",
            r"gross\s*(?:total|amount)",
            r"total\s*gross",
            r"total\s*(?:for\s*this\s*|of\s*(?:this\s*)?)(?:invoice|bill|period|statement)",
            r"total\s*(?:invoice|invoiced)",
            r"invoice\s*amount",
        ),
    ),
    (
        "total",
        "de",
        (
            r"gesamtbetrag",
            r"gesamtsumme",
            r"rechnungsbetrag",
            r"rechnungssumme",
            r"bruttobetrag",
            r"gesamt\s*brutto",
            r"summe\s*brutto",
            r"endbetrag",
            r"brutto(?:\s*-?\s*betrag)?",
            r"rechnung\s*(?:gesamt|total|summe)",
        ),
    ),
    (
        "total",
        "fr",
        (
            r"total\s*t\.?\s*t\.?\s*c\.?",
            r"montant\s*t\.?\s*t\.?\s*c\.?",
            r"total\s*g[ée]n[ée]ral",
            r"total\s*(?:de\s*(?:la\s*)?)?facture",
            r"montant\s*total",
            r"facture\s*total",
        ),
    ),
    (
        "total",
        "nl",
        (
            r"totaal(?:\s*-?\s*bedrag)?",
            r"totaal\s*incl\.?\s*btw",
            r"totaalbedrag",
            r"factuur\s*-?\s*(?:totaal|bedrag)",
            r"totaal\s*factuur",
            r"totaal\s*inclusief\s*btw",
        ),
    ),
    (
        "total",
        "pl",
        (
            r"nale[żz]no[śs][ćc](?:\s*og[óo][łl]em)?",
            r"(?:razem\s*)?do\s*zap[łl]aty",
            r"warto[śs][ćc]\s*brutto",
            r"razem(?:\s*brutto)?",
            r"og[óo][łl]em",
            r"suma(?:\s*brutto)?",
        ),
    ),
    (
        "amount_due",
        "en",
        (
            r"(?:total\s*)?amount\s*due",
            r"balance(?:\s*due)?",
            r"total\s*due",
            r"amount\s*payable",
            r"please\s*pay",
        ),
    ),
    ("amount_due", "de", (r"zahlbetrag", r"zu\s*zahlen(?:der\s*betrag)?", r"offener\s*betrag")),
    (
        "amount_due",
        "fr",
        (
            r"net\s*[àa]\s*payer",
            r"montant\s*d[ûu]",
            r"reste\s*[àa]\s*payer",
            r"total\s*[àa]\s*payer",
            r"somme\s*[àa]\s*payer",
            r"montant\s*[àa]\s*payer",
        ),
    ),
    ("amount_due", "nl", (r"te\s*betalen(?:\s*bedrag)?", r"openstaand\s*bedrag")),
    (
        "tax_id",
        "en",
        (
            r"(?:vat|tax|gst)\s*(?:reg(?:istration)?\.?\s*)?(?:id|no\.?|number|nr\.?|#)",
            r"vat\s*reg(?:istration|\.)?",
            r"ein",
            r"fein",
            r"tin",
            r"tax\s*id(?:entification)?(?:\s*(?:no\.?|number))?",
            r"federal\s*tax\s*id",
            r"company\s*vat",
        ),
    ),
    (
        "tax_id",
        "de",
        (
            r"ust\s*-?\s*id(?:nr\.?|\s*-?\s*nr\.?|\s*-?\s*no\.?)?",
            r"umsatzsteuer\s*-?\s*id(?:entifikationsnummer)?(?:\s*-?\s*nr\.?)?",
            r"steuer\s*-?\s*nr\.?",
            r"steuernummer",
            r"uid(?:\s*-?\s*(?:nr\.?|nummer))?",
            r"mwst\s*-?\s*(?:nr\.?|nummer)",
            r"che(?=\s*-)",
        ),
    ),
    (
        "tax_id",
        "fr",
        (
            r"n[°o]\.?\s*(?:de\s*)?tva(?:\s*intra\s*-?\s*communautaire|\s*intracom\.?)?",
            r"tva\s*intra\s*-?\s*communautaire",
            r"num[ée]ro\s*(?:de\s*)?tva",
            r"identifiant\s*tva",
        ),
    ),
    ("tax_id", "nl", (r"btw\s*-?\s*(?:nummer|nr\.?|id|identificatienummer)",)),
    ("tax_id", "pl", (r"nip", r"nr\s*nip", r"vat\s*-?\s*ue")),
    (
        "customer_tax_id",
        "en",
        (
            r"(?:customer|client|buyer|recipient|your)(?:['’]s)?\s*(?:vat|tax)\s*(?:reg\.?\s*)?(?:id|no\.?|number)?",
        ),
    ),
    (
        "customer_tax_id",
        "de",
        (
            r"ihre\s*ust\s*-?\s*id(?:nr\.?|\s*-?\s*nr\.?)?",
            r"kunden\s*-?\s*ust\s*-?\s*id(?:nr\.?)?",
            r"ust\s*-?\s*id(?:nr\.?)?\s*(?:des\s*)?(?:kunden|leistungsempf[äa]ngers)",
        ),
    ),
    ("customer_tax_id", "fr", (r"(?:n[°o]\s*)?tva\s*(?:du\s*)?client",)),
    (
        "customer_tax_id",
        "nl",
        (
            r"(?:uw\s*)?btw\s*-?\s*(?:nummer|nr\.?)\s*(?:klant|afnemer)",
            r"uw\s*btw\s*-?\s*(?:nummer|nr\.?)",
        ),
    ),
    (
        "customer",
        "en",
        (
            r"bill(?:ed)?\s*to",
            r"invoice(?:d)?\s*to",
            r"sold\s*to",
            r"customer(?:\s*name)?",
            r"client",
            r"buyer",
            r"recipient",
            r"to(?=\s*:)",
            r"billing\s*address",
            r"guest(?:\s*name)?",
        ),
    ),
    (
        "customer",
        "de",
        (
            r"rechnungs\s*-?\s*empf[äa]nger(?:in)?",
            r"rechnung\s*an",
            r"kunde",
            r"auftraggeber(?:in)?",
            r"leistungsempf[äa]nger(?:in)?",
            r"an(?=\s*:)",
            r"rechnungs\s*-?\s*(?:adresse|anschrift)",
        ),
    ),
    (
        "customer",
        "fr",
        (
            r"factur[ée]\s*[àa]",
            r"destinataire",
            r"adress[ée]\s*[àa]",
            r"acheteur",
            r"adresse\s*de\s*facturation",
        ),
    ),
    (
        "customer",
        "nl",
        (r"factuur\s*aan", r"klant", r"afnemer", r"aan(?=\s*:)", r"factuur\s*-?\s*adres"),
    ),
    (
        "vendor",
        "en",
        (
            r"from(?=\s*:)",
            r"seller",
            r"supplier",
            r"vendor",
            r"issued\s*by",
            r"issuer",
            r"bill\s*from",
            r"payee",
            r"sold\s*by",
        ),
    ),
    (
        "vendor",
        "de",
        (r"lieferant", r"verk[äa]ufer", r"rechnungssteller", r"absender", r"leistungserbringer"),
    ),
    ("vendor", "fr", (r"fournisseur", r"vendeur", r"[ée]metteur", r"prestataire")),
    ("vendor", "nl", (r"leverancier", r"verkoper", r"afzender")),
    ("customer", "pl", (r"nabywca", r"odbiorca", r"p[łl]atnik")),
    ("vendor", "pl", (r"sprzedawca", r"wystawca", r"sprzedaj[ąa]cy", r"dostawca")),
    # Bank details: language-neutral, they do not vote for the document's language.
    (
        "iban",
        "xx",
        (r"iban(?:\s*(?:no\.?|number|nr\.?|code))?", r"international\s*bank\s*account\s*number"),
    ),
    (
        "bic",
        "xx",
        (
            r"bic(?:\s*/\s*swift)?(?:\s*-?\s*code)?",
            r"swift(?:\s*/\s*bic)?(?:\s*-?\s*code)?",
            r"swift\s*address",
        ),
    ),
    ("currency", "en", (r"currency",)),
    ("currency", "de", (r"w[äa]hrung",)),
    ("currency", "fr", (r"devise", r"monnaie")),
    ("currency", "nl", (r"valuta", r"munteenheid")),
    # Labels whose values must not be mistaken for anything above.
    (
        "ignore",
        "en",
        (
            r"(?:customer|client|account|member)\s*(?:no\.?|number|id|#|ref(?:erence)?\.?|code)",
            r"(?:customer|client)\s*(?:service|support|care)",
            r"attn\.?",
            r"attention",
            r"c/o",
            r"contact(?:\s*person)?",
            r"(?:purchase\s*)?order(?:\s*(?:no\.?|number|#|date|ref(?:erence)?\.?))?",
            r"p\.?\s*o\.?(?:\s*(?:no\.?|number|#))?",
            r"(?:your|our)\s*ref(?:erence)?\.?",
            r"reference",
            r"ref\.?",
            r"(?:delivery|service|supply|shipping|ship|performance|tax\s*point)\s*date",
            r"date\s*of\s*(?:delivery|supply|service)",
            r"ship(?:ped)?\s*to",
            r"deliver(?:ed|y)?\s*to",
            r"(?:delivery|shipping)\s*address",
            r"(?:payment\s*)?terms(?:\s*of\s*payment)?",
            r"payment\s*(?:method|reference)",
            r"(?:vat|tax)\s*rate",
            r"bank(?:\s*name|\s*details)?",
            r"sort\s*code",
            r"account(?:\s*(?:no\.?|number|name|holder))?",
            r"routing(?:\s*(?:no\.?|number))?",
            r"tel(?:\.|ephone)?",
            r"phone",
            r"fax",
            r"mobile",
            r"e\s*-?\s*mail",
            r"web(?:site)?",
            r"www",
            r"company\s*(?:no\.?|number|reg(?:istration)?\.?(?:\s*no\.?)?)",
            r"registered\s*(?:in|office|no\.?|number)",
            r"directors?",
            r"carried\s*forward",
            r"brought\s*forward",
            r"balance\s*(?:carried|brought)\s*forward",
            r"sub\s*-?\s*total\s*carried\s*forward",
            r"page",
        ),
    ),
    (
        "ignore",
        "de",
        (
            r"kunden\s*-?\s*(?:nummer|nr\.?|id)",
            r"z\.?\s*hd\.?(?:\s*v\.)?",
            r"ansprechpartner(?:in)?",
            r"bestell\s*-?\s*(?:nummer|nr\.?|datum|zeichen)",
            r"auftrags\s*-?\s*(?:nummer|nr\.?|datum)",
            r"ihre\s*bestellung",
            r"(?:ihr|unser)\s*zeichen",
            r"leistungs\s*-?\s*(?:datum|zeitraum)",
            r"liefer\s*-?\s*(?:datum|schein(?:\s*-?\s*nr\.?)?|anschrift|adresse)",
            r"zahlungs\s*-?\s*(?:bedingungen|art|weise)",
            r"steuersatz",
            r"bankverbindung",
            r"kontonummer",
            r"konto",
            r"blz",
            r"bank",
            r"telefon",
            r"tel",
            r"mobil",
            r"amtsgericht",
            r"registergericht",
            r"handelsregister",
            r"hrb",
            r"hra",
            r"firmenbuch(?:\s*-?\s*nr\.?)?",
            r"fn",
            r"gesch[äa]ftsf[üu]hr(?:er|erin|ung)",
            r"inhaber(?:in)?",
            r"vorstand",
            r"sitz(?:\s*der\s*gesellschaft)?",
            r"[üu]bertrag",
            r"seite",
        ),
    ),
    (
        "ignore",
        "fr",
        (
            r"n[°o]\.?\s*(?:de\s*)?client",
            r"num[ée]ro\s*(?:de\s*)?client",
            r"code\s*client",
            r"(?:n[°o]\.?\s*(?:de\s*)?)?(?:bon\s*de\s*)?commande",
            r"r[ée]f[ée]rence",
            r"r[ée]f\.?",
            r"date\s*de\s*(?:livraison|prestation|commande)",
            r"livraison",
            r"adresse\s*de\s*livraison",
            r"conditions\s*(?:de\s*)?(?:paiement|r[èe]glement)",
            r"mode\s*de\s*(?:paiement|r[èe]glement)",
            r"p[ée]nalit[ée]s",
            r"siret",
            r"siren",
            r"rcs",
            r"code\s*ape",
            r"ape",
            r"naf",
            r"rib",
            r"t[ée]l\.?",
            r"t[ée]l[ée]phone",
            r"capital",
            r"[àa]\s*reporter",
            r"report\s*de\s*(?:la\s*)?page",
            r"page",
        ),
    ),
    (
        "ignore",
        "nl",
        (
            r"klant\s*-?\s*(?:nummer|nr\.?)",
            r"debiteur\s*-?\s*(?:nummer|nr\.?)",
            r"order\s*-?\s*(?:nummer|nr\.?)",
            r"bestel\s*-?\s*(?:nummer|nr\.?)",
            r"referentie",
            r"kenmerk",
            r"uw\s*referentie",
            r"lever\s*-?\s*(?:datum|adres)",
            r"leveringsdatum",
            r"afleveradres",
            r"betalings\s*-?\s*(?:termijn|voorwaarden|kenmerk)",
            r"kvk(?:\s*-?\s*(?:nummer|nr\.?))?",
            r"kbo",
            r"pagina",
            r"order\s*-?\s*datum",
        ),
    ),
    (
        "ignore",
        "pl",
        (r"regon", r"krs", r"adres", r"nr\s*konta", r"bdo", r"s[łl]ownie", r"zap[łl]acono"),
    ),
]

# "zzgl. 19 % MwSt.", "+ VAT", "20% VAT": a preposition and/or a rate may precede a label.
_PREFIX_WORD = (
    r"(?:(?:zzgl|inkl|incl|excl|exkl|plus|abzgl|dont|davon|hiervon|hierin|including)\.?\s+|\+\s*)"
)
_PREFIX_RATE = r"(?:\d{1,2}(?:[.,]\d{1,3})?\s*%\s*)"
_LABEL_PREFIX = _PREFIX_WORD + "?" + _PREFIX_RATE + "?"
_LABEL_END = r"(?![^\W\d_])"  # the label is a whole word: "Net" is no label in "Network"

_LABEL_LIST = [
    (role, lang, pattern) for role, lang, patterns in _LABEL_TABLE for pattern in patterns
]
assert all(re.compile(p).groups == 0 for _, _, p in _LABEL_LIST)
# Every synonym in one regex: an optional lookahead per synonym, capturing what it matches, so
# one call finds every synonym that matches at a position (and the longest can be chosen).
_ALL_LABELS_RE = re.compile("".join(f"(?:(?=({p}){_LABEL_END}))?" for _, _, p in _LABEL_LIST), re.I)
_ANY_LABEL = re.compile(
    r"^\s*" + _LABEL_PREFIX + "(?:" + "|".join(p for _, _, p in _LABEL_LIST) + ")" + _LABEL_END,
    re.I,
)
_WS_RE = re.compile(r"\s*")
_PREFIX_WORD_RE = re.compile(_PREFIX_WORD, re.I)
_PREFIX_RATE_RE = re.compile(_PREFIX_RATE)
# A cell that is only a label word, maybe with its punctuation and a rate or a currency.
_LEFTOVER_RE = re.compile(r"[\s:#.()\[\]/*=_-]+")

_MONEY_ROLES = ("subtotal", "tax", "total", "amount_due")
_DATE_ROLES = ("issue_date", "due_date")
_BLOCK_ROLES = ("customer", "vendor")


@dataclass(frozen=True)
class LabelMatch:
    role: str
    lang: str
    rest: str  # the cell's text after the label


def _prefix_ends(text: str) -> list[int]:
    """Where a label may start after an optional prefix word and rate, in the order a regex
    "prefix? rate? label" would try them (longest prefix first)."""
    ws = _WS_RE.match(text)
    assert ws is not None  # r"\s*" matches at any position
    start = ws.end()
    ends: list[int] = []
    word = _PREFIX_WORD_RE.match(text, start)
    for after_word in ([word.end()] if word else []) + [start]:
        rate = _PREFIX_RATE_RE.match(text, after_word)
        for end in ([rate.end()] if rate else []) + [after_word]:
            if end not in ends:
                ends.append(end)
    return ends


@functools.lru_cache(maxsize=8192)
def match_label(text: str) -> LabelMatch | None:
    """The field a cell's leading label names (longest synonym wins, the first listed among
    equals), or None. Cached: the same cell texts come back in every pass and document."""
    if not _ANY_LABEL.match(text):
        return None
    found: dict[int, int] = {}  # synonym -> end of its match
    for pos in _prefix_ends(text):
        m = _ALL_LABELS_RE.match(text, pos)
        assert m is not None  # only optional groups: it matches (empty) at any position
        regs = m.regs
        for k in [k for k in range(1, len(regs)) if regs[k][0] >= 0]:
            found.setdefault(k - 1, regs[k][1])
    best = min(found, key=lambda k: (-found[k], k))
    end = found[best]
    role, lang, _ = _LABEL_LIST[best]
    rest = text[end:].lstrip(" \t:#.").strip() if role not in _MONEY_ROLES else text[end:].strip()
    rest = rest.lstrip(":#").strip()
    return LabelMatch(role, lang, rest)


def _rest_is_empty(rest: str) -> bool:
    """True when what follows a label carries no value: only a rate, a currency, punctuation."""
    rest = _BASE_RE.sub(" ", rest)
    rest = _PERCENT_RE.sub(" ", rest)
    rest = _CODE_RE.sub(" ", rest)
    rest = _SYMBOL_RE.sub(" ", rest)
    rest = re.sub(r"(?i)\b(?:in|en|on|at|@)\b", " ", rest)
    return not _LEFTOVER_RE.sub("", rest)


# ============================================================================================
# Cells
# ============================================================================================

_PAGE_NOISE_RE = re.compile(
    r"^(?:(?:page|seite|pagina|blatt|feuille|p\.)\s*\d+(?:\s*(?:of|von|sur|van|de|/)\s*\d+)?|\d+\s*/\s*\d+|-\s*\d+\s*-)$",
    re.I,
)
_CELL_SPLIT_RE = re.compile(r"\s{2,}|\t|\s+[·|•]\s+")
_DASH_SPLIT_RE = re.compile(r"\s+[-–—−]\s+")


@dataclass
class Cell:
    text: str
    page: int
    line: int  # global line number
    index: int  # position in the document's cell list
    label: LabelMatch | None = None


def _label_role(cell: Cell) -> str:
    """The role of a cell that is known to carry a label."""
    assert cell.label is not None
    return cell.label.role


def split_cells(text: str) -> list[Cell]:
    """Cut page texts ("\\f" between pages) into cells: lines, split where columns meet."""
    cells: list[Cell] = []
    line_no = 0
    for page_no, page in enumerate(text.split("\f")):
        for raw in page.split("\n"):
            line_no += 1
            pieces = [p.strip() for p in _CELL_SPLIT_RE.split(raw.strip()) if p.strip()]
            for piece in pieces:
                # " - " separates footer items ("SARL au capital de ... - SIRET ..."), but only
                # where a label follows: descriptions may contain dashes too.
                parts = _DASH_SPLIT_RE.split(piece)
                merged = [parts[0]]
                for part in parts[1:]:
                    if match_label(part):
                        merged.append(part)
                    else:
                        merged[-1] = f"{merged[-1]} - {part}"
                for part in merged:
                    if not _PAGE_NOISE_RE.match(part):
                        cells.append(Cell(part, page_no, line_no, len(cells), match_label(part)))
    return cells


# ============================================================================================
# Values
# ============================================================================================

_TAX_ID_RE = re.compile(
    r"^(?:[A-Z]{2,3}[ -]?)?[0-9][0-9A-Z .\-/]{4,20}[0-9A-Z](?:\s+(?:MWST|TVA|IVA|VAT))?$"
)
_INVOICE_NUMBER_RE = re.compile(r"^[#№]?\s*([A-Za-z0-9][A-Za-z0-9./_\-]*[A-Za-z0-9]|[0-9])$")
_TITLE_RE = re.compile(
    r"(?:(?:tax|vat|commercial|pro[\s-]?forma|sales|final|payment)\s+)?(?:invoice|receipt|bill|statement|credit\s+note)"
    r"|(?:steuer|schluss|teil|abschlags)?rechnung|quittung|gutschrift|kassenbon|facture(?:\s+d['’]acompte)?|avoir"
    r"|factuur|creditnota|kwitantie|faktura(?:\s+vat)?|rachunek",
    re.I,
)
_LEGAL_FORM_RE = re.compile(
    r"\b(?:GmbH|AG|KG|OG|UG|e\.K\.|GbR|SE|Ltd\.?|Limited|LLP|LLC|Inc\.?|Corp\.?|Co\.?|plc|PLC|SARL|SAS|SA|"
    r"S\.A\.|EURL|SNC|B\.V\.|BV|N\.V\.|NV|VOF|SRL|S\.r\.l\.|DAC|Oy|AB|A/S|ApS|S\.p\.A\.)\b"
)


def looks_like_tax_id(text: str, *, strict: bool = False) -> bool:
    """A VAT id (DE123456789, FR12345678901, NL123456789B01, CHE-123.456.789 MWST) or, unless
    strict, another tax number with at least six digits (US EIN 12-3456789). Strict means the
    official format of its country prefix (`tasks.checks.VAT_FORMATS`)."""
    t = text.strip()
    if sum(ch.isdigit() for ch in t) < 6 or len(t) > 32:
        return False
    if _CODE_RE.match(t) or parse_number(t, ".") is not None or parse_number(t, ",") is not None:
        return False  # an amount ("EUR 12436.85"), not an id
    if parse_date(t, True) is not None:
        return False
    if strict:
        return vat_id_is_valid(t)
    return bool(_TAX_ID_RE.match(t))


# Where a VAT id printed without a label may start: a prefix of the checks' table as a word of
# its own ("DE 123...", "CHE-123..." is CH + "E123..."), the id after at most one separator.
_VAT_START_RE = re.compile(
    r"(?<![A-Za-z0-9])(" + "|".join(sorted(VAT_FORMATS)) + r")(?=[ .\-]?[0-9A-Z])"
)
# Unlabelled, "NO 123456789" is as likely "INVOICE NO 123456789" as a Norwegian organisation
# number: there only the VAT-registered form counts, with its "MVA" (the validator, which sees
# the field's value rather than running text, accepts the bare number too).
_UNLABELLED_SUFFIX = {"NO": "MVA"}


def find_vat_id(text: str) -> str | None:
    """The first VAT id in `text` that has its country's format ("DE 123 456 789" ->
    "DE123456789"); IBANs, phone numbers and amounts do not. The format is the validator's
    (`tasks.checks.vat_id_is_valid`), so an id found here passes check_invoice."""
    for m in _VAT_START_RE.finditer(text):
        country = m.group(1)
        # the id may be printed in groups: try every run of groups after the country code
        pieces = re.match(r"[ .\-]?([0-9A-Z]+(?:[ .\-][0-9A-Z]+)*)", text[m.end() :])
        if not pieces:
            continue
        body, found = "", None
        for piece in re.split(r"[ .\-]", pieces.group(1)):
            body += piece
            if len(body) > 16:
                break
            if vat_id_is_valid(country + body) and body.endswith(
                _UNLABELLED_SUFFIX.get(country, "")
            ):
                found = body  # the longest run that fits ("CHE-123.456.789 MWST")
        if found:
            return country + found
    return None


def normalize_tax_id(text: str) -> str:
    """ "DE 123 456 789" -> "DE123456789": VAT ids are compared without spaces; other tax
    numbers (and a trailing "MWST"/"TVA") stay as printed."""
    t = " ".join(text.split())
    m = re.fullmatch(r"([A-Z]{2}[0-9A-Z .\-]*?)((?:\s+(?:MWST|TVA|IVA))?)", t)
    if m and vat_id_is_valid(t) and re.fullmatch(r"[A-Z]{2}[0-9A-Z ]+", m.group(1)):
        return m.group(1).replace(" ", "") + m.group(2)
    return t


def _clean_name(name: str | None) -> str | None:
    """A vendor name without what a letterhead prints on its line: the address of a return-
    address line ("ACME AG - Weg 4 - 12345 Stadt"), a trailing title ("ACME Invoice")."""
    if not name:
        return name
    parts = re.split(r"\s+[-–·|•]\s+", name)
    if len(parts) > 1 and all(re.search(r"\d", p) for p in parts[1:]) and name_like(parts[0]):
        name = parts[0]
    m = re.fullmatch(r"(.+?)\s+(?:" + _TITLE_RE.pattern + r")", name, re.I)
    if m and name_like(m.group(1)):
        name = m.group(1)
    return name


def name_like(text: str) -> bool:
    """Could this cell be a company or person name? (No digits, no label, no title, no sentence.)"""
    t = text.strip()
    if not 2 <= len(t) <= 80 or len(t.split()) > 8:
        return False
    if re.search(r"\d", t) and not _LEGAL_FORM_RE.search(t):
        return False
    if "@" in t or re.search(r"(?i)www\.|https?:|\.(?:com|org|net|de|fr|nl|co\.uk|io)\b", t):
        return False
    if t[-1] in ":,;!?" or (t.endswith(".") and not re.search(r"(?:\b[A-Za-z]{1,4}\.)+$", t)):
        return False
    if not re.search(r"[^\W\d_]{2}", t) or _TITLE_RE.fullmatch(t):
        return False
    return match_label(t) is None


def _invoice_number(rest: str) -> str | None:
    tokens = rest.strip().split()
    if len(tokens) >= 2 and re.fullmatch(r"[A-Z]{1,3}", tokens[0]) and re.search(r"\d", tokens[1]):
        # a series letter printed apart: "F 1234K20/1234/12"
        number = _invoice_number(tokens[1])
        return f"{tokens[0]} {number}" if number else None
    token = tokens[0] if tokens else ""
    token = token.strip(".,;:")
    m = _INVOICE_NUMBER_RE.match(token)
    if not m or not re.search(r"\d", token) or len(token) > 40:
        return None
    if parse_date(token, True) is not None:
        return None
    return m.group(1)


def _currency_in(text: str) -> str | None:
    m = _CODE_RE.search(text)
    if m:
        return m.group(1)
    m = _SYMBOL_RE.search(text)
    if m:
        return dict(_SYMBOLS)[m.group(0)]
    return None


_IBAN_START_RE = re.compile(
    r"(?=[A-Z])(?<![A-Z0-9])([A-Z]{2}\d{2})((?:[ \u00a0]?[A-Z0-9]{1,8}){1,9})"
)


def find_iban(text: str, *, labelled: bool) -> str | None:
    """The IBAN in `text`, without spaces ("DE89 3704 0044 0532 0130 00" -> "DE89370400440532013000").

    After an "IBAN" label the value is read as printed (the checksum is the validator's job)
    as long as it has an IBAN's shape and its country's length; anywhere else a candidate must
    also pass the mod-97 checksum. Masked numbers ("FR76 ****") are no IBANs.
    """
    for m in _IBAN_START_RE.finditer(text.upper()):
        head, tail = m.group(1), m.group(2)
        groups = [g for g in re.split(r"[ \u00a0]", tail) if g]
        want = IBAN_LENGTHS.get(head[:2])
        # The longest run of groups that makes a plausible IBAN (text may follow it).
        for n in range(len(groups), 0, -1):
            candidate = head + "".join(groups[:n])
            if want is not None and len(candidate) != want:
                continue
            if want is None and not 15 <= len(candidate) <= 34:
                continue
            if iban_checksum_ok(candidate) or (labelled and want is not None):
                return candidate
    return None


# A BIC's country letters: an IBAN country or one of the big non-IBAN ones an invoice names.
_BIC_COUNTRIES = frozenset(IBAN_LENGTHS) | {"US", "CA", "IN", "JP", "CN"}


def find_bic(text: str) -> str | None:
    """A BIC (SWIFT code) printed after its label: 8 or 11 characters, bank, country, place."""
    for token in re.split(r"[\s:;,|]+", text.strip()):
        token = token.strip(".()")
        if BIC_RE.fullmatch(token) and token[4:6] in _BIC_COUNTRIES:
            return token
    return None


# ============================================================================================
# Line items
# ============================================================================================

_HEADER_SUFFIX = (
    r"(?:\s*(?:\(?(?:excl\.?|incl\.?|exkl\.?|inkl\.?|zzgl\.?)?\s*(?:h\.?t\.?|ttc|net(?:to)?|brutto|vat|tax|mwst|"
    r"ust|btw|tva)\)?|\(?(?:in\s+)?(?:" + "|".join(sorted(CURRENCY_CODES)) + r")\)?|\(?[€$£]\)?"
    r"|/\s*(?:unit|st(?:ü|ue)ck|stk\.?|pc\.?|u\.?)))*"
)
_HEADER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "pos": (
        r"pos\.?",
        r"position",
        r"#",
        r"no\.?",
        r"nr\.?",
        r"n[°o]",
        r"line",
        r"item\s*(?:no\.?|#)",
        r"lfd\.?\s*nr\.?",
        r"lp\.?",
    ),
    "desc": (
        r"descriptions?",
        r"item(?:s)?(?:\s*description)?",
        r"products?(?:\s*/\s*services?)?",
        r"services?",
        r"details",
        r"articles?",
        r"particulars",
        r"(?:leistungs|artikel)?\s*beschreibung",
        r"bezeichnung",
        r"artikel(?:\s*bezeichnung)?",
        r"leistung(?:en)?",
        r"d[ée]signation",
        r"libell[ée]",
        r"prestations?",
        r"omschrijving",
        r"dienst(?:en)?",
        r"produkt",
        r"text",
        r"nazwa(?:\s*towaru(?:\s*(?:/|lub)\s*us[łl]ugi)?)?",
    ),
    "qty": (
        r"qty\.?",
        r"quantity",
        r"quantit[ée]",
        r"qt[ée]\.?",
        r"menge",
        r"anzahl",
        r"aantal",
        r"hours",
        r"hrs\.?",
        r"units",
        r"stunden",
        r"std\.?",
        r"heures",
        r"uren",
        r"hoeveelheid",
        r"nombre",
        r"ilo[śs][ćc]",
    ),
    "uom": (r"unit", r"einheit", r"me", r"eh", r"unit[ée]", r"eenheid", r"uom", r"j\.?\s*m\.?"),
    "unit": (
        r"unit\s*price",
        r"price(?:\s*per\s*unit)?",
        r"rate",
        r"unit\s*cost",
        r"cost",
        r"einzelpreis",
        r"e\.?\s*-?\s*preis",
        r"st[üu]ckpreis",
        r"preis(?:\s*je\s*einheit)?",
        r"prix\s*unit(?:aire|\.)?",
        r"p\.?\s*u\.?",
        r"prix",
        r"stukprijs",
        r"eenheidsprijs",
        r"prijs(?:\s*per\s*stuk)?",
        r"tarief",
        r"ep",
        r"vk\s*-?\s*preis",
        r"cena(?:\s*(?:jedn(?:\.|ostkowa)?|netto|brutto))?",
    ),
    "rate": (r"(?:vat|tax|mwst|ust|tva|btw)\s*%?", r"%", r"taxes", r"(?:vat|tax)\s*rate"),
    "amount": (
        r"amount",
        r"(?:line\s*)?total",
        r"sum",
        r"betrag",
        r"gesamt(?:preis|betrag)?",
        r"summe",
        r"montant",
        r"total",
        r"bedrag",
        r"totaal",
        r"net(?:to)?\s*(?:amount|betrag)?",
        r"zeilen\s*-?\s*betrag",
        r"positions\s*-?\s*betrag",
        r"line\s*amount",
        r"ext(?:ended|\.)?\s*(?:price|amount)",
        r"kwota",
        r"warto[śs][ćc](?:\s*(?:netto|brutto))?",
    ),
    "discount": (
        r"disc\.?\s*%?",
        r"discount\s*%?",
        r"rabatt?\s*%?",
        r"remise\s*%?",
        r"korting\s*%?",
    ),
    "code": (
        r"sku",
        r"code",
        r"art(?:ikel)?\s*-?\s*nr\.?",
        r"artikelnummer",
        r"(?:item|product|article)\s*code",
        r"part\s*(?:no\.?|number)",
        r"r[ée]f(?:[ée]rence)?\.?",
    ),
    "qtyunit": (
        r"(?:qty|quantity|menge|qt[ée]|aantal)\s*(?:x|×|@)\s*(?:unit\s*)?(?:price|preis|prix|prijs)",
    ),
}
_HEADER_RES = {
    role: re.compile(r"^(?:" + "|".join(pats) + r")" + _HEADER_SUFFIX + r"\s*:?$", re.I)
    for role, pats in _HEADER_SYNONYMS.items()
}
_HEADER_WORD_RES = {
    role: re.compile(r"(?:" + "|".join(pats) + r")" + _HEADER_SUFFIX + r"(?=\s|$)", re.I)
    for role, pats in _HEADER_SYNONYMS.items()
}
_NUMERIC_ROLES = ("qty", "unit", "amount", "rate", "qtyunit", "discount")
_NUM = r"[-−(]?\d[\d.,'’\u00a0\u202f]*\d?\)?"
_QXU_RE = re.compile(
    r"^(" + _NUM + r")\s*(?:[x×*@]|\bx\b)\s*(?:[€£$¥]\s?)?(" + _NUM + r")(?:\s*[€£$¥])?$", re.I
)
_NUM_UNIT_RE = re.compile(
    r"^(" + _NUM + r")\s?([^\W\d_][^\W\d]{0,5}\.?(?:\([^\W\d]{1,3}\))?|m²|m2|m³)$"
)
_CARRY_RE = re.compile(
    r"^(?:(?:sub\s*-?\s*total\s*)?(?:carried|brought)\s*forward|balance\s*(?:carried|brought)\s*forward|"
    r"[üu]bertrag|[àa]\s*reporter|report\s*(?:de\s*(?:la\s*)?page|:)|zwischensumme\s*[üu]bertrag)(?![^\W\d_])",
    re.I,
)


@functools.lru_cache(maxsize=4096)
def _header_roles_cached(text: str) -> tuple[str, ...] | None:
    roles = _header_roles(text)
    return tuple(roles) if roles is not None else None


def header_roles(text: str) -> list[str] | None:
    """Column roles named by one header cell ("Unit price" -> ["unit"]); a cell holding a whole
    header row ("Description Qty Unit price Amount") yields several. None if not a header."""
    roles = _header_roles_cached(text)
    return list(roles) if roles is not None else None


def _header_roles(text: str) -> list[str] | None:
    """Column roles named by one header cell ("Unit price" -> ["unit"]); a cell holding a whole
    header row ("Description Qty Unit price Amount") yields several. None if not a header."""
    role = _header_role(text.strip())
    if role is not None:
        return [role]
    roles: list[str] = []
    rest = text.strip()
    while rest:
        best: tuple[int, str] | None = None
        for role, regex in _HEADER_WORD_RES.items():
            m = regex.match(rest)
            if m and (best is None or m.end() > best[0]):
                best = (m.end(), role)
        if best is None:
            return None
        roles.append(best[1])
        rest = rest[best[0] :].strip()
    return roles if len(roles) > 1 else None


@dataclass
class _Value:
    kind: Literal["num", "qxu", "text"]
    text: str
    number: Decimal | None = None
    second: Decimal | None = None  # unit price of "2 x 14.90"


def classify_cell(text: str, decimal: str | None) -> _Value:
    """A table cell as a number ("1,234.56", "24 Stk.", "19 %"), a quantity times a price
    ("2 x 14.90"), or text."""
    t = text.strip()
    value = parse_number(t.rstrip("%").strip(), decimal) if t else None
    if value is not None:
        return _Value("num", t, value)
    m = _QXU_RE.match(t)
    if m:
        q, u = parse_number(m.group(1), decimal), parse_number(m.group(2), decimal)
        if q is not None and u is not None:
            return _Value("qxu", t, q, u)
    m = _NUM_UNIT_RE.match(t)
    if m and not _CODE_RE.fullmatch(m.group(2)):
        q = parse_number(m.group(1), decimal)
        if q is not None:
            return _Value("num", t, q)
    return _Value("text", t)


def _consistent(qty: Decimal | None, unit: Decimal | None, amount: Decimal | None) -> bool:
    if qty is None or unit is None or amount is None:
        return False
    return abs(qty * unit - amount) <= Decimal("0.011") or abs(qty * unit - amount) <= abs(
        amount
    ) * Decimal("0.0005")


def _item(desc: str, values: list[_Value], roles: list[str]) -> LineItem | None:
    """Assign a row's numbers to the numeric columns after the description, in order."""
    qty = unit = amount = None
    needed = [r for r in roles if r in _NUMERIC_ROLES]
    plain = [v for v in values if v.kind == "num"]
    compound = [v for v in values if v.kind == "qxu"]
    if compound:
        qty, unit = compound[0].number, compound[0].second
        needed = [r for r in needed if r not in ("qty", "unit", "qtyunit")]
    if len(plain) < len(needed) or (not needed and not compound):
        return None
    for role, value in zip(needed, plain, strict=False):
        if role == "qty":
            qty = value.number
        elif role == "unit":
            unit = value.number
        elif role == "amount":
            amount = value.number
    if amount is None and qty is None and unit is None:
        return None
    return LineItem(description=desc, quantity=qty, unit_price=unit, amount=amount)


def _split_merged_row(
    text: str, decimal: str | None, roles: list[str], *, n_pre: int = 0
) -> tuple[str, list[_Value]] | None:
    """ "Consulting 2 150.00 300.00" (a row extracted as one run of words): description and
    numbers, accepted only when the numbers add up (quantity x price = amount)."""
    tokens = text.split()
    values: list[_Value] = []
    k = len(tokens)
    while k > 1:
        v = classify_cell(tokens[k - 1], decimal)
        if v.kind != "num":
            if tokens[k - 1].lower() in ("x", "×", "@", "*") and values:
                k -= 1
                continue
            break
        values.insert(0, v)
        k -= 1
    head = tokens[:k]
    # leading position numbers ("1 Beratung 10 95,00 950,00" under "Pos. Artikel ...")
    while n_pre and len(head) > 1 and re.fullmatch(r"\d{1,4}\.?", head[0]):
        head = head[1:]
        n_pre -= 1
    desc = " ".join(head)
    if not values or not name_like_description(desc):
        return None
    needed = [r for r in roles if r in ("qty", "unit", "amount")] or ["qty", "unit", "amount"]
    if len(values) < len(needed):
        return None
    tail = values[-len(needed) :]
    extra = values[: len(values) - len(needed)]
    item = _item(desc, tail, needed)
    if item is None or not _consistent(item.quantity, item.unit_price, item.amount):
        return None
    if extra:  # numbers that belong to the description ("Paper, box of 500 10 4.99 49.90")
        desc = " ".join([desc, *(v.text for v in extra)])
    return desc, tail


def name_like_description(text: str) -> bool:
    return bool(re.search(r"[^\W\d_]{2}", text))


def line_items_from_rows(
    rows: Iterable[list[str]], roles: list[str], *, decimal: str | None
) -> list[LineItem]:
    """Line items from table rows whose cells are already known (e.g. found by word positions).

    `roles` names each column ("pos", "desc", "qty", "uom", "unit", "rate", "amount",
    "qtyunit"), cells are taken in that order. A blank numeric cell stays None; rows without a
    description or without any number (section headings) are skipped, and so are rows with
    text in a numeric column.
    """
    items = []
    for cells in rows:
        desc: list[str] = []
        numbers: dict[str, Decimal] = {}
        usable = True
        for cell, role in zip(cells, roles, strict=False):
            text = cell.strip()
            if role == "desc":
                if text:
                    desc.append(text)
                continue
            if role not in _NUMERIC_ROLES or not text:
                continue
            value = classify_cell(text, decimal)
            if value.kind == "text":
                usable = False
            elif value.kind == "qxu":
                # classify_cell gives a "qxu" both numbers, and a "num" its number
                assert value.number is not None and value.second is not None
                numbers.setdefault("qty", value.number)
                numbers.setdefault("unit", value.second)
            elif role in ("qty", "unit", "amount"):
                assert value.number is not None
                numbers[role] = value.number
        if usable and desc and numbers:
            items.append(
                LineItem(
                    description=" ".join(desc),
                    quantity=numbers.get("qty"),
                    unit_price=numbers.get("unit"),
                    amount=numbers.get("amount"),
                )
            )
    return items


# ============================================================================================
# Layout: rows of words with positions (a PDF's word boxes, or a text's character columns)
# ============================================================================================


@dataclass
class _Tok:
    x0: float
    x1: float
    text: str


@dataclass
class _Row:
    """One visual line of a page: its words left to right, cut into phrases where a gap wider
    than half the line's height separates them (columns)."""

    page: int
    y0: float
    y1: float
    toks: list[_Tok]
    phrases: list[list[_Tok]] = field(default_factory=list)

    @property
    def height(self) -> float:
        return max(self.y1 - self.y0, 1.0)

    @functools.cached_property
    def text(self) -> str:
        return "  ".join(" ".join(t.text for t in ph) for ph in self.phrases)


def _phrases(toks: list[_Tok], height: float) -> list[list[_Tok]]:
    phrases: list[list[_Tok]] = []
    for tok in toks:
        if phrases and tok.x0 - phrases[-1][-1].x1 <= 0.5 * height:
            phrases[-1].append(tok)
        else:
            phrases.append([tok])
    return phrases


# A character of plain text is 4 units wide and a line 8 high: one space (4) keeps words in
# a phrase, two spaces (8) part them, as `split_cells` does.
_CHAR_W, _LINE_H = 4.0, 8.0


def rows_from_text(page_text: str, page: int) -> list[_Row]:
    rows = []
    for i, line in enumerate(page_text.split("\n")):
        toks = [
            _Tok(m.start() * _CHAR_W, m.end() * _CHAR_W, m.group(0))
            for m in re.finditer(r"\S+", line)
        ]
        if toks:
            y = i * _LINE_H * 1.25
            rows.append(_Row(page, y, y + _LINE_H, toks, _phrases(toks, _LINE_H)))
    return rows


def rows_from_words(words: Iterable, page: int) -> list[_Row]:
    """Visual lines from word boxes (`tasks.pdf.parse.Word` or PyMuPDF tuples x0, y0, x1, y1, text):
    words whose vertical centres are within a third of a line's height share a line."""
    boxes = sorted(((w[1] + w[3]) / 2, w[0], w) for w in words if str(w[4]).strip())
    rows: list[tuple[float, float, list]] = []  # (centre, height, words)
    for centre, _, w in boxes:
        height = w[3] - w[1]
        if rows and abs(centre - rows[-1][0]) <= 0.35 * min(height, rows[-1][1]):
            rows[-1][2].append(w)
        else:
            rows.append((centre, height, [w]))
    out = []
    for _, _, ws in rows:
        ws.sort(key=lambda w: w[0])
        toks = [_Tok(w[0], w[2], str(w[4])) for w in ws]
        y0, y1 = min(w[1] for w in ws), max(w[3] for w in ws)
        heights = sorted(w[3] - w[1] for w in ws)
        out.append(_Row(page, y0, y1, toks, _phrases(toks, heights[len(heights) // 2])))
    return out


# ============================================================================================
# Tables by position
# ============================================================================================


@dataclass
class _Col:
    role: str
    x0: float
    x1: float
    text: str = ""


_HEADER_HINT_DESC = re.compile(
    r"(?<![^\W\d_])(?:" + "|".join(_HEADER_SYNONYMS["desc"]) + r")(?![^\W\d_])", re.I
)
_HEADER_HINT_NUM = re.compile(
    r"(?<![^\W\d_])(?:"
    + "|".join(p for r in ("qty", "unit", "amount") for p in _HEADER_SYNONYMS[r])
    + r")(?![^\W\d_])",
    re.I,
)
_CURRENCY_TOKEN_RE = re.compile(r"^(?:[€£¥$₹]|Rs\.?|" + "|".join(sorted(CURRENCY_CODES)) + r")$")


def _header_role(chunk: str) -> str | None:
    """The column role one header cell names, the first in this order that matches."""
    order = ("qtyunit", "desc", "qty", "unit", "amount", "pos", "rate", "uom", "discount", "code")
    return next((role for role in order if _HEADER_RES[role].match(chunk)), None)


def header_columns(row: _Row) -> list[_Col] | None:
    """The columns a table header row names, each with its horizontal extent, or None.

    Every word of the row must belong to a column name (longest synonym first, several names
    may share one phrase: "BTW Prijs incl. BTW"). Two description columns side by side are an
    article code and a description; a repeated price column at the right is the line amount.
    """
    text = row.text
    if not _HEADER_HINT_DESC.search(text) or not _HEADER_HINT_NUM.search(text):
        return None
    toks = row.toks
    cols: list[_Col] = []
    i = 0
    while i < len(toks):
        best: tuple[int, str] | None = None
        for j in range(min(len(toks), i + 5), i, -1):
            role = _header_role(" ".join(t.text for t in toks[i:j]))
            if role:
                best = (j, role)
                break
        if (
            best is not None
            and best[0] - i >= 2
            and re.search(r"[^\W\d_]{2}", toks[best[0] - 1].text)
            and _header_role(toks[best[0] - 1].text)
        ):
            # "Prijs per stuk BTW": the suffix "BTW" is a column of its own when what is
            # left still names a column ("Prijs incl. BTW" stays whole)
            shorter = _header_role(" ".join(t.text for t in toks[i : best[0] - 1]))
            if shorter == best[1] != _header_role(toks[best[0] - 1].text):
                best = (best[0] - 1, shorter)
        if best is None:
            if re.fullmatch(r"[\W_]+|\[\w{1,4}\]|\(\w{1,4}\)", toks[i].text):
                i += 1  # punctuation, "[jm]", "(%)"
                continue
            return None
        j, role = best
        cols.append(_Col(role, toks[i].x0, toks[j - 1].x1, " ".join(t.text for t in toks[i:j])))
        i = j
    for k in range(len(cols) - 1):
        if cols[k].role == "desc" and cols[k + 1].role == "desc":
            cols[k].role = "code"
    units = [c for c in cols if c.role == "unit"]
    if len(units) > 1 and not any(c.role == "amount" for c in cols):
        units[-1].role = "amount"  # "Prijs per stuk ... Prijs incl. BTW"
        for c in units[1:-1]:
            c.role = "other"
    amounts = [c for c in cols if c.role == "amount"]
    if len(amounts) > 1:
        # "Montant HT ... Montant TTC": the line amount is the net one (else the last)
        net = [
            c
            for c in amounts
            if re.search(r"(?i)\b(?:h\.?t\.?|net(?:to)?|excl\.?|exkl\.?|ohne)\b", c.text)
        ]
        keep = net[0] if net else amounts[-1]
        for c in amounts:
            if c is not keep:
                c.role = "other"
    roles = [c.role for c in cols]
    if roles.count("desc") != 1 or not any(r in roles for r in ("amount", "unit", "qtyunit")):
        return None
    return cols


def _numeric_token(text: str, decimal: str | None) -> bool:
    t = text.strip()
    if _CURRENCY_TOKEN_RE.match(t) or t == "%":
        return True
    return classify_cell(t, decimal).kind == "num" and bool(re.search(r"\d", t))


def _money_like(text: str) -> bool:
    """Printed like a price: to the cent, or a currency sign or code."""
    t = text.strip()
    return (
        bool(_CURRENCY_TOKEN_RE.match(t))
        or _has_cents(_strip_currency(t))
        or _strip_currency(t) != t
    )


def _column_of(cols: list[_Col], x0: float, x1: float) -> _Col:
    def key(col: _Col) -> tuple[float, float]:
        overlap = min(x1, col.x1) - max(x0, col.x0)
        gap = max(0.0, col.x0 - x1, x0 - col.x1)
        return (gap, -overlap)

    return min(cols, key=key)


def _gap(x0: float, x1: float, col: _Col) -> float:
    return max(0.0, col.x0 - x1, x0 - col.x1)


def _align(groups: list[tuple[float, float]], cols: list[_Col]) -> list[int | None]:
    """Numbers of a row to columns, left to right: the assignment that keeps their order and
    puts each under a column of its own (the description column takes any number) with the
    least total distance; a number far from every column stays unassigned."""
    n, m = len(groups), len(cols)
    inf = float("inf")
    drop = 1e6
    # best[i][j]: cost of placing the first i numbers under the first j columns
    best = [[inf] * (m + 1) for _ in range(n + 1)]
    back: dict[tuple[int, int], tuple[int, int, int | None]] = {}
    for j in range(m + 1):
        best[0][j] = 0.0
    for i in range(1, n + 1):
        x0, x1 = groups[i - 1]
        centre = (x0 + x1) / 2
        best[i][0] = best[i - 1][0] + drop
        back[(i, 0)] = (i - 1, 0, None)
        for j in range(1, m + 1):
            col = cols[j - 1]
            cost = _gap(x0, x1, col) + 0.01 * abs(centre - (col.x0 + col.x1) / 2)
            options = [
                (best[i][j - 1], (i, j - 1, None)),  # column j left empty
                (best[i - 1][j - 1] + cost, (i - 1, j - 1, j - 1)),
                (best[i - 1][j] + drop, (i - 1, j, None)),  # number i left out
            ]
            if col.role == "desc":
                options.append((best[i - 1][j] + cost, (i - 1, j, j - 1)))
            value, step = min(options, key=lambda o: o[0])
            best[i][j] = value
            back[(i, j)] = step
    out: list[int | None] = [None] * n
    i, j = n, m
    while i > 0:
        pi, pj, col_index = back[(i, j)]
        if pi == i - 1:
            out[i - 1] = col_index
        i, j = pi, pj
    return out


def _row_cells(row: _Row, cols: list[_Col], decimal: str | None) -> dict[str, list[str]]:
    """The row's words put under the header's columns. Text goes where its phrase starts (or
    to the description); numbers (with their currency sign or unit) are aligned with the
    numeric columns in order (see `_align`), so a number printed a little off its column
    still lands under it."""
    cells: dict[str, list[tuple[float, str]]] = {}
    desc = next(c for c in cols if c.role == "desc")
    groups: list[tuple[float, float, str]] = []

    def put(col: _Col, x: float, text: str) -> None:
        cells.setdefault(col.role, []).append((x, text))

    for phrase in row.phrases:
        words = list(phrase)
        numeric = [_numeric_token(t.text, decimal) for t in words]
        a = 0
        while a < len(words) and numeric[a]:
            a += 1
        b = len(words)
        while b > a and numeric[b - 1]:
            b -= 1
        if a < b < len(words) and not any(_money_like(t.text) for t in words[b:]):
            b = len(words)  # "Exchange 2010", "box of 500": numbers of the description
        lead, body, tail = words[:a], words[a:b], words[b:]
        if (
            lead
            and len(body) == 1
            and len(body[0].text) <= 6
            and not tail
            and not _CURRENCY_TOKEN_RE.match(body[0].text)
        ):
            # "1 PCS", "1.00 kg": a number with its unit
            lead[-1] = _Tok(lead[-1].x0, body[0].x1, f"{lead[-1].text} {body[0].text}")
            body = []
        for part in (lead, tail):
            pending: list[_Tok] = []
            for n, tok in enumerate(part):
                if _CURRENCY_TOKEN_RE.match(tok.text) and not pending:
                    after = part[n + 1] if n + 1 < len(part) else None
                    if (after is None or _CURRENCY_TOKEN_RE.match(after.text)) and (
                        groups and groups[-1][1] <= tok.x0
                    ):  # "45,93 €": the sign after its number
                        x0, _, text = groups[-1]
                        groups[-1] = (x0, tok.x1, f"{text} {tok.text}")
                        continue
                    pending.append(tok)
                    continue
                if tok.text == "%" and groups and not pending:
                    x0, _, text = groups[-1]
                    groups[-1] = (x0, tok.x1, text + " %")
                    continue
                if (
                    n > 0
                    and not pending
                    and groups
                    and re.fullmatch(r"\d{3}(?:[.,]\d+)?", tok.text)
                    and groups[-1][1] == part[n - 1].x1
                    and re.fullmatch(r"-?\d{1,3}(?: \d{3})*", groups[-1][2])
                    and parse_number(f"{groups[-1][2]} {tok.text}", decimal) is not None
                ):
                    # "2 500", "1 234,56": a thousands separator printed as a space
                    x0, _, text = groups[-1]
                    groups[-1] = (x0, tok.x1, f"{text} {tok.text}")
                    continue
                start = pending[0] if pending else tok
                groups.append((start.x0, tok.x1, " ".join([*(p.text for p in pending), tok.text])))
                pending = []
            for tok in pending:  # a currency sign with no number after it
                groups.append((tok.x0, tok.x1, tok.text))
            if part is lead and body:
                col = _column_of(cols, body[0].x0, body[0].x1)
                text = " ".join(t.text for t in body)
                # text starting under a numeric column belongs to a long description
                put(col if col.role in ("desc", "code", "uom") else desc, body[0].x0, text)
    for (x0, _x1, text), k in zip(
        groups, _align([(g[0], g[1]) for g in groups], cols), strict=False
    ):
        if k is not None:
            put(cols[k], x0, text)
    return {role: [t for _, t in sorted(parts)] for role, parts in cells.items()}


def _ends_geo_table(row: _Row, decimal: str | None) -> str | None:
    """ "stop" at a total, tax or amount-due line, "skip" a subtotal line (tables may hold
    section subtotals), None for other rows. A label alone on its line (a second header line
    "MwSt.") ends nothing: the line must hold an amount."""
    for phrase in row.phrases:
        text = " ".join(t.text for t in phrase)
        label = match_label(text)
        if label is None or label.role not in _MONEY_ROLES or _CARRY_RE.match(text):
            continue
        if (
            _rest_is_empty(label.rest) or find_amount(label.rest, decimal) is not None
        ) and find_amount(row.text, decimal) is not None:
            return "skip" if label.role == "subtotal" else "stop"
    return None


def table_items_by_position(rows: list[_Row], decimal: str | None) -> list[LineItem]:
    """Line items from every table whose header row names its columns, reading each row's
    words under the column they stand in. A row is an item when it has a description and an
    amount or a unit price; rows of text alone (notes, serial numbers, section titles) and
    rows of a sub-article with a quantity only are not."""
    items: list[LineItem] = []
    headers = [header_columns(row) for row in rows]
    i = 0
    while i < len(rows):
        cols = headers[i]
        if cols is None:
            i += 1
            continue
        page = rows[i].page
        i += 1
        while i < len(rows) and rows[i].page == page:
            row = rows[i]
            if headers[i] is not None:
                break
            end = _ends_geo_table(row, decimal)
            if end == "stop":
                break
            i += 1
            if end == "skip":
                continue
            cells = _row_cells(row, cols, decimal)
            desc = " ".join(cells.get("desc", []))
            if not re.search(r"[^\W\d_]{2}", desc):
                continue
            values: dict[str, Decimal | None] = {}
            for role in ("qty", "unit", "amount"):
                if role in cells:
                    text = " ".join(cells[role])
                    v = classify_cell(text, decimal)
                    # prices are printed to the cent or with their currency ("0 €")
                    money = role == "qty" or _money_like(text)
                    values[role] = v.number if v.kind == "num" and money else None
            if "qtyunit" in cells:
                v = classify_cell(" ".join(cells["qtyunit"]), decimal)
                if v.kind == "qxu":
                    values["qty"], values["unit"] = v.number, v.second
            if values.get("amount") is None and values.get("unit") is None:
                continue
            items.append(
                LineItem(
                    description=desc,
                    quantity=values.get("qty"),
                    unit_price=values.get("unit"),
                    amount=values.get("amount"),
                )
            )
    return items


def label_rows_by_position(rows: list[_Row]) -> list[tuple[str, str]]:
    """(role, value text) from rows of labels with their values on the line below, in the
    same columns ("Invoice date   Due date" over "03/20/2023   04/04/2023"). A bare title word
    heading a column ("Invoice", "Factuur") names the invoice number."""
    pairs: list[tuple[str, str]] = []
    for k in range(len(rows) - 1):
        row, below = rows[k], rows[k + 1]
        if len(row.phrases) < 2 or below.page != row.page or below.y0 - row.y1 > 1.5 * row.height:
            continue
        if re.search(r"\d", row.text):
            continue
        labelled: list[tuple[list[_Tok], str]] = []
        usable = True
        for phrase in row.phrases:
            text = " ".join(t.text for t in phrase).strip(" :")
            label = match_label(text)
            if label is not None and _rest_is_empty(label.rest):
                labelled.append((phrase, label.role))
            elif _TITLE_RE.fullmatch(text):
                labelled.append((phrase, "invoice_number"))
            elif re.search(r"\d", text) or len(text.split()) > 4:
                usable = False
                break
        if not usable or not labelled:
            continue
        if any(match_label(" ".join(t.text for t in ph)) for ph in below.phrases):
            continue
        taken: set[int] = set()
        for phrase, role in labelled:
            x0, x1 = phrase[0].x0, phrase[-1].x1
            best, best_overlap = None, 0.0
            for n, value in enumerate(below.phrases):
                overlap = min(x1, value[-1].x1) - max(x0, value[0].x0)
                if n not in taken and overlap > best_overlap:
                    best, best_overlap = n, overlap
            if best is not None:
                taken.add(best)
                pairs.append((role, " ".join(t.text for t in below.phrases[best])))
    return pairs


# ============================================================================================
# The extractor
# ============================================================================================


_PAIR_ROLES = (
    "invoice_number",
    "alt_number",
    "issue_date",
    "due_date",
    "tax_id",
    "currency",
    "iban",
    "bic",
)
_TITLE_NUMBER_RE = re.compile(
    r"^(?:" + _TITLE_RE.pattern + r")\s+(?:(?:no\.?|nr\.?|n[°o]\.?|#)\s*)?([#A-Z0-9][\w/.\-]*)$",
    re.I,
)


def _sum_triple(amounts: list[Decimal]) -> tuple[Decimal, Decimal, Decimal] | None:
    """Three consecutive amounts "net, tax, gross" with net + tax = gross and the tax below
    the net (any VAT rate is under 100 %), else None."""
    for a, b, c in zip(amounts, amounts[1:], amounts[2:], strict=False):
        if a > 0 and 0 <= b < a and a + b == c:
            return a, b, c
    return None


@dataclass
class _Hit:
    role: str
    value: object
    cell: int  # index of the label cell


def _amount(hit: _Hit) -> Decimal:
    """The value of a money hit (subtotal, tax, total, amount due): always an amount, as
    `_value` and `_typed` give those roles only amounts and `_record` files text as a tax id."""
    assert isinstance(hit.value, Decimal), hit
    return hit.value


class _Document:
    """One pass of the rules over one invoice text."""

    def __init__(self, text: str, rows: list[_Row] | None = None) -> None:
        self.text = text
        # Rows of positioned words for the table and label-row readers: the PDF's word boxes
        # when the caller has them, else the text's own columns.
        self.rows = (
            rows
            if rows is not None
            else [row for n, page in enumerate(text.split("\f")) for row in rows_from_text(page, n)]
        )
        self.cells = split_cells(text)
        self.decimal = decimal_separator(text)
        self.notes: list[str] = []
        self.header_cells: set[int] = set()
        self.table_cells: set[int] = set()
        self.consumed: set[int] = set()
        self.hits: list[_Hit] = []
        self.langs = Counter(
            c.label.lang
            for c in self.cells
            if c.label and c.label.role != "ignore" and c.label.lang != "xx"
        )
        self.lang = self.langs.most_common(1)[0][0] if self.langs else "en"
        self.currency_hint = self._currency_hint()
        self.day_first = self._day_first()

    # ---- hints ------------------------------------------------------------------------------
    def _currency_hint(self) -> str | None:
        codes = Counter(m.group(1) for m in _CODE_RE.finditer(self.text))
        if codes:
            return codes.most_common(1)[0][0]
        symbols = Counter(dict(_SYMBOLS)[m.group(0)] for m in _SYMBOL_RE.finditer(self.text))
        return symbols.most_common(1)[0][0] if symbols else None

    def _day_first(self) -> bool | None:
        votes = set()
        for m in _NUM_DATE_RE.finditer(self.text):
            a, sep, b = int(m.group(1)), m.group(2), int(m.group(3))
            if sep == ".":
                continue
            if a > 12 >= b:
                votes.add(True)
            elif b > 12 >= a:
                votes.add(False)
        if len(votes) == 1:
            return votes.pop()
        # German, French, Dutch labels: day first. English: month first for dollars (US),
        # day first for any other currency (UK, Ireland, the rest of the world); with no
        # currency at all there is nothing to go by, and ambiguous dates stay unread.
        if self.lang in ("de", "fr", "nl", "pl"):
            return True
        if self.currency_hint == "USD":
            return False
        return True if self.currency_hint else None

    # ---- passes -----------------------------------------------------------------------------
    def run(self) -> Invoice:
        self._tables()
        self._key_values()
        self._label_rows()
        vendor = self._vendor()
        customer, block = self._customer(vendor)
        vendor = _clean_name(vendor)
        tax = self._tax()
        total = self._total(tax)
        subtotal = self._subtotal(tax, total)
        if total is not None and (subtotal is None or tax is None):
            found = self._sum_row(total)
            if found is not None:
                net, vat = found
                if subtotal is None and (tax is None or tax == vat):
                    subtotal, tax = net, vat
                elif tax is None and subtotal == net:
                    tax = vat
        return Invoice(
            vendor_name=vendor,
            vendor_tax_id=self._vendor_tax_id(block),
            iban=self._first("iban") or find_iban(self.text, labelled=False),
            bic=self._first("bic"),
            customer_name=customer,
            invoice_number=self._first("invoice_number")
            or self._title_number()
            or self._first("alt_number"),
            issue_date=self._first("issue_date"),
            due_date=self._first("due_date"),
            currency=self._currency(),
            subtotal=subtotal,
            tax=tax,
            total=total,
            line_items=self._choose_items(subtotal, total),
        )

    # Checks between fields ----------------------------------------------------------------------
    def _total(self, tax: Decimal | None) -> Decimal | None:
        """The total: the one printed (the last "Total" line, else the amount due). When
        different totals are printed, the one that subtotal + tax make, else the one the
        amount due repeats; failing both, none: better a review than a wrong total."""
        totals = [_amount(h) for h in self.hits if h.role == "total"]
        due = self._last("amount_due")
        if not totals:
            return due
        if len(set(totals)) == 1:
            return totals[-1]
        subtotals = {_amount(h) for h in self.hits if h.role == "subtotal"}
        if tax is not None:
            fitting = {
                t for t in totals if any(abs(s + tax - t) <= Decimal("0.01") for s in subtotals)
            }
            if len(fitting) == 1:
                return fitting.pop()
        if due is not None and due in totals:
            return due
        self.notes.append(
            f"different totals printed ({', '.join(str(t) for t in dict.fromkeys(totals))}): none taken"
        )
        return None

    def _subtotal(self, tax: Decimal | None, total: Decimal | None) -> Decimal | None:
        """The last subtotal printed, or, when several are (a gross "Subtotaal" next to
        "Exclusief BTW"), the last one that adds up with the tax to the total."""
        values = [_amount(h) for h in self.hits if h.role == "subtotal"]
        if not values:
            return None
        if tax is not None and total is not None:
            fitting = [v for v in values if abs(v + tax - total) <= Decimal("0.01")]
            if fitting:
                return fitting[-1]
        return values[-1]

    def _sum_row(self, total: Decimal) -> tuple[Decimal, Decimal] | None:
        """Net and tax from a line whose amounts read "net  tax  total" (a tax summary table,
        "Razem: 257,59 59,24 316,83"), for a total read elsewhere."""
        lines: dict[int, list[str]] = {}
        for cell in self.cells:
            lines.setdefault(cell.line, []).append(cell.text)
        for texts in lines.values():
            found = _sum_triple(
                find_amounts("  ".join(texts), self.decimal, currency=self.currency_hint)
            )
            if found is not None and found[2] == total:
                return found[0], found[1]
        return None

    def _choose_items(self, subtotal: Decimal | None, total: Decimal | None) -> list[LineItem]:
        """The text reader's line items, or the position reader's when only those add up to the
        subtotal (or total), when both read the same amounts, or when the text reader found
        none."""

        def adds_up(items: list[LineItem]) -> bool:
            amounts = [item.amount for item in items if item.amount is not None]
            if not items or len(amounts) < len(items):  # a line without an amount
                return False
            line_sum = sum(amounts, Decimal(0))
            return any(
                t is not None and abs(line_sum - t) <= Decimal("0.02") for t in (subtotal, total)
            )

        by_position = table_items_by_position(self.rows, self.decimal)
        if adds_up(self.items):
            if [i.amount for i in by_position] == [
                i.amount for i in self.items
            ] and by_position != self.items:
                # the same rows; a row's own words by position describe it better than text
                # lines, which cannot tell a note under one item from the start of the next
                self.notes.append("line item descriptions read by word positions")
                return by_position
            return self.items
        if by_position and (adds_up(by_position) or not self.items):
            if by_position != self.items:
                self.notes.append("line items read by word positions")
            return by_position
        return self.items

    def _title_number(self) -> str | None:
        """ "Invoice INV/2023/03/0008": a number printed right after the document's title, or
        on the line under a title standing alone ("INVOICE" / "# 1042")."""
        for k, cell in enumerate(self.cells):
            m = _TITLE_NUMBER_RE.match(cell.text)
            if m and not match_label(cell.text):
                number = _invoice_number(m.group(1))
                if number and (len(number) >= 3 or not number.isdigit()):
                    return number
            if _TITLE_RE.fullmatch(cell.text.strip()) and k + 1 < len(self.cells):
                m = re.match(
                    r"^(?:#|no\.?|nr\.?|n[°o]\.?)\s*(\S+)$", self.cells[k + 1].text.strip(), re.I
                )
                if m:
                    number = _invoice_number(m.group(1))
                    if number:
                        return number
        return None

    def _label_rows(self) -> None:
        """Fields still missing, from rows of labels over a row of values (by position)."""
        have = {hit.role for hit in self.hits}
        for role, text in label_rows_by_position(self.rows):
            if role in have or role not in _PAIR_ROLES:
                continue
            value = self._value(role, text)
            if value is not None:
                self.hits.append(_Hit(role, value, len(self.cells)))
                have.add(role)

    # Tables ------------------------------------------------------------------------------------
    def _header_at(self, i: int) -> tuple[int, list[str]] | None:
        """A header row starting at cell i: (cells it spans, column roles)."""
        cells = self.cells
        roles: list[str] = []
        j = i
        while j < len(cells) and cells[j].page == cells[i].page:
            r = header_roles(cells[j].text)
            if r is None:
                break
            roles.extend(r)
            j += 1
            if len(roles) >= 8:
                break
        numeric = any(r in roles for r in ("qty", "unit", "amount", "qtyunit"))
        if "desc" in roles and numeric and len(set(roles)) == len(roles):
            return j - i, roles
        return None

    def _ends_table(self, cell: Cell) -> bool:
        label = cell.label
        if label is None or label.role not in _MONEY_ROLES:
            return False
        if _CARRY_RE.match(cell.text):
            return False
        return _rest_is_empty(label.rest) or find_amount(label.rest, self.decimal) is not None

    def _tables(self) -> None:
        cells = self.cells
        self.items: list[LineItem] = []
        skipped = 0
        i = 0
        found = False
        while i < len(cells):
            header = self._header_at(i)
            if header is None:
                i += 1
                continue
            found = True
            span, roles = header
            self.header_cells.update(range(i, i + span))
            start = i + span
            end = start
            while end < len(cells) and cells[end].page == cells[i].page:
                if self._ends_table(cells[end]) or self._header_at(end):
                    break
                end += 1
            self.table_cells.update(range(start, end))
            items, bad = self._rows(range(start, end), roles)
            self.items.extend(items)
            skipped += bad
            i = end
        if not found:
            self.items, skipped = self._headerless_rows()
            if self.items:
                self.notes.append("no line-item header found; rows taken where numbers add up")
        if skipped:
            self.notes.append(f"{skipped} table row(s) without all their numbers skipped")

    def _rows(self, indexes: Iterable[int], roles: list[str]) -> tuple[list[LineItem], int]:
        """Rows of one table region: a description (maybe wrapped over several cells) followed
        by the numbers of the columns after it. Numbers before a description (a "Pos." column)
        and numbers beyond the columns' count (the next row's position) are not fields."""
        n_pre = roles.index("desc")
        post = roles[n_pre + 1 :]
        items: list[LineItem] = []
        skipped = 0
        row: dict | None = None  # {"desc": [str], "values": [_Value]}

        def finish() -> None:
            nonlocal skipped, row
            if row is not None and row["values"]:
                values = [v for v in row["values"] if v.kind != "text"]
                item = _item(" ".join(row["desc"]), values, post)
                if item is None:
                    skipped += 1
                else:
                    items.append(item)
            row = None

        skip_amount = False
        for idx in indexes:
            cell = self.cells[idx]
            value = classify_cell(cell.text, self.decimal)
            if skip_amount:
                skip_amount = False
                if value.kind == "num":
                    continue  # the amount of a "Carried forward" line
            if _CARRY_RE.match(cell.text):
                finish()
                skip_amount = find_amount(cell.text, self.decimal) is None
                continue
            if value.kind != "text":
                if row is not None:
                    row["values"].append(value)
                continue  # numbers before any description: the first row's position
            # A short text where the columns expect a unit of measure ("Stk.", "h").
            if (
                row is not None
                and row["values"]
                and len(row["values"]) < len(post)
                and post[len(row["values"])] == "uom"
                and len(value.text) <= 8
            ):
                row["values"].append(value)
                continue
            merged = _split_merged_row(value.text, self.decimal, post, n_pre=n_pre)
            if merged is not None:
                finish()
                row = {"desc": [merged[0]], "values": merged[1]}
                finish()
                continue
            if row is not None and not row["values"]:
                row["desc"].append(value.text)  # a description wrapped over lines
                continue
            finish()
            row = {"desc": [value.text], "values": []}
        finish()
        return items, skipped

    def _headerless_rows(self) -> tuple[list[LineItem], int]:
        """Without a header row, take rows whose numbers add up (qty x price = amount) from the
        cells before the first totals label."""
        end = next((c.index for c in self.cells if self._ends_table(c)), None)
        if end is None:
            return [], 0
        items: list[LineItem] = []
        desc: list[str] = []
        values: list[_Value] = []

        def flush() -> None:
            if desc and values:
                nums = [v for v in values if v.kind == "num"]
                qxu = [v for v in values if v.kind == "qxu"]
                if qxu and len(nums) >= 1:
                    item = LineItem(
                        description=" ".join(desc[-1:]),
                        quantity=qxu[0].number,
                        unit_price=qxu[0].second,
                        amount=nums[-1].number,
                    )
                elif len(nums) >= 3:
                    item = LineItem(
                        description=" ".join(desc[-1:]),
                        quantity=nums[-3].number,
                        unit_price=nums[-2].number,
                        amount=nums[-1].number,
                    )
                else:
                    return
                if _consistent(item.quantity, item.unit_price, item.amount):
                    items.append(item)

        for cell in self.cells[:end]:
            if cell.label is not None:
                flush()
                desc, values = [], []
                continue
            value = classify_cell(cell.text, self.decimal)
            if value.kind == "text":
                merged = _split_merged_row(value.text, self.decimal, ["qty", "unit", "amount"])
                if merged:
                    flush()
                    desc, values = [merged[0]], merged[1]
                    flush()
                    desc, values = [], []
                    continue
                if values:
                    flush()
                    desc, values = [], []
                desc.append(value.text)
            else:
                values.append(value)
        flush()
        return items, 0

    # Key-values ----------------------------------------------------------------------------------
    def _value(self, role: str, text: str) -> object | None:
        if role in _MONEY_ROLES:
            return find_amount(text, self.decimal, currency=self.currency_hint)
        if role in _DATE_ROLES:
            return parse_date(text, self.day_first)
        if role in ("invoice_number", "alt_number"):
            return _invoice_number(text)
        if role == "iban":
            return find_iban(text, labelled=True)
        if role == "bic":
            return find_bic(text)
        if role in ("tax_id", "customer_tax_id"):
            t = text.strip()
            return t if looks_like_tax_id(t) else None
        if role == "currency":
            m = _CODE_RE.search(text)
            return m.group(1) if m else _currency_in(text)
        if role == "ignore":
            return text.strip() or None
        return None

    def _record(self, cell: Cell, role: str, value: object, text: str = "") -> None:
        # "VAT: FR12345678901" in an address block is a tax id, not a tax amount.
        if role in ("tax", "subtotal", "total") and isinstance(value, str):
            role = "tax_id"
        if role in ("total", "amount_due") and text:
            # a totals row with its columns: "Total facture  24.99  5.00  29.99"
            found = _sum_triple(find_amounts(text, self.decimal, currency=self.currency_hint))
            if found is not None:
                self.hits.append(_Hit("subtotal", found[0], cell.index))
                self.hits.append(_Hit("tax", found[1], cell.index))
        self.hits.append(_Hit(role, value, cell.index))
        if role == "invoice_number" and text:
            # "Facture n° 562044387 du 02 Juillet 2015", "Rechnung 4711 vom 3. März 2026"
            m = re.search(r"(?i)\b(?:du|vom|of|dated|van|z\s+dnia|le|from)\s+(.{6,30})", text)
            issued = parse_date(m.group(1), self.day_first) if m else None
            if issued is not None:
                self.hits.append(_Hit("issue_date", issued, cell.index))

    def _free(self, i: int) -> bool:
        return i not in self.consumed and i not in self.header_cells and i not in self.table_cells

    def _key_values(self) -> None:
        cells = self.cells
        for cell in cells:
            i = cell.index
            if not self._free(i) or cell.label is None or cell.label.role in _BLOCK_ROLES:
                continue
            label = cell.label
            self.consumed.add(i)
            value = self._inline(label)
            if value is not None:
                self._record(cell, *value, text=label.rest)
                continue
            if not _rest_is_empty(label.rest):
                continue  # "Due: on receipt": a label with a value we cannot use
            # The value follows: in the next cell, or after a run of value-less labels.
            run = [cell]
            j = i + 1
            while j < len(cells) and cells[j].page == cell.page and self._free(j):
                nxt = cells[j].label
                if (
                    nxt is None
                    or nxt.role in _BLOCK_ROLES
                    or not _rest_is_empty(nxt.rest)
                    or self._inline(nxt)
                ):
                    break
                run.append(cells[j])
                j += 1
            values: list[Cell] = []
            while j < len(cells) and len(values) < len(run) and cells[j].page == cell.page:
                if not self._free(j):
                    j += 1
                    continue
                if cells[j].label is not None:
                    break
                if _CODE_RE.fullmatch(cells[j].text.strip()) and any(
                    _label_role(c) in _MONEY_ROLES for c in run[len(values) : len(values) + 1]
                ):
                    j += 1  # "Total" | "EUR" | "1,234.00"
                    continue
                values.append(cells[j])
                j += 1
            if len(run) > 1 and len(values) < len(run):
                values = values[:1]
                run = run[:1]
            if (
                len(run) > 1
                and len({c.line for c in run}) == 1
                and values
                and values[0].line != cell.line
            ):
                # a row of labels over a row of values pairs in order only when both rows are
                # exactly these columns; otherwise positions decide (`_label_rows`)
                label_line = [c for c in cells if c.line == cell.line]
                value_line = [c for c in cells if c.line == values[0].line]
                if label_line != run or len(value_line) != len(run):
                    continue
            if len(run) == 1 and values and label.role in ("total", "amount_due"):  # run[0] is cell
                # a totals row with several columns: "Total facture | 24.99 | 5.00 | 29.99"
                k = values[0].index + 1
                while (
                    k < len(cells)
                    and cells[k].line == values[0].line
                    and self._free(k)
                    and cells[k].label is None
                    and find_amount(cells[k].text, self.decimal) is not None
                ):
                    k += 1
                if k > values[0].index + 1:
                    row_text = "  ".join(c.text for c in cells[values[0].index : k])
                    parsed = self._typed(label.role, row_text)
                    if parsed is not None:
                        self.consumed.update(range(run[0].index, k))
                        self._record(run[0], *parsed, text=row_text)
                        continue
            for label_cell, value_cell in zip(run, values, strict=False):
                role = _label_role(label_cell)
                if role == "ignore" and not re.search(r"\d", value_cell.text):
                    continue
                parsed = self._typed(role, value_cell.text)
                if parsed is not None:
                    self.consumed.update((label_cell.index, value_cell.index))
                    self._record(label_cell, *parsed, text=value_cell.text)
                else:
                    self.consumed.add(label_cell.index)

    def _inline(self, label: LabelMatch) -> tuple[str, object] | None:
        if _rest_is_empty(label.rest):
            return None
        return self._typed(label.role, label.rest)

    def _typed(self, role: str, text: str) -> tuple[str, object] | None:
        if role in ("total", "amount_due"):
            amounts = find_amounts(text, self.decimal, currency=self.currency_hint)
            if len(amounts) > 1:
                # a totals row with its columns (net, tax, gross): the gross is the last
                found = _sum_triple(amounts)
                return role, found[2] if found else amounts[-1]
        value = self._value(role, text)
        if value is not None:
            return role, value
        if role in ("tax", "subtotal", "total") and looks_like_tax_id(text.strip(), strict=True):
            return "tax_id", text.strip()
        return None

    def _first(self, role: str):
        for hit in self.hits:
            if hit.role == role:
                return hit.value
        return None

    def _last(self, role: str):
        for hit in reversed(self.hits):
            if hit.role == role:
                return hit.value
        return None

    def _tax(self) -> Decimal | None:
        taxes = [h for h in self.hits if h.role == "tax"]
        if not taxes:
            return None
        # Several tax lines (one per rate) between the last subtotal and the total add up.
        subtotal = max((h.cell for h in self.hits if h.role == "subtotal"), default=None)
        total = max((h.cell for h in self.hits if h.role in ("total", "amount_due")), default=None)
        if subtotal is not None and total is not None and subtotal < total:
            block = [h for h in taxes if subtotal < h.cell < total]
            if (
                len(block) > 1
                and self.cells[block[-1].cell].line - self.cells[block[0].cell].line
                < len(block) + 3
            ):
                return sum((_amount(h) for h in block), Decimal(0))
            if block:
                return _amount(block[-1])
        return _amount(taxes[-1])

    # Parties ------------------------------------------------------------------------------------
    def _candidate(self, cell: Cell) -> bool:
        return self._free(cell.index) and cell.label is None and name_like(cell.text)

    def _vendor(self) -> str | None:
        for cell in self.cells:
            if cell.label and cell.label.role == "vendor":
                if name_like(cell.label.rest):
                    return cell.label.rest
                nxt = self._next_name(cell.index, limit=4)
                if nxt is not None:
                    self.consumed.add(nxt.index)
                    return nxt.text
        after_customer = 0  # a name right after "Bill to" is the customer's
        for cell in self.cells:
            if cell.page > 0:
                break
            if cell.label and cell.label.role == "customer" and _rest_is_empty(cell.label.rest):
                after_customer = 3
                continue
            if self._candidate(cell):
                if after_customer:
                    after_customer = 0
                    continue
                return cell.text
            after_customer = max(0, after_customer - 1)
        return None

    def _next_name(self, start: int, *, limit: int) -> Cell | None:
        seen = 0
        for cell in self.cells[start + 1 :]:
            if cell.page != self.cells[start].page or cell.index in self.header_cells:
                return None
            if not self._free(cell.index) or cell.label is not None:
                if cell.label and cell.label.role in _BLOCK_ROLES:
                    return None
                continue
            if name_like(cell.text):
                return cell
            seen += 1
            if seen >= limit:
                return None
        return None

    def _customer(self, vendor: str | None) -> tuple[str | None, set[int]]:
        """The customer's name and the cells of its address block."""
        anchor: int | None = None
        name: str | None = None
        for cell in self.cells:
            if cell.label and cell.label.role == "customer" and self._free(cell.index):
                if name_like(cell.label.rest) and cell.label.rest != vendor:
                    name, anchor = cell.label.rest, cell.index
                    break
                nxt = self._next_name(cell.index, limit=3)
                if nxt is not None and nxt.text != vendor:
                    name, anchor = nxt.text, cell.index
                    break
        if name is None and vendor:
            # DIN 5008 letters: a return-address line "Vendor · Street · City" above the window.
            for cell in self.cells:
                if cell.page > 0:
                    break
                line = [c for c in self.cells if c.line == cell.line]
                if (
                    cell.text == vendor
                    and len(line) >= 3
                    and line[0] is cell
                    and any(re.search(r"\d", c.text) for c in line[1:])
                ):
                    after = self.cells[line[-1].index + 1 : line[-1].index + 3]
                    for nxt in after:
                        if self._candidate(nxt) and nxt.text != vendor:
                            name, anchor = nxt.text, line[-1].index
                            break
                    if name:
                        break
        # The address block: what follows, up to the table, the totals, the next party or
        # the vendor's own line (a footer), skipping label/value pairs printed beside it.
        block: set[int] = set()
        roles = {hit.cell: hit.role for hit in self.hits}  # "VAT: DE123..." is an id, not a tax
        if anchor is not None:
            counted = 0
            for cell in self.cells[anchor + 1 :]:
                if (
                    cell.page != self.cells[anchor].page
                    or cell.index in self.header_cells
                    or counted >= 6
                ):
                    break
                role = roles.get(cell.index, cell.label.role if cell.label else None)
                if role in (*_BLOCK_ROLES, *_MONEY_ROLES):
                    break
                if vendor and cell.text == vendor:
                    break
                block.add(cell.index)
                if self._free(cell.index) and cell.label is None:
                    counted += 1
        return name, block

    def _vendor_tax_id(self, customer_block: set[int]) -> str | None:
        """The vendor's tax id: one outside the customer's address block, from the letterhead
        (before that block) if there is one, else the first (often the footer); a VAT id is
        preferred over another tax number printed next to it."""
        ids = [h for h in self.hits if h.role == "tax_id" and h.cell not in customer_block]
        if not ids:
            # no label: a VAT id by its country's format, outside the customer's block and
            # not given as the customer's
            theirs = {str(h.value) for h in self.hits if h.role == "customer_tax_id"}
            for cell in self.cells:
                if cell.index in customer_block or (
                    cell.label and cell.label.role == "customer_tax_id"
                ):
                    continue
                found = find_vat_id(cell.text)
                if found and found not in {re.sub(r"[ .\-]", "", t) for t in theirs}:
                    return found
            return None
        first_block = min(customer_block) if customer_block else None
        group = [h for h in ids if first_block is not None and h.cell < first_block] or ids
        vat = [h for h in group if looks_like_tax_id(str(h.value), strict=True)]
        return normalize_tax_id(str((vat or group)[0].value))

    def _currency(self) -> str | None:
        """An explicit "Currency:" label, else the code or symbol printed with the total (or
        the subtotal), else the one the document uses most."""
        explicit = self._first("currency")
        if explicit:
            return explicit
        for role in ("total", "amount_due", "subtotal"):
            hit = next((h for h in reversed(self.hits) if h.role == role), None)
            if hit is None:
                continue
            label = self.cells[hit.cell]
            # the label cell ("Total EUR"), then its value ("EUR 1,234.00"), maybe after a
            # lone currency cell ("Total | EUR | 1,234.00")
            for cell in self.cells[hit.cell : hit.cell + 3]:
                if cell.page != label.page:
                    break
                found = _currency_in(cell.text)
                if found:
                    return found
        return self.currency_hint


def extract_fields(text: str) -> Invoice:
    """Invoice fields from an invoice's text by rules (see the module docstring). Pure: no I/O."""
    return _Document(text).run()


def extract_document(document: ParsedDocument) -> tuple[Invoice, list[str]]:
    """The invoice and notes on what the rules skipped (for `Extraction.notes`), reading
    tables and label rows from the document's word positions when it has them (a parsed
    PDF), else from its text's columns."""
    rows = None
    if document.has_words:
        rows = [
            row
            for n in range(document.page_count)
            for row in rows_from_words(document.page_words(n), n)
        ]
    doc = _Document(document.text, rows)
    invoice = doc.run()
    return invoice, doc.notes


class OfflineExtractor:
    """The rules extractor behind the `Extractor` protocol: no network, no tokens.

    The rules are pure Python and CPU-bound (seconds on a long, text-heavy document): given a
    `parser`, they run in its pool (`PdfParser.run`), off the event loop and bounded by its
    deadline (`extract_timeout`, `extract_crashed`); without one, inline."""

    name = "offline"

    def __init__(self, parser: PdfParser | None = None) -> None:
        self.parser = parser

    async def extract(self, document: ParsedDocument) -> Extraction:
        if self.parser is None:
            invoice, notes = extract_document(document)
        else:
            invoice, notes = await self.parser.run(extract_document, document, stage="extract")
        return Extraction(invoice=invoice, source="text", notes=notes)
