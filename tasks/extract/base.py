"""The extraction interface: what every extractor (offline rules, LLM, embedded e-invoice)
takes and gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from tasks.invoice import Invoice
from tasks.pdf.parse import ParsedDocument


@dataclass
class Extraction:
    invoice: Invoice
    source: Literal["text", "llm", "embedded_xml"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    notes: list[str] = field(default_factory=list)
    # Reasons for review the extractor itself found ("code: message"), on top of the checks.
    problems: list[str] = field(default_factory=list)


class Extractor(Protocol):
    name: str

    async def extract(self, document: ParsedDocument) -> Extraction: ...
