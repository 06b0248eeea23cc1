"""Extraction: one interface, several extractors (offline rules here, the LLM in llm.py).

The offline extractor (`extract_fields`, `OfflineExtractor`) reads an invoice from its text
layer with general rules, no per-vendor templates:

1. The text is cut into *cells*: lines, split further where a layout puts columns side by side
   (two or more spaces, a tab, " · ", " | "). This works both for PyMuPDF's plain text (one
   cell per line) and for its sorted, layout-preserving text (several cells per line).
2. Cells that start with a known *label* (English, German, French and Dutch synonyms, matched
   longest first) take their value from the rest of the cell or from the following cell(s);
   a run of labels followed by a run of values (a label column printed before its value
   column) is paired in order. Every value is validated for its field (a date must parse as a
   date, an amount must look like money, a tax id like a tax id), otherwise it is not used.
3. Line items come from the table under a header row whose cells are column names (Pos.,
   Description, Qty, Unit price, Amount and their synonyms), down to the totals; a row is a
   description followed by its numbers, or one line "description qty price amount".
4. Parties: the vendor is the first name-like cell on the first page (or a "From/Seller"
   label); the customer the first name-like cell after a "Bill to/Rechnungsempfänger/Client/
   Klant" label, or after a DIN 5008 return-address line.

Document-wide hints decide what single values cannot: the decimal separator (from the money
amounts in the text), day-first or month-first dates (from unambiguous dates, the language of
the labels and the currency). Nothing is guessed: a field that is not found stays None.

The pieces are plain functions (`parse_number`, `parse_date`, `line_items_from_rows`, ...)
so that a position-based table reader can reuse them and feed rows it found by geometry.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from typing import Iterable, Literal, Protocol

from tasks.invoice import Invoice, LineItem
from tasks.parse import ParsedDocument


@dataclass
class Extraction:
    invoice: Invoice
    source: Literal["text", "llm", "embedded_xml"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    notes: list[str] = field(default_factory=list)


class Extractor(Protocol):
    name: str

    async def extract(self, document: ParsedDocument) -> Extraction: ...


# ============================================================================================
# Numbers
# ============================================================================================

CURRENCY_CODES = frozenset(
    "EUR USD GBP CHF JPY CAD AUD NZD SEK NOK DKK PLN CZK HUF RON BGN ISK TRY CNY HKD SGD INR "
    "ZAR BRL MXN AED SAR ILS KRW TWD THB MYR IDR PHP".split()
)
ZERO_DECIMAL_CURRENCIES = frozenset({"JPY", "KRW", "ISK", "HUF"})
# Longest first: "US$" before "$".
_SYMBOLS = (
    ("US$", "USD"), ("CA$", "CAD"), ("C$", "CAD"), ("AU$", "AUD"), ("A$", "AUD"), ("NZ$", "NZD"),
    ("HK$", "HKD"), ("S$", "SGD"), ("R$", "BRL"), ("SFr.", "CHF"), ("Fr.", "CHF"), ("€", "EUR"),
    ("£", "GBP"), ("¥", "JPY"), ("₹", "INR"), ("zł", "PLN"), ("Kč", "CZK"), ("$", "USD"),
)
_SYMBOL_CHARS = "€£¥₹$"
_CODE_RE = re.compile(r"(?<![A-Za-z])(" + "|".join(sorted(CURRENCY_CODES)) + r")(?![A-Za-z])")
_SYMBOL_RE = re.compile("|".join(re.escape(s) for s, _ in _SYMBOLS))
_STRIP_CURRENCY_RE = re.compile(
    r"^\s*(?:" + _CODE_RE.pattern + "|" + _SYMBOL_RE.pattern + r")\s*|\s*(?:"
    + _CODE_RE.pattern + "|" + _SYMBOL_RE.pattern + r")\s*$"
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
    r"(?<![\w.,])[-−(]?\s?(?:[€£¥$]\s?)?\d"
    r"(?:[\d.,'’\u00a0\u202f\u2009]|(?<=\d) (?=\d{3}(?!\d)))*\d?\)?-?(?![\w%])"
)
_PERCENT_RE = re.compile(r"[-+]?\d+(?:[.,]\d+)?\s*%")


def _has_cents(token: str) -> bool:
    return bool(re.search(r"\d[.,]\d{2}\)?-?\s*$", token.strip()))


def find_amount(text: str, decimal: str | None = None, *, currency: str | None = None) -> Decimal | None:
    """The first money amount in `text`, skipping percentages ("VAT 20 %: 123.45" -> 123.45).

    Amounts are printed to the cent; a number without cents counts only for currencies that
    have none (JPY...), so "Net 30" or "Page 2" never pass as amounts.
    """
    cleaned = _PERCENT_RE.sub(" ", text)
    cleaned = _CODE_RE.sub(" ", cleaned)
    for match in _MONEY_TOKEN_RE.finditer(cleaned):
        token = match.group(0).strip()
        value = parse_number(token, decimal)
        if value is None:
            continue
        if _has_cents(token) or (currency in ZERO_DECIMAL_CURRENCIES):
            return value
    return None


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
    "jan": 1, "january": 1, "feb": 2, "february": 2, "mar": 3, "march": 3, "apr": 4, "april": 4,
    "may": 5, "jun": 6, "june": 6, "jul": 7, "july": 7, "aug": 8, "august": 8, "sep": 9,
    "sept": 9, "september": 9, "oct": 10, "october": 10, "nov": 11, "november": 11, "dec": 12,
    "december": 12,
    # German
    "januar": 1, "jan.": 1, "jaenner": 1, "janner": 1, "februar": 2, "marz": 3, "maerz": 3,
    "mai": 5, "juni": 6, "juli": 7, "okt": 10, "oktober": 10, "dez": 12, "dezember": 12,
    # French (accents removed)
    "janvier": 1, "janv": 1, "fevrier": 2, "fevr": 2, "fev": 2, "mars": 3, "avril": 4, "avr": 4,
    "juin": 6, "juillet": 7, "juil": 7, "aout": 8, "septembre": 9, "octobre": 10,
    "novembre": 11, "decembre": 12,
    # Dutch
    "januari": 1, "februari": 2, "maart": 3, "mrt": 3, "mei": 5, "augustus": 8,
}

_ISO_DATE_RE = re.compile(r"(?<![\d.,/-])(\d{4})([-/.])(\d{1,2})\2(\d{1,2})(?![\d])")
_NUM_DATE_RE = re.compile(r"(?<![\d.,/-])(\d{1,2})([./-])(\d{1,2})\2(\d{4}|\d{2})(?![\d])")
_DMY_TEXT_RE = re.compile(
    r"(?<![\w])(\d{1,2})(?:st|nd|rd|th|er|\.)?[\s-]*(?:de\s+)?([^\W\d_]{3,10})\.?,?[\s-]+(\d{4})(?!\d)"
)
_MDY_TEXT_RE = re.compile(r"(?<![\w])([^\W\d_]{3,10})\.?\s+(\d{1,2})(?:st|nd|rd|th)?,?\s+(\d{4})(?!\d)")


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
    ("invoice_number", "en", (
        r"invoice\s*(?:no\.?|number|num\.?|nr\.?|#|n[°o]\.?|id)", r"inv\.?\s*(?:no\.?|#)",
        r"bill\s*(?:no\.?|number|#)", r"receipt\s*(?:no\.?|number|#)",
    )),
    ("invoice_number", "de", (
        r"rechnungs\s*-?\s*(?:nummer|nr\.?|no\.?)", r"rechnung\s*(?:nr\.?|nummer|no\.?)",
        r"beleg\s*-?\s*(?:nummer|nr\.?)",
    )),
    ("invoice_number", "fr", (
        r"facture\s*n[°o]\.?", r"n[°o]\.?\s*(?:de\s*)?(?:la\s*)?facture",
        r"num[ée]ro\s*(?:de\s*)?(?:la\s*)?facture", r"facture\s*num[ée]ro",
    )),
    ("invoice_number", "nl", (r"factuur\s*-?\s*(?:nummer|nr\.?|no\.?)",)),
    ("issue_date", "en", (
        r"(?:invoice|issue|billing|bill|document)\s*date", r"date\s*of\s*(?:issue|invoice)",
        r"date\s*issued", r"issued(?:\s*on)?", r"date",
    )),
    ("issue_date", "de", (r"rechnungsdatum", r"ausstellungsdatum", r"belegdatum", r"datum")),
    ("issue_date", "fr", (
        r"date\s*(?:de\s*)?(?:la\s*)?facture", r"date\s*d['’]\s*[ée]mission", r"date\s*d['’]\s*[ée]dition",
    )),
    ("issue_date", "nl", (r"factuurdatum",)),
    ("due_date", "en", (
        r"(?:payment\s*)?due(?:\s*(?:date|by|on))?", r"date\s*due", r"pay(?:ment)?\s*by",
        r"payable\s*(?:by|on|until)",
    )),
    ("due_date", "de", (
        r"f[äa]llig(?:keitsdatum|\s*am|\s*bis|\s*zum)?", r"zahlbar\s*(?:bis|am)(?:\s*zum)?",
        r"zahlungsziel", r"zahlungstermin",
    )),
    ("due_date", "fr", (
        r"(?:date\s*d['’]\s*)?[ée]ch[ée]ance", r"[àa]\s*payer\s*(?:avant\s*le|le|avant)",
        r"payable\s*(?:le|avant\s*le)", r"date\s*limite\s*de\s*paiement",
    )),
    ("due_date", "nl", (r"vervaldatum", r"vervaldag", r"te\s*betalen\s*v[óo]{1,2}r", r"uiterste\s*betaaldatum")),
    ("subtotal", "en", (
        r"sub\s*-?\s*total", r"net(?:\s*(?:amount|total|value))?", r"total\s*net",
        r"total\s*(?:excl\.?|excluding|before|ex\.?)\s*(?:vat|tax|gst)", r"amount\s*(?:excl\.?|before)\s*(?:vat|tax)",
    )),
    ("subtotal", "de", (
        r"zwischensumme", r"netto(?:\s*-?\s*(?:betrag|summe))?", r"nettobetrag", r"nettosumme",
        r"summe\s*netto", r"gesamt\s*netto", r"(?:rechnungs|gesamt)betrag\s*netto", r"warenwert",
    )),
    ("subtotal", "fr", (
        r"sous\s*-?\s*total", r"total\s*h\.?\s*t\.?", r"montant\s*h\.?\s*t\.?",
        r"total\s*hors\s*tax(?:e|es)?",
    )),
    ("subtotal", "nl", (
        r"subtotaal", r"totaal\s*excl\.?\s*btw", r"netto\s*bedrag", r"bedrag\s*excl\.?\s*btw",
    )),
    ("tax", "en", (
        r"(?:total\s*)?(?:vat|tax|sales\s*tax|gst|hst|pst)(?:\s*(?:amount|total))?",
        r"value\s*added\s*tax",
    )),
    ("tax", "de", (
        r"(?:mwst|ust|mehrwertsteuer|umsatzsteuer)\.?(?:\s*-?\s*betrag)?",
    )),
    ("tax", "fr", (r"(?:total\s*|montant\s*)?t\.?v\.?a\.?",)),
    ("tax", "nl", (r"(?:totaal\s*)?btw(?:\s*-?\s*bedrag)?",)),
    ("total", "en", (
        r"(?:grand\s*|invoice\s*)?total(?:\s*amount)?", r"total\s*(?:incl\.?|including|inc\.?)\s*(?:vat|tax|gst)",
        r"gross\s*(?:total|amount)", r"total\s*gross",
    )),
    ("total", "de", (
        r"gesamtbetrag", r"gesamtsumme", r"rechnungsbetrag", r"rechnungssumme", r"bruttobetrag",
        r"gesamt\s*brutto", r"summe\s*brutto", r"endbetrag", r"brutto(?:\s*-?\s*betrag)?",
    )),
    ("total", "fr", (r"total\s*t\.?\s*t\.?\s*c\.?", r"montant\s*t\.?\s*t\.?\s*c\.?", r"total\s*g[ée]n[ée]ral")),
    ("total", "nl", (r"totaal(?:\s*-?\s*bedrag)?", r"totaal\s*incl\.?\s*btw", r"totaalbedrag")),
    ("amount_due", "en", (
        r"(?:total\s*)?amount\s*due", r"balance(?:\s*due)?", r"total\s*due", r"amount\s*payable",
        r"please\s*pay",
    )),
    ("amount_due", "de", (r"zahlbetrag", r"zu\s*zahlen(?:der\s*betrag)?", r"offener\s*betrag")),
    ("amount_due", "fr", (r"net\s*[àa]\s*payer", r"montant\s*d[ûu]", r"reste\s*[àa]\s*payer", r"total\s*[àa]\s*payer")),
    ("amount_due", "nl", (r"te\s*betalen(?:\s*bedrag)?", r"openstaand\s*bedrag")),
    ("tax_id", "en", (
        r"(?:vat|tax|gst)\s*(?:reg(?:istration)?\.?\s*)?(?:id|no\.?|number|nr\.?|#)",
        r"vat\s*reg(?:istration|\.)?", r"ein", r"fein", r"tin", r"tax\s*id(?:entification)?(?:\s*(?:no\.?|number))?",
        r"federal\s*tax\s*id", r"company\s*vat",
    )),
    ("tax_id", "de", (
        r"ust\s*-?\s*id(?:nr\.?|\s*-?\s*nr\.?|\s*-?\s*no\.?)?",
        r"umsatzsteuer\s*-?\s*id(?:entifikationsnummer)?(?:\s*-?\s*nr\.?)?",
        r"steuer\s*-?\s*nr\.?", r"steuernummer", r"uid(?:\s*-?\s*(?:nr\.?|nummer))?",
        r"mwst\s*-?\s*(?:nr\.?|nummer)", r"che(?=\s*-)",
    )),
    ("tax_id", "fr", (
        r"n[°o]\.?\s*(?:de\s*)?tva(?:\s*intra\s*-?\s*communautaire|\s*intracom\.?)?",
        r"tva\s*intra\s*-?\s*communautaire", r"num[ée]ro\s*(?:de\s*)?tva",
        r"identifiant\s*tva",
    )),
    ("tax_id", "nl", (r"btw\s*-?\s*(?:nummer|nr\.?|id|identificatienummer)",)),
    ("customer_tax_id", "en", (
        r"(?:customer|client|buyer|recipient|your)(?:['’]s)?\s*(?:vat|tax)\s*(?:reg\.?\s*)?(?:id|no\.?|number)?",
    )),
    ("customer_tax_id", "de", (
        r"ihre\s*ust\s*-?\s*id(?:nr\.?|\s*-?\s*nr\.?)?", r"kunden\s*-?\s*ust\s*-?\s*id(?:nr\.?)?",
        r"ust\s*-?\s*id(?:nr\.?)?\s*(?:des\s*)?(?:kunden|leistungsempf[äa]ngers)",
    )),
    ("customer_tax_id", "fr", (r"(?:n[°o]\s*)?tva\s*(?:du\s*)?client",)),
    ("customer_tax_id", "nl", (
        r"(?:uw\s*)?btw\s*-?\s*(?:nummer|nr\.?)\s*(?:klant|afnemer)", r"uw\s*btw\s*-?\s*(?:nummer|nr\.?)",
    )),
    ("customer", "en", (
        r"bill(?:ed)?\s*to", r"invoice(?:d)?\s*to", r"sold\s*to", r"customer(?:\s*name)?", r"client",
        r"buyer", r"recipient", r"to(?=\s*:)",
    )),
    ("customer", "de", (
        r"rechnungs\s*-?\s*empf[äa]nger(?:in)?", r"rechnung\s*an", r"kunde", r"auftraggeber(?:in)?",
        r"leistungsempf[äa]nger(?:in)?", r"an(?=\s*:)",
    )),
    ("customer", "fr", (r"factur[ée]\s*[àa]", r"destinataire", r"adress[ée]\s*[àa]", r"acheteur")),
    ("customer", "nl", (r"factuur\s*aan", r"klant", r"afnemer", r"aan(?=\s*:)")),
    ("vendor", "en", (r"from(?=\s*:)", r"seller", r"supplier", r"vendor", r"issued\s*by", r"bill\s*from", r"payee")),
    ("vendor", "de", (r"lieferant", r"verk[äa]ufer", r"rechnungssteller", r"absender", r"leistungserbringer")),
    ("vendor", "fr", (r"fournisseur", r"vendeur", r"[ée]metteur", r"prestataire")),
    ("vendor", "nl", (r"leverancier", r"verkoper", r"afzender")),
    ("currency", "en", (r"currency",)),
    ("currency", "de", (r"w[äa]hrung",)),
    ("currency", "fr", (r"devise", r"monnaie")),
    ("currency", "nl", (r"valuta", r"munteenheid")),
    # Labels whose values must not be mistaken for anything above.
    ("ignore", "en", (
        r"(?:customer|client|account|member)\s*(?:no\.?|number|id|#|ref(?:erence)?\.?|code)",
        r"(?:customer|client)\s*(?:service|support|care)", r"attn\.?", r"attention", r"c/o", r"contact(?:\s*person)?",
        r"(?:purchase\s*)?order(?:\s*(?:no\.?|number|#|date|ref(?:erence)?\.?))?", r"p\.?\s*o\.?(?:\s*(?:no\.?|number|#))?",
        r"(?:your|our)\s*ref(?:erence)?\.?", r"reference", r"ref\.?",
        r"(?:delivery|service|supply|shipping|ship|performance|tax\s*point)\s*date", r"date\s*of\s*(?:delivery|supply|service)",
        r"ship(?:ped)?\s*to", r"deliver(?:ed|y)?\s*to", r"delivery\s*address",
        r"(?:payment\s*)?terms(?:\s*of\s*payment)?", r"payment\s*(?:method|reference)", r"(?:vat|tax)\s*rate",
        r"iban", r"bic", r"swift(?:\s*code)?", r"bank(?:\s*name|\s*details)?", r"sort\s*code",
        r"account(?:\s*(?:no\.?|number|name|holder))?", r"routing(?:\s*(?:no\.?|number))?",
        r"tel(?:\.|ephone)?", r"phone", r"fax", r"mobile", r"e\s*-?\s*mail", r"web(?:site)?", r"www",
        r"company\s*(?:no\.?|number|reg(?:istration)?\.?(?:\s*no\.?)?)", r"registered\s*(?:in|office|no\.?|number)",
        r"directors?", r"carried\s*forward", r"brought\s*forward", r"balance\s*(?:carried|brought)\s*forward",
        r"sub\s*-?\s*total\s*carried\s*forward", r"page",
    )),
    ("ignore", "de", (
        r"kunden\s*-?\s*(?:nummer|nr\.?|id)", r"z\.?\s*hd\.?(?:\s*v\.)?", r"ansprechpartner(?:in)?",
        r"bestell\s*-?\s*(?:nummer|nr\.?|datum|zeichen)",
        r"auftrags\s*-?\s*(?:nummer|nr\.?|datum)", r"ihre\s*bestellung", r"(?:ihr|unser)\s*zeichen",
        r"leistungs\s*-?\s*(?:datum|zeitraum)", r"liefer\s*-?\s*(?:datum|schein(?:\s*-?\s*nr\.?)?|anschrift|adresse)",
        r"zahlungs\s*-?\s*(?:bedingungen|art|weise)", r"steuersatz", r"bankverbindung", r"kontonummer", r"konto",
        r"blz", r"bank", r"telefon", r"tel", r"mobil", r"amtsgericht", r"registergericht",
        r"handelsregister", r"hrb", r"hra", r"firmenbuch(?:\s*-?\s*nr\.?)?", r"fn",
        r"gesch[äa]ftsf[üu]hr(?:er|erin|ung)", r"inhaber(?:in)?", r"vorstand", r"sitz(?:\s*der\s*gesellschaft)?",
        r"[üu]bertrag", r"seite",
    )),
    ("ignore", "fr", (
        r"n[°o]\.?\s*(?:de\s*)?client", r"num[ée]ro\s*(?:de\s*)?client", r"code\s*client",
        r"(?:n[°o]\.?\s*(?:de\s*)?)?(?:bon\s*de\s*)?commande", r"r[ée]f[ée]rence", r"r[ée]f\.?",
        r"date\s*de\s*(?:livraison|prestation|commande)", r"livraison", r"adresse\s*de\s*livraison",
        r"conditions\s*(?:de\s*)?(?:paiement|r[èe]glement)", r"mode\s*de\s*(?:paiement|r[èe]glement)",
        r"p[ée]nalit[ée]s", r"siret", r"siren", r"rcs", r"code\s*ape", r"ape", r"naf", r"rib", r"t[ée]l\.?",
        r"t[ée]l[ée]phone", r"capital", r"[àa]\s*reporter", r"report\s*de\s*(?:la\s*)?page", r"page",
    )),
    ("ignore", "nl", (
        r"klant\s*-?\s*(?:nummer|nr\.?)", r"debiteur\s*-?\s*(?:nummer|nr\.?)", r"order\s*-?\s*(?:nummer|nr\.?)",
        r"bestel\s*-?\s*(?:nummer|nr\.?)", r"referentie", r"kenmerk", r"uw\s*referentie",
        r"lever\s*-?\s*(?:datum|adres)", r"leveringsdatum", r"afleveradres",
        r"betalings\s*-?\s*(?:termijn|voorwaarden|kenmerk)", r"kvk(?:\s*-?\s*(?:nummer|nr\.?))?", r"kbo",
        r"pagina",
    )),
]

# "zzgl. 19 % MwSt.", "+ VAT", "20% VAT": a preposition and/or a rate may precede a label.
_LABEL_PREFIX = (
    r"(?:(?:zzgl|inkl|incl|excl|exkl|plus|abzgl|dont|davon|hiervon|hierin|including)\.?\s+|\+\s*)?"
    r"(?:\d{1,2}(?:[.,]\d{1,3})?\s*%\s*)?"
)
_LABEL_END = r"(?![^\W\d_])"  # the label is a whole word: "Net" is no label in "Network"


@dataclass(frozen=True)
class _Label:
    role: str
    lang: str
    regex: re.Pattern[str]


_LABELS = [
    _Label(role, lang, re.compile(r"^\s*" + _LABEL_PREFIX + "(?:" + pattern + ")" + _LABEL_END, re.I))
    for role, lang, patterns in _LABEL_TABLE
    for pattern in patterns
]
_ANY_LABEL = re.compile(
    r"^\s*" + _LABEL_PREFIX + "(?:" + "|".join(p for _, _, ps in _LABEL_TABLE for p in ps) + ")" + _LABEL_END, re.I
)
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


def match_label(text: str) -> LabelMatch | None:
    """The field a cell's leading label names (longest synonym wins), or None."""
    if not _ANY_LABEL.match(text):
        return None
    best: tuple[int, _Label] | None = None
    for label in _LABELS:
        m = label.regex.match(text)
        if m and (best is None or m.end() > best[0]):
            best = (m.end(), label)
    assert best is not None
    end, label = best
    rest = text[end:].lstrip(" \t:#.").strip() if label.role not in _MONEY_ROLES else text[end:].strip()
    rest = rest.lstrip(":#").strip()
    return LabelMatch(label.role, label.lang, rest)


