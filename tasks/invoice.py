"""The invoice schema: what every extractor returns and the pipeline stores.

Amounts may be negative (credit notes carry negative subtotal, tax, total and line amounts).
The checks that make an extraction safe to pay from (`check_invoice`) are in `tasks.checks`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

# Money is exact in memory (Decimal) and a plain JSON number on the wire, so results,
# the manifest and the LLM's JSON schema all speak numbers.
Money = Annotated[Decimal, PlainSerializer(float, return_type=float, when_used="json")]


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
