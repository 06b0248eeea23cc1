"""Sample invoices: realistic, deterministic PDFs together with their ground truth.

`make_invoice(seed)` draws a vendor, a customer, dates, a currency and line items from a seeded
random generator and prints them with PyMuPDF in one of several layouts. The returned `Invoice`
is exactly what is printed, so it doubles as the expected extraction.

Only the PDF base-14 fonts are used (nothing is embedded, files stay a few KB). Those fonts
cover Latin-1: umlauts, accents, the pound sign and "N°" render and extract back unchanged, the
euro sign and typographic dashes do not (they come back as "·"), so euro amounts are printed
with the ISO code "EUR" and every string is checked to be Latin-1 before it is drawn.

Every invoice without a `defect` passes `tasks.checks.check_invoice`: issue dates lie in
2024-2025 (in the past whenever this runs), VAT ids follow their country's format and IBANs
carry correct check digits with the matching bank's BIC. Only the german and dutch layouts
print IBAN and BIC, so only their truth has `iban` (no spaces) and `bic`; elsewhere both are None.

    python -m testing.samples OUT_DIR --count 12 --seed 0 [--expected DIR] [--pages N]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pymupdf

from tasks.checks import format_iban, iban_from_bban
from tasks.invoice import Invoice, LineItem

LAYOUTS: tuple[str, ...] = ("classic", "modern", "german", "compact", "french", "dutch")
DEFECTS: tuple[str, ...] = ("total_mismatch",)

CENT = Decimal("0.01")

# --------------------------------------------------------------------------------------------
# Reference data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Country:
    code: str
    currency: str
    tax_rates: tuple[str, ...]  # percent, as printed
    tax_id: str  # template: "#" a random digit, "@" a random capital letter, "%" one of A-W
    streets: tuple[str, ...]
    cities: tuple[str, ...]  # templates with the postcode where the country puts it
    legal_forms: tuple[str, ...]
    country_name: str
    street_first: bool = False  # "12 Kingsway" rather than "Hauptstraße 12"


_FILL = {
    "#": "0123456789",
    "@": "ABCDEFGHJKLMNPRSTUVWXYZ",
    "%": "ABCDEFGHIJKLMNOPQRSTUVW",  # an Irish VAT id's check letter (as many letters as "@")
}


def _fill(rng: random.Random, template: str) -> str:
    return "".join(rng.choice(_FILL[ch]) if ch in _FILL else ch for ch in template)


def _digits(rng: random.Random, n: int) -> str:
    return _fill(rng, "#" * n)


def _upper(rng: random.Random, n: int) -> str:
    return _fill(rng, "@" * n)


COUNTRIES: dict[str, _Country] = {
    "GB": _Country(
        "GB",
        "GBP",
        ("20",),
        "GB#########",
        (
            "Kingsway",
            "Deansgate",
            "Victoria Street",
            "Queen Street",
            "Park Row",
            "Whiteladies Road",
        ),
        (
            "London EC1A #@@",
            "London WC2B #@@",
            "Manchester M1 #@@",
            "Leeds LS1 #@@",
            "Bristol BS8 #@@",
            "Edinburgh EH2 #@@",
            "Cambridge CB2 #@@",
        ),
        ("Ltd", "Limited", "plc", "LLP"),
        "United Kingdom",
        street_first=True,
    ),
    "US": _Country(
        "US",
        "USD",
        ("6", "7.25", "8.25", "8.875"),
        "##-#######",
        (
            "Market Street",
            "Congress Avenue",
            "Pine Street",
            "Larimer Street",
            "Main Street",
            "Elm Street",
        ),
        (
            "San Francisco, CA 941##",
            "Austin, TX 787##",
            "Seattle, WA 981##",
            "Denver, CO 802##",
            "Boston, MA 021##",
            "Chicago, IL 606##",
            "Portland, OR 972##",
            "Raleigh, NC 276##",
        ),
        ("Inc.", "LLC", "Corp.", "Co."),
        "USA",
        street_first=True,
    ),
    "IE": _Country(
        "IE",
        "EUR",
        ("23",),
        "IE#######%",
        ("Grafton Street", "Baggot Street", "Patrick Street", "Shop Street"),
        ("Dublin 2, D02 @#@#", "Dublin 4, D04 @#@#", "Cork T12 @#@#", "Galway H91 @#@#"),
        ("Ltd", "DAC", "Limited"),
        "Ireland",
        street_first=True,
    ),
    "CH": _Country(
        "CH",
        "CHF",
        ("8.1",),
        "CHE-###.###.### MWST",
        ("Bahnhofstrasse", "Seestrasse", "Marktgasse", "Spitalgasse"),
        ("80## Zürich", "30## Bern", "40## Basel", "60## Luzern"),
        ("AG", "GmbH", "SA"),
        "Switzerland",
    ),
    "NL": _Country(
        "NL",
        "EUR",
        ("21",),
        "NL#########B01",
        ("Keizersgracht", "Coolsingel", "Oudegracht", "Stationsplein", "Herengracht"),
        ("10## @@ Amsterdam", "30## @@ Rotterdam", "35## @@ Utrecht", "56## @@ Eindhoven"),
        ("B.V.", "BV", "N.V."),
        "Nederland",
    ),
    "DE": _Country(
        "DE",
        "EUR",
        ("19", "19", "19", "7"),
        "DE#########",
        (
            "Hauptstraße",
            "Bahnhofstraße",
            "Lindenallee",
            "Friedrichstraße",
            "Schillerweg",
            "Industriestraße",
        ),
        (
            "10### Berlin",
            "80### München",
            "20### Hamburg",
            "50### Köln",
            "04### Leipzig",
            "70### Stuttgart",
        ),
        ("GmbH", "AG", "GmbH & Co. KG", "UG (haftungsbeschränkt)", "e.K."),
        "Deutschland",
    ),
    "AT": _Country(
        "AT",
        "EUR",
        ("20",),
        "ATU########",
        ("Mariahilfer Straße", "Herrengasse", "Landstraße", "Getreidegasse"),
        ("10#0 Wien", "80#0 Graz", "40#0 Linz", "50#0 Salzburg"),
        ("GmbH", "AG", "OG", "KG"),
        "Österreich",
    ),
    "FR": _Country(
        "FR",
        "EUR",
        ("20",),
        "FR###########",
        (
            "rue de la République",
            "avenue Jean Jaurès",
            "boulevard Haussmann",
            "rue Nationale",
            "place Bellecour",
        ),
        ("750## Paris", "6900# Lyon", "3100# Toulouse", "4400# Nantes", "5900# Lille"),
        ("SARL", "SAS", "S.A.", "EURL"),
        "France",
        street_first=True,
    ),
}


def rng_choice(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


_NAME_WORDS = {
    "en": (
        (
            "Northwind",
            "Bluebell",
            "Harbour",
            "Kestrel",
            "Oakridge",
            "Silverline",
            "Brightwater",
            "Redfern",
            "Summit",
            "Copperleaf",
            "Lakeside",
            "Granite",
            "Beacon",
            "Meridian",
            "Foxglove",
            "Ironbridge",
            "Willow",
            "Crestview",
            "Pinecone",
            "Highgate",
        ),
        (
            "Consulting",
            "Supplies",
            "Digital",
            "Logistics",
            "Print Works",
            "Software",
            "Analytics",
            "Facilities",
            "Engineering",
            "Media",
            "Office Solutions",
            "Catering",
            "Design Studio",
            "Networks",
            "Coffee Roasters",
            "Trading",
        ),
    ),
    "de": (
        (
            "Müller",
            "Schneider",
            "Becker",
            "Hoffmann",
            "Schäfer",
            "Krüger",
            "Weiß",
            "Zimmermann",
            "Hartmann",
            "Lange",
            "Schröder",
            "Neumann",
            "Förster",
            "Bäcker",
            "Köhler",
            "Brandt",
        ),
        (
            "Bürotechnik",
            "IT-Service",
            "Haustechnik",
            "Druckerei",
            "Softwarelösungen",
            "Logistik",
            "Elektrotechnik",
            "Beratung",
            "Gebäudereinigung",
            "Medien",
            "Maschinenbau",
            "Werbetechnik",
        ),
    ),
    "fr": (
        (
            "Dubois",
            "Lefèvre",
            "Moreau",
            "Laurent",
            "Girard",
            "Rousseau",
            "Fontaine",
            "Chevalier",
            "Mercier",
            "Garnier",
            "Faure",
            "Bérard",
            "Lemaître",
            "Durand",
        ),
        (
            "Conseil",
            "Informatique",
            "Imprimerie",
            "Bureautique",
            "Logistique",
            "Services",
            "Ingénierie",
            "Communication",
            "Nettoyage",
            "Développement",
        ),
    ),
    "nl": (
        (
            "Van Dijk",
            "De Vries",
            "Jansen",
            "Bakker",
            "Visser",
            "Smit",
            "Mulder",
            "De Boer",
            "Van den Berg",
            "Hendriks",
            "Dekker",
            "Brouwer",
            "Peeters",
            "Willems",
        ),
        (
            "Installatietechniek",
            "ICT",
            "Advies",
            "Drukwerk",
            "Kantoorartikelen",
            "Logistiek",
            "Software",
            "Schoonmaak",
            "Communicatie",
            "Techniek",
        ),
    ),
}

_PEOPLE = (
    "Jane Doe",
    "Oliver Bennett",
    "Amelia Clarke",
    "Liam O'Connor",
    "Sophie Martin",
    "Lukas Weber",
    "Emma Jansen",
    "Noah Dubois",
    "Mia Schmidt",
    "Lucas Peeters",
    "Chloé Bernard",
    "Ethan Walker",
)

_COUNTRY_LANG = {
    "GB": "en",
    "US": "en",
    "IE": "en",
    "CH": "de",
    "NL": "nl",
    "DE": "de",
    "AT": "de",
    "FR": "fr",
}


# (description, quantity kind, unit price range)
_ITEMS = {
    "en": (
        ("Consulting services", "hours", (90, 180)),
        ("Software development", "hours", (80, 150)),
        ("Project management", "hours", (70, 120)),
        ("UX design workshop (day rate)", "days", (800, 1500)),
        ("Cloud hosting, monthly plan", "few", (20, 400)),
        ("Website maintenance", "one", (150, 600)),
        ("Laptop stand, aluminium", "units", (25, 60)),
        ("USB-C docking station", "units", (80, 250)),
        ("Ergonomic office chair", "units", (150, 450)),
        ("A4 copy paper, box of 5 reams", "units", (18, 35)),
        ("Printer toner cartridge, black", "units", (45, 120)),
        ("Annual software licence 2026", "units", (99, 499)),
        ("Support ticket #4512", "one", (40, 200)),
        ("Travel expenses", "one", (50, 600)),
        ("On-site installation", "hours", (60, 110)),
        ("Business cards, 500 pcs", "few", (25, 80)),
        ("Flyers A5, full colour", "bulk", (0.05, 0.40)),
        ("Data migration", "hours", (95, 160)),
        ("Security audit", "days", (900, 1800)),
        ("Training session (half day)", "few", (350, 700)),
    ),
    "de": (
        ("Beratung", "hours", (90, 160)),
        ("Softwareentwicklung", "hours", (80, 140)),
        ("Projektleitung", "hours", (70, 120)),
        ("Montage vor Ort", "hours", (55, 95)),
        ("Wartungspauschale November", "lump", (150, 600)),
        ("Druckerpapier A4, 500 Blatt", "units", (4, 9)),
        ("Tonerkartusche schwarz", "units", (45, 120)),
        ("Bürostuhl ergonomisch", "units", (150, 450)),
        ("Softwarelizenz (jährlich)", "units", (99, 499)),
        ("Anfahrtspauschale", "lump", (35, 90)),
        ("Schulung Mitarbeiter (Tagessatz)", "days", (800, 1400)),
        ("Netzwerkkabel Cat. 6, 5 m", "units", (4, 15)),
        ("Flyer DIN A5, 4/4-farbig", "bulk", (0.04, 0.30)),
        ("Server-Hosting Dezember", "lump", (40, 300)),
    ),
    "fr": (
        ("Prestation de conseil", "hours", (90, 160)),
        ("Développement logiciel", "hours", (80, 140)),
        ("Maintenance mensuelle", "one", (150, 600)),
        ("Ramettes papier A4", "units", (4, 9)),
        ("Cartouche d'encre noire", "units", (35, 95)),
        ("Frais de déplacement", "one", (40, 400)),
        ("Formation (journée)", "days", (700, 1300)),
        ("Licence logicielle annuelle", "units", (99, 499)),
        ("Installation sur site", "hours", (55, 95)),
        ("Hébergement web, décembre", "one", (20, 300)),
        ("Dépliants A5 couleur", "bulk", (0.05, 0.35)),
    ),
    "nl": (
        ("Advieswerkzaamheden", "hours", (85, 150)),
        ("Softwareontwikkeling", "hours", (80, 140)),
        ("Projectbegeleiding", "hours", (70, 120)),
        ("Maandelijks onderhoud", "one", (150, 600)),
        ("Kopieerpapier A4 (doos)", "units", (18, 35)),
        ("Inktcartridge zwart", "units", (35, 95)),
        ("Reiskosten", "one", (40, 300)),
        ("Training (dagdeel)", "few", (350, 700)),
        ("Jaarlicentie software", "units", (99, 499)),
        ("Installatie op locatie", "hours", (55, 95)),
        ("Folders A5, full colour", "bulk", (0.05, 0.35)),
    ),
    "receipt": (
        ("Espresso beans 1kg", "units", (14, 32)),
        ("Oat milk 1l", "units", (2, 4)),
        ("Paper cups 12oz (50)", "units", (4, 9)),
        ("Cleaning tablets", "units", (9, 19)),
        ("Filter papers (100)", "units", (3, 7)),
        ("Gift card", "one", (20, 100)),
        ("Descaler 500ml", "units", (8, 15)),
        ("Croissant", "units", (1.2, 3.5)),
        ("Sandwich platter", "few", (25, 60)),
        ("Bottled water 0.5l", "units", (1, 2.5)),
        ("Delivery", "one", (5, 15)),
    ),
}

_GERMAN_UNITS = {
    "hours": "Std.",
    "days": "Tag(e)",
    "units": "Stk.",
    "lump": "Psch.",
    "bulk": "Stk.",
    "one": "Psch.",
    "few": "Stk.",
}


# Banks a vendor's account is with: (city the bank is in or "", national bank code, BIC).
# Real bank codes and BICs, so an IBAN's bank part and the printed BIC agree.
_BANKS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "DE": (
        ("Berlin", "10050000", "BELADEBEXXX"),
        ("München", "70150000", "SSKMDEMMXXX"),
        ("Hamburg", "20050550", "HASPDEHHXXX"),
        ("Köln", "37050198", "COLSDE33XXX"),
        ("Leipzig", "86055592", "WELADE8LXXX"),
        ("Stuttgart", "60050101", "SOLADEST600"),
    ),
    "AT": (
        ("Wien", "20111", "GIBAATWWXXX"),
        ("Graz", "20815", "STSPAT2GXXX"),
        ("Linz", "20320", "ASPKAT2LXXX"),
        ("Salzburg", "20404", "SBGSAT2SXXX"),
    ),
    "NL": (
        ("", "ABNA", "ABNANL2A"),
        ("", "INGB", "INGBNL2A"),
        ("", "RABO", "RABONL2U"),
        ("", "TRIO", "TRIONL2U"),
        ("", "SNSB", "SNSBNL2A"),
        ("", "KNAB", "KNABNL2H"),
    ),
    "GB": (
        ("", "NWBK60", "NWBKGB2L"),
        ("", "BARC20", "BARCGB22"),
        ("", "LOYD30", "LOYDGB2L"),
        ("", "HBUK40", "HBUKGB4B"),
    ),
    "IE": (("", "AIBK93", "AIBKIE2D"), ("", "BOFI90", "BOFIIE2D")),
    "CH": (
        ("", "00230", "UBSWCHZH80A"),
        ("", "00700", "ZKBKCHZZ80A"),
        ("", "09000", "POFICHBEXXX"),
    ),
    "FR": (
        ("", "30004", "BNPAFRPPXXX"),
        ("", "30003", "SOGEFRPPXXX"),
        ("", "30002", "CRLYFRPPXXX"),
        ("", "20041", "PSSTFRPPPAR"),
    ),
}


def _bank_account(country: str, city_line: str, digits: str) -> tuple[str, str] | None:
    """A valid IBAN (no spaces) and the matching BIC for a vendor in `country`, or None where
    there are no IBANs (US). `digits` (20 random digits) supply the account number; the bank
    is the one in the vendor's city when there is one, else picked by the digits."""
    banks = _BANKS.get(country)
    if not banks:
        return None
    local = [bank for bank in banks if bank[0] and bank[0] in city_line]
    _, code, bic = local[0] if local else banks[int(digits[-4:]) % len(banks)]
    if country == "DE":  # Bankleitzahl (8) + account (10)
        bban = code + digits[:10]
    elif country == "AT":  # Bankleitzahl (5) + account (11)
        bban = code + digits[:11]
    elif country == "NL":  # bank (4 letters) + account (10)
        bban = code + digits[:10]
    elif (
        country in ("GB", "IE") or country == "CH"
    ):  # bank (4 letters) + sort code (6) + account (8)
        bban = code + digits[:12]
    else:  # FR: bank (5) + branch (5) + account (11) + RIB key (2)
        branch, account = digits[:5], digits[5:16]
        key = 97 - (89 * int(code) + 15 * int(branch) + 3 * int(account)) % 97
        bban = f"{code}{branch}{account}{key:02d}"
    return iban_from_bban(country, bban), bic


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