def _rest_is_empty(rest: str) -> bool:
    """True when what follows a label carries no value: only a rate, a currency, punctuation."""
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
_DASH_SPLIT_RE = re.compile(r"\s+[-–—]\s+")


@dataclass
class Cell:
    text: str
    page: int
    line: int  # global line number
    index: int  # position in the document's cell list
    label: LabelMatch | None = None


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
_VAT_ID_RE = re.compile(r"^[A-Z]{2}[ -]?[0-9A-Z]{2,3}[0-9A-Z .\-]{4,14}[0-9A-Z](?:\s+(?:MWST|TVA|IVA))?$")
_INVOICE_NUMBER_RE = re.compile(r"^[#№]?\s*([A-Za-z0-9][A-Za-z0-9./_\-]*[A-Za-z0-9]|[0-9])$")
_TITLE_RE = re.compile(
    r"(?:(?:tax|vat|commercial|pro[\s-]?forma|sales|final)\s+)?(?:invoice|receipt|bill|statement|credit\s+note)"
    r"|(?:steuer|schluss|teil|abschlags)?rechnung|quittung|gutschrift|kassenbon|facture(?:\s+d['’]acompte)?|avoir"
    r"|factuur|creditnota|kwitantie",
    re.I,
)
_LEGAL_FORM_RE = re.compile(
    r"\b(?:GmbH|AG|KG|OG|UG|e\.K\.|GbR|SE|Ltd\.?|Limited|LLP|LLC|Inc\.?|Corp\.?|Co\.?|plc|PLC|SARL|SAS|SA|"
    r"S\.A\.|EURL|SNC|B\.V\.|BV|N\.V\.|NV|VOF|SRL|S\.r\.l\.|DAC|Oy|AB|A/S|ApS|S\.p\.A\.)\b"
)


