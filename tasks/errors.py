"""The two kinds of error: one invoice failed, or the run cannot go ahead.

`InvoiceFailure` ends one invoice as a recorded failure. Every stage raises `InvoiceFailure` (or a subclass) with a stable, machine-readable `code`
and a human message. The pipeline turns it into a `failed` manifest entry; anything else
that escapes a stage is recorded as `internal_error` with its type and message, so nothing
is ever swallowed silently.

`ConfigurationError` is a user mistake in what the run was asked to do (a source that does
not exist, an output that is a file, a manifest that is not ours, a malformed setting): the
run stops before any invoice is touched, and the CLI prints its message as one line and exits
2. Its message says what is wrong and what to do, and never carries a secret.
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


class ConfigurationError(Exception):
    """The run cannot go ahead as configured; the message says what is wrong and what to do."""