_MONTHS_EN = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def fmt_number(value: Decimal, style: str, places: int | None = 2) -> str:
    """Format like a locale would: en 1,234.56 / de 1.234,56 / fr 1 234,56 / ch 1'234.56."""
    if places is None:
        text = format(value.normalize(), "f")
        if "." in text:
            intpart, frac = text.split(".")
        else:
            intpart, frac = text, ""
    else:
        text = f"{value:.{places}f}"
        intpart, _, frac = text.partition(".")
    neg = intpart.startswith("-")
    intpart = intpart.lstrip("-")
    group, dec = {
        "en": (",", "."),
        "de": (".", ","),
        "fr": (" ", ","),
        "ch": ("'", "."),
        "plain": ("", "."),
    }[style]
    groups: list[str] = []
    while len(intpart) > 3:
        groups.insert(0, intpart[-3:])
        intpart = intpart[:-3]
    groups.insert(0, intpart)
    out = group.join(groups) + (dec + frac if frac else "")
    return ("-" if neg else "") + out


def fmt_date(d: date, style: str) -> str:
    if style == "iso":
        return d.isoformat()
    if style == "dmy.":
        return f"{d.day:02d}.{d.month:02d}.{d.year}"
    if style == "dmy/":
        return f"{d.day:02d}/{d.month:02d}/{d.year}"
    if style == "dmy-":
        return f"{d.day:02d}-{d.month:02d}-{d.year}"
    if style == "mdy/":
        return f"{d.month:02d}/{d.day:02d}/{d.year}"
    if style == "d mon y":
        return f"{d.day} {_MONTHS_EN[d.month - 1][:3]} {d.year}"
    if style == "d month y":
        return f"{d.day} {_MONTHS_EN[d.month - 1]} {d.year}"
    if style == "month d, y":
        return f"{_MONTHS_EN[d.month - 1]} {d.day}, {d.year}"
    if style == "mon d, y":
        return f"{_MONTHS_EN[d.month - 1][:3]} {d.day}, {d.year}"
    raise ValueError(style)