def looks_like_tax_id(text: str, *, strict: bool = False) -> bool:
    """A VAT id (DE123456789, FR12345678901, NL123456789B01, CHE-123.456.789 MWST) or, unless
    strict, another tax number with at least six digits (US EIN 12-3456789)."""
    t = text.strip()
    if sum(ch.isdigit() for ch in t) < 6 or len(t) > 32:
        return False
    if _CODE_RE.match(t) or parse_number(t, ".") is not None or parse_number(t, ",") is not None:
        return False  # an amount ("EUR 12436.85"), not an id
    if parse_date(t, True) is not None:
        return False
    return bool((_VAT_ID_RE if strict else _TAX_ID_RE).match(t))


def normalize_tax_id(text: str) -> str:
    """"DE 123 456 789" -> "DE123456789": VAT ids are compared without spaces; other tax
    numbers (and a trailing "MWST"/"TVA") stay as printed."""
    t = " ".join(text.split())
    m = re.fullmatch(r"([A-Z]{2}[0-9A-Z .\-]*?)((?:\s+(?:MWST|TVA|IVA))?)", t)
    if m and _VAT_ID_RE.match(t) and re.fullmatch(r"[A-Z]{2}[0-9A-Z ]+", m.group(1)):
        return m.group(1).replace(" ", "") + m.group(2)
    return t


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
    token = rest.strip().split()[0] if rest.strip() else ""
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


