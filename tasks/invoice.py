"""The invoice schema and the checks that make an extraction safe to pay from.

`check_invoice` lists every reason an extraction needs a human look before it is paid, each
as "code: message" with a stable code (the pipeline records them as the needs_review reasons).
Amounts may be negative (credit notes carry negative subtotal, tax, total and line amounts):
every check is a signed comparison, so a credit note whose signs agree passes.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from tasks.checks import (
    due_date_problem,
    iban_problem,
    is_iso4217,
    issue_date_problem,
    tax_id_problem,
)

# Money is exact in memory (Decimal) and a plain JSON number on the wire, so results,
# the manifest and the LLM's JSON schema all speak numbers.
Money = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]

# Amounts are printed to the cent; sums of rounded line amounts may drift by a cent or two.
TOLERANCE = Decimal("0.02")


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(description="What was sold, as printed on the line.")
    quantity: Money | None = Field(default=None, description="Number of units.")
    unit_price: Money | None = Field(default=None, description="Price of one unit, before tax.")
    amount: Money | None = Field(default=None, description="Line total, before tax.")


class Invoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vendor_name: str | None = Field(default=None, description="Who issued the invoice.")
    vendor_tax_id: str | None = Field(default=None, description="Issuer's VAT / tax id.")
    iban: str | None = Field(default=None, description="IBAN to pay to, without spaces.")
    bic: str | None = Field(default=None, description="BIC / SWIFT code of the payee's bank.")
    customer_name: str | None = Field(default=None, description="Who is billed.")
    invoice_number: str | None = Field(default=None, description="The invoice's own number.")
    issue_date: date | None = Field(default=None, description="Date of issue (ISO 8601).")
    due_date: date | None = Field(default=None, description="Payment due date (ISO 8601).")
    currency: str | None = Field(default=None, description="ISO 4217 code, e.g. EUR.")
    subtotal: Money | None = Field(default=None, description="Total before tax.")
    tax: Money | None = Field(default=None, description="Total tax.")
    total: Money | None = Field(default=None, description="Amount due, tax included.")
    line_items: list[LineItem] = Field(default_factory=list)


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
    amounts = [line.amount for line in invoice.line_items]
    if invoice.line_items and invoice.subtotal is not None and None not in amounts:
        line_sum = sum(amounts, Decimal(0))
        if abs(line_sum - invoice.subtotal) > TOLERANCE:
            problems.append(
                f"lines_sum_mismatch: line amounts sum to {line_sum}, subtotal is {invoice.subtotal}"
            )
    if None not in (invoice.subtotal, invoice.tax, invoice.total):
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