# --------------------------------------------------------------------------------------------
# The invoice content (what is printed), independent of layout drawing
# --------------------------------------------------------------------------------------------


@dataclass
class _Party:
    name: str
    lines: list[str]  # address lines, country last when shown
    tax_id: str | None
    country: str


@dataclass
class _Content:
    layout: str
    lang: str
    vendor: _Party
    customer: _Party
    number: str
    issue: date
    due: date
    currency: str
    tax_rate: str  # percent as printed, in the layout's number style
    lines: list[tuple[str, Decimal, Decimal, Decimal, str]]  # desc, qty, unit, amount, qty kind
    subtotal: Decimal
    tax: Decimal
    total: Decimal  # as printed
    num_style: str
    date_style: str
    customer_no: str
    order_no: str
    delivery: date
    reverse_charge: bool = False
    extras: dict = field(default_factory=dict)
    iban: str | None = None  # in the truth only where the layout prints bank details
    bic: str | None = None

    def money(self, value: Decimal) -> str:
        return fmt_number(value, self.num_style)

    def qty(self, value: Decimal) -> str:
        return fmt_number(value, self.num_style, places=None)

    def date(self, value: date) -> str:
        return fmt_date(value, self.date_style)

    def invoice(self) -> Invoice:
        return Invoice(
            vendor_name=self.vendor.name,
            vendor_tax_id=self.vendor.tax_id,
            iban=self.iban,
            bic=self.bic,
            customer_name=self.customer.name,
            invoice_number=self.number,
            issue_date=self.issue,
            due_date=self.due,
            currency=self.currency,
            subtotal=self.subtotal,
            tax=self.tax,
            total=self.total,
            line_items=[
                LineItem(description=d, quantity=q, unit_price=u, amount=a)
                for d, q, u, a, _ in self.lines
            ],
        )


def _company(rng: random.Random, country: _Country, lang: str) -> str:
    first, second = _NAME_WORDS[lang]
    form = rng_choice(rng, country.legal_forms)
    if lang == "de" and rng.random() < 0.3:
        one, two = rng.sample(first, 2)
        return f"{one} & {two} {form}"
    return f"{rng_choice(rng, first)} {rng_choice(rng, second)} {form}"


def _party(
    rng: random.Random, code: str, *, person: bool = False, with_tax_id: bool = True
) -> _Party:
    country = COUNTRIES[code]
    lang = _COUNTRY_LANG[code]
    if person:
        name = rng_choice(rng, _PEOPLE)
    else:
        name = _company(rng, country, lang if lang in _NAME_WORDS else "en")
    number = rng.randint(1, 240)
    street = rng_choice(rng, country.streets)
    street_line = f"{number} {street}" if country.street_first else f"{street} {number}"
    city = _fill(rng, rng_choice(rng, country.cities))
    return _Party(
        name,
        [street_line, city, country.country_name],
        _fill(rng, country.tax_id) if with_tax_id else None,
        code,
    )


def _money(rng: random.Random, lo: float, hi: float) -> Decimal:
    cents = rng.randint(int(lo * 100), int(hi * 100))
    if hi >= 20 and rng.random() < 0.5:
        cents = cents // 100 * 100 + rng.choice((0, 0, 50, 90, 95, 99))
    return (Decimal(cents) / 100).quantize(CENT)


def _quantity(rng: random.Random, kind: str) -> Decimal:
    if kind == "hours":
        return Decimal(
            rng.choice(
                ("0.5", "1", "1.5", "2", "2.5", "3", "4", "6", "7.5", "8", "10", "12", "16", "0.25")
            )
        )
    if kind == "days":
        return Decimal(rng.choice(("1", "1", "2", "3", "0.5")))
    if kind in ("one", "lump"):
        return Decimal(1)
    if kind == "few":
        return Decimal(rng.randint(1, 4))
    if kind == "bulk":
        return Decimal(rng.choice((250, 500, 1000, 1200, 2500, 5000)))
    return Decimal(rng.randint(1, 24))


_LAYOUT_COUNTRIES = {
    "classic": ("GB", "US", "IE", "CH"),
    "modern": ("US", "GB", "IE", "NL"),
    "compact": ("US", "GB", "CH", "IE"),
    "german": ("DE", "AT"),
    "french": ("FR",),
    "dutch": ("NL",),
}