# ============================================================================================
# Line items
# ============================================================================================

_HEADER_SUFFIX = (
    r"(?:\s*(?:\(?(?:excl\.?|incl\.?|exkl\.?|inkl\.?|zzgl\.?)?\s*(?:h\.?t\.?|ttc|net(?:to)?|brutto|vat|tax|mwst|"
    r"ust|btw|tva)\)?|\(?(?:in\s+)?(?:" + "|".join(sorted(CURRENCY_CODES)) + r")\)?|\(?[€$£]\)?"
    r"|/\s*(?:unit|st(?:ü|ue)ck|stk\.?|pc\.?|u\.?)))*"
)
_HEADER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "pos": (r"pos\.?", r"position", r"#", r"no\.?", r"nr\.?", r"n[°o]", r"line", r"item\s*(?:no\.?|#)", r"lfd\.?\s*nr\.?"),
    "desc": (
        r"descriptions?", r"item(?:s)?(?:\s*description)?", r"products?(?:\s*/\s*services?)?", r"services?",
        r"details", r"articles?", r"particulars", r"(?:leistungs|artikel)?\s*beschreibung", r"bezeichnung",
        r"artikel(?:\s*bezeichnung)?", r"leistung(?:en)?", r"d[ée]signation", r"libell[ée]", r"prestations?",
        r"omschrijving", r"dienst(?:en)?", r"produkt", r"text",
    ),
    "qty": (r"qty\.?", r"quantity", r"quantit[ée]", r"qt[ée]\.?", r"menge", r"anzahl", r"aantal", r"hours", r"hrs\.?",
            r"units", r"stunden", r"std\.?", r"heures", r"uren"),
    "uom": (r"unit", r"einheit", r"me", r"eh", r"unit[ée]", r"eenheid", r"uom"),
    "unit": (
        r"unit\s*price", r"price(?:\s*per\s*unit)?", r"rate", r"unit\s*cost", r"cost", r"einzelpreis", r"e\.?\s*-?\s*preis",
        r"st[üu]ckpreis", r"preis(?:\s*je\s*einheit)?", r"prix\s*unit(?:aire|\.)?", r"p\.?\s*u\.?", r"prix",
        r"stukprijs", r"eenheidsprijs", r"prijs(?:\s*per\s*stuk)?", r"tarief", r"ep",
    ),
    "rate": (r"(?:vat|tax|mwst|ust|tva|btw)\s*%?", r"%"),
    "amount": (
        r"amount", r"(?:line\s*)?total", r"sum", r"betrag", r"gesamt(?:preis|betrag)?", r"summe", r"montant",
        r"total", r"bedrag", r"totaal", r"net(?:to)?\s*(?:amount|betrag)?",
    ),
    "qtyunit": (r"(?:qty|quantity|menge|qt[ée]|aantal)\s*(?:x|×|@)\s*(?:unit\s*)?(?:price|preis|prix|prijs)",),
}
_HEADER_RES = {
    role: re.compile(r"^(?:" + "|".join(pats) + r")" + _HEADER_SUFFIX + r"\s*:?$", re.I)
    for role, pats in _HEADER_SYNONYMS.items()
}
_HEADER_WORD_RES = {
    role: re.compile(r"(?:" + "|".join(pats) + r")" + _HEADER_SUFFIX + r"(?=\s|$)", re.I)
    for role, pats in _HEADER_SYNONYMS.items()
}
_NUMERIC_ROLES = ("qty", "unit", "amount", "rate", "qtyunit")
_NUM = r"[-−(]?\d[\d.,'’\u00a0\u202f]*\d?\)?"
_QXU_RE = re.compile(r"^(" + _NUM + r")\s*(?:[x×*@]|\bx\b)\s*(?:[€£$¥]\s?)?(" + _NUM + r")(?:\s*[€£$¥])?$", re.I)
_NUM_UNIT_RE = re.compile(r"^(" + _NUM + r")\s?([^\W\d_][^\W\d]{0,5}\.?(?:\([^\W\d]{1,3}\))?|m²|m2|m³)$")
_CARRY_RE = re.compile(
    r"^(?:(?:sub\s*-?\s*total\s*)?(?:carried|brought)\s*forward|balance\s*(?:carried|brought)\s*forward|"
    r"[üu]bertrag|[àa]\s*reporter|report\s*(?:de\s*(?:la\s*)?page|:)|zwischensumme\s*[üu]bertrag)(?![^\W\d_])",
    re.I,
)


