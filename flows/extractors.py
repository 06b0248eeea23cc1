"""Choosing the extractor for a run: offline rules, or an OpenAI-compatible LLM."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from tasks.extract import Extractor, OfflineExtractor

ExtractorChoice = Literal["auto", "offline", "openai"]


@asynccontextmanager
async def build_extractor(choice: ExtractorChoice) -> AsyncIterator[Extractor]:
    """`auto` uses the LLM when one is configured (OPENAI_API_KEY or OPENAI_BASE_URL), else offline."""
    from tasks.llm import LLMSettings, OpenAIExtractor

    settings = LLMSettings.from_env()
    configured = settings.api_key is not None or settings.base_url is not None
    if choice == "offline" or (choice == "auto" and not configured):
        yield OfflineExtractor()
        return
    if not configured:
        raise ValueError(
            "extractor 'openai' needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local "
            "OpenAI-compatible server)"
        )
    async with OpenAIExtractor(settings) as extractor:
        yield extractor
