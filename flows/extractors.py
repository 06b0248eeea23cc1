"""Choosing the extractor for a run: offline rules, or an OpenAI-compatible LLM."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prefect.runtime import flow_run
from pydantic import SecretStr

from flows.settings import DEFAULTS, ExtractorChoice
from tasks.errors import ConfigurationError
from tasks.extract.base import Extractor
from tasks.extract.einvoice import EmbeddedFirstExtractor
from tasks.extract.llm import (  # at import: importing openai takes ~0.3 s
    LLMSettings,
    OpenAIExtractor,
)
from tasks.extract.rules import OfflineExtractor
from tasks.orchestration.limits import LLMSlots, ensure_llm_limits
from tasks.pdf.pool import PdfParser


@asynccontextmanager
async def build_extractor(
    choice: ExtractorChoice,
    *,
    parser: PdfParser | None = None,
    api_key: SecretStr | None = None,
    max_in_flight: int = DEFAULTS.max_concurrency,
    slot_lease_seconds: float = DEFAULTS.lease_seconds,
    expected_calls: int | None = None,
) -> AsyncIterator[Extractor]:
    """`auto` uses the LLM when one is configured (an API key or OPENAI_BASE_URL), else offline.

    With a `parser`, every CPU-bound extraction step (the offline rules, the embedded XML,
    the page read that cross-checks it) runs in its pool, off the event loop and under its
    deadline; it is only kept here, so it need not be started yet. Without one they run
    inline (tests, benches that drive extractors directly).

    The LLM's slots follow its calls (`LLMSlots`): none are taken here unless
    `expected_calls` says how many calls are coming (then a first block for them, waited
    for). In a flow run, the run publishes its use on its labels and shares the slots
    fairly with the other runs.

    A malformed LLM setting (e.g. OPENAI_BASE_URL with credentials in it) raises
    `ConfigurationError` here, before any invoice; `offline` does not read those settings.
    """
    if choice == "offline":
        yield _offline(parser)
        return
    settings = LLMSettings.from_env()
    if api_key is not None:
        settings.api_key = api_key
    configured = settings.api_key is not None or settings.base_url is not None
    if choice == "auto" and not configured:
        yield _offline(parser)
        return
    if not configured:
        raise ConfigurationError(
            "extractor 'openai' needs OPENAI_API_KEY (or OPENAI_BASE_URL for a local "
            "OpenAI-compatible server)"
        )
    # LLM calls are capped by Prefect limits, so all runs together stay within the account's.
    in_flight, rate_burst = await ensure_llm_limits(update_existing=False)
    capacity = min(max_in_flight, in_flight, rate_burst)
    async with LLMSlots(
        capacity, lease_seconds=slot_lease_seconds, flow_run_id=flow_run.id
    ) as slots:
        # Built in a worker thread, while the slots are taken: the client's TLS context loads
        # the CA bundle, which would otherwise hold the event loop (bench/README.md).
        building = asyncio.create_task(
            asyncio.to_thread(OpenAIExtractor, settings, call_guard=slots.call)
        )
        try:
            await slots.open(expected=expected_calls)
        except BaseException:
            with contextlib.suppress(Exception):
                await (await building).aclose()
            raise
        async with await building as extractor:
            yield EmbeddedFirstExtractor(extractor, parser=parser)


def _offline(parser: PdfParser | None) -> Extractor:
    if parser is not None:
        # Every invoice is read by the rules in a worker: import them in the forkserver,
        # once, rather than in every fresh worker on its first invoice. (With the LLM, only
        # e-invoices need them there, so those workers import them when one comes.)
        parser.preload("tasks.extract.rules", "tasks.extract.einvoice")
    return EmbeddedFirstExtractor(OfflineExtractor(parser), parser=parser)