def _content(rng: random.Random, layout: str, n_lines: int, defect: str | None) -> _Content:
    code = rng_choice(rng, _LAYOUT_COUNTRIES[layout])
    country = COUNTRIES[code]
    lang = {"german": "de", "french": "fr", "dutch": "nl"}.get(layout, "en")
    vendor = _party(rng, code)
    vendor.name = _company(rng, country, lang)  # a name in the invoice's language
    if layout == "compact":
        cust_code = code
        customer = _party(rng, cust_code, person=rng.random() < 0.5, with_tax_id=False)
    else:
        cust_code = code if rng.random() < 0.7 else rng_choice(rng, ("DE", "FR", "NL", "GB", "IE"))
        customer = _party(rng, cust_code, with_tax_id=rng.random() < 0.4 and cust_code != "US")
        if customer.name == vendor.name:
            customer.name = "Atlas " + customer.name
    reverse_charge = (
        cust_code != code
        and code in ("IE", "NL", "DE", "AT", "FR")
        and cust_code in ("DE", "FR", "NL", "IE")
        and customer.tax_id is not None
    )

    # Dates: two years that are over, so every issue date is in the past whenever this runs
    issue = date(2024, 1, 1) + timedelta(days=rng.randint(0, 729))
    due = issue + timedelta(days=rng.choice((14, 30, 30, 60)))
    delivery = issue - timedelta(days=rng.randint(0, 10))

    # Styles
    if layout == "german":
        num_style, date_style = "de", "dmy."
    elif layout == "french":
        num_style, date_style = "fr", "dmy/"
    elif layout == "dutch":
        num_style, date_style = "de", "dmy-"
    elif layout == "compact":
        num_style, date_style = ("ch" if code == "CH" else "en"), "iso"
    else:
        num_style = "ch" if code == "CH" and layout == "classic" else "en"
        if code == "US":
            date_style = rng_choice(
                rng,
                ("mdy/", "month d, y", "mon d, y")
                if layout == "classic"
                else ("month d, y", "mon d, y"),
            )
        elif code == "CH":
            date_style = rng_choice(rng, ("dmy.", "d mon y"))
        elif code == "NL":
            date_style = rng_choice(rng, ("dmy-", "d month y"))
        else:
            date_style = rng_choice(
                rng,
                ("d mon y", "dmy/", "d month y")
                if layout == "classic"
                else ("d month y", "d mon y"),
            )

    # Numbers
    year = issue.year
    serial = rng.randint(1, 9999)
    number = {
        "classic": lambda: rng_choice(
            rng, (f"INV-{year}-{serial:04d}", f"{serial + 100000:06d}", f"INV{serial:05d}")
        ),
        "modern": lambda: f"{_upper(rng, 4)}{_digits(rng, 4)}-{serial % 1000:04d}",
        "compact": lambda: rng_choice(rng, (f"R{year}{serial:05d}", f"{year}-{serial:05d}")),
        "german": lambda: rng_choice(
            rng, (f"RE-{year}-{serial:04d}", f"{year}{serial:04d}", f"RG{serial:06d}")
        ),
        "french": lambda: rng_choice(
            rng, (f"F{year}-{serial:04d}", f"FA-{year}{issue.month:02d}-{serial % 1000:03d}")
        ),
        "dutch": lambda: rng_choice(rng, (f"{year}.{serial:04d}", f"F{year}-{serial:04d}")),
    }[layout]()

    # Lines
    pool = _ITEMS["receipt" if layout == "compact" else lang]
    lines = []
    for _ in range(n_lines):
        desc, kind, (lo, hi) = rng_choice(rng, pool)
        qty = _quantity(rng, kind)
        unit = _money(rng, lo, hi)
        amount = (qty * unit).quantize(CENT, ROUND_HALF_UP)
        lines.append((desc, qty, unit, amount, kind))

    rate_text = "0" if reverse_charge else rng_choice(rng, country.tax_rates)
    rate = Decimal(rate_text) / 100
    subtotal = sum((a for *_, a, _k in lines), Decimal(0)).quantize(CENT)
    tax = (subtotal * rate).quantize(CENT, ROUND_HALF_UP)
    total = subtotal + tax
    if defect == "total_mismatch":
        delta = _money(rng, 0.10, 99.99)
        if rng.random() < 0.5 and total > delta:
            delta = -delta
        total = total + delta
    elif defect is not None:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")

    if num_style in ("de", "fr"):
        rate_text = rate_text.replace(".", ",")

    return _Content(
        layout=layout,
        lang=lang,
        vendor=vendor,
        customer=customer,
        number=number,
        issue=issue,
        due=due,
        currency=country.currency,
        tax_rate=rate_text,
        lines=lines,
        subtotal=subtotal,
        tax=tax,
        total=total,
        num_style=num_style,
        date_style=date_style,
        customer_no=rng_choice(
            rng, (f"C-{rng.randint(10000, 99999)}", str(rng.randint(10000, 99999)))
        ),
        order_no=f"PO-{rng.randint(1000, 99999)}",
        delivery=delivery,
        reverse_charge=reverse_charge,
    )


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

BLACK = (0, 0, 0)
GRAY = (0.42, 0.42, 0.42)
LIGHT = (0.86, 0.86, 0.86)
PALE = (0.95, 0.95, 0.95)
WHITE = (1, 1, 1)


class _Canvas:
    """Draws on one page through a single Shape: one content stream, committed once."""

    def __init__(self, page: pymupdf.Page) -> None:
        self.page = page
        self.shape = page.new_shape()

    def text(
        self,
        x: float,
        y: float,
        s: str,
        *,
        font: str = "helv",
        size: float = 9,
        color=BLACK,
        align: str = "left",
        max_width: float | None = None,
    ) -> None:
        s.encode("latin-1")  # base-14 fonts: anything else would not render
        if max_width is not None:  # shrink long names rather than cut them
            natural = pymupdf.get_text_length(s, fontname=font, fontsize=size)
            if natural > max_width:
                size = max(5.0, size * max_width / natural)
        if align != "left":
            width = pymupdf.get_text_length(s, fontname=font, fontsize=size)
            x -= width if align == "right" else width / 2
        self.shape.insert_text((x, y), s, fontname=font, fontsize=size, color=color)

    def rect(self, x0, y0, x1, y1, *, fill=None, color=None, width: float = 0.6) -> None:
        self.shape.draw_rect(pymupdf.Rect(x0, y0, x1, y1))
        self.shape.finish(color=color, fill=fill, width=width)

    def line(self, x0, y0, x1, y1, *, color=LIGHT, width: float = 0.6) -> None:
        self.shape.draw_line((x0, y0), (x1, y1))
        self.shape.finish(color=color, width=width)

    def commit(self) -> None:
        self.shape.commit()


def fits(text: str, width: float, font: str = "helv", size: float = 9) -> str:
    """Shorten `text` so it fits in `width` points (descriptions never wrap)."""
    while pymupdf.get_text_length(text, fontname=font, fontsize=size) > width and len(text) > 4:
        text = text[:-2].rstrip() + "."
    return text


@dataclass
class _Column:
    role: str  # pos, desc, qty, unit, amount, qtyunit
    title: str
    x: float  # left edge for left-aligned, right edge for right-aligned
    align: str = "right"
    width: float = 0.0