def header_roles(text: str) -> list[str] | None:
    """Column roles named by one header cell ("Unit price" -> ["unit"]); a cell holding a whole
    header row ("Description Qty Unit price Amount") yields several. None if not a header."""
    for role in ("qtyunit", "desc", "qty", "unit", "amount", "pos", "rate", "uom"):
        if _HEADER_RES[role].match(text.strip()):
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
        rest = rest[best[0]:].strip()
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
    if None in (qty, unit, amount):
        return False
    return abs(qty * unit - amount) <= Decimal("0.011") or abs(qty * unit - amount) <= abs(amount) * Decimal("0.0005")


def _item(desc: str, values: list[_Value], roles: list[str]) -> LineItem | None:
    """Assign a row's numbers to the numeric columns after the description, in order."""
    qty = unit = amount = None
    needed = [r for r in roles if r in _NUMERIC_ROLES]
    plain = [v for v in values if v.kind == "num"]
    compound = [v for v in values if v.kind == "qxu"]
    if compound:
        qty, unit = compound[0].number, compound[0].second
        needed = [r for r in needed if r not in ("qty", "unit", "qtyunit")]
    if len(plain) < len(needed) or not needed and not compound:
        return None
    for role, value in zip(needed, plain):
        if role == "qty":
            qty = value.number
        elif role == "unit":
            unit = value.number
        elif role == "amount":
            amount = value.number
    if amount is None and qty is None and unit is None:
        return None
    return LineItem(description=desc, quantity=qty, unit_price=unit, amount=amount)


