"""The one error type that ends an invoice as a recorded failure.

Every stage raises `InvoiceFailure` (or a subclass) with a stable, machine-readable `code`
and a human message. The pipeline turns it into a `failed` manifest entry; anything else
that escapes a stage is recorded as `internal_error` with its type and message, so nothing
is ever swallowed silently.
"""

from __future__ import annotations


class InvoiceFailure(Exception):
    """A per-invoice failure with a stable code (e.g. `pdf_encrypted`, `llm_timeout`)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable

    def __reduce__(self):  # survives the trip back from a process pool
        return (_rebuild, (type(self), self.code, self.message, self.retryable))


def _rebuild(cls, code, message, retryable):
    return cls(code, message, retryable=retryable)