class _Layout:
    """Page geometry plus the drawing of one layout. Subclasses fill in the blanks."""

    size: tuple[float, float] = (595, 842)  # A4 portrait
    first_top = 330.0  # y of the table header on page 1
    cont_top = 110.0  # y of the table header on continuation pages
    bottom = 760.0  # rows must end above this
    row_h = 15.0
    head_h = 20.0
    totals_h = 80.0
    font, bold, size_ = "helv", "hebo", 9.0
    margin = 44.0
    continued = "Continued on next page"
    prints_bank_details = False  # IBAN and BIC on the page (then they are in the truth)

    def __init__(self, c: _Content) -> None:
        self.c = c

    # geometry -------------------------------------------------------------------------------
    def columns(self) -> list[_Column]:
        raise NotImplementedError

    def paginate(self, n: int) -> list[list[int]]:
        pages: list[list[int]] = []
        current: list[int] = []
        y = self.first_top + self.head_h
        for i in range(n):
            if y + self.row_h > self.bottom:
                pages.append(current)
                current = []
                y = self.cont_top + self.head_h
            current.append(i)
            y += self.row_h
        if y + self.totals_h > self.bottom:
            pages.append(current)
            current = []
        pages.append(current)
        return pages

    def lines_for_pages(self, pages: int, rng: random.Random) -> int:
        first = int((self.bottom - self.first_top - self.head_h) // self.row_h)
        cont = int((self.bottom - self.cont_top - self.head_h) // self.row_h)
        if pages <= 1:
            last_max = int(
                (self.bottom - self.totals_h - self.first_top - self.head_h) // self.row_h
            )
            n = rng.randint(1, max(1, min(last_max, 12)))
        else:
            last_max = int(
                (self.bottom - self.totals_h - self.cont_top - self.head_h) // self.row_h
            )
            n = first + (pages - 2) * cont + rng.randint(1, max(1, last_max))
        assert len(self.paginate(n)) == max(1, pages), (pages, n, len(self.paginate(n)))
        return n

    # drawing ----------------------------------------------------------------------------------
    def render(self) -> bytes:
        c = self.c
        doc = pymupdf.open()
        plan = self.paginate(len(c.lines))
        self.adjust(plan)
        n_pages = len(plan)
        running = Decimal(0)
        for index, rows in enumerate(plan):
            page = doc.new_page(width=self.size[0], height=self.size[1])
            cv = _Canvas(page)
            last = index == n_pages - 1
            self.before_page(cv, index, n_pages)
            if index == 0:
                self.first_header(cv)
                y = self.first_top
            else:
                y = self.cont_header(cv, index, n_pages, running)
            if rows or not last or index == 0:
                self.table_header(cv, y)
                y += self.head_h
                for i in rows:
                    self.row(cv, y, i)
                    running += c.lines[i][3]
                    y += self.row_h
            if last:
                self.totals(cv, y + 6)
            else:
                self.carry(cv, y, running)
            self.footer(cv, index, n_pages)
            cv.commit()
        doc.set_metadata(
            {
                "title": f"Invoice {c.number}",
                "author": c.vendor.name,
                "creator": "testing.samples",
                "producer": "PyMuPDF",
                "creationDate": f"D:{c.issue:%Y%m%d}090000Z",
                "modDate": f"D:{c.issue:%Y%m%d}090000Z",
            }
        )
        return doc.tobytes(garbage=3, deflate=True, no_new_id=True)

    def adjust(self, plan: list[list[int]]) -> None:
        """Last chance to change the geometry once the pagination is known."""

    def before_page(self, cv: _Canvas, index: int, n_pages: int) -> None:
        pass

    def first_header(self, cv: _Canvas) -> None:
        raise NotImplementedError

    def cont_header(self, cv: _Canvas, index: int, n_pages: int, running: Decimal) -> float:
        c = self.c
        m, w = self.margin, self.size[0]
        cv.text(m, 60, c.vendor.name, font=self.bold, size=11)
        cv.text(w - m, 60, f"Invoice {c.number} (continued)", size=9, color=GRAY, align="right")
        cv.line(m, 70, w - m, 70)
        return self.cont_top

    def table_header(self, cv: _Canvas, y: float) -> None:
        cv.rect(
            self.margin - 6, y - 4, self.size[0] - self.margin + 6, y + self.head_h - 6, fill=PALE
        )
        for col in self.columns():
            cv.text(
                col.x,
                y + 9,
                col.title,
                font=self.bold,
                size=self.size_,
                align="left" if col.align == "left" else "right",
            )

    def cell_text(self, role: str, i: int) -> str:
        desc, qty, unit, amount, _kind = self.c.lines[i]
        if role == "pos":
            return str(i + 1)
        if role == "desc":
            return desc
        if role == "qty":
            return self.c.qty(qty)
        if role == "unit":
            return self.c.money(unit)
        if role == "amount":
            return self.c.money(amount)
        if role == "qtyunit":
            return f"{self.c.qty(qty)} x {self.c.money(unit)}"
        raise ValueError(role)

    def row(self, cv: _Canvas, y: float, i: int) -> None:
        for col in self.columns():
            text = self.cell_text(col.role, i)
            if col.role == "desc":
                text = fits(text, col.width, self.font, self.size_)
                # keep the truth equal to what is printed
                _d, q, u, a, k = self.c.lines[i]
                self.c.lines[i] = (text, q, u, a, k)
            cv.text(
                col.x,
                y + 9,
                text,
                font=self.font,
                size=self.size_,
                align="left" if col.align == "left" else "right",
            )
        cv.line(
            self.margin,
            y + self.row_h - 3,
            self.size[0] - self.margin,
            y + self.row_h - 3,
            color=PALE,
        )

    def carry(self, cv: _Canvas, y: float, running: Decimal) -> None:
        cv.text(
            self.size[0] - self.margin, y + 14, self.continued, size=8, color=GRAY, align="right"
        )

    def totals(self, cv: _Canvas, y: float) -> None:
        raise NotImplementedError

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        cv.text(
            self.size[0] / 2,
            self.size[1] - 30,
            f"Page {index + 1} of {n_pages}",
            size=7,
            color=GRAY,
            align="center",
        )


def _symbol_money(c: _Content, value: Decimal) -> str:
    amount = c.money(value)
    if c.currency == "GBP":
        return f"£{amount}"
    if c.currency == "USD":
        return f"${amount}"
    return f"{c.currency} {amount}"


class _Classic(_Layout):
    """Letterhead left, INVOICE right, bill-to block, shaded line table, boxed totals."""

    first_top = 300.0

    def __init__(self, c: _Content, rng: random.Random) -> None:
        super().__init__(c)
        if c.vendor.country == "US":
            self.size = (612, 792)
            self.bottom = 712.0
        self.labels = {
            "number": rng_choice(rng, ("Invoice No:", "Invoice #:", "Invoice Number:")),
            "date": rng_choice(rng, ("Invoice Date:", "Date:", "Date of issue:")),
            "due": rng_choice(rng, ("Due Date:", "Payment due:")),
            "bill": rng_choice(rng, ("Bill To", "Invoice To", "Billed To")),
            "taxid": "EIN:"
            if c.vendor.country == "US"
            else rng_choice(rng, ("VAT No:", "VAT Reg. No.:")),
            "tax": "Sales Tax" if c.vendor.country == "US" else "VAT",
            "amount_title": rng_choice(rng, ("Amount", "Total")),
        }

    def columns(self) -> list[_Column]:
        r = self.size[0] - 44
        return [
            _Column("desc", "Description", 44, "left", width=r - 44 - 230),
            _Column("qty", "Qty", r - 170),
            _Column("unit", "Unit Price", r - 85),
            _Column("amount", self.labels["amount_title"], r),
        ]

    def first_header(self, cv: _Canvas) -> None:
        c, L, w = self.c, self.labels, self.size[0]
        # Side-by-side blocks share one baseline grid (12 pt pitch), so text extraction that
        # sorts by position sees "street   Invoice No:   123" rather than interleaved lines.
        cv.text(44, 66, c.vendor.name, font="hebo", size=16, max_width=w - 88 - 150)
        cv.text(w - 44, 66, "INVOICE", font="hebo", size=22, align="right")
        left = [*c.vendor.lines, f"{L['taxid']} {c.vendor.tax_id}"]
        right = [
            (L["number"], c.number),
            (L["date"], c.date(c.issue)),
            (L["due"], c.date(c.due)),
            ("PO Number:", c.order_no),
        ]
        y = 90
        for k in range(max(len(left), len(right))):
            if k < len(left):
                cv.text(44, y, left[k], size=9, color=GRAY)
            if k < len(right):
                cv.text(w - 190, y, right[k][0], font="hebo", size=9)
                cv.text(w - 44, y, right[k][1], size=9, align="right")
            y += 12
        cv.line(44, 168, w - 44, 168, color=GRAY)
        cv.text(44, 190, L["bill"], font="hebo", size=10)
        y = 205
        for line in [c.customer.name, *c.customer.lines]:
            cv.text(44, y, line, size=9)
            y += 12
        if c.customer.tax_id:
            cv.text(44, y, f"VAT: {c.customer.tax_id}", size=9)

    def totals(self, cv: _Canvas, y: float) -> None:
        c, w = self.c, self.size[0]
        cv.rect(w - 230, y, w - 40, y + 62, color=LIGHT)
        rows = [
            ("Subtotal", c.subtotal, "helv"),
            (f"{self.labels['tax']} {c.tax_rate}%", c.tax, "helv"),
            (f"Total {c.currency}", c.total, "hebo"),
        ]
        yy = y + 16
        for label, value, font in rows:
            cv.text(w - 222, yy, label, font=font, size=9)
            cv.text(w - 48, yy, _symbol_money(c, value), font=font, size=9, align="right")
            yy += 17

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        c, w, h = self.c, self.size[0], self.size[1]
        if index == n_pages - 1:
            cv.text(
                44,
                h - 70,
                f"Payment terms: {(c.due - c.issue).days} days net. "
                "Please quote the invoice number with your payment.",
                size=8,
            )
            if c.reverse_charge:
                cv.text(
                    44, h - 58, "Reverse charge: VAT to be accounted for by the recipient.", size=8
                )
        cv.line(44, h - 45, w - 44, h - 45)
        cv.text(
            44,
            h - 34,
            f"{c.vendor.name} | {c.vendor.lines[0]}, {c.vendor.lines[1]}",
            size=7,
            color=GRAY,
        )
        cv.text(w - 44, h - 34, f"Page {index + 1} of {n_pages}", size=7, color=GRAY, align="right")


class _Modern(_Layout):
    """Colour band, two-column header (billed-to left, meta right), right-aligned totals."""

    first_top = 290.0
    cont_top = 100.0
    totals_h = 100.0
    accent = (0.11, 0.25, 0.45)

    margin = 48.0

    def __init__(self, c: _Content, rng: random.Random) -> None:
        super().__init__(c)
        if c.vendor.country == "US":
            self.size = (612, 792)
            self.bottom = 720.0
        self.tax_label = "Sales tax" if c.vendor.country == "US" else "VAT"
        self.taxid = "Tax ID" if c.vendor.country == "US" else "VAT ID"

    def columns(self) -> list[_Column]:
        r = self.size[0] - 48
        return [
            _Column("desc", "DESCRIPTION", 48, "left", width=r - 48 - 220),
            _Column("qty", "QTY", r - 160),
            _Column("unit", "UNIT PRICE", r - 80),
            _Column("amount", "AMOUNT", r),
        ]

    def table_header(self, cv: _Canvas, y: float) -> None:
        for col in self.columns():
            cv.text(
                col.x,
                y + 9,
                col.title,
                font="hebo",
                size=7.5,
                color=self.accent,
                align="left" if col.align == "left" else "right",
            )
        cv.line(
            48,
            y + self.head_h - 6,
            self.size[0] - 48,
            y + self.head_h - 6,
            color=self.accent,
            width=1,
        )

    def first_header(self, cv: _Canvas) -> None:
        c, w = self.c, self.size[0]
        cv.rect(0, 0, w, 96, fill=self.accent)
        cv.text(48, 52, c.vendor.name, font="hebo", size=18, color=WHITE, max_width=w - 96 - 120)
        cv.text(48, 70, ", ".join(c.vendor.lines[:2]), size=8.5, color=WHITE)
        cv.text(w - 48, 52, "Invoice", font="hebo", size=22, color=WHITE, align="right")
        # left column: billed to
        cv.text(48, 135, "BILLED TO", font="hebo", size=7.5, color=GRAY)
        y = 150
        for line in [c.customer.name, *c.customer.lines]:
            cv.text(48, y, line, size=9.5 if y == 150 else 9)
            y += 13
        if c.customer.tax_id:
            cv.text(48, y, f"VAT ID {c.customer.tax_id}", size=9)
        # right column: labels, then their values (as many generators emit them)
        labels = ("Invoice number", "Date of issue", "Date due", "Order")
        values = (c.number, c.date(c.issue), c.date(c.due), c.order_no)
        y = 150
        for label in labels:
            cv.text(w - 250, y, label, size=9, color=GRAY)
            y += 13
        y = 150
        for value in values:
            cv.text(w - 48, y, value, size=9, align="right")
            y += 13
        cv.rect(w - 250, 222, w - 48, 262, fill=PALE)
        cv.text(w - 240, 246, "Amount due", font="hebo", size=10)
        cv.text(
            w - 58,
            246,
            f"{_symbol_money(c, c.total)} {c.currency}"
            if c.currency in ("USD", "GBP")
            else _symbol_money(c, c.total),
            font="hebo",
            size=12,
            align="right",
        )

    def totals(self, cv: _Canvas, y: float) -> None:
        c, w = self.c, self.size[0]
        rows = [
            ("Subtotal", c.subtotal),
            (f"{self.tax_label} ({c.tax_rate}%)", c.tax),
            ("Total", c.total),
            ("Amount due", c.total),
        ]
        yy = y + 14
        for n, (label, value) in enumerate(rows):
            font = "hebo" if n == 3 else "helv"
            cv.text(w - 230, yy, label, font=font, size=9)
            cv.text(w - 48, yy, _symbol_money(c, value), font=font, size=9, align="right")
            if n == 2:
                cv.line(w - 230, yy + 5, w - 48, yy + 5)
            yy += 17

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        c, w, h = self.c, self.size[0], self.size[1]
        parts = [c.vendor.name, ", ".join(c.vendor.lines[:2]), f"{self.taxid} {c.vendor.tax_id}"]
        cv.text(48, h - 40, " · ".join(parts), size=7, color=GRAY)
        cv.text(w - 48, h - 40, f"Page {index + 1} of {n_pages}", size=7, color=GRAY, align="right")


class _German(_Layout):
    """DIN 5008 style: letterhead, return-address line over the window, info block, Pos. column."""

    first_top = 370.0
    cont_top = 120.0
    bottom = 740.0
    totals_h = 110.0
    prints_bank_details = True

    margin = 56.0

    def __init__(self, c: _Content, rng: random.Random) -> None:
        super().__init__(c)
        self.due_label = rng_choice(rng, ("Fällig am:", "Fällig:", "Zahlbar bis:"))
        self.tax_label = rng_choice(rng, ("MwSt.", "USt."))
        self.total_label = rng_choice(rng, ("Gesamtbetrag", "Rechnungsbetrag"))
        self.taxid_label = "UID-Nr.:" if c.vendor.country == "AT" else "USt-IdNr.:"

    def columns(self) -> list[_Column]:
        r = self.size[0] - 56
        return [
            _Column("pos", "Pos.", 72),
            _Column("desc", "Bezeichnung", 84, "left", width=r - 84 - 215),
            _Column("qty", "Menge", r - 150),
            _Column("unit", "Einzelpreis", r - 75),
            _Column("amount", "Gesamt", r),
        ]

    def cell_text(self, role: str, i: int) -> str:
        if role == "qty":
            kind = self.c.lines[i][4]
            return f"{self.c.qty(self.c.lines[i][1])} {_GERMAN_UNITS[kind]}"
        return super().cell_text(role, i)

    def before_page(self, cv: _Canvas, index: int, n_pages: int) -> None:
        # Templates often draw the footer first: it lands first in the text layer.
        c, w, h = self.c, self.size[0], self.size[1]
        cv.line(56, h - 72, w - 56, h - 72)
        v = c.vendor
        cols = [
            [v.name, v.lines[0], v.lines[1]],
            [
                f"Geschäftsführer: {rng_name(c)}",
                (
                    f"Firmenbuch FN {c.extras.get('hrb', '12345')}a"
                    if v.country == "AT"
                    else f"Amtsgericht {v.lines[1].split(' ', 1)[1]} HRB {c.extras.get('hrb', '12345')}"
                ),
                f"{self.taxid_label} {v.tax_id}",
            ],
            ["Sparkasse", f"IBAN {c.extras['iban']}", f"BIC {c.extras['bic']}"],
        ]
        for k, col in enumerate(cols):
            y = h - 60
            for line in col:
                cv.text(56 + k * 170, y, line, size=6.5, color=GRAY)
                y += 9
        cv.text(
            w - 56, h - 80, f"Seite {index + 1} von {n_pages}", size=7, color=GRAY, align="right"
        )

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        pass

    def first_header(self, cv: _Canvas) -> None:
        c, w = self.c, self.size[0]
        v = c.vendor
        cv.text(w - 56, 60, v.name, font="hebo", size=14, align="right")
        y = 76
        prefix = "+43" if v.country == "AT" else "+49"
        for line in (
            v.lines[0],
            v.lines[1],
            f"Tel. {prefix} {c.extras.get('phone', '30 1234567')}",
        ):
            cv.text(w - 56, y, line, size=8, color=GRAY, align="right")
            y += 11
        # return address line above the window
        cv.text(70, 130, f"{v.name} · {v.lines[0]} · {v.lines[1]}", size=6.5, color=GRAY)
        cv.line(70, 133, 300, 133, color=GRAY, width=0.4)
        y = 150
        foreign = c.customer.country != c.vendor.country
        for line in [c.customer.name, *c.customer.lines[: 3 if foreign else 2]]:
            cv.text(70, y, line, size=10)
            y += 13  # the info block on the right uses the same grid
        # info block
        rows = [
            ("Rechnungsnummer:", c.number),
            ("Rechnungsdatum:", c.date(c.issue)),
            ("Leistungsdatum:", c.date(c.delivery)),
            ("Kundennummer:", c.customer_no),
            (self.due_label, c.date(c.due)),
        ]
        if c.customer.tax_id:
            rows.append(("Ihre USt-IdNr.:", c.customer.tax_id))
        y = 150
        for label, value in rows:
            cv.text(w - 250, y, label, size=8.5)
            cv.text(w - 56, y, value, size=8.5, align="right")
            y += 13
        cv.text(70, 268, "Rechnung", font="hebo", size=15)
        cv.text(70, 296, "Sehr geehrte Damen und Herren,", size=9.5)
        cv.text(
            70, 310, "wir erlauben uns, Ihnen folgende Leistungen in Rechnung zu stellen:", size=9.5
        )

    def cont_header(self, cv: _Canvas, index: int, n_pages: int, running: Decimal) -> float:
        c = self.c
        cv.text(70, 60, f"{c.vendor.name}", font="hebo", size=10)
        cv.text(self.size[0] - 56, 60, f"Rechnung {c.number}", size=9, align="right")
        cv.text(
            self.size[0] - 56,
            90,
            f"Übertrag: {c.money(running)} {c.currency}",
            size=8.5,
            align="right",
        )
        return self.cont_top

    def carry(self, cv: _Canvas, y: float, running: Decimal) -> None:
        cv.text(
            self.size[0] - 56,
            y + 14,
            f"Übertrag: {self.c.money(running)} {self.c.currency}",
            size=8.5,
            align="right",
        )

    def totals(self, cv: _Canvas, y: float) -> None:
        c, w = self.c, self.size[0]
        rows = [
            ("Zwischensumme", c.subtotal, "helv"),
            (f"zzgl. {c.tax_rate} % {self.tax_label}", c.tax, "helv"),
            (self.total_label, c.total, "hebo"),
        ]
        yy = y + 12
        for label, value, font in rows:
            cv.text(w - 260, yy, label, font=font, size=9)
            cv.text(w - 56, yy, f"{c.money(value)} {c.currency}", font=font, size=9, align="right")
            yy += 15
        cv.line(w - 260, yy - 27, w - 56, yy - 27, color=GRAY)
        text_y = yy + 12
        if c.reverse_charge:
            cv.text(
                70,
                text_y,
                "Steuerschuldnerschaft des Leistungsempfängers (Reverse Charge).",
                size=8.5,
            )
            text_y += 12
        cv.text(70, text_y, f"Zahlbar bis {c.date(c.due)} ohne Abzug.", size=8.5)
        cv.text(70, text_y + 12, "Mit freundlichen Grüßen", size=8.5)


def rng_name(c: _Content) -> str:
    return c.extras.get("manager", "Max Mustermann")


class _Compact(_Layout):
    """Receipt-like: narrow page, monospace, centred header, 'qty x price' lines."""

    size: tuple[float, float] = (260, 620)
    first_top = 200.0
    cont_top = 70.0
    bottom = 575.0
    row_h = 26.0
    head_h = 16.0
    totals_h = 70.0
    font, bold, size_ = "cour", "cobo", 8.0

    def __init__(self, c: _Content, rng: random.Random) -> None:
        super().__init__(c)
        self.number_label = rng_choice(rng, ("Invoice #", "Invoice no."))
        self.taxid = "EIN" if c.vendor.country == "US" else "VAT no."
        self.tax_label = "Tax" if c.vendor.country == "US" else "VAT"

    def adjust(self, plan: list[list[int]]) -> None:
        if len(plan) == 1:  # a receipt is as long as its content
            height = self.first_top + self.head_h + len(plan[0]) * self.row_h + self.totals_h + 70
            self.size = (self.size[0], max(400.0, height))

    def columns(self) -> list[_Column]:
        return [
            _Column("desc", "ITEM", 16, "left", width=228),
            _Column("amount", "AMOUNT", self.size[0] - 16),
        ]

    def table_header(self, cv: _Canvas, y: float) -> None:
        cv.line(16, y - 4, self.size[0] - 16, y - 4, color=GRAY)
        cv.text(16, y + 6, "ITEM", font="cobo", size=8)
        cv.text(self.size[0] - 16, y + 6, "AMOUNT", font="cobo", size=8, align="right")

    def row(self, cv: _Canvas, y: float, i: int) -> None:
        desc, qty, unit, amount, kind = self.c.lines[i]
        desc = fits(desc, 228, "cour", 8)
        self.c.lines[i] = (desc, qty, unit, amount, kind)
        cv.text(16, y + 8, desc, font="cour", size=8)
        cv.text(28, y + 19, f"{self.c.qty(qty)} x {self.c.money(unit)}", font="cour", size=8)
        cv.text(self.size[0] - 16, y + 19, self.c.money(amount), font="cour", size=8, align="right")

    def first_header(self, cv: _Canvas) -> None:
        c, w = self.c, self.size[0]
        cv.text(w / 2, 40, c.vendor.name, font="cobo", size=10, align="center", max_width=w - 32)
        y = 54
        for line in c.vendor.lines[:2]:
            cv.text(w / 2, y, line, font="cour", size=7.5, align="center")
            y += 10
        cv.text(w / 2, y, f"{self.taxid} {c.vendor.tax_id}", font="cour", size=7.5, align="center")
        cv.line(16, 92, w - 16, 92, color=GRAY)
        rows = [
            (self.number_label, c.number),
            ("Date:", c.date(c.issue)),
            ("Due:", c.date(c.due)),
            ("Customer:", c.customer.name),
        ]
        y = 108
        for label, value in rows:
            cv.text(16, y, label, font="cour", size=8)
            cv.text(w - 16, y, value, font="cour", size=8, align="right", max_width=w - 32 - 70)
            y += 12
        cv.text(16, y + 6, f"Currency: {c.currency}", font="cour", size=8)

    def cont_header(self, cv: _Canvas, index: int, n_pages: int, running: Decimal) -> float:
        cv.text(
            self.size[0] / 2,
            40,
            f"{self.c.vendor.name} - {self.c.number}",
            font="cour",
            size=7.5,
            align="center",
        )
        return self.cont_top

    def totals(self, cv: _Canvas, y: float) -> None:
        c, w = self.c, self.size[0]
        cv.line(16, y, w - 16, y, color=GRAY)
        rows = [
            ("Net", c.subtotal, "cour"),
            (f"{self.tax_label} {c.tax_rate}%", c.tax, "cour"),
            (f"TOTAL {c.currency}", c.total, "cobo"),
        ]
        yy = y + 14
        for label, value, font in rows:
            cv.text(16, yy, label, font=font, size=8.5)
            cv.text(w - 16, yy, c.money(value), font=font, size=8.5, align="right")
            yy += 13

    def carry(self, cv: _Canvas, y: float, running: Decimal) -> None:
        cv.text(self.size[0] / 2, y + 12, "(continued)", font="cour", size=7, align="center")

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        w, h = self.size
        if index == n_pages - 1:
            cv.text(
                w / 2, h - 40, "Thank you for your business!", font="cour", size=7.5, align="center"
            )
        cv.text(w / 2, h - 22, f"Page {index + 1}/{n_pages}", font="cour", size=7, align="center")


class _French(_Layout):
    """French facture: FACTURE title, client block right, HT/TVA/TTC totals, legal footer."""

    first_top = 320.0
    totals_h = 95.0
    continued = "Suite page suivante"

    margin = 50.0

    def __init__(self, c: _Content, rng: random.Random) -> None:
        super().__init__(c)
        self.number_label = rng_choice(
            rng, ("Facture N° :", "N° de facture :", "Numéro de facture :")
        )
        self.client_label = rng_choice(rng, ("Client :", "Facturé à :", "Destinataire :"))
        self.taxid = rng_choice(rng, ("N° TVA intracommunautaire :", "N° TVA :"))

    def columns(self) -> list[_Column]:
        r = self.size[0] - 48
        return [
            _Column("desc", "Désignation", 50, "left", width=r - 50 - 230),
            _Column("qty", "Qté", r - 175),
            _Column("unit", "Prix unitaire HT", r - 85),
            _Column("amount", "Montant HT", r),
        ]

    def first_header(self, cv: _Canvas) -> None:
        c, w = self.c, self.size[0]
        v = c.vendor
        cv.text(50, 64, v.name, font="tibo", size=15, max_width=w - 98 - 130)
        cv.text(w - 48, 64, "FACTURE", font="hebo", size=20, align="right")
        y = 82
        for line in v.lines[:2]:
            cv.text(50, y, line, font="tiro", size=9.5)
            y += 12
        cv.text(50, y, f"{self.taxid} {v.tax_id}", font="tiro", size=9.5)
        cv.rect(w - 260, 122, w - 48, 225, color=LIGHT)
        cv.text(w - 250, 138, self.client_label, font="hebo", size=9)
        # meta rows on the left share the client block's baselines
        rows = [
            (self.number_label, c.number),
            ("Date de facture :", c.date(c.issue)),
            ("Date d'échéance :", c.date(c.due)),
            ("N° client :", c.customer_no),
        ]
        client = [c.customer.name, *c.customer.lines]
        if c.customer.tax_id:
            client.append(f"TVA : {c.customer.tax_id}")
        y = 154
        for k in range(max(len(rows), len(client))):
            if k < len(rows):
                cv.text(50, y, f"{rows[k][0]} {rows[k][1]}", size=9)
            if k < len(client):
                cv.text(w - 250, y, client[k], size=9.5 if k == 0 else 9)
            y += 13

    def cont_header(self, cv: _Canvas, index: int, n_pages: int, running: Decimal) -> float:
        c = self.c
        cv.text(52, 60, c.vendor.name, font="tibo", size=11)
        cv.text(self.size[0] - 48, 60, f"Facture {c.number} (suite)", size=9, align="right")
        return self.cont_top

    def totals(self, cv: _Canvas, y: float) -> None:
        c, w = self.c, self.size[0]
        rows = [
            ("Total HT", c.subtotal, "helv"),
            (f"TVA {c.tax_rate} %", c.tax, "helv"),
            ("Total TTC", c.total, "hebo"),
        ]
        cv.rect(w - 240, y, w - 48, y + 56, fill=PALE)
        yy = y + 15
        for label, value, font in rows:
            cv.text(w - 232, yy, label, font=font, size=9)
            cv.text(w - 56, yy, f"{c.money(value)} EUR", font=font, size=9, align="right")
            yy += 16
        note_y = y + 74
        if c.reverse_charge:
            cv.text(
                52,
                note_y,
                "Autoliquidation : TVA due par le preneur (art. 196 directive 2006/112/CE).",
                size=8,
            )
            note_y += 11
        cv.text(
            52,
            note_y,
            f"Conditions de paiement : {(c.due - c.issue).days} jours. "
            "Pénalités de retard : 3 fois le taux d'intérêt légal.",
            size=8,
        )

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        c, w, h = self.c, self.size[0], self.size[1]
        v = c.vendor
        form = v.name.rsplit(" ", 1)[-1]
        cv.line(52, h - 50, w - 48, h - 50)
        siret = c.extras.get("siret", "123 456 789 00012")
        cv.text(
            w / 2,
            h - 38,
            f"{v.name} - {form} au capital de 10 000 EUR - SIRET {siret}",
            size=6.5,
            color=GRAY,
            align="center",
        )
        cv.text(
            w / 2,
            h - 28,
            f"{v.lines[0]}, {v.lines[1]} - {self.taxid} {v.tax_id}",
            size=6.5,
            color=GRAY,
            align="center",
        )
        cv.text(
            w - 48, h - 16, f"Page {index + 1} / {n_pages}", size=6.5, color=GRAY, align="right"
        )


class _Dutch(_Layout):
    """Dutch factuur: logo-less letterhead right, 'Factuur aan' block, BTW totals, KvK footer."""

    first_top = 310.0
    prints_bank_details = True

    margin = 50.0

    def __init__(self, c: _Content, rng: random.Random) -> None:
        super().__init__(c)
        self.number_label = rng_choice(rng, ("Factuurnummer:", "Factuurnr.:"))
        self.customer_label = rng_choice(rng, ("Factuur aan:", "Klant:"))

    def columns(self) -> list[_Column]:
        r = self.size[0] - 50
        return [
            _Column("desc", "Omschrijving", 50, "left", width=r - 50 - 220),
            _Column("qty", "Aantal", r - 165),
            _Column("unit", "Prijs", r - 85),
            _Column("amount", "Bedrag", r),
        ]

    def first_header(self, cv: _Canvas) -> None:
        c, w = self.c, self.size[0]
        v = c.vendor
        cv.text(50, 60, "FACTUUR", font="hebo", size=20, color=(0.1, 0.45, 0.35))
        cv.text(w - 50, 60, v.name, font="hebo", size=12, align="right", max_width=w - 100 - 150)
        y = 75
        for line in (
            *v.lines[:2],
            f"BTW-nummer: {v.tax_id}",
            f"KvK: {c.extras.get('kvk', '12345678')}",
        ):
            cv.text(w - 50, y, line, size=8.5, color=GRAY, align="right")
            y += 11
        cv.text(50, 150, self.customer_label, font="hebo", size=9)
        y = 164
        for line in [c.customer.name, *c.customer.lines]:
            cv.text(50, y, line, size=9.5)
            y += 12
        if c.customer.tax_id:
            cv.text(50, y, f"BTW: {c.customer.tax_id}", size=9)
        rows = [
            (self.number_label, c.number),
            ("Factuurdatum:", c.date(c.issue)),
            ("Vervaldatum:", c.date(c.due)),
            ("Klantnummer:", c.customer_no),
        ]
        y = 164
        for label, value in rows:
            cv.text(w - 230, y, label, font="hebo", size=9)
            cv.text(w - 50, y, value, size=9, align="right")
            y += 12

    def cont_header(self, cv: _Canvas, index: int, n_pages: int, running: Decimal) -> float:
        c = self.c
        cv.text(50, 60, c.vendor.name, font="hebo", size=11)
        cv.text(self.size[0] - 50, 60, f"Factuur {c.number} (vervolg)", size=9, align="right")
        return self.cont_top

    def totals(self, cv: _Canvas, y: float) -> None:
        c, w = self.c, self.size[0]
        rows = [
            ("Subtotaal", c.subtotal, "helv"),
            (f"BTW {c.tax_rate}%", c.tax, "helv"),
            ("Totaal", c.total, "hebo"),
        ]
        yy = y + 14
        for label, value, font in rows:
            cv.text(w - 230, yy, label, font=font, size=9.5)
            cv.text(w - 50, yy, f"EUR {c.money(value)}", font=font, size=9.5, align="right")
            yy += 16
        cv.line(w - 230, yy - 28, w - 50, yy - 28, color=GRAY)
        note = yy + 10
        if c.reverse_charge:
            cv.text(50, note, "BTW verlegd.", size=8.5)
            note += 12
        cv.text(
            50,
            note,
            f"Gelieve het totaalbedrag binnen {(c.due - c.issue).days} dagen over te maken "
            f"onder vermelding van het factuurnummer.",
            size=8.5,
        )

    def footer(self, cv: _Canvas, index: int, n_pages: int) -> None:
        c, w, h = self.c, self.size[0], self.size[1]
        cv.text(
            50,
            h - 34,
            f"IBAN {c.extras['iban']} | BIC {c.extras['bic']} | "
            f"KvK {c.extras.get('kvk', '12345678')}",
            size=7,
            color=GRAY,
        )
        cv.text(
            w - 50, h - 34, f"Pagina {index + 1} van {n_pages}", size=7, color=GRAY, align="right"
        )


# Each layout class, called with the content and a random source for its labels.
_LAYOUT_CLASSES: dict[str, Callable[[_Content, random.Random], _Layout]] = {
    "classic": _Classic,
    "modern": _Modern,
    "german": _German,
    "compact": _Compact,
    "french": _French,
    "dutch": _Dutch,
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def make_invoice(
    seed: int, layout: str | None = None, *, pages: int | None = None, defect: str | None = None
) -> tuple[bytes, Invoice]:
    """A deterministic invoice PDF for `seed` and the truth of what it prints.

    `layout` defaults to `LAYOUTS[seed % len(LAYOUTS)]`; `pages` asks for that many pages
    (line items are added until the table flows over them, totals on the last page);
    `defect="total_mismatch"` prints a total that is not subtotal + tax.
    """
    layout = layout or LAYOUTS[seed % len(LAYOUTS)]
    if layout not in _LAYOUT_CLASSES:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(DEFECTS)}")
    if pages is not None and pages < 1:
        raise ValueError("pages must be >= 1")
    rng = random.Random(f"invoice:{seed}:{layout}")
    plan_rng = random.Random(f"lines:{seed}:{layout}:{pages}")
    # The line count depends on the geometry, which depends on the vendor (Letter vs A4):
    # build the content once with a placeholder count to size the pages, then for real.
    probe = _content(random.Random(f"invoice:{seed}:{layout}"), layout, 1, defect)
    geometry = _LAYOUT_CLASSES[layout](probe, random.Random(f"labels:{seed}"))
    if pages is None:
        n_lines = plan_rng.randint(1, 4 if layout == "compact" else 8)
    else:
        n_lines = geometry.lines_for_pages(pages, plan_rng)
    content = _content(rng, layout, n_lines, defect)
    manager = rng_choice(rng, ("Anna Schulz", "Thomas Wagner", "Sabine Koch", "Jürgen Wolf"))
    hrb = str(rng.randint(10000, 199999))
    account_digits = _digits(rng, 20)  # drawn here so the draws after it stay what they were
    content.extras = {
        "manager": manager,
        "hrb": hrb,
        "phone": f"{rng.randint(30, 899)} {_digits(rng, 7)}",
        "kvk": _digits(rng, 8),
        "siret": f"{_digits(rng, 3)} {_digits(rng, 3)} {_digits(rng, 3)} {_digits(rng, 5)}",
    }
    account = _bank_account(content.vendor.country, content.vendor.lines[1], account_digits)
    drawer = _LAYOUT_CLASSES[layout](content, random.Random(f"labels:{seed}"))
    if account is not None:
        content.extras["iban"], content.extras["bic"] = format_iban(account[0]), account[1]
        if drawer.prints_bank_details:
            content.iban, content.bic = account
    elif drawer.prints_bank_details:
        raise AssertionError(f"{layout} prints bank details, {content.vendor.country} has no IBAN")
    data = drawer.render()
    return data, content.invoice()


def sample_name(index: int, layout: str, defect: str | None = None) -> str:
    return f"invoice-{index:04d}-{layout}" + (f"-{defect.replace('_', '-')}" if defect else "")


def write_samples(
    folder: Path,
    count: int,
    *,
    seed: int = 0,
    expected_folder: Path | None = None,
    pages: int | None = None,
) -> list[Path]:
    """Write `count` invoices (cycling through every layout) as invoice-0001-classic.pdf, ...

    One invoice in the set (the fourth, when count >= 4) carries defect="total_mismatch", so a
    demo run shows a needs_review outcome. With `expected_folder`, the truth of each invoice is
    written there as <name>.json (`Invoice.model_dump_json(indent=2)`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if expected_folder is not None:
        expected_folder = Path(expected_folder)
        expected_folder.mkdir(parents=True, exist_ok=True)
    defect_index = 4 if count >= 4 else None
    written = []
    for index in range(1, count + 1):
        layout = LAYOUTS[(index - 1) % len(LAYOUTS)]
        defect = "total_mismatch" if index == defect_index else None
        data, truth = make_invoice(seed + index, layout, pages=pages, defect=defect)
        name = sample_name(index, layout, defect)
        path = folder / f"{name}.pdf"
        path.write_bytes(data)
        if expected_folder is not None:
            (expected_folder / f"{name}.json").write_text(truth.model_dump_json(indent=2) + "\n")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testing.samples", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", type=Path, help="folder for the PDFs")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--expected", type=Path, default=None, help="folder for the truth JSON files"
    )
    parser.add_argument("--pages", type=int, default=None, help="pages per invoice (default: one)")
    args = parser.parse_args(argv)
    paths = write_samples(
        args.out_dir, args.count, seed=args.seed, expected_folder=args.expected, pages=args.pages
    )
    print(f"wrote {len(paths)} invoices to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