def _split_merged_row(text: str, decimal: str | None, roles: list[str], *,
                      n_pre: int = 0) -> tuple[str, list[_Value]] | None:
    """"Consulting 2 150.00 300.00" (a row extracted as one run of words): description and
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
    tail = values[-len(needed):]
    extra = values[: len(values) - len(needed)]
    item = _item(desc, tail, needed)
    if item is None or not _consistent(item.quantity, item.unit_price, item.amount):
        return None
    if extra:  # numbers that belong to the description ("Paper, box of 500 10 4.99 49.90")
        desc = " ".join([desc, *(v.text for v in extra)])
    return desc, tail


def name_like_description(text: str) -> bool:
    return bool(re.search(r"[^\W\d_]{2}", text))


def line_items_from_rows(rows: Iterable[list[str]], roles: list[str], *, decimal: str | None) -> list[LineItem]:
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
        for cell, role in zip(cells, roles):
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
                numbers.setdefault("qty", value.number)
                numbers.setdefault("unit", value.second)
            elif role in ("qty", "unit", "amount"):
                numbers[role] = value.number
        if usable and desc and numbers:
            items.append(LineItem(description=" ".join(desc), quantity=numbers.get("qty"),
                                  unit_price=numbers.get("unit"), amount=numbers.get("amount")))
    return items


# ============================================================================================
# The extractor
# ============================================================================================


@dataclass
class _Hit:
    role: str
    value: object
    cell: int  # index of the label cell


class _Document:
    """One pass of the rules over one invoice text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.cells = split_cells(text)
        self.decimal = decimal_separator(text)
        self.notes: list[str] = []
        self.header_cells: set[int] = set()
        self.table_cells: set[int] = set()
        self.consumed: set[int] = set()
        self.hits: list[_Hit] = []
        self.langs = Counter(c.label.lang for c in self.cells if c.label and c.label.role != "ignore")
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
        if self.lang in ("de", "fr", "nl"):
            return True
        if self.currency_hint == "USD":
            return False
        return True if self.currency_hint else None

    # ---- passes -----------------------------------------------------------------------------
    def run(self) -> Invoice:
        self._tables()
        self._key_values()
        vendor = self._vendor()
        customer, block = self._customer(vendor)
        return Invoice(
            vendor_name=vendor,
            vendor_tax_id=self._vendor_tax_id(block),
            customer_name=customer,
            invoice_number=self._first("invoice_number"),
            issue_date=self._first("issue_date"),
            due_date=self._first("due_date"),
            currency=self._currency(),
            subtotal=self._last("subtotal"),
            tax=self._tax(),
            total=self._last("total") if self._last("total") is not None else self._last("amount_due"),
            line_items=self.items,
        )

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
        post = roles[n_pre + 1:]
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
            if row is not None and row["values"] and len(row["values"]) < len(post) \
                    and post[len(row["values"])] == "uom" and len(value.text) <= 8:
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
                    item = LineItem(description=" ".join(desc[-1:]), quantity=qxu[0].number,
                                    unit_price=qxu[0].second, amount=nums[-1].number)
                elif len(nums) >= 3:
                    item = LineItem(description=" ".join(desc[-1:]), quantity=nums[-3].number,
                                    unit_price=nums[-2].number, amount=nums[-1].number)
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
        if role == "invoice_number":
            return _invoice_number(text)
        if role in ("tax_id", "customer_tax_id"):
            t = text.strip()
            return t if looks_like_tax_id(t) else None
        if role == "currency":
            m = _CODE_RE.search(text)
            return m.group(1) if m else _currency_in(text)
        if role == "ignore":
            return text.strip() or None
        return None

    def _record(self, cell: Cell, role: str, value: object) -> None:
        # "VAT: FR12345678901" in an address block is a tax id, not a tax amount.
        if role in ("tax", "subtotal", "total") and isinstance(value, str):
            role = "tax_id"
        self.hits.append(_Hit(role, value, cell.index))

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
                self._record(cell, *value)
                continue
            if not _rest_is_empty(label.rest):
                continue  # "Due: on receipt": a label with a value we cannot use
            # The value follows: in the next cell, or after a run of value-less labels.
            run = [cell]
            j = i + 1
            while j < len(cells) and cells[j].page == cell.page and self._free(j):
                nxt = cells[j].label
                if nxt is None or nxt.role in _BLOCK_ROLES or not _rest_is_empty(nxt.rest) or self._inline(nxt):
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
                    c.label.role in _MONEY_ROLES for c in run[len(values):len(values) + 1]
                ):
                    j += 1  # "Total" | "EUR" | "1,234.00"
                    continue
                values.append(cells[j])
                j += 1
            if len(run) > 1 and len(values) < len(run):
                values = values[:1]
                run = run[:1]
            for label_cell, value_cell in zip(run, values):
                role = label_cell.label.role
                if role == "ignore" and not re.search(r"\d", value_cell.text):
                    continue
                parsed = self._typed(role, value_cell.text)
                if parsed is not None:
                    self.consumed.update((label_cell.index, value_cell.index))
                    self._record(label_cell, *parsed)
                else:
                    self.consumed.add(label_cell.index)

    def _inline(self, label: LabelMatch) -> tuple[str, object] | None:
        if _rest_is_empty(label.rest):
            return None
        return self._typed(label.role, label.rest)

    def _typed(self, role: str, text: str) -> tuple[str, object] | None:
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
            if len(block) > 1 and self.cells[block[-1].cell].line - self.cells[block[0].cell].line < len(block) + 3:
                return sum((h.value for h in block), Decimal(0))
            if block:
                return block[-1].value
        return taxes[-1].value

    # Parties ------------------------------------------------------------------------------------
    def _candidate(self, cell: Cell) -> bool:
        return (self._free(cell.index) and cell.label is None and name_like(cell.text))

    def _vendor(self) -> str | None:
        for cell in self.cells:
            if cell.label and cell.label.role == "vendor":
                if name_like(cell.label.rest):
                    return cell.label.rest
                nxt = self._next_name(cell.index, limit=4)
                if nxt is not None:
                    self.consumed.add(nxt.index)
                    return nxt.text
        for cell in self.cells:
            if cell.page > 0:
                break
            if self._candidate(cell):
                return cell.text
        return None

    def _next_name(self, start: int, *, limit: int) -> Cell | None:
        seen = 0
        for cell in self.cells[start + 1:]:
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
                if (cell.text == vendor and len(line) >= 3 and line[0] is cell
                        and any(re.search(r"\d", c.text) for c in line[1:])):
                    after = self.cells[line[-1].index + 1:line[-1].index + 3]
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
            for cell in self.cells[anchor + 1:]:
                if cell.page != self.cells[anchor].page or cell.index in self.header_cells or counted >= 6:
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
            for cell in self.cells[hit.cell:hit.cell + 3]:
                if cell.page != label.page:
                    break
                found = _currency_in(cell.text)
                if found:
                    return found
        return self.currency_hint


def extract_fields(text: str) -> Invoice:
    """Invoice fields from an invoice's text by rules (see the module docstring). Pure: no I/O."""
    return _Document(text).run()


def extract_fields_with_notes(text: str) -> tuple[Invoice, list[str]]:
    """`extract_fields` plus notes on what the rules skipped (for `Extraction.notes`)."""
    doc = _Document(text)
    invoice = doc.run()
    return invoice, doc.notes


class OfflineExtractor:
    """The rules extractor behind the `Extractor` protocol: no network, no tokens."""

    name = "offline"

    async def extract(self, document: ParsedDocument) -> Extraction:
        invoice, notes = extract_fields_with_notes(document.text)
        return Extraction(invoice=invoice, source="text", notes=notes)
