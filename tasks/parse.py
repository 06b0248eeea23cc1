"""PDF text extraction with PyMuPDF, off the event loop."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParsedDocument:
    """Text of every page, in reading order."""

    pages: list[str]

    @property
    def page_count(self) -> int:
        return len(self.pages)

    @property
    def text(self) -> str:
        return "\n\f".join(self.pages)
